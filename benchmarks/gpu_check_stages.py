"""The stages of ``benchmarks/gpu_check.py`` (what each checks is in that file's docstring).

Each runner takes ``(stage, plan, device, from_src)``, records its cells on ``stage`` through
:meth:`Stage.check` (which skips a cell once time is up) and may return extra data for the
record. Inputs, tolerances and timing come from what the project already has:
``tests/helpers.py`` (random inputs, the "twice PyTorch's own error vs float64" rule),
:mod:`normkit.reference` (the truth) and :mod:`normkit.bench` (cases, implementations, timer,
copy bandwidth, tables).
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import torch

import normkit
from normkit import reference as ref
from normkit.backends import get_backend, select_backend, use_backend
from normkit.bench import cases as C
from normkit.bench.copy_bandwidth import copy_bandwidth
from normkit.bench.impls import implementations
from normkit.bench.report import markdown_table
from normkit.bench.runner import _add_ratios, machine_info, run_cases
from normkit.bench.timing import measure

from helpers import assert_close_to_truth, max_err, params, randn  # tests/helpers.py

REPO = Path(__file__).resolve().parents[1]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GRAD_NAMES = ("dx", "dresidual", "dweight", "dbias")


# --- the Triton backend, forced (and, for the tests of this check, broken on purpose) ---------


@contextlib.contextmanager
def _wrapped(obj, method: str, wrapper) -> Iterator[None]:
    """Replace ``obj.method`` by ``wrapper(original, *args)`` inside the block."""
    own = vars(obj).get(method)  # an instance attribute already there (another wrapper)
    original = getattr(obj, method)
    setattr(obj, method, lambda *args: wrapper(original, *args))
    try:
        yield
    finally:
        if own is None:
            delattr(obj, method)  # the class's method shows through again
        else:
            setattr(obj, method, own)


def _off_by_one(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[:1] += 1.0
    return t


def _bad_forward(original, *args):
    res = original(*args)
    return res._replace(y=_off_by_one(res.y))


def _bad_backward(original, *args):
    res = original(*args)
    return res if res.dx is None else res._replace(dx=_off_by_one(res.dx))


@contextlib.contextmanager
def forced_triton(fault: Optional[str] = None) -> Iterator[None]:
    """Every normkit call in the block runs the Triton backend (float64 falls back to the
    reference); ``fault`` makes its forward or backward off by one in one element."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(use_backend("triton"))
        if fault is not None:
            bad = {"forward": _bad_forward, "backward": _bad_backward}[fault]
            stack.enter_context(_wrapped(get_backend("triton"), "fused_" + fault, bad))
        yield


def _assert_triton_runs(x2d: torch.Tensor, dropout_p: float = 0.0) -> None:
    chosen = select_backend(x2d, dropout_p).name
    assert chosen == "triton", f"the call went to the {chosen!r} backend, not Triton"


def environment(device: str, mode: str) -> dict:
    info = machine_info(device)
    with contextlib.suppress(ImportError):
        import triton

        info["triton"] = triton.__version__
    info["triton_interpret"] = os.environ.get("TRITON_INTERPRET") == "1"
    if device == "cuda":
        info["cudnn"] = torch.backends.cudnn.version()
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    return {"mode": mode, "machine": info}


# --- correctness --------------------------------------------------------------------------------


def _to(t: Optional[torch.Tensor], device: str, dtype=None, grad: bool = True) -> Optional[torch.Tensor]:
    if t is None:
        return None
    return t.detach().to(device=device, dtype=dtype or t.dtype).requires_grad_(grad)


def _outputs_and_grads(fn, is_rms, x, r, w, b, eps, dy, ds, **kwargs) -> Dict[str, torch.Tensor]:
    """``y`` (and ``s`` with a residual) of ``fn`` (normkit's or the reference's), and the
    gradients of ``sum(y * dy) + sum(s * ds)`` for every input given."""
    prenorm = r is not None
    n = x.shape[-1]
    args = (w, eps) if is_rms else (w, b, eps)
    out = fn(x, (n,), *args, residual=r, prenorm=prenorm, **kwargs)
    y, s = out if prenorm else (out, None)
    loss = (y.double() * dy).sum() + ((s.double() * ds).sum() if prenorm else 0.0)
    named = [(k, t) for k, t in zip(GRAD_NAMES, (x, r, w, b)) if t is not None]
    grads = torch.autograd.grad(loss, [t for _, t in named])
    return {"y": y, **({"s": s} if prenorm else {}), **{k: g for (k, _), g in zip(named, grads)}}


