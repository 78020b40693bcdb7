"""Backend registry: which implementation runs a norm call. A module, like ``torch.backends``:

``normkit.backends.available()`` lists the backends that can run here, ``normkit.backends.use(name)``
forces one inside a ``with`` block, ``normkit.backends.register(backend)`` plugs in a
:class:`Backend` subclass, and ``import normkit.backends.cpu`` imports a backend's module.
(``normkit.backends()``, the 0.1 function this module replaces, still works for one release
and warns.)

Built-in backends, in priority order:

=============  ==========================================  ===============================
name           runs on                                     module
=============  ==========================================  ===============================
``triton``     CUDA tensors (CPU tensors under             :mod:`normkit.backends.triton`
               ``TRITON_INTERPRET=1``, when forced)
``cpu``        CPU tensors, float32/64, bfloat16, float16  :mod:`normkit.backends.cpu`
               (compiled C++ kernels, ``normkit._C``)
``reference``  anything (plain PyTorch; the CPU default     :mod:`normkit.backends.reference`
               when ``normkit._C`` is not built)
=============  ==========================================  ===============================

:func:`select_backend` takes the first available backend that supports the call. A backend
forced with :func:`use_backend` or the ``NORMKIT_BACKEND`` environment variable is used
whenever it supports the call; a call it does not support (a dtype it lacks, say) falls back
to the reference, never to a wrong answer.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
import sys
import types
import warnings
from typing import Dict, Iterator, List, Optional

import torch
from torch import Tensor

from normkit import _torch_private as private
from normkit.backends.base import Backend

__all__ = [
    "Backend",
    "available",
    "explain_backend",
    "get_backend",
    "register",
    "register_backend",
    "select_backend",
    "select_backend_name",
    "use",
    "use_backend",
]

# Built-ins are imported on first use, so `import normkit` stays light.
_BUILTIN_MODULES = {
    "triton": "normkit.backends.triton",
    "cpu": "normkit.backends.cpu",
    "reference": "normkit.backends.reference",
}
_registry: Dict[str, Optional[Backend]] = {name: None for name in _BUILTIN_MODULES}
_forced: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("normkit_backend", default=None)
ENV_VAR = "NORMKIT_BACKEND"


class _Missing(Backend):
    """Stands in for a built-in backend whose module cannot be imported."""

    def __init__(self, name: str, reason: str):
        self.name = name
        self._reason = reason

    def unavailable_reason(self) -> Optional[str]:
        return self._reason

    def supports(self, x: Tensor, dropout_p: float) -> bool:
        return False


def register_backend(backend: Backend, *, priority: Optional[int] = None) -> None:
    """Add (or replace) a backend. ``priority`` is its position in the selection order
    (0 = tried first); by default a new backend goes just before ``"reference"``."""
    if not isinstance(backend, Backend):
        raise TypeError(f"register_backend expects a normkit Backend, got {type(backend).__name__}")
    names = [n for n in _registry if n != backend.name]
    if priority is None:
        priority = names.index("reference") if "reference" in names else len(names)
    names.insert(priority, backend.name)
    old = dict(_registry)
    old[backend.name] = backend
    _registry.clear()
    _registry.update((n, old[n]) for n in names)


def get_backend(name: str) -> Backend:
    """The backend called ``name``; ``ValueError`` for an unknown name."""
    if name not in _registry:
        raise ValueError(f"unknown normkit backend {name!r}; expected one of {sorted(_registry)}")
    backend = _registry[name]
    if backend is None:
        try:
            backend = importlib.import_module(_BUILTIN_MODULES[name]).BACKEND
        except ImportError as exc:  # the backend's own dependency is missing
            backend = _Missing(name, f"cannot import {_BUILTIN_MODULES[name]}: {exc}")
        _registry[name] = backend
    return backend


def available() -> List[str]:
    """Names of the backends that can run on this machine, in selection order."""
    return [name for name in _registry if get_backend(name).is_available()]


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[Backend]:
    """Force backend ``name`` inside a ``with`` block (thread- and task-local).

    Raises ``ValueError`` for an unknown name and ``RuntimeError`` when the backend cannot run
    on this machine. Calls the backend does not support fall back to the reference.
    """
    backend = _require_available(name)
    token = _forced.set(name)
    try:
        yield backend
    finally:
        _forced.reset(token)


def _require_available(name: str) -> Backend:
    backend = get_backend(name)
    reason = backend.unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"normkit backend {name!r} is not available here: {reason}")
    return backend


def forced_backend() -> Optional[str]:
    """The backend forced by :func:`use_backend`, else by ``$NORMKIT_BACKEND``, else ``None``."""
    return _forced.get() or os.environ.get(ENV_VAR) or None


def select_backend(x: Tensor, dropout_p: float = 0.0) -> Backend:
    """The backend that runs a call on ``x`` (already validated)."""
    return _select(x, dropout_p)[0]


def explain_backend(x: Tensor, dropout_p: float = 0.0) -> str:
    """``"<name>: <why>"`` for the backend :func:`select_backend` picks for ``x``."""
    backend, why = _select(x, dropout_p)
    call = f"{x.dtype} on {x.device.type} (dropout_p={dropout_p})"
    reasons = {
        "forced": f"forced ({'use_backend' if _forced.get() else ENV_VAR})",
        "forced_unsupported": f"forced {forced_backend()!r} does not support {call}: the reference",
        "default": f"the first available backend that is a default for {x.device.type} and supports {call}",
        "fallback": "no other backend supports the call",
    }
    return f"{backend.name}: {reasons[why]}"


def _select(x: Tensor, dropout_p: float):
    """``(backend, why)``, ``why`` a key that :func:`explain_backend` turns into a sentence (the
    sentence is not built on the hot path)."""
    forced = forced_backend()
    if forced is not None:
        backend = _require_available(forced)
        if backend.supports(x, dropout_p):
            return backend, "forced"
        return get_backend("reference"), "forced_unsupported"
    device = x.device.type
    for name in _registry:
        backend = get_backend(name)
        if (
            (device in backend.default_for or "*" in backend.default_for)
            and backend.is_available()
            and backend.supports(x, dropout_p)
        ):
            return backend, "default"
    return get_backend("reference"), "fallback"


def select_backend_name(x: Tensor, dropout_p: float = 0.0) -> str:
    """Name of :func:`select_backend`'s choice; what :mod:`normkit.functional` dispatches on.

    Under ``torch.compile`` the choice is made once, while tracing, and baked into the graph as
    a constant (Dynamo cannot trace the context variable behind :func:`use_backend`): a compiled
    model keeps the backend that was selected when it was compiled.
    """
    if torch.compiler.is_compiling():
        dropout = True if dropout_p > 0.0 else False  # a branch: specializes a symbolic rate
        return _traced_backend_name(x.device, x.dtype, dropout)
    return select_backend(x, dropout_p).name


@private.assume_constant_result
def _traced_backend_name(device: torch.device, dtype: torch.dtype, dropout: bool) -> str:
    # Arguments Dynamo can turn into constants (a tensor with symbolic sizes cannot be); the
    # backends' ``supports`` look at the device and dtype only.
    probe = torch.empty(0, dtype=dtype, device=device)
    return select_backend(probe, 0.5 if dropout else 0.0).name


use = use_backend
register = register_backend


class _CallableModule(types.ModuleType):
    """Lets the 0.1 call ``normkit.backends()`` keep working (with a warning) now that
    ``normkit.backends`` is this module."""

    def __call__(self) -> List[str]:
        warnings.warn(
            "normkit.backends() is deprecated and will be removed in normkit 0.3; "
            "use normkit.backends.available()",
            DeprecationWarning,
            stacklevel=2,
        )
        return available()


sys.modules[__name__].__class__ = _CallableModule
