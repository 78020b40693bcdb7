"""The private PyTorch APIs normkit's route relies on (``normkit._torch_private``): each must
still exist and answer as normkit assumes. A failure here means torch moved one: the shim's
fallback keeps results right but slower, so fix the shim, do not silence the test."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch.autograd import forward_ad

from normkit import _torch_private as private


@pytest.mark.parametrize("name", sorted(private.FAST_PATHS))
def test_every_fast_path_is_present(name):
    assert private.FAST_PATHS[name], f"torch (or Python) no longer provides the private API behind {name}; see normkit/_torch_private.py"


def test_functorch_transforms_active():
    seen = []
    torch.func.vmap(lambda t: seen.append(private.functorch_transforms_active()) or t)(torch.ones(2, 3))
    torch.func.grad(lambda t: seen.append(private.functorch_transforms_active()) or t.sum())(torch.ones(3))
    assert seen == [True, True]
    assert private.functorch_transforms_active() is False


def test_forward_ad_level():
    assert private.forward_ad_level() == -1
    with forward_ad.dual_level():
        assert private.forward_ad_level() >= 0
    assert private.forward_ad_level() == -1


def test_dispatch_mode_active():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    assert not private.dispatch_mode_active()
    with Passthrough():
        assert private.dispatch_mode_active()


def test_is_batched_sees_both_vmaps():
    seen = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            seen.append(private.is_batched(g))
            return g * 2

    x = torch.randn(3, requires_grad=True)
    torch.autograd.grad(Probe.apply(x), x, torch.randn(2, 3), is_grads_batched=True)  # the legacy vmap
    torch.func.vmap(lambda t: seen.append(private.is_batched(t)) or t)(torch.ones(2, 3))
    assert seen == [True, True]
    assert not private.is_batched(torch.ones(3))


def test_environ_getter_tracks_os_environ(monkeypatch):
    get, key = private.environ_getter("NORMKIT_TEST_PRIVATE_VAR")
    monkeypatch.delenv("NORMKIT_TEST_PRIVATE_VAR", raising=False)
    assert get(key) is None
    monkeypatch.setenv("NORMKIT_TEST_PRIVATE_VAR", "cpu")
    assert get(key) in ("cpu", b"cpu")
    assert os.environ["NORMKIT_TEST_PRIVATE_VAR"] == "cpu"


def test_assume_constant_result_marks_as_torch_does():
    def mine():
        return 1

    def torchs():
        return 1

    torch.compiler.assume_constant_result(torchs)
    private.assume_constant_result(mine)
    marks = {k for k in vars(torchs) if "constant" in k}
    assert marks == {"_dynamo_marked_constant"}, f"torch's decorator now sets {marks}; update the shim"
    assert {k: vars(mine)[k] for k in marks} == {k: vars(torchs)[k] for k in marks}


def test_assume_constant_result_is_a_constant_under_compile():
    calls = []

    @private.assume_constant_result
    def answer():
        calls.append(1)
        return 3

    @torch.compile(backend="eager", fullgraph=True)
    def f(x):
        return x * answer()

    x = torch.randn(4)
    torch.testing.assert_close(f(x), x * 3)
    torch.testing.assert_close(f(x), x * 3)
    assert len(calls) == 1  # called once, while tracing: the result is baked into the graph


def test_import_normkit_does_not_import_dynamo():
    # Dynamo costs about as much import time as torch; only a compile should pay for it.
    code = "import sys, normkit, normkit.nn; print('torch._dynamo' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False", "something imported at `import normkit` pulls in torch._dynamo"