def _against_truth(is_rms, x, r, w, b, dy, ds, *, eps, rows, keep=None, dropout_p=0.0) -> dict:
    """normkit (Triton forced by the caller) against float64 truth, allowed twice the error of
    the reference run in the input dtype; returns each output's error and PyTorch's."""
    device = x.device.type
    public = normkit.rms_norm if is_rms else normkit.layer_norm
    reference = ref.rms_norm if is_rms else ref.layer_norm
    if dropout_p:
        torch.manual_seed(1234)  # the mask's seed comes from torch's generator
    got = _outputs_and_grads(public, is_rms, x, r, w, b, eps, dy, ds, dropout_p=dropout_p)
    replay = dict(keep_mask=keep, dropout_p=dropout_p) if dropout_p else {}
    truth = _outputs_and_grads(reference, is_rms, *(_to(t, device, torch.float64) for t in (x, r, w, b)),
                               eps, dy, ds, **replay)
    base = _outputs_and_grads(reference, is_rms, *(_to(t, device) for t in (x, r, w, b)), eps, dy, ds, **replay)
    detail = {}
    for k, g in got.items():
        assert g.dtype == base[k].dtype and g.shape == truth[k].shape, \
            f"{k}: got {g.dtype}{list(g.shape)}, expected {base[k].dtype}{list(truth[k].shape)}"
        # dweight/dbias are sums over rows: their rounding grows like sqrt(rows)
        floor = 2e-5 * math.sqrt(rows) if k in ("dweight", "dbias") else 2e-5
        assert_close_to_truth(g, truth[k], base[k], floor=floor, what=k)
        detail[k] = {"err": max_err(g, truth[k]), "torch_err": max_err(base[k], truth[k])}
    return {"outputs": detail, "got": got}


def _inputs(rows, n, dtype, device, *, is_rms, residual=True, affine=True, offset=0.0, seed=0):
    x = _to(randn((rows, n), dtype, seed=seed, offset=offset), device)
    r = _to(randn((rows, n), dtype, seed=seed + 10), device) if residual else None
    w, b = params((n,), dtype, seed=seed + 20)
    w, b = (_to(w, device), None if is_rms else _to(b, device)) if affine else (None, None)
    dy = randn((rows, n), torch.float64, seed=seed + 30).to(device)
    ds = randn((rows, n), torch.float64, seed=seed + 40).to(device)
    return x, r, w, b, dy, ds


def _case(device, rows, n, dtype, *, is_rms, residual=True, affine=True, offset=0.0, seed=0):
    def run():
        x, r, w, b, dy, ds = _inputs(rows, n, dtype, device, is_rms=is_rms, residual=residual, affine=affine,
                                     offset=offset, seed=seed)
        _assert_triton_runs(x.detach())
        out = _against_truth(is_rms, x, r, w, b, dy, ds, eps=1e-6 if is_rms else 1e-5, rows=rows)
        return {"outputs": out["outputs"]}
    return run


def _dropout_case(device, rows, n, dtype, *, is_rms, p=0.3):
    """The keep mask is read back from the kernel (dropout of ones, same seed), then y, s and
    every gradient must follow the reference replaying that mask; dx is exactly 0 where dropped."""
    def run():
        x, r, w, b, dy, ds = _inputs(rows, n, dtype, device, is_rms=is_rms, seed=n + 5)
        _assert_triton_runs(x.detach(), p)
        fn = normkit.rms_norm if is_rms else normkit.layer_norm
        torch.manual_seed(1234)
        with torch.no_grad():
            _, s1 = fn(torch.ones_like(x), (n,), residual=torch.zeros_like(x), prenorm=True, dropout_p=p)
        keep = s1 != 0
        kept, sigma = keep.double().mean().item(), math.sqrt(p * (1 - p) / keep.numel())
        assert abs(kept - (1 - p)) < 5 * sigma + 1e-9, f"kept {kept:.4f} of the elements, expected {1 - p}"
        out = _against_truth(is_rms, x, r, w, b, dy, ds, eps=1e-6 if is_rms else 1e-5, rows=rows,
                             keep=keep, dropout_p=p)
        assert torch.equal(out["got"]["dx"] == 0, ~keep), "dx must vanish exactly where x was dropped"
        return {"outputs": out["outputs"], "kept": kept}
    return run


