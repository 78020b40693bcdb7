"""LayerNormLSTM / LayerNormGRU under every autograd mode, and loading torch's state_dicts.

Double backward (``create_graph=True``) through the fused function recomputes the sequence
with the reference equations and differentiates them (``sequence._differentiable_backward``);
``torch.func`` transforms and forward-mode AD run the reference per-step loop. Each mode is
checked against a computation that does not share its machinery: ``gradgradcheck`` (finite
differences of the backward), the fast path's ordinary first-order autograd, or the reference
path (``fast_path = False``).
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence

import normkit
from helpers import randn
from test_rnn import KINDS, PAIRS, _one_thread, make, make_hx, states  # noqa: F401 (_one_thread: autouse fixture)

F64 = torch.float64
EPS32 = torch.finfo(torch.float32).eps
BACKENDS = ["default", "reference"]  # default: the registry's choice (compiled C++ loop for float32)


def _backend(name):
    """``normkit.backends.use(name)``, or nothing for the registry's own choice."""
    return contextlib.nullcontext() if name == "default" else normkit.backends.use(name)


def _functional(m, kind, lengths, names):
    """``f(x, *hx, *params named by names) -> (output data, *final states)``; ``lengths``:
    ``x`` runs as an unsorted packed batch of those lengths, else dense."""

    def f(x, *rest):
        n_state = 2 if kind == "LSTM" else 1
        hx, params = rest[:n_state], dict(zip(names, rest[n_state:]))
        inp = x if lengths is None else pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False)
        out, st = functional_call(m, params, (inp, hx if kind == "LSTM" else hx[0]))
        return (out if lengths is None else out.data,) + states(kind, st)

    return f


# (num_layers, bidirectional, packed lengths or None, fast_mode). The 2-layer case checks random
# projections of the second derivatives (fast_mode): the full check takes one recorded backward
# per input element, 15 s here.
GRADGRAD_CONFIGS = [
    (1, False, None, False),
    (2, True, (3, 1, 2), True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("config", GRADGRAD_CONFIGS, ids=["1layer-dense", "2layer-bidir-packed"])
def test_gradgradcheck_float64(kind, config, backend):
    """Second derivatives with respect to the input, both initial states and the parameters
    match finite differences of the first derivatives."""
    L, bi, lengths, fast_mode = config
    m = make(kind, 2, 2, num_layers=L, bidirectional=bi, dtype=F64, seed=3)
    names = [n for n, _ in m.named_parameters()]
    x = randn((3, 3, 2), F64, seed=9, requires_grad=True)
    hx = states(kind, make_hx(kind, m, 3, dtype=F64, requires_grad=True))
    params = [getattr(m, n).detach().clone().requires_grad_() for n in names]
    with _backend(backend):
        assert torch.autograd.gradgradcheck(
            _functional(m, kind, lengths, names), (x, *hx, *params), eps=1e-6, atol=1e-6, rtol=1e-5,
            fast_mode=fast_mode,
        )


def _second_order(m, kind, x, hx, lengths, fast_path):
    """``x``, ``hx`` and every parameter's gradient of ``|| d loss / d (x, hx, params) ||^2``,
    with loss a random weighting of the outputs: a gradient-penalty-style double backward."""
    m.fast_path = fast_path
    x = x.detach().requires_grad_()
    hx = tuple(s.detach().requires_grad_() for s in hx)
    params = list(m.parameters())
    outs = _functional(m, kind, lengths, [])(x, *hx)
    g = torch.Generator().manual_seed(7)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=F64).to(o.dtype)).sum() for o in outs)
    firsts = torch.autograd.grad(loss, (x, *hx, *params), create_graph=True)
    penalty = sum(f.square().sum() for f in firsts)
    seconds = torch.autograd.grad(penalty, (x, *hx, *params))
    return [f.detach().double() for f in firsts], [s.double() for s in seconds]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_double_backward_float64_equals_the_reference_path(kind, backend):
    """First and second derivatives under ``create_graph=True`` on a 2-layer bidirectional
    packed batch: the fused path's (float64 runs the plain-torch steps forward) against the
    per-step reference path's."""
    m = make(kind, 3, 3, num_layers=2, bidirectional=True, dtype=F64, seed=4)
    x = randn((4, 3, 3), F64, seed=2)
    hx = states(kind, make_hx(kind, m, 3, dtype=F64))
    with _backend(backend):
        fast = sum(_second_order(m, kind, x, hx, (4, 2, 3), True), [])
    ref = sum(_second_order(m, kind, x, hx, (4, 2, 3), False), [])
    for i, (a, b) in enumerate(zip(fast, ref)):
        scale = b.abs().max().item()
        assert scale > 0, f"derivative {i} is zero: the check could not fail"
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10 * scale, msg=lambda msg: f"derivative {i}: {msg}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_double_backward_float32_is_as_accurate_as_the_reference_path(kind, backend):
    """float32 on the default backend runs the compiled C++ loop forward (the plain-torch steps
    under "reference"), then the differentiable backward. Its first and second derivatives are
    within 8x the float32 reference path's error of a float64 run, plus 16 ulps of the scale
    (the slack of ``test_rnn.test_fast_float32_matches_float64_as_well_as_the_reference``; the
    ratio reached 5.1 here)."""
    m = make(kind, 3, 3, num_layers=2, bidirectional=True, dtype=F64, seed=4)
    x = randn((4, 3, 3), F64, seed=2)
    hx = states(kind, make_hx(kind, m, 3, dtype=F64))
    truth = sum(_second_order(m, kind, x, hx, (4, 2, 3), False), [])
    m32, x32, hx32 = copy.deepcopy(m).float(), x.float(), tuple(s.float() for s in hx)
    ref32 = sum(_second_order(m32, kind, x32, hx32, (4, 2, 3), False), [])
    with _backend(backend):
        fast32 = sum(_second_order(m32, kind, x32, hx32, (4, 2, 3), True), [])
    for i, (t, r, f) in enumerate(zip(truth, ref32, fast32)):
        scale = t.abs().max().item()
        baseline, err = (r - t).abs().max().item(), (f - t).abs().max().item()
        assert err <= 8 * baseline + 16 * EPS32 * scale, f"derivative {i}: error {err:.3g}, float32 baseline {baseline:.3g}, scale {scale:.3g}"


