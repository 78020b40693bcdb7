"""The implementations ``normkit bench`` compares, behind one forward signature.

Every implementation is a function ``f(x, residual, weight, bias)`` returning ``y``, or
``(y, s)`` with ``s = x + residual`` for the ``add_*`` ops (the pre-norm output). The timing
harness (:mod:`normkit.bench.runner`) derives the forward, backward and forward+backward
measurements from it, so every implementation is timed the same way.

============  ==================================================================  ============
name          what                                                               devices
============  ==================================================================  ============
``normkit``   :func:`normkit.layer_norm` / :func:`normkit.rms_norm` with          cpu, cuda
              ``residual=``/``prenorm=`` (the default backend for the device,
              or the one forced with ``--backend``)
``torch``     :func:`torch.nn.functional.layer_norm` / ``rms_norm`` in eager     cpu, cuda
              mode, the residual add as a separate op
``compile``   the same eager function under ``torch.compile(dynamic=False)``     cpu, cuda
``liger``     Liger-Kernel's autograd functions (``LigerLayerNormFunction``,     cuda
              ``LigerRMSNormFunction``, ``LigerFusedAddRMSNormFunction``)
``quack``     QuACK's ``quack.rmsnorm.rmsnorm`` (with ``residual=``,             cuda
              ``prenorm=``) and its LayerNorm forward (``layernorm_fwd``)
============  ==================================================================  ============

An implementation that lacks an op or a direction returns ``None`` from ``make`` and shows as
"-" in the table; one that cannot be imported is listed with the reason and skipped.
Third-party adapters follow those projects' public APIs; they are only exercised on a GPU.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

from normkit.bench.cases import EPS, Case

ForwardFn = Callable  # f(x, residual, weight, bias) -> y | (y, s)


@dataclass
class Impl:
    """One column group of the table."""

    name: str
    devices: tuple
    make: Callable[[Case], Optional[ForwardFn]]
    #: why it cannot run here (``None`` when it can)
    unavailable: Optional[str] = None


# --- normkit -----------------------------------------------------------------------------------


def _make_normkit(case: Case) -> ForwardFn:
    import normkit

    prenorm = case.has_residual
    if case.is_rms:
        def f(x, r, w, b):
            return normkit.rms_norm(x, x.shape[-1:], w, EPS, residual=r, prenorm=prenorm)
    else:
        def f(x, r, w, b):
            return normkit.layer_norm(x, x.shape[-1:], w, b, EPS, residual=r, prenorm=prenorm)
    return f


# --- torch eager and torch.compile -----------------------------------------------------------
# Module-level functions (not closures) so Dynamo sees one code object per op.


def torch_layer_norm(x, r, w, b):
    return F.layer_norm(x, x.shape[-1:], w, b, EPS)


def torch_rms_norm(x, r, w, b):
    return F.rms_norm(x, x.shape[-1:], w, EPS)


def torch_add_layer_norm(x, r, w, b):
    s = x + r
    return F.layer_norm(s, s.shape[-1:], w, b, EPS), s


def torch_add_rms_norm(x, r, w, b):
    s = x + r
    return F.rms_norm(s, s.shape[-1:], w, EPS), s


_TORCH = {
    "layer_norm": torch_layer_norm,
    "rms_norm": torch_rms_norm,
    "add_layer_norm": torch_add_layer_norm,
    "add_rms_norm": torch_add_rms_norm,
}


def _make_torch(case: Case) -> ForwardFn:
    return _TORCH[case.op]


# One compiled function per (op, shape, dtype): the backward and forward+backward cases share
# the graph compiled with gradients, the forward case adds the inference graph.
_compiled: dict = {}


def reset_compiled() -> None:
    """Forget compiled functions and Dynamo's caches (called when the shape changes, so the
    cache never reaches Dynamo's recompile limit and silently falls back to eager)."""
    if _compiled:  # no Dynamo import (seconds) when nothing was compiled
        _compiled.clear()
        torch._dynamo.reset()