def _nan_rows_case(device, rows, n, dtype):
    def run():
        x, _, w, b, dy, _ = _inputs(rows, n, dtype, device, is_rms=False, residual=False, seed=n + 7)
        with torch.no_grad():
            x[1, n // 2] = float("nan")
            x[2, 0] = float("inf")
        _assert_triton_runs(x.detach())
        y = normkit.layer_norm(x, (n,), w, b)
        (dx,) = torch.autograd.grad((y.double() * dy).sum(), (x,))
        clean = [i for i in range(rows) if i not in (1, 2)]
        xc = x.detach()[clean]
        truth = ref.layer_norm(xc.double(), (n,), w.double(), b.double())
        assert_close_to_truth(y[clean], truth, ref.layer_norm(xc, (n,), w, b), floor=2e-5, what="y of clean rows")
        assert torch.isnan(y[1]).all() and torch.isnan(y[2]).all(), "a row with NaN/Inf must be all NaN"
        assert torch.isfinite(dx[clean]).all(), "a NaN row leaked into another row's gradient"
        return {"outputs": {"y": {"err": max_err(y[clean], truth)}}}
    return run


def _strided_case(device, rows, n, dtype, *, is_rms):
    """Row-strided views (x and residual interleaved in one buffer) and a permuted 3-D input."""
    def run():
        base = _to(randn((rows, 2, n + 1), dtype, seed=n + 9), device)
        x, r = base[:, 0, 1:], base[:, 1, :-1]
        assert not x.is_contiguous() and not r.is_contiguous()
        w, b = params((n,), dtype, seed=n + 10)
        w, b = _to(w, device), None if is_rms else _to(b, device)
        dy, ds = (randn((rows, n), torch.float64, seed=s).to(device) for s in (n + 11, n + 12))
        views = _against_truth(is_rms, x, r, w, b, dy, ds, eps=1e-6 if is_rms else 1e-5, rows=rows)["outputs"]
        cube = _to(randn((n, 3, rows), dtype, seed=n + 13).to(device).permute(1, 2, 0), device, grad=False)
        cube.requires_grad_(True)  # (3, rows, n) with the normalized dim the slowest: a copy is needed
        dyc = randn(cube.shape, torch.float64, seed=n + 14).to(device)
        permuted = _against_truth(is_rms, cube, None, w, b, dyc, None, eps=1e-6 if is_rms else 1e-5, rows=3 * rows)
        return {"outputs": {**views, **{f"permuted {k}": v for k, v in permuted["outputs"].items()}}}
    return run


def run_correctness(stage, plan, device, from_src):
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    op_name = {False: "layer_norm", True: "rms_norm"}
    wide = plan.wide
    # the special cases first: each covers a path the main sweep does not
    for n in (517, wide):
        for dtype in (torch.float32, torch.bfloat16):
            for is_rms in (False, True):
                stage.check(f"dropout p=0.3 {op_name[is_rms]} {plan.rows(n)}x{n} {names[dtype]}",
                            _dropout_case(device, plan.rows(n), n, dtype, is_rms=is_rms))
    for n in (1000, wide):
        for dtype in (torch.float32, torch.bfloat16):
            stage.check(f"mean 1e4 layer_norm {plan.rows(n)}x{n} {names[dtype]}",
                        _case(device, plan.rows(n), n, dtype, is_rms=False, residual=False, offset=1e4, seed=7))
        stage.check(f"NaN/Inf rows layer_norm {max(plan.rows(n), 4)}x{n} fp32",
                    _nan_rows_case(device, max(plan.rows(n), 4), n, torch.float32))
    for dtype in (torch.bfloat16, torch.float32):
        for is_rms in (False, True):
            stage.check(f"strided {op_name[is_rms]} {names[dtype]}", _strided_case(device, 9, 39, dtype, is_rms=is_rms))
    for n in (1000, wide):
        for is_rms in (False, True):
            stage.check(f"no residual, no affine {op_name[is_rms]} {plan.rows(n)}x{n} fp16",
                        _case(device, plan.rows(n), n, torch.float16, is_rms=is_rms, residual=False, affine=False,
                              seed=3))
    # the main sweep: every width, dtype and op, with residual + prenorm and gain/bias
    for n in plan.widths:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for is_rms in (False, True):
                stage.check(f"residual+prenorm {op_name[is_rms]} {plan.rows(n)}x{n} {names[dtype]}",
                            _case(device, plan.rows(n), n, dtype, is_rms=is_rms, seed=n))


# --- determinism, gradcheck, torch.compile --------------------------------------------------------


def run_determinism(stage, plan, device, from_src):
    for rows, n in plan.determinism_shapes:
        for dtype in (torch.bfloat16, torch.float32):
            def run(rows=rows, n=n, dtype=dtype):
                t = C.make_inputs(C.Case("add_layer_norm", "bwd", rows, n, dtype), device, seed=rows + n)
                leaves = [t[k].requires_grad_(True) for k in ("x", "residual", "weight", "bias")]
                _assert_triton_runs(leaves[0].detach())
                y, s = normkit.layer_norm(leaves[0], (n,), leaves[2], leaves[3], residual=leaves[1], prenorm=True)
                runs = [torch.autograd.grad((y, s), leaves, (t["dy"], t["ds"]), retain_graph=True) for _ in range(3)]
                for i, k in enumerate(GRAD_NAMES):
                    for other in runs[1:]:
                        assert torch.equal(runs[0][i], other[i]), f"{k} differs between two identical backward passes"
                return {"runs": len(runs)}
            stage.check(f"dx, dresidual, dW, dB bitwise x3: layer_norm+residual {rows}x{n} {C.dtype_name(dtype)}", run)


def run_gradcheck(stage, plan, device, from_src):
    stage.note = ("float64 is not a Triton dtype: gradcheck runs the reference backend through the op's "
                  "dispatch and autograd on this device; Triton's gradients are checked in 'correctness'")
    for is_rms in (False, True):
        def run(is_rms=is_rms):
            x, r, w, b, _, _ = _inputs(4, 7, torch.float64, device, is_rms=is_rms, seed=31)
            inputs = tuple(t for t in (x, r, w, b) if t is not None)
            if is_rms:
                def f(x, r, w):
                    return normkit.rms_norm(x, (7,), w, 1e-6, residual=r, prenorm=True)
            else:
                def f(x, r, w, b):
                    return normkit.layer_norm(x, (7,), w, b, residual=r, prenorm=True)
            assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6), "gradcheck returned False"
            return {"backend": select_backend(x.detach(), 0.0).name}
        stage.check(f"gradcheck float64 {'rms_norm' if is_rms else 'layer_norm'} residual+prenorm 4x7", run)


