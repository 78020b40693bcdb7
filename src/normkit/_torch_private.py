"""Every private PyTorch (and CPython) API normkit's route depends on, in one place.

Each is the cheapest answer to a question no public API answers in under a microsecond (a
plain eager call must cost what a native op costs). Each has a fallback that is *correct but
slower* if torch moves it, so a torch upgrade can cost speed, never a wrong route;
``tests/test_torch_private.py`` fails loudly when a fast path has gone, so the fallback is
never taken silently for long.

- :func:`functorch_transforms_active`: ``torch._C._are_functorch_transforms_active``; whether
  a ``torch.func`` transform (vmap, grad, jvp, ...) or a batched backward
  (``is_grads_batched=True``) is running. Fallback: always ``True`` (the composite path,
  which every transform understands).
- :func:`forward_ad_level`: ``torch.autograd.forward_ad._current_level``, ``-1`` when no dual
  level is open. Fallback: ``0`` (so every call asks the public ``unpack_dual``).
- :func:`dispatch_mode_active`: ``torch._C._len_torch_dispatch_stack``; whether a
  ``TorchDispatchMode`` (``make_fx``, ``torch.export``, FakeTensorMode) is active, under which
  kernels must not touch real data pointers. Fallback: the semi-public
  ``torch.utils._python_dispatch._get_current_dispatch_mode``, else ``True``.
- :func:`is_batched`: ``torch._C._functorch.is_legacy_batchedtensor`` / ``is_batchedtensor``;
  whether a gradient is a vmap batch (``is_grads_batched=True`` runs backward under the legacy
  vmap, which ``functorch_transforms_active`` does not see), whose memory no kernel can read.
  Fallback: whether the tensor has no storage.
- :func:`assume_constant_result`: marks a function as :func:`torch.compiler.assume_constant_result`
  does (the ``_dynamo_marked_constant`` attribute Dynamo reads), without that decorator's
  ``import torch._dynamo``, which costs about as much as ``import torch`` itself (1.2 s here)
  and would otherwise be paid by every ``import normkit``. No run-time fallback (telling whether
  Dynamo still reads the attribute would mean importing it): the test checks that torch's own
  decorator sets exactly this attribute and that Dynamo honours the mark, so a torch that
  renames it fails the suite rather than compiling normkit's choices as traced code.
- :func:`environ_getter`: ``os.environ._data`` (CPython's POSIX bytes-keyed dict behind
  ``os.environ``, ~50 ns a miss against ~1.4 us for ``os.environ.get``, which raises and catches
  ``KeyError`` inside). Fallback: ``os.environ.get``.
"""

from __future__ import annotations

import os
from typing import Callable, Optional, Tuple, Union

import torch
from torch.autograd import forward_ad as _forward_ad

__all__ = [
    "FAST_PATHS",
    "functorch_transforms_active",
    "forward_ad_level",
    "dispatch_mode_active",
    "is_batched",
    "environ_getter",
    "assume_constant_result",
]

#: Which private fast path each function found in this torch / Python (the test asserts all).
FAST_PATHS = {}

_are_transforms_active = getattr(torch._C, "_are_functorch_transforms_active", None)
FAST_PATHS["functorch_transforms_active"] = _are_transforms_active is not None
if _are_transforms_active is not None:
    functorch_transforms_active: Callable[[], bool] = _are_transforms_active
else:  # pragma: no cover - only on a torch that moved it

    def functorch_transforms_active() -> bool:
        return True


FAST_PATHS["forward_ad_level"] = isinstance(getattr(_forward_ad, "_current_level", None), int)


def forward_ad_level() -> int:
    """The innermost open forward-AD level, ``-1`` when none is open."""
    level = getattr(_forward_ad, "_current_level", 0)
    return level if isinstance(level, int) else 0


_len_dispatch_stack = getattr(torch._C, "_len_torch_dispatch_stack", None)
FAST_PATHS["dispatch_mode_active"] = _len_dispatch_stack is not None
if _len_dispatch_stack is not None:

    def dispatch_mode_active() -> bool:
        return _len_dispatch_stack() > 0

else:  # pragma: no cover - only on a torch that moved it

    def dispatch_mode_active() -> bool:
        try:
            from torch.utils._python_dispatch import _get_current_dispatch_mode
        except ImportError:
            return True
        return _get_current_dispatch_mode() is not None


_functorch = getattr(torch._C, "_functorch", None)
_is_legacy_batched = getattr(_functorch, "is_legacy_batchedtensor", None)
_is_batched = getattr(_functorch, "is_batchedtensor", None)
FAST_PATHS["is_batched"] = _is_legacy_batched is not None and _is_batched is not None


def is_batched(t: torch.Tensor) -> bool:
    """Whether ``t`` is a vmap batch (legacy or functorch) rather than a tensor with memory."""
    if FAST_PATHS["is_batched"]:
        return _is_legacy_batched(t) or _is_batched(t)
    try:  # pragma: no cover - only on a torch that moved them
        t.untyped_storage()
    except RuntimeError:
        return True
    return False


_environ_data = getattr(os.environ, "_data", None)
FAST_PATHS["environ_getter"] = isinstance(_environ_data, dict) and os.name == "posix"


def environ_getter(name: str) -> Tuple[Callable[..., Optional[Union[str, bytes]]], Union[str, bytes]]:
    """``(get, key)`` such that ``get(key)`` reads environment variable ``name`` (``None`` when
    unset) as fast as this platform allows: a ``bytes`` value from the fast path, a ``str``
    from the fallback, so compare against both."""
    if FAST_PATHS["environ_getter"]:
        return _environ_data.get, os.fsencode(name)
    return os.environ.get, name  # pragma: no cover - other platforms


#: The attribute by which Dynamo tells a function marked with ``assume_constant_result``
#: (torch/_dynamo/variables/functions.py reads it; the test checks torch's decorator sets it).
_DYNAMO_CONSTANT_ATTR = "_dynamo_marked_constant"
FAST_PATHS["assume_constant_result"] = hasattr(torch.compiler, "assume_constant_result")


def assume_constant_result(fn: Callable) -> Callable:
    """:func:`torch.compiler.assume_constant_result` without importing ``torch._dynamo`` at
    decoration time: Dynamo calls ``fn`` once while tracing and bakes its result into the graph.
    The decorator only sets an attribute; importing Dynamo to set it would double the import
    time of normkit."""
    setattr(fn, _DYNAMO_CONSTANT_ATTR, True)
    return fn
