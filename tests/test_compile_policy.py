"""Under torch.compile a norm call decomposes to the reference composite (normkit.compile_policy):
what is traced for each mode, and that compiled results (inductor) equal eager normkit's."""

import pytest
import torch

import normkit
from normkit import compile_policy
from normkit import reference as ref

from helpers import params, randn


def _traced_ops(fn, *args):
    """Compile ``fn`` with ``fullgraph=True`` and a backend that records the graphs; return
    the result and how many normkit custom ops the forward graphs hold."""
    counts = []

    def backend(gm, example_inputs):
        counts.append(sum("normkit" in str(n.target) for n in gm.graph.nodes))
        return gm

    torch._dynamo.reset()
    out = torch.compile(fn, fullgraph=True, backend=backend)(*args)
    return out, sum(counts)


def _block(x, h, w, b, g):
    y, s = normkit.layer_norm(x, x.shape[-1:], w, b, residual=h, prenorm=True)
    return normkit.rms_norm(y, y.shape[-1:], g, 1e-6, casting_mode="llama") + s


def _inputs(dtype=torch.float32, n=32):
    x = randn((2, 5, n), dtype, seed=1, requires_grad=True)
    h = randn((2, 5, n), dtype, seed=2, requires_grad=True)
    (w, b), g = params((n,), seed=3), randn((n,), seed=4, offset=1.0)
    return x, h, w.requires_grad_(True), b.requires_grad_(True), g.requires_grad_(True)


def test_compiled_calls_decompose_by_default_and_keep_the_op_when_asked():
    args = _inputs()
    out, ops = _traced_ops(_block, *args)
    assert ops == 0, "auto on CPU: the reference composite, no custom op in the graph"
    with compile_policy.use("op"):
        out_op, ops = _traced_ops(_block, *args)
    assert ops == 2
    with normkit.use_backend("reference"):  # a forced backend: the user asked for its kernels
        _, ops = _traced_ops(_block, *args)
    assert ops == 2
    with normkit.use_backend("reference"), compile_policy.use("decompose"):
        _, ops = _traced_ops(_block, *args)
    assert ops == 0
    torch.testing.assert_close(out, _block(*args))
    torch.testing.assert_close(out_op, _block(*args))
    with pytest.raises(ValueError, match="mode must be one of auto, decompose, op"):
        with compile_policy.use("fast"):
            pass


def test_a_changed_mode_retraces_a_compiled_function():
    x = randn((3, 16), seed=5)
    seen = []

    def backend(gm, example_inputs):
        seen.append(sum("normkit" in str(n.target) for n in gm.graph.nodes))
        return gm

    torch._dynamo.reset()
    f = torch.compile(lambda t: normkit.rms_norm(t, 16), fullgraph=True, backend=backend)
    f(x)
    with compile_policy.use("op"):
        f(x)
    with compile_policy.use("decompose"):
        f(x)
    assert seen == [0, 1, 0]


def test_dropout_keeps_the_op_and_draws_a_fresh_mask_per_call():
    """The composite would draw its seed in Python, baked into the graph; the op draws it
    inside. Two calls of one compiled function must drop different elements."""
    x, h = randn((64, 32), seed=6), randn((64, 32), seed=7)

    def f(x, h):
        return normkit.layer_norm(x, 32, residual=h, prenorm=True, dropout_p=0.5)[1]

    with compile_policy.use("decompose"):
        s1, ops = _traced_ops(f, x, h)
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        s2 = compiled(x, h)
        s3 = compiled(x, h)
    assert ops == 1
    kept = [(s - h).abs() > 1e-6 for s in (s1, s2, s3)]
    for s, k in zip((s1, s2, s3), kept):  # each element dropped (s = h) or kept and rescaled
        torch.testing.assert_close(torch.where(k, s, h + 2 * x), h + 2 * x)
        assert 0.3 < k.float().mean() < 0.7
    assert not torch.equal(kept[1], kept[2]), "the compiled graph reused one dropout mask"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inductor_matches_eager_normkit_forward_and_backward(dtype):
    """One inductor compile per dtype (fullgraph): LN with residual and prenorm, RMS in Llama's
    rounding, and the gradients of every input; bfloat16 keeps normkit's float32 statistics."""
    args = _inputs(dtype)
    torch._dynamo.reset()
    compiled = torch.compile(_block, fullgraph=True)
    got = compiled(*args)
    want = _block(*args)
    dy = randn(want.shape, dtype, seed=8)
    tol = {} if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got, want, **tol)
    for g, e in zip(torch.autograd.grad(got, args, dy), torch.autograd.grad(want, args, dy)):
        torch.testing.assert_close(g, e, **({} if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)))