class _Block(torch.nn.Module):
    """Linear, then normkit's LayerNorm with the prenorm residual stream, then RMSNorm."""

    def __init__(self, width: int):
        super().__init__()
        self.fc = torch.nn.Linear(width, width)
        self.ln = normkit.nn.LayerNorm(width)
        self.rms = normkit.nn.RMSNorm(width)

    def forward(self, x, h):
        y, h = self.ln(self.fc(x), h, prenorm=True)
        return self.rms(y) + h


def run_compile(stage, plan, device, from_src):
    rows, width = plan.compile_shape

    def run():
        calls: List[str] = []
        backend = get_backend("triton")
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = _Block(width).to(device)
        x = torch.randn(rows, width, device=device, requires_grad=True)
        h = torch.randn(rows, width, device=device)
        eager = model(x, h)
        ge = torch.autograd.grad(eager.sum(), (x, model.ln.weight, model.rms.weight))
        with _wrapped(backend, "fused_forward", lambda f, *a: calls.append("fwd") or f(*a)), \
                _wrapped(backend, "fused_backward", lambda f, *a: calls.append("bwd") or f(*a)):
            compiled = torch.compile(model, fullgraph=True, backend="inductor")(x, h)
            gc = torch.autograd.grad(compiled.sum(), (x, model.ln.weight, model.rms.weight))
        torch._dynamo.reset()
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
        for name, a, c in zip(("dx", "dW ln", "dW rms"), gc, ge):
            torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
        # first call traces (fake kernels) and runs; at least one real forward and backward per norm
        assert calls.count("fwd") >= 2 and calls.count("bwd") >= 2, f"Triton calls inside the graph: {calls}"
        return {"triton_calls": {"fwd": calls.count("fwd"), "bwd": calls.count("bwd")}}

    stage.check(f"torch.compile(fullgraph=True, inductor): Linear + LayerNorm(prenorm) + RMSNorm {rows}x{width} fp32",
                run)


# --- kernel timing ---------------------------------------------------------------------------


def _f64(a):
    return a.double() if torch.is_tensor(a) else a


