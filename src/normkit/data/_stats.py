r"""Per-feature statistics shared by the scalers and :class:`~normkit.data.RunningNormalizer`.

Everything here works on float64 tensors laid out as ``(rows, *feature_shape)`` — rows are the
samples reduced over — and returns per-feature tensors of shape ``feature_shape``.

Moments are kept as the triple :math:`(n, \mu, M_2)` with :math:`M_2 = \sum_i (x_i - \mu)^2`.
One batch is summarized in float64 with the two-pass formula (first :math:`\mu`, then the
squared deviations from it), which stays exact at large means, where :math:`E[x^2] - E[x]^2`
cancels catastrophically.
Two summaries merge exactly with Chan, Golub & LeVeque's parallel formula (1979):

.. math::

    n = n_a + n_b,\qquad \delta = \mu_b - \mu_a,\qquad
    \mu = \mu_a + \delta\,\frac{n_b}{n},\qquad
    M_2 = M_{2,a} + M_{2,b} + \delta^2\,\frac{n_a n_b}{n}

Only differences of means enter, so the merge loses no precision to a large common offset:
streaming :math:`10^7` values of :math:`10^6 + \mathcal N(0, 1)` this way matches a float64
two-pass computation over all of them to about 1e-12 relative.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = [
    "FLOAT64",
    "affine_forward",
    "affine_inverse",
    "Moments",
    "batch_moments",
    "chan_merge",
    "check_finite_moments",
    "check_values",
    "ew_batch_moments",
    "ew_merge",
    "constant_mask",
    "ew_variance",
    "nan_min_max",
    "nan_quantiles",
    "safe_scale",
]

FLOAT64 = torch.float64
NAN_POLICIES = ("raise", "omit")

Moments = Tuple[Tensor, Tensor, Tensor]  # (count, mean, m2), each float64 of the feature shape


def check_nan_policy(nan_policy: str) -> str:
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
    return nan_policy


def check_values(x: Tensor, name: str, nan_policy: str) -> bool:
    """Raise ``ValueError`` if ``x`` holds an infinity, or a NaN under ``nan_policy="raise"``.
    Returns whether ``x`` holds a NaN (possible only under ``"omit"``).

    Fast gate: one sum (float32 at least) and one host sync; NaN or Inf anywhere makes it
    non-finite. Only then are NaNs and infinities counted (an overflowing sum of finite
    values costs that second look and passes).
    """
    acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    if bool(torch.isfinite(x.sum(dtype=acc))):
        return False
    n_nan = int(torch.isnan(x).sum())
    n_inf = int(torch.isinf(x).sum())
    if n_inf:
        raise ValueError(
            f"{name} contains {n_inf} infinite value(s) (of {x.numel()}); expected finite "
            f"values{' or NaN' if nan_policy == 'omit' else ''}"
        )
    if n_nan and nan_policy == "raise":
        raise ValueError(
            f"{name} contains {n_nan} NaN value(s) (of {x.numel()}); expected no NaN with "
            f"nan_policy='raise' (pass nan_policy='omit' to leave NaNs out of the statistics "
            f"and pass them through)"
        )
    return n_nan > 0


def batch_moments(rows: Tensor, has_nan: bool = True) -> Moments:
    r"""Per-feature :math:`(n, \mu, M_2)` of the float64 ``rows`` (``(R, *features)``), NaNs left out.

    Two-pass: :math:`\mu = \frac1n\sum x_i`, then :math:`M_2 = \sum (x_i - \mu)^2` over the
    present values (masked only when ``has_nan``). A feature with no value gets :math:`(0, 0, 0)`, the identity of
    :func:`chan_merge`; a feature whose values are all equal gets exactly that value and
    :math:`M_2 = 0` (a rounded mean would leave :math:`M_2 \approx (n\varepsilon x)^2`), so
    merges keep it exactly constant (:math:`\delta = 0`).
    """
    if not has_nan:
        n = rows.shape[0]
        mean = rows.sum(0) / n
        m2 = (rows - mean).square_().sum(0)  # torch's CPU var_mean (Welford) is ~1e4x less exact here
        count = torch.full_like(mean, float(n))
        if not bool(constant_mask(m2 / n, mean, count).any()):  # only near-constant features need the exact look
            return count, mean, m2
    else:
        present = ~torch.isnan(rows)
        count = present.sum(0, dtype=FLOAT64)
        mean = torch.where(present, rows, 0.0).sum(0) / count.clamp_min(1.0)
        dev = torch.where(present, rows - mean, 0.0)
        m2 = (dev * dev).sum(0)
    lo, hi = nan_min_max(rows) if has_nan else torch.aminmax(rows, dim=0)
    constant = lo == hi
    return count, torch.where(constant, lo, mean), torch.where(constant, 0.0, m2)


def chan_merge(a: Moments, b: Moments) -> Moments:
    r"""Merge two :math:`(n, \mu, M_2)` summaries exactly (Chan et al.; see the module docstring).

    Works elementwise on per-feature tensors; a side with :math:`n = 0` leaves the other intact.
    """
    n_a, mean_a, m2_a = a
    n_b, mean_b, m2_b = b
    n = n_a + n_b
    safe_n = n.clamp_min(1.0)
    delta = mean_b - mean_a
    mean = mean_a + delta * (n_b / safe_n)
    m2 = m2_a + m2_b + delta * delta * (n_a * n_b / safe_n)
    return n, mean, m2


def check_finite_moments(mean: Tensor, m2: Tensor, rows: Tensor, name: str) -> None:
    r"""Raise ``ValueError`` when a mean or :math:`M_2` overflowed float64.

    Every value is finite (:func:`check_values`), but :math:`\sum x` or :math:`\sum (x-\mu)^2`
    can still exceed float64's range (about 1.8e308: values beyond ~1e154 for the squares); an
    infinite variance would otherwise read as "constant feature" and scale silently by 1.
    """
    bad = ~(torch.isfinite(mean) & torch.isfinite(m2))
    if bool(bad.any()):
        idx = bad.reshape(-1).nonzero()[:, 0].tolist()
        big = float(torch.where(torch.isnan(rows), 0.0, rows).abs().max())
        raise ValueError(
            f"{name}: the mean or variance of feature(s) {idx[:10]}{' ...' if len(idx) > 10 else ''} "
            f"overflows float64 (largest |value| {big:.3g}; the sum of squared deviations must stay "
            f"below 1.8e308); rescale {name} first (e.g. divide it by 1e150)"
        )


# -- exponentially weighted moments (RunningNormalizer with momentum) ---------------------------

EWMoments = Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]  # (count, weight, weight_sq, mean, m2)


def ew_batch_moments(rows: Tensor, alpha: float, has_nan: bool = True) -> Tuple[Tensor, EWMoments]:
    r"""Exponentially weighted moments of the float64 ``rows`` (``(R, *features)``) in row order.

    Row :math:`j` of the :math:`n` present values of a feature gets the weight
    :math:`w_j = (1-\alpha)^{k_j}`, :math:`k_j` = the number of that feature's present values
    after it (the newest gets 1): the weights the per-sample update would give them. Returns
    ``(decay, (n, W, W_2, \mu, M_2))`` with :math:`W = \sum w_j`, :math:`W_2 = \sum w_j^2`,
    :math:`\mu = \sum w_j x_j / W`, :math:`M_2 = \sum w_j (x_j - \mu)^2` (two-pass) and
    ``decay`` :math:`= (1-\alpha)^n`, the factor the older statistics' weights take on.
    NaNs (``has_nan``) get weight 0 and do not count as a step of that feature's clock.
    """
    log_q = math.log1p(-alpha)
    if not has_nan:  # the same weights for every feature: one (R,) vector
        n = rows.shape[0]
        full = lambda v: torch.full(rows.shape[1:], v, dtype=FLOAT64, device=rows.device)  # noqa: E731
        decay, count = full(math.exp(n * log_q)), full(float(n))
        if n == 1:  # the common streaming case: the sample itself, weight 1
            return decay, (count, full(1.0), full(1.0), rows[0].clone(), full(0.0))
        age = torch.arange(n - 1, -1, -1, dtype=FLOAT64, device=rows.device)
        w = torch.exp(age * log_q).reshape((n,) + (1,) * (rows.dim() - 1))
        q = math.exp(log_q)  # geometric sums, W = (1 - q^n)/(1 - q), W_2 = (1 - q^2n)/(1 - q^2)
        weight, weight_sq = full(-math.expm1(n * log_q) / alpha), full(-math.expm1(2 * n * log_q) / (1 - q * q))
        mean = (w * rows).sum(0) / weight
        m2 = (w * (rows - mean).square()).sum(0)
        lo, hi = torch.aminmax(rows, dim=0)
        constant = lo == hi  # exact value, exactly zero spread (as batch_moments)
        return decay, (count, weight, weight_sq, torch.where(constant, lo, mean), torch.where(constant, 0.0, m2))
    present = ~torch.isnan(rows)
    p = present.to(FLOAT64)
    count = p.sum(0)
    after = p.flip(0).cumsum(0).flip(0) - p  # present values after each row, per feature
    w = torch.exp(after * log_q) * p
    weight = w.sum(0)
    mean = (w * torch.where(present, rows, 0.0)).sum(0) / weight.clamp_min(torch.finfo(FLOAT64).tiny)
    m2 = (w * torch.where(present, rows - mean, 0.0).square()).sum(0)
    lo, hi = nan_min_max(rows)
    constant = (lo == hi) & (count > 0)
    mean = torch.where(constant, lo, torch.where(count > 0, mean, 0.0))
    m2 = torch.where(constant | (count == 0), 0.0, m2)
    return torch.exp(count * log_q), (count, weight, (w * w).sum(0), mean, m2)


def ew_merge(old: EWMoments, decay: Tensor, new: EWMoments) -> EWMoments:
    r"""Age the ``old`` weighted moments by ``decay`` and merge ``new`` into them.

    Ageing multiplies every old weight by ``decay``: :math:`W \to dW`, :math:`W_2 \to d^2W_2`,
    :math:`M_2 \to dM_2`. The merge is Chan's formula with weights in place of counts
    (West 1979): :math:`\mu = \mu_a + \delta W_b / W`,
    :math:`M_2 = M_{2,a} + M_{2,b} + \delta^2 W_a W_b / W`.
    """
    n_a, w_a, w2_a, mean_a, m2_a = old
    n_b, w_b, w2_b, mean_b, m2_b = new
    w_a, w2_a, m2_a = w_a * decay, w2_a * decay * decay, m2_a * decay
    weight = w_a + w_b
    safe = weight.clamp_min(torch.finfo(FLOAT64).tiny)
    delta = mean_b - mean_a
    mean = torch.where(w_a > 0, mean_a + delta * (w_b / safe), mean_b)
    mean = torch.where(w_b > 0, mean, mean_a)
    m2 = m2_a + m2_b + delta * delta * (w_a * w_b / safe)
    return n_a + n_b, weight, w2_a + w2_b, mean, torch.where(w_b > 0, m2, m2_a)


def ew_variance(weight: Tensor, weight_sq: Tensor, m2: Tensor) -> Tensor:
    r"""Unbiased weighted variance :math:`M_2 / (W - W_2/W)` (reliability weights; 0 when a
    single value carries all the weight, e.g. after one sample)."""
    dof = weight - weight_sq / weight.clamp_min(torch.finfo(FLOAT64).tiny)
    return torch.where(dof > 0, m2 / torch.where(dof > 0, dof, 1.0), 0.0)


def merge_all(parts: Sequence[Moments]) -> Moments:
    """Fold :func:`chan_merge` over ``parts`` left to right (a fixed order: bitwise reproducible)."""
    out = parts[0]
    for p in parts[1:]:
        out = chan_merge(out, p)
    return out


def constant_mask(var: Tensor, mean: Tensor, count: Tensor) -> Tensor:
    r"""Features indistinguishable from constant: :math:`\sigma^2 \le n\varepsilon\sigma^2 + (n\mu\varepsilon)^2`.

    The bound is the rounding error of a float64 two-pass variance (Chan, Golub & LeVeque), the
    test scikit-learn's ``StandardScaler`` uses; such features get scale 1 instead of a
    division by (almost) zero.
    """
    eps = torch.finfo(FLOAT64).eps
    return var <= count * eps * var + (count * mean * eps) ** 2


def safe_scale(scale: Tensor, constant: Tensor = None) -> Tensor:
    """``scale`` with 1 where ``constant`` (default: where ``scale < 10·eps``), sklearn's
    ``_handle_zeros_in_scale``: constant features pass through shifted, never divided by 0."""
    if constant is None:
        constant = scale < 10 * torch.finfo(FLOAT64).eps
    return torch.where(constant, torch.ones_like(scale), scale)


def nan_min_max(rows: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-feature min and max of ``rows`` ignoring NaNs (``+inf``/``-inf`` where all are NaN)."""
    nan = torch.isnan(rows)
    lo = torch.where(nan, float("inf"), rows).amin(0)
    hi = torch.where(nan, float("-inf"), rows).amax(0)
    return lo, hi


