"""Smoke test of an installed normkit (run from outside the checkout, in the environment a plain
`pip install` made): the compiled CPU kernels load, run the native route, and match the
reference composite; the build record names the running torch. Exits non-zero otherwise."""

import sys

import torch

import normkit
from normkit import reference
from normkit.backends import cpu

print(normkit.__file__)
if cpu.extension is None:
    sys.exit(f"FAIL: the compiled CPU kernels did not load: {cpu.unavailable_reason()}")
assert "site-packages" in normkit.__file__, f"normkit imported from {normkit.__file__}, not the installed package"
assert cpu.extension.BUILT_TORCH == torch.__version__, (cpu.extension.BUILT_TORCH, torch.__version__)
assert "cpu" in normkit.backends.available(), normkit.backends.available()
g = torch.Generator().manual_seed(0)
x = (torch.randn(37, 1000, generator=g) * 3 + 10).requires_grad_()
w, b = torch.randn(1000, generator=g), torch.randn(1000, generator=g)
y = normkit.layer_norm(x, (1000,), w, b)
assert normkit.functional.route(x, None, w, b, False, 0.0) == "native"
x64 = x.detach().double().requires_grad_()
want = reference.layer_norm(x64, (1000,), w.double(), b.double(), 1e-5)
torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
dy = torch.randn(37, 1000, generator=g)
(gx,) = torch.autograd.grad(y, x, dy)
(gx_want,) = torch.autograd.grad(want, x64, dy.double())
torch.testing.assert_close(gx.double(), gx_want, rtol=1e-4, atol=1e-4)
r = normkit.rms_norm(x.detach().bfloat16(), (1000,), w)
torch.testing.assert_close(r.float(), torch.nn.functional.rms_norm(x.detach().bfloat16().float(), (1000,), w).bfloat16().float(), rtol=2e-2, atol=2e-2)
print(f"install smoke test passed: normkit {normkit.__version__}, compiled kernels built for torch {cpu.extension.BUILT_TORCH}")