def _spot_check(case: C.Case, device: str) -> dict:
    """normkit's forward on the timed shape against float64, on the first and last rows (where
    an offset overflow would show), with the correctness stage's tolerance."""
    t = C.make_inputs(case, device, seed=0)
    x, r, n, prenorm = t["x"], t["residual"], case.width, case.has_residual
    args = (t["weight"], C.EPS) if case.is_rms else (t["weight"], t["bias"], C.EPS)
    fn, rfn = (normkit.rms_norm, ref.rms_norm) if case.is_rms else (normkit.layer_norm, ref.layer_norm)
    detail: Dict[str, float] = {}
    with torch.no_grad():
        _assert_triton_runs(x)
        got = fn(x, (n,), *args, residual=r, prenorm=prenorm)
        for part in (slice(0, min(256, case.rows)), slice(max(0, case.rows - 256), case.rows)):
            xs, rs = x[part], None if r is None else r[part]
            truth = rfn(xs.double(), (n,), *map(_f64, args), residual=_f64(rs), prenorm=prenorm)
            base = rfn(xs, (n,), *args, residual=rs, prenorm=prenorm)
            for name, g, tr, bs in zip(("y", "s"), *((o,) if not prenorm else o for o in (got, truth, base))):
                assert_close_to_truth(g[part], tr, bs, floor=2e-5, what=f"{name} rows {part.start}:{part.stop}")
                detail[name] = max(detail.get(name, 0.0), max_err(g[part], tr))
    return detail


def _time_group(cases, impls, device, copy_gbps, plan, caps, spent) -> List[dict]:
    """Time one (op, shape, dtype) in every direction, one implementation at a time, so each
    one's seconds (its compilations included) count against its own cap; one row per direction."""
    rows: Optional[List[dict]] = None
    for impl in impls:  # normkit first: its rows carry the case's fields
        if impl.unavailable is None and spent[impl.name] >= caps.get(impl.name, math.inf):
            impl.unavailable = f"time budget ({caps[impl.name]:.0f} s of the kernels stage) spent"
        if impl.unavailable is not None:
            timed = [{"impls": {impl.name: {"skipped": impl.unavailable}}} for _ in cases]
        else:
            t0 = time.perf_counter()
            timed = run_cases(cases, [impl], device, copy_gbps, warmup=plan.warmup, repeats=plan.repeats)
            spent[impl.name] += time.perf_counter() - t0
        if rows is None:
            rows = timed
        else:
            for row, other in zip(rows, timed):
                row["impls"].update(other["impls"])
    for row in rows:
        _add_ratios(row)
    return rows


def run_kernels(stage, plan, device, from_src):
    impls = implementations(device)
    available = {i.name: i.unavailable or "available" for i in impls}
    caps = {name: share * stage.budget_s for name, share in plan.impl_share.items()}
    spent = {i.name: 0.0 for i in impls}
    copy = copy_bandwidth(device, plan.copy_bytes, warmup=max(1, plan.warmup), repeats=max(3, plan.repeats))
    results: List[dict] = []
    groups = [(op, dtype_name, m, n) for ops, row_counts in plan.kernel_sweep for dtype_name in plan.kernel_dtypes
              for op in ops for n in plan.kernel_widths for m in row_counts]
    for op, dtype_name, m, n in groups:
        cases = C.make_cases([op], C.DIRECTIONS, [(m, n)], DTYPES[dtype_name])

        def run(cases=cases):
            detail = {"forward_err": _spot_check(cases[0], device)}
            rows = _time_group(cases, impls, device, copy.gbps, plan, caps, spent)
            results.extend(rows)
            for row in rows:
                mine = row["impls"]["normkit"]
                assert "error" not in mine, f"normkit {row['direction']}: {mine.get('error')}"
            return detail

        stage.check(f"{op} {m}x{n} {dtype_name}", run)
    copy_end = copy_bandwidth(device, copy.nbytes, warmup=max(1, plan.warmup), repeats=max(3, plan.repeats))
    doc = {
        "command": "python benchmarks/gpu_check.py (kernels stage)",
        "machine": machine_info(device),
        "config": {"device": device, "warmup": plan.warmup, "repeats": plan.repeats, "backend": "triton",
                   "compile": True, "quick": False, "seed": 0},
        "copy_bandwidth": {**copy.as_dict(), "end_gbps": copy_end.gbps},
        "implementations": available,
        "seconds_spent": {k: round(v, 1) for k, v in spent.items()},
        "results": results,
    }
    return doc


