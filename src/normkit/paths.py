"""The paths of a norm call that do not launch normkit's kernels, each chosen by
:func:`normkit.functional.route`: the reference composite (autograd modes the kernels' autograd
cannot serve) and the standard operators ONNX exporters write. Inputs are validated already;
each returns ``y`` or ``(y, s)``."""

from __future__ import annotations

import torch

from normkit import reference as ref

__all__ = ["composite_norm", "onnx_norm", "nested_norm", "complex_rms_norm", "fused_composite"]


def composite_norm(x, shape, weight, bias, eps, is_rms, residual, prenorm, dropout_p):
    """The reference composite (:mod:`normkit.reference`), the path for autograd modes the
    kernels' autograd cannot serve: every op in it has forward-AD, vmap and higher-order
    rules. Dropout uses the reference backend's mask stream."""
    keep = None
    if dropout_p > 0.0:
        keep = ref.dropout_keep_mask(ref.draw_dropout_seed(dropout_p), x.shape, dropout_p, x.device)
    kwargs = dict(residual=residual, prenorm=prenorm, keep_mask=keep, dropout_p=dropout_p)
    if is_rms:
        return ref.rms_norm(x, shape, weight, eps, **kwargs)
    return ref.layer_norm(x, shape, weight, bias, eps, **kwargs)


def onnx_norm(x, shape, weight, bias, eps, is_rms, residual, prenorm, dropout_p):
    """The op as ONNX exporters see it: the fused residual add (+ dropout) as separate ops, then
    ``F.layer_norm`` (exported as ``LayerNormalization``, opset >= 17) or, for RMS norm,
    ``F.rms_norm`` (the dynamo exporter writes ``RMSNormalization`` at opset >= 23, else a
    ``Pow/ReduceMean/Sqrt`` graph). The TorchScript exporter has no ``aten::rms_norm``, so under
    it (``torch.jit.is_tracing()``) RMS norm is the reference composite of plain ops."""
    s = torch.nn.functional.dropout(x, dropout_p, True) if dropout_p > 0.0 else x
    if residual is not None:
        s = s + residual
    w = None if weight is None else weight.to(x.dtype)
    if not is_rms:
        y = torch.nn.functional.layer_norm(s, shape, w, None if bias is None else bias.to(x.dtype), eps)
    elif torch.jit.is_tracing():
        y = ref.rms_norm(s, shape, w, eps)
    else:
        y = torch.nn.functional.rms_norm(s, shape, w, eps)
    return (y, s) if prenorm else y


def nested_norm(norm, x, normalized_shape, *args):
    """A nested tensor (torch.nested, jagged or strided layout): ``norm(component, shape,
    *args)`` on each component, re-wrapped in ``x``'s layout; autograd flows through
    ``unbind()``. The normalized dims must be regular trailing dims of every component."""
    return torch.nested.as_nested_tensor([norm(t, normalized_shape, *args) for t in x.unbind()], layout=x.layout)


def complex_rms_norm(x, normalized_shape, weight, eps):
    """RMS norm of a complex input, as :func:`torch.nn.functional.rms_norm` defines it (its
    OpInfo covers complex): ``x * rsqrt(mean(x * x) + eps) * weight`` with the complex square,
    ``eps`` defaulting to the real dtype's machine epsilon. normkit's kernels are real-only, so
    torch's own op runs it (plain calls only; the fused options raise for complex input)."""
    return torch.nn.functional.rms_norm(x, normalized_shape, weight, eps)


def fused_composite(x, residual, x1, rowscale, weight, bias, weight1, bias1, spec):
    """A call with fused options as the reference composite (:func:`normkit.reference.fused_forward`,
    torch ops every autograd mode and exporter understands), on ``(M, N)`` tensors, with the
    reference backend's dropout streams. Returns a :class:`~normkit.contract.ForwardOut`."""
    keep, keep1 = ref.fused_keep_masks(ref.draw_dropout_seed(spec.dropout_p), x, x1, spec.dropout_p)
    return ref.fused_forward(x, residual, x1, rowscale, weight, bias, weight1, bias1, spec, keep, keep1)