def _make_compile(case: Case) -> ForwardFn:
    key = (case.op, case.rows, case.width, case.dtype)
    if key not in _compiled:
        _compiled[key] = torch.compile(_TORCH[case.op], dynamic=False)
    return _compiled[key]


# --- Liger-Kernel ------------------------------------------------------------------------------


def _make_liger(case: Case) -> Optional[ForwardFn]:
    # Positional arguments as in liger_kernel.transformers.functional: (X, W, eps) for layer
    # norm plus B; (X, W, eps, offset, casting_mode, in_place) for RMS norm. in_place=False:
    # in-place backward would overwrite dy, which the harness reuses across repeats.
    if case.op == "layer_norm":
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction

        return lambda x, r, w, b: LigerLayerNormFunction.apply(x, w, b, EPS)
    if case.op == "rms_norm":
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        return lambda x, r, w, b: LigerRMSNormFunction.apply(x, w, EPS, 0.0, "llama", False)
    if case.op == "add_rms_norm":
        try:  # added in Liger-Kernel 0.6
            from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction
        except ImportError:
            return None
        return lambda x, r, w, b: LigerFusedAddRMSNormFunction.apply(x, r, w, EPS, 0.0, "llama", False)
    return None  # no fused add + layer norm in Liger


# --- QuACK -------------------------------------------------------------------------------------


def _make_quack(case: Case) -> Optional[ForwardFn]:
    if case.is_rms:
        from quack.rmsnorm import rmsnorm

        if case.has_residual:
            return lambda x, r, w, b: rmsnorm(x, w, residual=r, eps=EPS, prenorm=True)
        return lambda x, r, w, b: rmsnorm(x, w, eps=EPS)
    if case.op == "layer_norm" and case.direction == "fwd":
        # QuACK's LayerNorm is forward-only and wants float32 weight and bias.
        # Newer releases: quack.rmsnorm.layernorm_fwd(x, w, b, eps); older ones:
        # quack.layernorm.layernorm(x, w, eps) without a bias (a negligible N*4 bytes less).
        try:
            from quack.rmsnorm import layernorm_fwd

            def run(x, w32, b32):
                return layernorm_fwd(x, w32, b32, eps=EPS)
        except ImportError:
            try:
                from quack.layernorm import layernorm
            except ImportError:
                return None

            def run(x, w32, b32):
                return layernorm(x, w32, eps=EPS)
        cache = {}

        def f(x, r, w, b):
            if "wb" not in cache:  # converted once, outside the timed calls after warm-up
                cache["wb"] = (w.float(), b.float())
            return run(x, *cache["wb"])

        return f
    return None


def _import_reason(module: str, device: str, devices: tuple) -> Optional[str]:
    if device not in devices:
        return f"runs on {'/'.join(devices)} only"
    try:
        if importlib.util.find_spec(module) is None:
            return f"not installed (no module {module!r})"
        importlib.import_module(module)
    except Exception as exc:  # a broken install must not stop the benchmark
        return f"cannot import {module}: {type(exc).__name__}: {exc}"
    return None


IMPL_NAMES = ("normkit", "torch", "compile", "liger", "quack")


def implementations(device: str, *, compile: bool = True,
                    third_party: bool = True) -> List[Impl]:
    """The implementations to measure on ``device``, each with ``unavailable`` set when it
    cannot run here (not installed, wrong device, ``--no-compile``)."""
    impls = [
        Impl("normkit", ("cpu", "cuda"), _make_normkit),
        Impl("torch", ("cpu", "cuda"), _make_torch),
        Impl("compile", ("cpu", "cuda"), _make_compile, None if compile else "skipped (--no-compile)"),
    ]
    if device == "cuda" and third_party:
        impls.append(Impl("liger", ("cuda",), _make_liger, _import_reason("liger_kernel", device, ("cuda",))))
        impls.append(Impl("quack", ("cuda",), _make_quack, _import_reason("quack", device, ("cuda",))))
    return impls