# --- LayerNormLSTM / GRU against torch.nn (cuDNN) ------------------------------------------------


def _rnn_step(model, x):
    model.zero_grad(set_to_none=True)
    out, state = model(x)
    h = state[0] if isinstance(state, tuple) else state
    (out.sum() + h.sum()).backward()


def run_rnn(stage, plan, device, from_src):
    from bench_rnn import SHAPES  # benchmarks/bench_rnn.py: the recorded CPU table's shapes

    shapes = plan.rnn_shapes or tuple(SHAPES)
    table: List[dict] = []
    for kind, torch_cls, nk_cls in (("LSTM", torch.nn.LSTM, normkit.nn.LayerNormLSTM),
                                    ("GRU", torch.nn.GRU, normkit.nn.LayerNormGRU)):
        def agree(kind=kind, nk_cls=nk_cls, shape=shapes[0]):
            T, B, H = shape
            torch.manual_seed(0)
            fast = nk_cls(H, H).to(device)
            slow = nk_cls(H, H).to(device)
            slow.load_state_dict(fast.state_dict())
            slow.fast_path = False
            x = torch.randn(T, B, H, device=device)
            outs = []
            for model in (fast, slow):
                xi = x.clone().requires_grad_(True)
                out, _ = model(xi)
                outs.append((out, *torch.autograd.grad(out.sum(), (xi, model.weight_hh_l0))))
            for name, a, b in zip(("output", "dx", "dW_hh"), *outs):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")

        stage.check(f"LayerNorm{kind} fused path = per-step reference {shapes[0]}", agree)
        for T, B, H in shapes:
            def run(T=T, B=B, H=H, kind=kind, torch_cls=torch_cls, nk_cls=nk_cls):
                torch.manual_seed(0)
                x = torch.randn(T, B, H, device=device)
                ms = {}
                for name, model in (("torch", torch_cls(H, H).to(device)), ("normkit", nk_cls(H, H).to(device))):
                    timing = measure(lambda model=model: _rnn_step(model, x), device, warmup=plan.warmup,
                                     repeats=plan.repeats)
                    ms[name] = timing.median_s * 1e3
                row = {"cell": kind, "seq": T, "batch": B, "hidden": H, "torch_ms": ms["torch"],
                       "normkit_ms": ms["normkit"], "normkit_over_torch": ms["normkit"] / ms["torch"]}
                table.append(row)
                return row
            stage.check(f"time {kind} fwd+bwd (seq, batch, hidden) = ({T}, {B}, {H})", run)
    return {"rows": table, "torch_baseline": "cuDNN" if device == "cuda" else "torch's CPU kernels"}


# --- tests/test_triton_backend.py under pytest ------------------------------------------------


def run_suite(stage, plan, device, from_src):
    name = "pytest tests/test_triton_backend.py" + (f" -k '{plan.suite_select}'" if plan.suite_select else "")
    if importlib.util.find_spec("pytest") is None:
        stage.skip(name, "pytest is not installed")
        return None
    timeout = stage.time_left()
    if timeout < 15:
        stage.skip(name, stage.skip_reason() or f"only {timeout:.0f} s left")
        return None
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", "tests/test_triton_backend.py"]
    cmd += ["-k", plan.suite_select] if plan.suite_select else []
    env = dict(os.environ, PYTHONUNBUFFERED="1")  # what ran before a timeout is still in the pipe
    if from_src:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        output, timed_out = proc.stdout + proc.stderr, False
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        timed_out = True
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", output)}
    progress = "".join(line.split("[")[0].strip() for line in output.splitlines()
                       if re.fullmatch(r"[.sFExX]+(\s+\[\s*\d+%\])?", line.strip()))
    failures = [line for line in output.splitlines() if line.startswith(("FAILED", "ERROR"))]
    if timed_out and "F" not in progress and "E" not in progress:
        stage.skip(name, f"time budget: stopped after {len(progress)} tests, none failed")
        return {"output_tail": output[-3000:]}

    def verdict():
        assert not timed_out, f"timed out; failures before that: {progress.count('F')}"
        assert proc.returncode == 0, f"pytest exit status {proc.returncode}: " + "; ".join(failures[:5])
        return {"counts": counts}

    stage.check(name, verdict)
    return {"output_tail": output[-3000:]}


