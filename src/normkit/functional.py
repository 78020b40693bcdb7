r"""The public functional API: :func:`layer_norm` and :func:`rms_norm`.

Same first arguments as :func:`torch.nn.functional.layer_norm` / :func:`~torch.nn.functional.rms_norm`,
plus keyword-only fused options. Input is validated here, once; then the call is flattened to a
contiguous ``(rows, N)`` view and dispatched to a backend (:mod:`normkit.backends`). The exact
semantics are those of :mod:`normkit.reference`.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from normkit.dispatch import ROUTES, fused_norm, native_call, native_norm_dim, route
from normkit.dispatch import norm as _norm
from normkit.fused_options import FusedOptions, zero_centered_gains
from normkit.reference import default_rms_eps
from normkit.validation import FLOAT_DTYPES, check_casting_mode

__all__ = ["layer_norm", "rms_norm", "route", "native_call", "native_norm_dim", "ROUTES"]

ShapeLike = Union[int, Sequence[int], torch.Size]


def layer_norm(
    input: Tensor,
    normalized_shape: ShapeLike,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    *,
    residual: Optional[Tensor] = None,
    prenorm: bool = False,
    dropout_p: float = 0.0,
    training: bool = True,
    zero_centered_weight: bool = False,
    residual_in_fp32: bool = False,
    x1: Optional[Tensor] = None,
    weight1: Optional[Tensor] = None,
    bias1: Optional[Tensor] = None,
    rowscale: Optional[Tensor] = None,
    return_dropout_mask: bool = False,
    out_dtype: Optional[torch.dtype] = None,
    out: Optional[Tensor] = None,
    out1: Optional[Tensor] = None,
    residual_out: Optional[Tensor] = None,
    dim: Optional[int] = None,
):
    r"""Layer normalization (Ba, Kiros & Hinton 2016) over the trailing ``normalized_shape`` dims.

    .. math::
        s = \operatorname{dropout}(x) + r, \qquad
        y = \frac{s - \mathrm{E}[s]}{\sqrt{\mathrm{Var}[s] + \epsilon}} \cdot g + b,
        \qquad g = \begin{cases} 1 + w & \text{zero\_centered\_weight} \\ w & \text{else} \end{cases}

    with the biased variance, statistics in float32 (float64 for float64 input).

    Args:
        input: tensor of shape ``(*, *normalized_shape)``, float16/bfloat16/float32/float64.
        normalized_shape: the trailing dims to normalize over (an int or a sequence of ints).
        weight, bias: gain ``g`` and bias ``b`` of shape ``normalized_shape`` (any floating
            dtype; the output keeps the input's dtype), or ``None``.
        eps: added to the variance, ``>= 0``.
        residual: optional tensor like ``input``; the norm is applied to ``dropout(input) + residual``
            in one fused pass.
        prenorm: also return ``s = dropout(input) + residual`` (for pre-LN residual streams).
        dropout_p: dropout rate in ``[0, 1)`` applied to ``input`` before the add, when
            ``training`` is true.
        training: apply dropout (as :func:`torch.nn.functional.dropout`'s ``training``).
        zero_centered_weight: scale by ``1 + weight`` instead of ``weight`` (Gemma's gain,
            flash-attn's ``zero_centered_weight``, Liger's ``offset=1.0``): a weight initialized
            to zeros is the identity gain, and weight decay pulls the gain towards 1, not 0.
            The gain is ``1.0 + weight.float()`` (in float64 for float64 input), as Gemma
            computes it; gradients reach ``weight`` through that sum. Needs a ``weight``.
            With ``weight1`` the second gain is ``1 + weight1`` too (as in flash-attn).

    The options below are flash-attn's (``layer_norm_fn``), with its semantics. Each is a
    switch of the one kernel contract (:mod:`normkit.contract`): the C++ and Triton kernels
    apply every option inside their one forward and one backward pass, the reference
    (:func:`normkit.reference.fused_forward`) defines the results.

    Args:
        residual_in_fp32: keep the residual stream in float32: the sum ``s`` is formed in
            float32 and stored (the prenorm output) in float32 (float64 stays float64) even for
            16-bit ``input``, and the norm normalizes that float32 sum, not a 16-bit rounding
            of it. It also admits a ``residual`` of another dtype than ``input`` (say a float32
            stream beside bfloat16 branches; without this flag that raises): the sum is formed
            in float32 and stored in the residual's dtype, at least float32. (flash-attn
            stores it in a given residual's dtype even when that is 16-bit.)
        x1: a second branch output of ``input``'s shape and dtype, added into the sum with its
            own dropout mask: ``s = dropout(input) + dropout(x1) + residual``.
        weight1, bias1: a second gain and bias (parallel blocks, GPT-J / PaLM) applied to the
            same normalized ``s``: ``y1 = s_hat * weight1 + bias1``; ``weight1`` needs
            ``weight``. Both outputs come from the same pass over ``s``.
        rowscale: a per-row scale of shape ``input.shape`` without the normalized dims,
            applied to ``input`` before dropout and the add (``x * rowscale[..., None]``);
            not with ``x1`` (flash-attn refuses the pair too).
        return_dropout_mask: also return the boolean keep masks of ``input`` and ``x1``
            (``None`` where no dropout ran or there is no ``x1``): the masks the kernel drew
            and applied. Each backend has its own counter-based stream, seeded from torch's
            default generator, so ``torch.manual_seed`` reproduces them.
        out_dtype: the dtype of ``y`` (and ``y1``), default the input's: ``y`` is computed in
            float32 (float64 for float64 input) and rounded once to ``out_dtype``, by the
            kernel as it writes ``y``.
        out, out1, residual_out: buffers of the result's shape, dtype and device for ``y``,
            ``y1`` and the prenorm sum, returned. When nothing needs gradients the kernel
            writes them itself (contiguous buffers, the normalized dims last); with gradients,
            or another layout, the results are copied into them (``copy_``, an extra pass,
            through which gradients flow). ``out1`` needs ``weight1``, ``residual_out`` needs
            ``prenorm=True``. A buffer may not share memory with an input or with another
            buffer (:class:`~normkit.errors.NormOverlapError`): the kernel would overwrite what
            it still reads.
        dim: the first normalized dim (default ``input.dim() - len(normalized_shape)``): with
            ``x`` of shape ``(N, C, H, W)``, ``layer_norm(x, (C,), w, b, dim=1)`` normalizes
            over channels. On CPU without other options (``out=`` aside) the compiled strided
            kernel normalizes the channels where they lie; otherwise the dims are moved last
            (``movedim``, a copy to that layout), normalized and moved back: the outputs are
            views in the input's dim order.

    Returns:
        ``y`` with the input's shape and dtype, or ``(y, s)`` if ``prenorm``. With the options,
        flash-attn's tuple: ``y``, then ``y1`` (with ``weight1``), ``s`` (with ``prenorm``),
        ``mask, mask1`` (with ``return_dropout_mask``).
    """
    if zero_centered_weight is not False:
        weight, weight1 = zero_centered_gains(zero_centered_weight, input, weight, weight1)
    if not (x1 is weight1 is bias1 is rowscale is out_dtype is out1 is dim is None) or (
        residual_in_fp32 is not False or return_dropout_mask is not False
    ):
        options = FusedOptions(residual_in_fp32, x1, weight1, bias1, rowscale, return_dropout_mask, out_dtype, out, residual_out, dim, out1)
        return fused_norm(input, normalized_shape, weight, bias, eps, False, residual, prenorm, dropout_p, training, options)
    return _norm(input, normalized_shape, weight, bias, eps, False, residual, prenorm, dropout_p, training, out, residual_out)


def rms_norm(
    input: Tensor,
    normalized_shape: ShapeLike,
    weight: Optional[Tensor] = None,
    eps: Optional[float] = None,
    *,
    residual: Optional[Tensor] = None,
    prenorm: bool = False,
    dropout_p: float = 0.0,
    training: bool = True,
    zero_centered_weight: bool = False,
    casting_mode: str = "gemma",
    bias: Optional[Tensor] = None,
    residual_in_fp32: bool = False,
    x1: Optional[Tensor] = None,
    weight1: Optional[Tensor] = None,
    bias1: Optional[Tensor] = None,
    rowscale: Optional[Tensor] = None,
    return_dropout_mask: bool = False,
    out_dtype: Optional[torch.dtype] = None,
    out: Optional[Tensor] = None,
    out1: Optional[Tensor] = None,
    residual_out: Optional[Tensor] = None,
    dim: Optional[int] = None,
):
    r"""RMS normalization (Zhang & Sennrich 2019) over the trailing ``normalized_shape`` dims.

    .. math::
        s = \operatorname{dropout}(x) + r, \qquad
        y = \frac{s}{\sqrt{\mathrm{E}[s^2] + \epsilon}} \cdot g

    ``eps=None`` uses the machine epsilon of the compute dtype (float32 for float16/bfloat16
    input), as :func:`torch.nn.functional.rms_norm` does.

    ``casting_mode`` says where a float16/bfloat16 result is rounded (Liger-Kernel's names;
    for float32 and float64 input the three modes compute the same thing):

    - ``"gemma"`` (the default, and normkit's semantics since 0.1; Hugging Face
      ``GemmaRMSNorm``, ``torch.nn.functional.rms_norm`` on CPU): statistics, normalization and
      gain in float32, the output rounded once, ``(x_hat * g.float()).to(dtype)``.
    - ``"llama"`` (Hugging Face ``LlamaRMSNorm``, Liger's default): ``x_hat`` is rounded to the
      input dtype, then multiplied by the gain, ``(g * x_hat.to(dtype)).to(dtype)``. The
      kernel runs without the gain and the product is a second elementwise pass. With a gain
      of the input's dtype this is Hugging Face's formula; with a float32 gain Hugging Face
      returns float32, normkit rounds the product to the input dtype (as Liger does).
    - ``"none"``: Liger computes everything in the input dtype. normkit never takes statistics
      in 16 bits (a bfloat16 sum of squares keeps 8 bits), so ``"none"`` is accepted for
      Liger compatibility and computes exactly as ``"gemma"``.

    ``zero_centered_weight=True`` (Gemma) uses the gain ``g = 1 + weight``, formed in float32
    in every mode.

    ``bias`` (keyword-only; flash-attn's ``rms_norm_fn`` has one) shifts the output,
    ``y = x_hat * g + bias``, added to the norm's float32 (float64) result in the kernel and
    rounded once. With ``casting_mode="llama"`` the bias is added after the gain,
    ``(g * x_hat.to(dtype) + bias)``, then rounded to the input dtype (and then cast to
    ``out_dtype`` if one is given: Liger's and Hugging Face's llama result is in the input
    dtype). ``residual_in_fp32``, ``x1``, ``weight1``/``bias1``, ``rowscale``,
    ``return_dropout_mask``, ``out_dtype``, ``out``/``out1``/``residual_out`` and ``dim`` as in
    :func:`layer_norm` (``bias1`` is the RMS bias of the second branch). Other arguments and
    the return value as :func:`layer_norm`.
    """
    if eps is None and isinstance(input, Tensor) and input.dtype in FLOAT_DTYPES:
        eps = default_rms_eps(input.dtype)
    if zero_centered_weight is not False:
        weight, weight1 = zero_centered_gains(zero_centered_weight, input, weight, weight1)
    if not (bias is x1 is weight1 is bias1 is rowscale is out_dtype is out1 is dim is None) or (
        residual_in_fp32 is not False or return_dropout_mask is not False
    ):
        options = FusedOptions(residual_in_fp32, x1, weight1, bias1, rowscale, return_dropout_mask, out_dtype, out, residual_out, dim, out1)
        mode = check_casting_mode(casting_mode)
        return fused_norm(input, normalized_shape, weight, bias, eps, True, residual, prenorm, dropout_p, training, options, mode)
    if casting_mode != "gemma" and check_casting_mode(casting_mode) == "llama" and weight is not None and (
        isinstance(input, Tensor) and input.dtype in (torch.float16, torch.bfloat16)
    ):  # x_hat rounded to the input dtype before the gain: the fused path's "llama" switch
        options = FusedOptions(out=out, residual_out=residual_out)
        return fused_norm(input, normalized_shape, weight, None, eps, True, residual, prenorm, dropout_p, training, options, "llama")
    return _norm(input, normalized_shape, weight, None, eps, True, residual, prenorm, dropout_p, training, out, residual_out)

