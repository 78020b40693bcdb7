"""Shared pytest set-up.

Triton kernels run on CPU tensors through Triton's interpreter when no GPU is present, so
``TRITON_INTERPRET=1`` must be set before anything imports triton.
"""

import os

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover - torch is a hard dependency
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests choose backends explicitly; an inherited NORMKIT_BACKEND would silently change them.
os.environ.pop("NORMKIT_BACKEND", None)