def _lerp(a: Tensor, b: Tensor, t: Tensor) -> Tensor:
    # numpy's formula (numpy/lib/_function_base_impl.py `_lerp`): exact at both ends.
    diff = b - a
    return torch.where(t >= 0.5, b - diff * (1.0 - t), a + diff * t)


def nan_quantiles(rows: Tensor, qs: Sequence[float]) -> Tuple[Tensor, Tensor]:
    """Per-feature quantiles of ``rows`` ignoring NaNs, with numpy's default ``"linear"`` method.

    ``qs`` are fractions in [0, 1]. Returns ``(quantiles, count)``: quantiles of shape
    ``(len(qs), *features)`` (NaN for a feature with no value) and the per-feature count of
    non-NaN values. One sort of each feature's values, laid out contiguously (sorting along a
    strided dim is ~3x slower); torch sorts NaN last. No size limit (``torch.quantile`` refuses
    inputs over 2**24 elements).
    """
    fshape = rows.shape[1:]
    cols = rows.reshape(rows.shape[0], -1).T.contiguous()  # (F, R)
    ordered, _ = torch.sort(cols, dim=1)
    count = (~torch.isnan(cols)).sum(1)
    last = (count - 1).clamp_min(0)
    out = []
    for q in qs:
        pos = last.to(FLOAT64) * q
        lo = pos.floor()
        t = pos - lo
        lo_i = lo.long()
        hi_i = torch.minimum(lo_i + 1, last)
        a = ordered.gather(1, lo_i[:, None])[:, 0]
        b = ordered.gather(1, hi_i[:, None])[:, 0]
        out.append(torch.where(count > 0, _lerp(a, b, t), float("nan")).reshape(fshape))
    return torch.stack(out), count.reshape(fshape)


