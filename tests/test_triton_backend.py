"""Triton-specific tests: what the shared suite (tests/test_backends.py) does not reach.

Run on CPU tensors through Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest.py when
there is no GPU) or on a GPU. The looped (wide-row) path is forced on small inputs with a
backend whose whole-row limit is a few bytes; dropout masks come from Triton's Philox stream,
not torch's, so they are recovered from the kernel (dropout applied to x = ones) and the
reference is replayed with the recovered mask.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest
import torch

import normkit
from normkit import reference as ref
from normkit.backends import get_backend, select_backend

from helpers import assert_close_to_truth, backend_or_skip, params, randn

triton_backend = pytest.importorskip("normkit.backends.triton")
TritonBackend, launch_config = triton_backend.TritonBackend, triton_backend.launch_config


@pytest.fixture
def device():
    backend_or_skip("triton")
    return "cuda" if torch.cuda.is_available() else "cpu"


def looped(loop_block_n: int = 16, min_tile: int = 64) -> TritonBackend:
    """A backend that takes the looped path for every width, with a few rows per tile."""
    return TritonBackend(max_fused_bytes=1, loop_block_n=loop_block_n, min_tile=min_tile)


def _inputs(rows, n, dtype, device, *, seed=0, offset=0.0):
    x = randn((rows, n), dtype, seed=seed, offset=offset).to(device)
    r = randn((rows, n), dtype, seed=seed + 1).to(device)
    w, b = (t.to(device) for t in params((n,), torch.float32, seed=seed + 2))
    dy = randn((rows, n), dtype, seed=seed + 3).to(device)
    dsum = randn((rows, n), dtype, seed=seed + 4).to(device)
    return x, r, w, b, dy, dsum


def _compare(got, want, dtype, what):
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-2)
    for name, g, t in zip(what, got, want):
        if t is None:
            assert g is None, f"{name}: expected None, got a tensor"
            continue
        assert g.dtype == t.dtype and g.shape == t.shape, f"{name}: got {g.dtype}{list(g.shape)}, expected {t.dtype}{list(t.shape)}"
        torch.testing.assert_close(g, t, **tol, msg=lambda m: f"{name}: {m}")


def _check_backend_vs_reference(backend, rows, n, dtype, device, *, is_rms, residual, affine, offset=0.0, seed=0):
    x, r, w, b, dy, dsum = _inputs(rows, n, dtype, device, seed=seed, offset=offset)
    r = r if residual else None
    dsum = dsum if residual else None
    w = w if affine else None
    b = None if (is_rms or not affine) else b
    eps = 1e-6 if is_rms else 1e-5
    store = residual
    got = backend.forward(x, r, w, b, eps, is_rms, 0.0, 0, store)
    want = ref.norm_forward(x, r, w, b, eps, is_rms, None, 0.0, store)
    _compare(got, want, dtype, ("y", "s", "mean", "rstd"))
    s = got[1] if store else x
    got_b = backend.backward(dy, dsum, s, w, got[2], got[3], is_rms, 0.0, 0)
    want_b = ref.norm_backward(dy, dsum, s, w, want[2], want[3], is_rms, None, 0.0)
    _compare(got_b, want_b, dtype, ("dx", "dresidual", "dweight", "dbias"))


# --- launch configuration


def test_launch_config_keeps_rows_whole_while_they_fit_then_loops():
    fits = launch_config(4096, 16384, 4, backward=False, sm_count=132)
    assert fits.single_pass and fits.block_n == 16384 and fits.grid == 4096
    assert not launch_config(4096, 16384, 4, backward=False, sm_count=132, dropout=True).single_pass
    assert not launch_config(4096, 16384, 4, backward=False, sm_count=132, max_fused_bytes=32768).single_pass
    wide = launch_config(4096, 65536, 2, backward=False, sm_count=132)
    assert not wide.single_pass and wide.block_n < 65536 and wide.block_m == 1
    assert launch_config(4096, 8192, 2, backward=True, sm_count=132).single_pass
    assert not launch_config(4096, 8192, 2, backward=True, sm_count=132, dropout=True).single_pass
    assert not launch_config(4096, 16384, 2, backward=True, sm_count=132).single_pass
    # a backward with dy1 (four accumulators) gets half the elements per thread, at most 32 warps
    heavy = launch_config(4096, 1000, 2, backward=True, sm_count=132, second_output=True)
    assert heavy.block_m * heavy.block_n == 2048 and heavy.num_warps == 16, heavy
    assert not launch_config(4096, 8192, 2, backward=True, sm_count=132, second_output=True).single_pass


def test_launch_config_packs_rows_for_small_widths_and_bounds_the_backward_grid():
    small = launch_config(10000, 64, 2, backward=False, sm_count=132)
    assert small.block_m * small.block_n >= 4096 and small.grid == math.ceil(10000 / small.block_m)
    assert launch_config(3, 64, 2, backward=False, sm_count=132).block_m == 4  # not more rows than exist
    bwd = launch_config(100000, 4096, 2, backward=True, sm_count=132)
    assert bwd.grid <= 132 * 32 and bwd.grid < math.ceil(100000 / bwd.block_m)
    for cfg in (small, bwd, launch_config(7, 1, 4, backward=True, sm_count=132)):
        assert 1 <= cfg.num_warps <= 32 and cfg.num_warps & (cfg.num_warps - 1) == 0


# --- the looped (wide-row) path


@pytest.mark.parametrize("is_rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n", [1, 3, 16, 100])
def test_looped_path_matches_reference(device, is_rms, dtype, n):
    _check_backend_vs_reference(looped(), 7, n, dtype, device, is_rms=is_rms, residual=True, affine=True, seed=n)


@pytest.mark.parametrize("is_rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_looped_path_without_residual_or_affine(device, is_rms):
    _check_backend_vs_reference(looped(), 5, 77, torch.float32, device, is_rms=is_rms, residual=False, affine=False, seed=3)


@pytest.mark.parametrize("backend", [TritonBackend(), looped(8)], ids=["single_pass", "looped"])
def test_variance_is_exact_at_a_large_mean(device, backend):
    """x = 1e4 + randn: E[s^2] - E[s]^2 would lose every digit. The looped path (shifted data,
    chunks merged by Chan's formula) must stay within 2x torch's own float32 error of the
    float64 truth, like the two-pass single-pass path."""
    x, _, w, b, _, _ = _inputs(6, 203, torch.float32, device, seed=4, offset=1e4)
    got = backend.forward(x, None, w, b, 1e-5, False, 0.0, 0, False)
    fp32 = ref.norm_forward(x, None, w, b, 1e-5, False, None, 0.0, False)
    truth = ref.norm_forward(x.double(), None, w.double(), b.double(), 1e-5, False, None, 0.0, False)
    for i, what in ((0, "y"), (2, "mean"), (3, "rstd")):
        assert_close_to_truth(got[i], truth[i], fp32[i], floor=1e-7, what=what)


def test_width_65536_runs_looped_by_default(device):
    x, _, w, b, dy, _ = _inputs(2, 65536, torch.float32, device, seed=5)
    assert not get_backend("triton")._config(x, backward=False).single_pass
    with normkit.use_backend("triton"):
        xg, wg, bg = (t.clone().requires_grad_(True) for t in (x, w, b))
        y = normkit.layer_norm(xg, 65536, wg, bg)
        grads = torch.autograd.grad(y, (xg, wg, bg), dy)
    x64, w64, b64 = (t.double().requires_grad_(True) for t in (x, w, b))
    y64 = ref.layer_norm(x64, 65536, w64, b64)
    truth = torch.autograd.grad(y64, (x64, w64, b64), dy.double())
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    for g, t in zip(grads, truth):
        torch.testing.assert_close(g.double(), t, rtol=1e-4, atol=1e-4)


# --- dropout: Philox mask from (seed, row, col), regenerated in backward


def triton_keep_mask(backend, seed, rows, n, p, device):
    """The keep mask the kernels use for ``(seed, rows, n, p)``: dropout applied to x = ones."""
    ones = torch.ones((rows, n), device=device)
    _, s, _, _ = backend.forward(ones, None, None, None, 1e-5, False, p, seed, True)
    kept = s != 0
    torch.testing.assert_close(s[kept], torch.full_like(s[kept], 1 / (1 - p)))
    return kept


def test_dropout_keep_rate_and_independence(device):
    p, rows, n = 0.25, 64, 500
    keep = triton_keep_mask(get_backend("triton"), 1234, rows, n, p, device).double()
    total = rows * n
    sigma = math.sqrt(p * (1 - p) / total)
    assert abs(keep.mean().item() - (1 - p)) < 5 * sigma, f"kept {keep.mean().item():.4f}, expected {1 - p}"
    # Every row and column gets its own stream: no two rows (or columns) share a pattern.
    assert len({tuple(row.tolist()) for row in keep.bool()}) == rows
    assert len({tuple(col.tolist()) for col in keep.bool().t()}) == n
    # Per-row keep rates scatter like Binomial(n, 1 - p) / n, not more (a broken counter repeats).
    row_sd = keep.mean(1).std().item()
    assert 0.5 * math.sqrt(p * (1 - p) / n) < row_sd < 1.5 * math.sqrt(p * (1 - p) / n)


def test_dropout_mask_is_a_function_of_seed_only(device):
    p = 0.4
    a = triton_keep_mask(get_backend("triton"), 7, 9, 70, p, device)
    assert torch.equal(a, triton_keep_mask(get_backend("triton"), 7, 9, 70, p, device))
    assert not torch.equal(a, triton_keep_mask(get_backend("triton"), 8, 9, 70, p, device))
    # Same mask whatever the tiling: the looped path draws the same numbers.
    assert torch.equal(a, triton_keep_mask(looped(), 7, 9, 70, p, device))


@pytest.mark.parametrize("backend", [TritonBackend(), looped()], ids=["single_pass", "looped"])
@pytest.mark.parametrize("is_rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_dropout_backward_regenerates_the_forward_mask(device, backend, is_rms):
    p, seed, rows, n = 0.3, 99, 11, 45
    x, r, w, b, dy, dsum = _inputs(rows, n, torch.float32, device, seed=6)
    b = None if is_rms else b
    keep = triton_keep_mask(backend, seed, rows, n, p, device)
    got = backend.forward(x, r, w, b, 1e-5, is_rms, p, seed, True)
    want = ref.norm_forward(x, r, w, b, 1e-5, is_rms, keep, p, True)
    _compare(got, want, torch.float32, ("y", "s", "mean", "rstd"))
    got_b = backend.backward(dy, dsum, got[1], w, got[2], got[3], is_rms, p, seed)
    want_b = ref.norm_backward(dy, dsum, want[1], w, want[2], want[3], is_rms, keep, p)
    _compare(got_b, want_b, torch.float32, ("dx", "dresidual", "dweight", "dbias"))
    assert torch.equal(got_b[0] == 0, ~keep), "dx must vanish exactly where x was dropped"
    other = backend.backward(dy, dsum, got[1], w, got[2], got[3], is_rms, p, seed + 1)[0]
    assert not torch.equal(other, got_b[0]), "backward ignored the seed"


def test_dropout_through_the_public_api_is_reproducible(device):
    x, r, w, b, _, _ = _inputs(8, 33, torch.float32, device, seed=7)
    with normkit.use_backend("triton"):
        torch.manual_seed(0)
        first = normkit.layer_norm(x, 33, w, b, residual=r, dropout_p=0.2)
        torch.manual_seed(0)
        again = normkit.layer_norm(x, 33, w, b, residual=r, dropout_p=0.2)
        other = normkit.layer_norm(x, 33, w, b, residual=r, dropout_p=0.2)
    assert torch.equal(first, again) and not torch.equal(first, other)


# --- determinism, dtypes, layouts


@pytest.mark.parametrize("backend", [TritonBackend(min_tile=2048), looped(32, min_tile=128)], ids=["single_pass", "looped"])
def test_weight_and_bias_gradients_are_bitwise_deterministic(device, backend):
    rows, n = 100, 96
    x, _, w, _, dy, _ = _inputs(rows, n, torch.bfloat16, device, seed=8)
    cfg = backend._config(dy, backward=True)
    y, _, mean, rstd = backend.forward(x, None, w, None, 1e-5, False, 0.0, 0, False)
    runs = [backend.backward(dy, None, x, w, mean, rstd, False, 0.0, 0) for _ in range(2)]
    for a, c in zip(*runs):
        assert torch.equal(a, c), "two identical backward passes gave different bits"
    want = ref.norm_backward(dy, None, x, w, mean, rstd, False, None, 0.0)
    torch.testing.assert_close(runs[0][2], want[2], rtol=1e-4, atol=1e-4 * math.sqrt(rows))
    torch.testing.assert_close(runs[0][3], want[3], rtol=1e-4, atol=1e-4 * math.sqrt(rows))
    # several row tiles per persistent program, so the partial sums span tiles
    if device == "cpu":  # the interpreter's 2-program grid; a GPU has more programs than tiles here
        assert math.ceil(rows / cfg.block_m) > cfg.grid > 1, cfg


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_outputs_round_to_nearest(device, dtype):
    """Outputs round once from float32 to nearest even, as torch does (the interpreter's own
    bfloat16 cast truncates; the fused sum must come out bit-identical)."""
    x, r, w, b, _, _ = _inputs(6, 257, dtype, device, seed=9)
    y, s, _, _ = get_backend("triton").forward(x, r, w, b, 1e-5, False, 0.0, 0, True)
    y_ref, s_ref, _, _ = ref.norm_forward(x, r, w, b, 1e-5, False, None, 0.0, True)
    assert torch.equal(s, s_ref), "the fused sum must round exactly as the reference's"
    ulp = torch.finfo(dtype).eps * y_ref.double().abs().clamp_min(1.0)
    assert ((y.double() - y_ref.double()).abs() <= ulp).all()


def test_strided_inputs_through_the_public_api(device):
    base = randn((9, 2, 40), torch.bfloat16, seed=10).to(device)
    x, r = base[:, 0, 1:], base[:, 1, :-1]  # (9, 39) views with row stride 80
    assert not x.is_contiguous()
    w, _ = params((39,), seed=11)
    with normkit.use_backend("triton"):
        y, s = normkit.rms_norm(x, 39, w.to(device), residual=r, prenorm=True)
    y_ref, s_ref = ref.rms_norm(x.contiguous(), 39, w.to(device), residual=r.contiguous(), prenorm=True)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0)
    torch.testing.assert_close(y, y_ref, rtol=1e-2, atol=2e-2)


# --- selection rules


def test_forced_triton_runs_supported_dtypes_and_float64_falls_back(device):
    x = torch.ones(2, 3, device=device)
    with normkit.use_backend("triton"):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            assert select_backend(x.to(dtype)).name == "triton"
        assert select_backend(x.double()).name == "reference"
        y = normkit.layer_norm(randn((4, 5), torch.float64, seed=12).to(device), 5)
    assert y.dtype == torch.float64


def test_cpu_tensors_are_not_sent_to_triton_unless_forced(device):
    assert select_backend(torch.ones(2, 3)).name != "triton"


def test_unavailable_reasons_are_sentences():
    without = triton_backend._unavailable_reason(False, "off")
    assert "TRITON_INTERPRET=1" in without
    assert "after Triton was imported" in triton_backend._unavailable_reason(False, "too late")


_SUBPROCESS = """
import sys, torch, normkit
from normkit.backends import select_backend
from normkit import reference as ref
assert "normkit.backends.triton_kernels" not in sys.modules, "kernels imported before first use"
x = torch.randn(4, 37)
y = normkit.layer_norm(x, 37)
assert torch.allclose(y, ref.layer_norm(x, 37), atol=1e-5)
print(select_backend(x).name, "normkit.backends.triton_kernels" in sys.modules)
"""


def test_environment_variable_selects_triton_in_a_fresh_process(device):
    if device != "cpu":
        pytest.skip("checks the interpreter path")
    env = {"PATH": os.environ.get("PATH", ""), "TRITON_INTERPRET": "1", "NORMKIT_BACKEND": "triton"}
    out = subprocess.run([sys.executable, "-c", _SUBPROCESS], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["triton", "True"]


# --- the kernels compile for a real GPU (the interpreter never runs Triton's compiler)


def test_kernels_compile_for_sm90_without_spilling():
    triton_home = os.path.dirname(__import__("importlib").util.find_spec("triton").origin)
    if not os.path.exists(os.path.join(triton_home, "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this Triton ships no ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    script = os.path.join(os.path.dirname(__file__), "triton_aot.py")
    out = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 6 and all("REG:" in line for line in lines), out.stdout
    for line in lines:  # without dropout, and with every fused option, the configs must not spill
        if "dropout=0" in line or "all-options" in line:
            assert set(re.findall(r"STACK:(\d+)", line)) == {"0"}, line


# --- torch.compile


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_with_triton_forced(device, compiler, monkeypatch):
    """The custom op is opaque to the compiler: the graph holds one node per norm and runs the
    Triton kernels (interpreted on CPU) inside it."""
    calls = []
    backend = get_backend("triton")
    for method in ("forward", "backward"):
        original = getattr(backend, "fused_" + method)
        monkeypatch.setattr(backend, "fused_" + method, lambda *a, _f=original, _m=method: calls.append(_m) or _f(*a))
    torch._dynamo.reset()

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(24, 24)
            self.ln = normkit.nn.LayerNorm(24)
            self.rms = normkit.nn.RMSNorm(24)

        def forward(self, x, h):
            y, h = self.ln(self.fc(x), h, prenorm=True)
            return self.rms(y) + h

    model = Block().to(device)
    x, h = randn((5, 24), seed=13).to(device).requires_grad_(True), randn((5, 24), seed=14).to(device)
    with normkit.use_backend("triton"):
        eager = model(x, h)
        compiled = torch.compile(model, fullgraph=True, backend=compiler)(x, h)
    torch.testing.assert_close(compiled, eager)
    ge = torch.autograd.grad(eager.sum(), (x, model.ln.weight))
    gc = torch.autograd.grad(compiled.sum(), (x, model.ln.weight))
    for a, b in zip(ge, gc):
        torch.testing.assert_close(a, b)
    assert calls.count("forward") >= 4 and calls.count("backward") >= 4, calls
    torch._dynamo.reset()