RUNNERS = {
    "correctness": run_correctness, "determinism": run_determinism, "gradcheck": run_gradcheck,
    "compile": run_compile, "kernels": run_kernels, "rnn": run_rnn, "suite": run_suite,
}


# --- the Markdown report ---------------------------------------------------------------------


def markdown(record: dict) -> str:
    m = record["machine"]
    pins = record.get("pins", {})
    versions = f"torch {m['torch']}, Triton {m.get('triton', '-')}"
    pinned = f"torch=={pins.get('torch', '?')}, triton=={pins.get('triton', '?')}"
    differs = m["torch"].split("+")[0] != pins.get("torch") or m.get("triton") != pins.get("triton")
    where = (f"{m.get('gpu')} (CUDA {m.get('cuda')}, sm_{m.get('capability', '?').replace('.', '')})"
             if record["mode"] == "gpu" else
             f"dry run: CPU ({m.get('cpu')}) through Triton's interpreter at tiny sizes; NOT a GPU result")
    lines = [
        f"# normkit gpu-check: {record['status'].upper()}",
        "",
        "| | |", "|---|---|",
        f"| date (UTC) | {record['started_utc']} |",
        f"| device | {where} |",
        f"| commit | {record.get('commit') or 'unknown (no git checkout)'} |",
        f"| versions | {versions} (pinned: {pinned}{'; **differ**' if differs else ''}) |",
        f"| wall time | {record['wall_s']:.0f} s of a {record['budget_s']:.0f} s budget |",
        f"| command | `{record['command']}` |",
        "",
        "| stage | status | passed | wrong | skipped | wall s | budget s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, st in record["stages"].items():
        c = st["counts"]
        lines.append(f"| {name} | {st['status']} | {c['pass']} | {c['fail'] + c['error']} | {c['skipped']} | "
                     f"{st['wall_s']:.1f} | {st['budget_s']:.0f} |")
    if record["failures"]:
        lines += ["", "## Wrong results", ""] + [f"- {f}" for f in record["failures"]]
    skipped = [(name, c) for name, st in record["stages"].items() for c in st["cells"] if c["status"] == "skipped"]
    unselected = [s for s in skipped if s[1]["reason"] == "not selected by --cells"]
    skipped = [s for s in skipped if s not in unselected]
    if skipped or unselected:
        lines += ["", f"## Skipped ({len(skipped) + len(unselected)})", ""]
        if unselected:
            lines.append(f"- {len(unselected)} cells not selected by --cells")
        lines += [f"- {name}: {c['name']}: {c['reason']}" for name, c in skipped[:40]]
        if len(skipped) > 40:
            lines.append(f"- ... and {len(skipped) - 40} more (all in the JSON)")
    notes = [f"- {name}: {st['note']}" for name, st in record["stages"].items() if st.get("note")]
    if notes:
        lines += ["", "## Notes", ""] + notes
    if "correctness" in record["stages"]:
        lines += ["", "## Correctness: worst error / PyTorch's own error, against float64", "",
                  "| case | status | worst output | error | torch error |", "|---|---|---|---|---|"]
        for c in record["stages"]["correctness"]["cells"]:
            outs = c.get("outputs") or {}
            if outs:
                k, v = max(outs.items(), key=lambda kv: kv[1]["err"] / max(kv[1].get("torch_err", 0.0), 1e-12))
                torch_err = f"{v['torch_err']:.3g}" if "torch_err" in v else "-"
                lines.append(f"| {c['name']} | {c['status']} | {k} | {v['err']:.3g} | {torch_err} |")
            else:
                lines.append(f"| {c['name']} | {c['status']} | - | - | - |")
    if record.get("kernels", {}).get("results"):
        lines += ["", "## Kernels", "", markdown_table(record["kernels"])]
    if record.get("rnn", {}).get("rows"):
        lines += ["", f"## LayerNormLSTM / GRU against torch.nn ({record['rnn']['torch_baseline']}), fwd+bwd", "",
                  "| cell | (seq, batch, hidden) | torch ms | normkit ms | normkit / torch |", "|---|---|---|---|---|"]
        for r in record["rnn"]["rows"]:
            lines.append(f"| {r['cell']} | ({r['seq']}, {r['batch']}, {r['hidden']}) | {r['torch_ms']:.2f} | "
                         f"{r['normkit_ms']:.2f} | {r['normkit_over_torch']:.2f}x |")
    return "\n".join(lines) + "\n"