def _split(v: Tensor) -> Tuple[Tensor, Tensor]:
    """``v`` (float64) as ``hi + lo`` with both float32: ``hi`` = v rounded, ``lo`` = the rest."""
    hi = v.to(torch.float32)
    return hi, (v - hi.to(FLOAT64)).to(torch.float32)


def affine_forward(x: Tensor, center: Optional[Tensor], divisor: Optional[Tensor], offset: Optional[float] = None) -> Tensor:
    r""":math:`y = (x - c) / d + o` per feature (float64 statistics broadcastable to ``x``), as a
    new tensor of ``x``'s dtype; ``None`` skips a step.

    float64 input: computed in float64. Other dtypes: in float32 (3-4x faster than float64
    on CPU) with the center split as :math:`c = c_{hi} + c_{lo}` (two float32s):
    :math:`x - c_{hi}` is exact near the center (Sterbenz), so a large offset costs no
    accuracy: the result is within ~2 float32 ulps of the float64 one, where subtracting a
    float32-rounded :math:`c` would be off by :math:`\mathrm{ulp}(c)/2d` (0.03/d at
    :math:`c = 10^6`).
    """
    if x.dtype == FLOAT64:
        y = x if center is None else x - center
        y = y if divisor is None else y / divisor
        y = y if offset is None else y + offset
        return y.clone() if y is x else y
    y = x.to(torch.float32)
    if center is not None:
        hi, lo = _split(center)
        y = (y - hi).sub_(lo)
    if divisor is not None:
        y = y / divisor.to(torch.float32)
    if offset is not None:
        y = y + offset
    y = y.to(x.dtype)
    return y.clone() if y is x else y


def affine_inverse(y: Tensor, center: Optional[Tensor], divisor: Optional[Tensor], offset: Optional[float] = None) -> Tensor:
    """Inverse of :func:`affine_forward`: :math:`x = (y - o)\\,d + c`, same precision rules."""
    if y.dtype == FLOAT64:
        x = y if offset is None else y - offset
        x = x if divisor is None else x * divisor
        x = x if center is None else x + center
        return x.clone() if x is y else x
    x = y.to(torch.float32)
    if offset is not None:
        x = x - offset
    if divisor is not None:
        x = x * divisor.to(torch.float32)
    if center is not None:
        hi, lo = _split(center)
        x = (x + lo).add_(hi)
    x = x.to(y.dtype)
    return x.clone() if x is y else x
