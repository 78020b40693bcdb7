"""Run the benchmark: for every case and implementation, time forward, backward, or both.

How each direction is timed, the same way for every implementation ``f`` (see
:mod:`normkit.bench.impls`):

* ``fwd``: ``f(x, r, w, b)`` under :func:`torch.no_grad` (inference: nothing is saved).
* ``bwd``: the forward runs once, untimed, with ``x, r, w, b`` requiring gradients; then
  ``torch.autograd.grad(outputs, inputs, (dy[, ds]), retain_graph=True)`` is timed alone, so
  no forward work is inside the number. It produces ``dx (, dr), dw (, db)``.
* ``fwd+bwd``: the forward with gradients enabled and that backward, timed together (a
  training step's share of the norm).

Achieved bandwidth is ``case.bytes / median time`` (:mod:`normkit.bench.cases`), and
``frac_copy`` its fraction of the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import contextlib
import os
import platform
from typing import Callable, Dict, List, Optional, Sequence

import torch

from normkit._machine import cpu_model
from normkit.bench.cases import Case, dtype_name, make_inputs
from normkit.bench.impls import Impl, reset_compiled
from normkit.bench.timing import measure


def build_call(f: Callable, case: Case, tensors: Dict[str, Optional[torch.Tensor]]) -> Callable[[], object]:
    """The zero-argument callable that the timer calls for ``case.direction``."""
    x, r, w, b = (tensors[k] for k in ("x", "residual", "weight", "bias"))
    if case.direction == "fwd":
        def run_fwd():
            with torch.no_grad():
                return f(x, r, w, b)

        return run_fwd

    leaves = [None if t is None else t.detach().requires_grad_() for t in (x, r, w, b)]
    inputs = [t for t in leaves if t is not None]
    grads = (tensors["dy"], tensors["ds"]) if case.has_residual else (tensors["dy"],)

    def forward():
        with torch.enable_grad():
            out = f(*leaves)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    if case.direction == "bwd":
        outputs = forward()  # built once, outside the timed region
        if len(outputs) != len(grads):
            raise RuntimeError(f"{case.op}: expected {len(grads)} outputs, got {len(outputs)}")
        return lambda: torch.autograd.grad(outputs, inputs, grads, retain_graph=True)
    return lambda: torch.autograd.grad(forward(), inputs, grads)


def normkit_backend_name(x: torch.Tensor) -> str:
    """The backend :func:`normkit.layer_norm` dispatches ``x`` to (forced or default)."""
    from normkit.backends import select_backend

    return select_backend(x.reshape(-1, x.shape[-1]), 0.0).name


def run_cases(cases: Sequence[Case], impls: Sequence[Impl], device: str, copy_gbps: float, *,
              warmup: int, repeats: int, seed: int = 0,
              on_result: Optional[Callable[[dict], None]] = None) -> List[dict]:
    """Measure every case with every available implementation; one result dict per case."""
    results: List[dict] = []
    inputs_key, tensors = None, None
    for case in cases:
        key = (case.op, case.rows, case.width, case.dtype)
        if key != inputs_key:  # the directions of one op and shape share their inputs
            tensors = None
            reset_compiled()
            if device == "cuda":
                torch.cuda.empty_cache()
            tensors, inputs_key = make_inputs(case, device, seed), key
        row = {
            "op": case.op, "direction": case.direction, "rows": case.rows, "width": case.width,
            "dtype": dtype_name(case.dtype), "bytes": case.bytes,
            "normkit_backend": normkit_backend_name(tensors["x"]), "impls": {},
        }
        for impl in impls:
            row["impls"][impl.name] = _measure_impl(impl, case, tensors, device, copy_gbps, warmup, repeats)
        _add_ratios(row)
        results.append(row)
        if on_result is not None:
            on_result(row)
    return results


def _measure_impl(impl: Impl, case: Case, tensors, device: str, copy_gbps: float,
                  warmup: int, repeats: int) -> dict:
    if impl.unavailable is not None:
        return {"skipped": impl.unavailable}
    call = None
    try:
        f = impl.make(case)
        if f is None:
            return {"skipped": f"no {case.op} {case.direction} in {impl.name}"}
        call = build_call(f, case, tensors)
        timing = measure(call, device, warmup=warmup, repeats=repeats)
    except Exception as exc:  # one failing implementation must not end a long sweep
        if device == "cuda" and isinstance(exc, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    finally:
        del call
    gbps = case.bytes / timing.median_s / 1e9
    return {"ms": timing.median_s * 1e3, "gbps": gbps, "frac_copy": gbps / copy_gbps,
            "timing": timing.as_dict()}


#: A timing is too noisy for a ratio with fewer samples than this, or a slowest sample more than
#: MAX_SPREAD times the fastest (a stalled run on a loaded machine moves the median of a few).
MIN_SAMPLES = 5
MAX_SPREAD = 1.5


def unreliable(timing: dict) -> Optional[str]:
    """Why a timing (:meth:`Timing.as_dict`) cannot carry a ratio, or ``None``."""
    why = []
    if timing["samples"] < MIN_SAMPLES:
        why.append(f"{timing['samples']} samples (< {MIN_SAMPLES})")
    spread = timing["max_ms"] / timing["min_ms"] if timing["min_ms"] > 0 else float("inf")
    if spread > MAX_SPREAD:
        why.append(f"max/min {spread:.2f} (> {MAX_SPREAD})")
    return ", ".join(why) or None


def _add_ratios(row: dict) -> None:
    """``speedup``: other implementation's time / normkit's time (> 1: normkit is faster);
    ``unreliable``: the ratios whose timings are too noisy to read (:func:`unreliable`)."""
    mine = row["impls"].get("normkit", {})
    if "ms" not in mine:
        return
    mine["speedup"] = {
        name: other["ms"] / mine["ms"]
        for name, other in row["impls"].items()
        if name != "normkit" and "ms" in other
    }
    flags = {}
    for name in mine["speedup"]:
        why = [f"{who}: {r}" for who, entry in (("normkit", mine), (name, row["impls"][name]))
               if "timing" in entry and (r := unreliable(entry["timing"])) is not None]
        if why:
            flags[name] = "; ".join(why)
    if flags:
        mine["unreliable"] = flags


def machine_info(device: str) -> dict:
    """What the numbers depend on: processor or GPU, threads, library versions."""
    info = {
        "device": device,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        import normkit

        info["normkit"] = normkit.__version__
    except Exception:  # pragma: no cover - normkit is what runs this
        pass
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
        with contextlib.suppress(Exception):
            import triton

            info["triton"] = triton.__version__
    for name in ("liger_kernel", "quack"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            info[name] = version(name.replace("_", "-") if name == "liger_kernel" else "quack-kernels")
    return info