@pytest.mark.parametrize("kind", KINDS)
def test_create_graph_first_derivatives_equal_the_fused_backward(kind):
    """The differentiable backward returns the same first derivatives as the hand-written one."""
    m = make(kind, 3, 3, num_layers=2, bidirectional=True, dtype=F64, seed=6)
    x = randn((4, 2, 3), F64, seed=3, requires_grad=True)
    hx = states(kind, make_hx(kind, m, 2, dtype=F64, requires_grad=True))
    inputs = (x, *hx, *m.parameters())
    loss = lambda: sum(o.sin().sum() for o in _functional(m, kind, None, [])(x, *hx))  # noqa: E731
    plain = torch.autograd.grad(loss(), inputs)
    graphed = torch.autograd.grad(loss(), inputs, create_graph=True)
    assert all(g.requires_grad for g in graphed)
    for a, b in zip(plain, graphed):
        torch.testing.assert_close(a, b.detach(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bias", [True, False])
def test_parameter_penalty_with_a_frozen_input_projection(kind, bias):
    """Only the recurrent parameters train and the input needs no gradient, so the fused
    function's ``xg`` needs none either: the second derivatives of a penalty on the parameter
    gradients still equal the reference path's."""
    m = make(kind, 3, 3, num_layers=2, bias=bias, dtype=F64, seed=5)
    for name, p in m.named_parameters():
        p.requires_grad_(not name.endswith("_l0") or "hh" in name)  # layer 0's input part frozen
    x = randn((4, 2, 3), F64, seed=6)
    got = []
    for fast in (True, False):
        m.fast_path = fast
        ps = [p for p in m.parameters() if p.requires_grad]
        firsts = torch.autograd.grad(m(x)[0].sin().sum(), ps, create_graph=True)
        got.append(torch.autograd.grad(sum(f.square().sum() for f in firsts), ps))
    for a, b in zip(*got):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10 * b.abs().max().item())


@pytest.mark.parametrize("kind", KINDS)
def test_issue_example_second_derivative(kind):
    """The report's example: d/dx || d/dx sum(out^2) ||^2, fast path against the reference."""
    m = PAIRS[kind][0](4, 5).double()
    x = randn((6, 3, 4), F64, seed=8, requires_grad=True)
    got = []
    for fast in (True, False):
        m.fast_path = fast
        (g,) = torch.autograd.grad(m(x)[0].square().sum(), x, create_graph=True)
        got.append(torch.autograd.grad(g.square().sum(), x)[0])
    torch.testing.assert_close(got[0], got[1], rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------- torch.func, forward AD


def _setup(kind, batch=3):
    m = make(kind, 3, 2, num_layers=2, bidirectional=True, dtype=F64, seed=11)
    x = randn((4, batch, 3), F64, seed=12)
    hx = states(kind, make_hx(kind, m, batch, dtype=F64))
    return m, x, hx


def _call(m, kind, params, x, hx):
    out, st = functional_call(m, params, (x, hx if kind == "LSTM" else hx[0]))
    return out, states(kind, st)


@pytest.mark.parametrize("kind", KINDS)
def test_torch_func_grad_equals_ordinary_backward(kind):
    m, x, hx = _setup(kind)
    params = {n: p.detach() for n, p in m.named_parameters()}

    def loss(p, x, hx):
        out, st = _call(m, kind, p, x, hx)
        return out.sin().sum() + sum(s.cos().sum() for s in st)

    got_p, got_x = torch.func.grad(loss, argnums=(0, 1))(params, x, hx)
    xr = x.clone().requires_grad_()
    loss({n: p for n, p in m.named_parameters()}, xr, hx).backward()  # the fast path
    torch.testing.assert_close(got_x, xr.grad, rtol=1e-10, atol=1e-12)
    for n, p in m.named_parameters():
        torch.testing.assert_close(got_p[n], p.grad, rtol=1e-10, atol=1e-12, msg=n)


@pytest.mark.parametrize("kind", KINDS)
def test_torch_func_vmap_over_the_batch_equals_the_batched_call(kind):
    m, x, hx = _setup(kind)
    params = dict(m.named_parameters())
    # unbatched calls, x (T, I) and hx (L, H), mapped over the batch dims
    out_v, st_v = torch.func.vmap(lambda xb, hb: _call(m, kind, params, xb, hb), in_dims=(1, 1), out_dims=(1, 1))(x, hx)
    with torch.no_grad():
        out, st = _call(m, kind, params, x, hx)  # the fast path on the whole batch
    torch.testing.assert_close(out_v, out, rtol=1e-10, atol=1e-12)
    for a, b in zip(st_v, st):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_torch_func_jacrev_equals_rows_of_ordinary_backward(kind):
    m, x, hx = _setup(kind, batch=2)
    params = dict(m.named_parameters())
    jac = torch.func.jacrev(lambda xx: _call(m, kind, params, xx, hx)[0])(x)  # (T, B, 2H, T, B, I)
    xr = x.clone().requires_grad_()
    out = _call(m, kind, params, xr, hx)[0].flatten()
    rows = torch.stack([torch.autograd.grad(out[k], xr, retain_graph=True)[0] for k in range(out.numel())])
    torch.testing.assert_close(jac.reshape(rows.shape), rows, rtol=1e-10, atol=1e-12)


def _jacobian_times(m, kind, x, hx, tx):
    """``J tx`` of (output, states) w.r.t. ``x`` from the fast path's ordinary reverse mode."""
    xr = x.clone().requires_grad_()
    out, st = _call(m, kind, dict(m.named_parameters()), xr, hx)
    res = []
    for o in (out, *st):
        flat = o.flatten()
        rows = [torch.autograd.grad(flat[k], xr, retain_graph=True)[0].flatten() for k in range(flat.numel())]
        res.append((torch.stack(rows) @ tx.flatten()).reshape(o.shape))
    return res


@pytest.mark.parametrize("kind", KINDS)
def test_forward_ad_and_jvp_equal_the_jacobian_product(kind):
    m, x, hx = _setup(kind, batch=2)
    tx = randn(x.shape, F64, seed=13)
    want = _jacobian_times(m, kind, x, hx, tx)
    with fwAD.dual_level():
        out, st = m(fwAD.make_dual(x, tx), hx if kind == "LSTM" else hx[0])
        duals = [fwAD.unpack_dual(t).tangent for t in (out, *states(kind, st))]
    params = dict(m.named_parameters())
    _, jvps = torch.func.jvp(lambda xx: (lambda o, s: (o, *s))(*_call(m, kind, params, xx, hx)), (x,), (tx,))
    for i, (d, j, w) in enumerate(zip(duals, jvps, want)):
        torch.testing.assert_close(d, w, rtol=1e-10, atol=1e-12, msg=lambda msg: f"forward AD, output {i}: {msg}")
        torch.testing.assert_close(j, w, rtol=1e-10, atol=1e-12, msg=lambda msg: f"jvp, output {i}: {msg}")


@pytest.mark.parametrize("kind", KINDS)
def test_transforms_do_not_reach_the_fused_function(kind, monkeypatch):
    """The fused function has no vmap rule or jvp: transforms must take the reference loop."""
    from normkit.nn.rnn import sequence

    def refuse(*args, **kwargs):
        raise AssertionError("the fused function ran under a transform")

    m, x, hx = _setup(kind)
    params = dict(m.named_parameters())
    monkeypatch.setattr(sequence, "lstm_layer", refuse)
    monkeypatch.setattr(sequence, "gru_layer", refuse)
    torch.func.vmap(lambda xb, hb: _call(m, kind, params, xb, hb)[0], in_dims=(1, 1))(x, hx)
    with fwAD.dual_level():
        m(fwAD.make_dual(x, torch.ones_like(x)), hx if kind == "LSTM" else hx[0])
    with pytest.raises(AssertionError, match="fused function ran"):
        m(x, hx if kind == "LSTM" else hx[0])  # and a plain call does take it


# --------------------------------------------------------------------------- torch state_dicts


@pytest.mark.parametrize("bidirectional", [False, True])
def test_torch_lstm_state_dict_folds_bias_hh_into_the_gate_bias(bidirectional):
    theirs = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=bidirectional)
    ours = normkit.nn.LayerNormLSTM(3, 4, num_layers=2, bidirectional=bidirectional)
    sd = theirs.state_dict()
    before = {k: v.clone() for k, v in sd.items()}
    result = ours.load_state_dict(sd, strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(k.startswith("ln_") for k in result.missing_keys)
    for name in sd:
        if name.startswith("weight_"):
            assert torch.equal(getattr(ours, name), sd[name]), name
        elif name.startswith("bias_ih"):
            assert torch.equal(getattr(ours, name), sd[name] + sd[name.replace("_ih", "_hh")]), name
    assert all(torch.equal(sd[k], before[k]) for k in before) and sd.keys() == before.keys(), "the caller's dict changed"


def test_folded_bias_gives_torch_cell_state_where_layer_norm_is_inert():
    """With zero weight matrices both LN projections are 0 (LN(0) = 0), so the gates are the
    bias alone and ``c_n`` is torch's exactly: b = b_ih + b_hh is the right bias (b_ih alone,
    which dropping bias_hh would give, is not)."""
    theirs = torch.nn.LSTM(3, 4, dtype=F64)
    with torch.no_grad():
        theirs.weight_ih_l0.zero_()
        theirs.weight_hh_l0.zero_()
        theirs.bias_hh_l0.normal_()
    ours = normkit.nn.LayerNormLSTM(3, 4, dtype=F64)
    ours.load_state_dict(theirs.state_dict(), strict=False)
    x = randn((5, 2, 3), F64, seed=1)
    _, (_, c_theirs) = theirs(x)
    _, (_, c_ours) = ours(x)
    torch.testing.assert_close(c_ours, c_theirs, rtol=1e-12, atol=1e-12)


def test_lstm_cell_state_dict_folds_too():
    theirs, ours = torch.nn.LSTMCell(3, 4), normkit.nn.LayerNormLSTMCell(3, 4)
    result = ours.load_state_dict(theirs.state_dict(), strict=False)
    assert result.unexpected_keys == [] and sorted(result.missing_keys) == ["ln_c_bias", "ln_c_weight", "ln_hh_weight", "ln_ih_weight"]
    assert torch.equal(ours.bias_ih, theirs.bias_ih + theirs.bias_hh)


def test_fold_works_inside_a_parent_module():
    parent_theirs = torch.nn.ModuleDict({"rnn": torch.nn.LSTM(3, 4, bidirectional=True)})
    parent_ours = torch.nn.ModuleDict({"rnn": normkit.nn.LayerNormLSTM(3, 4, bidirectional=True)})
    result = parent_ours.load_state_dict(parent_theirs.state_dict(), strict=False)
    assert result.unexpected_keys == []
    t = parent_theirs["rnn"]
    assert torch.equal(parent_ours["rnn"].bias_ih_l0_reverse, t.bias_ih_l0_reverse + t.bias_hh_l0_reverse)


def test_bias_free_lstm_reports_both_torch_biases():
    ours = normkit.nn.LayerNormLSTM(3, 4, bias=False)
    result = ours.load_state_dict(torch.nn.LSTM(3, 4).state_dict(), strict=False)
    assert sorted(result.unexpected_keys) == ["bias_hh_l0", "bias_ih_l0"]
    with pytest.raises(RuntimeError, match='Unexpected key.*"bias_hh_l0"'):
        ours.load_state_dict(torch.nn.LSTM(3, 4).state_dict())


def test_bias_hh_without_bias_ih_is_reported_not_dropped():
    ours = normkit.nn.LayerNormLSTM(3, 4)
    result = ours.load_state_dict({"bias_hh_l0": torch.randn(16)}, strict=False)
    assert result.unexpected_keys == ["bias_hh_l0"]


@pytest.mark.parametrize("kind", KINDS)
def test_own_state_dict_round_trips(kind):
    a = make(kind, 3, 4, num_layers=2, bidirectional=True, seed=2)
    b = PAIRS[kind][0](3, 4, num_layers=2, bidirectional=True)
    b.load_state_dict(a.state_dict())  # strict
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    x = randn((3, 2, 3), seed=4)
    torch.testing.assert_close(a(x)[0], b(x)[0], rtol=0, atol=0)


def test_torch_gru_state_dict_maps_every_key_by_name():
    theirs, ours = torch.nn.GRU(3, 4, num_layers=2), normkit.nn.LayerNormGRU(3, 4, num_layers=2)
    result = ours.load_state_dict(theirs.state_dict(), strict=False)
    assert result.unexpected_keys == [] and all(k.startswith("ln_") for k in result.missing_keys)
    for name, value in theirs.state_dict().items():
        assert torch.equal(getattr(ours, name), value), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("kind", KINDS)
def test_is_grads_batched_equals_one_gradient_at_a_time(kind, dtype, backend):
    """A vmap batch of output gradients (is_grads_batched, vectorized jacobians) has no memory
    the compiled loop could read: the backward takes the differentiable recompute."""
    m = make(kind, 3, 4, num_layers=2, dtype=dtype, seed=5)
    x = randn((4, 2, 3), dtype, seed=6, requires_grad=True)
    with _backend(backend):
        out, _ = m(x)
        grads = randn((3,) + tuple(out.shape), dtype, seed=7)
        inputs = (x, m.weight_hh_l0)
        batched = torch.autograd.grad(out, inputs, grads, is_grads_batched=True, retain_graph=True)
        for i in range(3):
            single = torch.autograd.grad(out, inputs, grads[i], retain_graph=True)
            for got, want in zip(batched, single):
                tol = dict(rtol=1e-10, atol=1e-12) if dtype == F64 else dict(rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(got[i], want, **tol)
