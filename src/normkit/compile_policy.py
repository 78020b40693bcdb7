r"""What a norm call becomes when ``torch.compile`` traces it: torch ops, or normkit's custom op.

:func:`normkit.dispatch.route` asks :func:`traced_route` for every call traced by Dynamo
(``torch.compile``; not ``torch.export``, ONNX export, ``make_fx`` or ``jit.trace``, which keep
the custom op). The answer is a key of :data:`normkit.dispatch.ROUTES`:

* ``"composite"``, the *decomposition*: the reference composite (:func:`normkit.paths.composite_norm`,
  which *is* normkit's semantics: float32 statistics for 16-bit input, the refined two-pass
  mean and variance, one rounding). Inductor sees plain aten ops, fuses the norm with the
  residual add before it and the matmul epilogue / activation after it, and derives a backward
  it fuses the same way, as it does for ``torch.nn.LayerNorm``;
* ``"op"``: ``normkit::norm_fwd`` / ``norm_bwd``, opaque to inductor: every tensor crossing it
  is written to memory and read back, and the graph is split around it.

The default (``"auto"``) was chosen by measurement (``normkit bench --suite compile``,
BENCHMARKS.md "Compiled models"): on CPU, a converted tiny Llama and a pre-LN transformer
block train as fast as the compiled torch originals with the decomposition and measurably
slower with the op. The op is kept where the decomposition would change what runs:

* dropout (``dropout_p > 0`` in training): the op draws the mask's seed inside the graph, a
  fresh one per call; the composite draws it in Python (``.item()``), which Dynamo would bake
  into the graph or break it at;
* a backend forced with :func:`normkit.backends.use` or ``$NORMKIT_BACKEND``: the user asked
  for those kernels.

:func:`use` overrides the choice (``"decompose"`` / ``"op"``), as ``$NORMKIT_COMPILE_NORM``
does. A function compiled under one :func:`use` mode is retraced under another (Dynamo
guards on it); ``$NORMKIT_COMPILE_NORM`` and a forced backend are read once while tracing and
baked into the graph, as the backend choice is (``torch._dynamo.reset()`` retraces).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

import torch

from normkit import _torch_private as private
from normkit.backends import forced_backend

__all__ = ["MODES", "ENV_VAR", "use", "current", "traced_route"]

#: ``auto``: the measured default; ``decompose``: always the torch ops (except dropout, which
#: needs the op's in-graph seed); ``op``: always the custom op.
MODES = ("auto", "decompose", "op")
ENV_VAR = "NORMKIT_COMPILE_NORM"

#: Devices where the measured default is the decomposition (CPU: inductor's C++ backend;
#: see BENCHMARKS.md "Compiled models"). CUDA keeps the Triton kernels' op until measured.
DECOMPOSE_ON = frozenset({"cpu"})

# A module global, not a context variable: Dynamo reads it while tracing and guards on it, so
# a compiled function traced under one mode is retraced when the mode changes.
_override: Optional[str] = None


def current() -> str:
    """The mode in force: :func:`use`'s, else ``$NORMKIT_COMPILE_NORM``'s, else ``"auto"``."""
    return _override or _env_mode()


def _env_mode() -> str:
    mode = os.environ.get(ENV_VAR) or "auto"
    if mode not in MODES:
        raise ValueError(f"${ENV_VAR} must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


@contextlib.contextmanager
def use(mode: str) -> Iterator[str]:
    """Trace norm calls as ``mode`` (one of :data:`MODES`) inside the block (not thread-local,
    like ``torch._inductor.config``). A function compiled under another mode is retraced."""
    global _override
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    previous, _override = _override, mode
    try:
        yield mode
    finally:
        _override = previous


def traced_route(x: torch.Tensor, dropout_p: float) -> str:
    """``"composite"`` (decompose to torch ops) or ``"op"`` (the custom op) for a call that
    Dynamo traces; :func:`normkit.dispatch.route` asks only then."""
    if dropout_p > 0.0 or torch.compiler.is_exporting():  # a branch: specializes a symbolic rate
        return "op"
    mode = _override or _traced_env_mode()
    if mode == "auto":
        decompose = x.device.type in DECOMPOSE_ON and not _backend_forced()
    else:
        decompose = mode == "decompose"
    return "composite" if decompose else "op"


# Dynamo cannot trace os.environ reads or the context variable behind normkit.backends.use():
# each is read once per trace and baked in, as the backend choice is (backends.select_backend_name).
@private.assume_constant_result
def _traced_env_mode() -> str:
    return _env_mode()


@private.assume_constant_result
def _backend_forced() -> bool:
    return forced_backend() is not None
