"""The native route's autograd node (normkit._C.norm's NormBackward, csrc/norm_node.cpp), a
hand-written torch::autograd::Node: every autograd mechanism torch gives its own nodes must hold
for it (hooks, retain_graph, saved-tensor hooks, version counters, in-place ops on outputs,
anomaly mode, compiled autograd). Numbers against torch's layer_norm / rms_norm in float64."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as TF
from helpers import params, randn

import normkit
from normkit.backends import cpu as compiled

pytestmark = pytest.mark.skipif(compiled.extension is None, reason="normkit._C is not built")

TOL = dict(rtol=1e-10, atol=1e-10)


def _inputs(shape=(3, 2, 9), seed=0):
    x = randn(shape, torch.float64, seed=seed, offset=0.5, requires_grad=True)
    w, b = (t.requires_grad_(True) for t in params(shape[-1:], torch.float64, seed=seed + 1))
    r = randn(shape, torch.float64, seed=seed + 3, requires_grad=True)
    return x, w, b, r


def _call(is_rms, residual):
    """(normkit, torch) as f(x, w, b, r) -> a tuple of outputs: (y,) or (y, s)."""

    def nk(x, w, b, r):
        n = x.shape[-1]
        kw = dict(residual=r, prenorm=True) if residual else {}
        out = normkit.rms_norm(x, n, w, 1e-5, **kw) if is_rms else normkit.layer_norm(x, n, w, b, 1e-5, **kw)
        return out if residual else (out,)

    def th(x, w, b, r):
        n = x.shape[-1]
        s = x + r if residual else x
        y = TF.rms_norm(s, (n,), w, 1e-5) if is_rms else TF.layer_norm(s, (n,), w, b, 1e-5)
        return (y, s) if residual else (y,)

    return nk, th


def _grads(f, inputs, *, seed=20, **backward_kw):
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    outs = f(*leaves)
    for i, o in enumerate(outs):
        o.backward(randn(o.shape, o.dtype, seed=seed + i), retain_graph=i + 1 < len(outs), **backward_kw)
    return [t.grad for t in leaves]


def _assert_grads(got, want):
    for g, t in zip(got, want):
        if t is None:
            assert g is None
        else:
            torch.testing.assert_close(g, t, **TOL)


def test_the_native_route_builds_the_hand_written_node():
    x, w, b, _ = _inputs()
    assert normkit.layer_norm(x, 9, w, b).grad_fn.name() == "normkit::NormBackward"


@pytest.mark.parametrize("is_rms", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_saved_tensor_hooks_see_every_saved_tensor_and_the_gradients_hold(is_rms, residual):
    nk, th = _call(is_rms, residual)
    inputs = _inputs()
    packed = []

    def pack(t):
        packed.append(t.shape)
        return t.clone()  # what save_on_cpu does: the backward reads the copy

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        got = _grads(nk, inputs)
    # x (or s), weight, mean (layer norm), rstd: the statistics are saved tensors too
    rows = 6
    want_shapes = [(3, 2, 9), (9,)] + ([] if is_rms else [(rows,)]) + [(rows,)]
    assert sorted(map(tuple, packed)) == sorted(want_shapes)
    _assert_grads(got, _grads(th, inputs))
    with torch.autograd.graph.save_on_cpu():
        _assert_grads(_grads(nk, inputs), _grads(th, inputs))


def test_modifying_a_saved_input_in_place_fails_the_backward():
    x, w, b, _ = _inputs()
    h = x * 1.0
    y = normkit.layer_norm(h, 9, w, b)
    h.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_retain_graph_repeats_the_backward_and_without_it_the_second_one_fails():
    x, w, b, _ = _inputs()
    y = normkit.layer_norm(x, 9, w, b)
    first = torch.autograd.grad(y.sum(), (x, w, b), retain_graph=True)
    second = torch.autograd.grad(y.sum(), (x, w, b))
    _assert_grads(second, first)
    with pytest.raises(RuntimeError, match="second time"):
        torch.autograd.grad(y.sum(), (x, w, b))


@pytest.mark.parametrize("is_rms", [False, True])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("shape", [(6, 9), (3, 2, 9)])
def test_in_place_ops_on_the_outputs_work_as_on_torchs(is_rms, residual, shape):
    nk, th = _call(is_rms, residual)

    def in_place(f):
        def g(*args):
            outs = f(*args)
            outs[0].mul_(2.0)
            return outs

        return g

    inputs = _inputs(shape)
    _assert_grads(_grads(in_place(nk), inputs), _grads(in_place(th), inputs))


def test_tensor_and_node_hooks_run():
    x, w, b, _ = _inputs()
    y = normkit.layer_norm(x, 9, w, b)
    seen = []
    y.register_hook(lambda g: g * 3.0)
    y.grad_fn.register_prehook(lambda grad_outputs: seen.append("pre"))
    y.grad_fn.register_hook(lambda grad_inputs, grad_outputs: seen.append(len(grad_inputs)))
    y.sum().backward()
    # the tensor hook triples dy = 1: torch's gradients for dy = 3
    x2, w2, b2 = (t.detach().requires_grad_(True) for t in (x, w, b))
    TF.layer_norm(x2, (9,), w2, b2, 1e-5).backward(torch.full((3, 2, 9), 3.0, dtype=torch.float64))
    _assert_grads([x.grad, w.grad, b.grad], [x2.grad, w2.grad, b2.grad])
    assert seen == ["pre", 4]  # grads for x, residual, weight, bias


def test_only_the_gradients_asked_for_are_returned():
    x, w, b, _ = _inputs()
    x.requires_grad_(False)
    y = normkit.layer_norm(x, 9, w, b)
    gw, gb = torch.autograd.grad(y.square().sum(), (w, b))
    y2 = TF.layer_norm(x, (9,), w, b, 1e-5)
    _assert_grads((gw, gb), torch.autograd.grad(y2.square().sum(), (w, b)))


def test_anomaly_mode_reports_the_forward_call():
    x, w, b, _ = _inputs()
    with torch.autograd.detect_anomaly(check_nan=False):
        h = x * 1.0
        y = normkit.layer_norm(h, 9, w, b)
        h.add_(1.0)
        with warnings.catch_warnings(record=True) as caught, pytest.raises(RuntimeError, match="inplace"):
            warnings.simplefilter("always")
            y.sum().backward()
    assert any("normkit::NormBackward" in str(c.message) and "forward call" in str(c.message) for c in caught)


@pytest.mark.parametrize("is_rms", [False, True])
@pytest.mark.parametrize("residual", [False, True])
def test_compiled_autograd_runs_the_node(is_rms, residual):
    from torch._dynamo import compiled_autograd

    nk, th = _call(is_rms, residual)
    inputs = _inputs()
    torch._dynamo.reset()
    with compiled_autograd._enable(torch.compile(backend="eager")):
        got = _grads(nk, inputs)
    _assert_grads(got, _grads(th, inputs))


def test_forward_ad_on_a_direct_call_is_refused():
    import torch.autograd.forward_ad as fwAD

    x, w, b, _ = _inputs()
    with fwAD.dual_level():
        dual = fwAD.make_dual(x.detach(), torch.ones_like(x))
        with pytest.raises(RuntimeError, match="forward-mode AD"):
            compiled.extension.norm(dual, 9, w, b, 1e-5, False, None)
