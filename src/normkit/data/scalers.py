r"""Input scalers with scikit-learn's API on torch tensors (any device) and numpy arrays.

:class:`MinMaxScaler`, :class:`StandardScaler` and :class:`RobustScaler` take the constructor
arguments, methods (``fit``, ``partial_fit``, ``transform``, ``fit_transform``,
``inverse_transform``, ``get_params``/``set_params``) and fitted attribute names (``mean_``,
``var_``, ``scale_``, ``data_min_``, ...) of their ``sklearn.preprocessing`` namesakes, and
agree with them to float64 rounding. What differs:

- **Types.** Output type follows input type: tensor in, tensor out (same device and dtype);
  numpy in, numpy out (same dtype). Fitted attributes are numpy arrays if the first ``fit``
  saw numpy, else float64 tensors on the data's device. Statistics are always accumulated in
  float64 (on the input's device), whatever the input dtype. ``transform`` runs in float64
  for float64 input and in float32 otherwise, with the center split into two float32 parts
  so that data far from 0 (1e6 + noise) is still scaled within ~2 float32 ulps of float64
  math (:func:`normkit.data._stats.affine_forward`).
- **Feature dims.** ``feature_dims`` names the dims that index features; all other dims are
  samples and are reduced over. ``-1`` (default) = sklearn's ``(n_samples, n_features)``, and
  also ``(batch, time, features)``; ``(1,)`` = per channel of NCHW images (reduces N, H, W);
  ``(-2, -1)`` = one statistic per ``(H, W)`` position. Fitted attributes have the shape of the
  feature dims (``(C,)`` for NCHW with ``(1,)``). Negative dims count from the end, so a scaler
  fitted on ``(B, T, F)`` also transforms ``(B, F)``.
- **NaN.** ``nan_policy="raise"`` (default) rejects NaN with a ``ValueError`` that says how
  many; ``"omit"`` leaves NaNs out of the statistics per feature and passes them through
  ``transform`` — sklearn's behaviour. Infinities are always rejected, as in sklearn.
- **Integers are not converted:** a non-floating input raises ``TypeError``.
- ``state_dict()`` / ``load_state_dict()`` save and restore the fitted statistics (a dict that
  ``torch.save`` stores with ``weights_only=True``); ``to(device)`` moves them.

Constant features (zero range, or variance within float64 rounding of zero) get scale 1,
as in sklearn: they are shifted, never divided by zero, so no NaN or Inf appears.
"""

from __future__ import annotations

import inspect
import math
import numbers
import statistics
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from normkit.data import _arrays as A
from normkit.data._stats import (
    FLOAT64,
    affine_forward,
    affine_inverse,
    batch_moments,
    chan_merge,
    check_finite_moments,
    check_nan_policy,
    check_values,
    constant_mask,
    nan_min_max,
    nan_quantiles,
    safe_scale,
)

__all__ = ["MinMaxScaler", "NotFittedError", "RobustScaler", "StandardScaler"]


class NotFittedError(ValueError, AttributeError):
    """A scaler was used before ``fit``. Subclasses ``ValueError`` and ``AttributeError``, like
    ``sklearn.exceptions.NotFittedError``, so ``hasattr(scaler, "mean_")`` is ``False`` before
    fitting."""


class _Scaler:
    """Shared machinery: parameters, input checks, feature dims, state, type round trip.

    A subclass defines ``_STATE_TENSORS`` (names of its float64 per-feature statistics),
    ``_validate()``, ``_update(rows, has_nan)`` (fold one batch of float64 rows into ``self._state``),
    ``_affine()`` -> ``(center, divisor, offset)`` of the transform ``(x - center) / divisor +
    offset`` (float64 per-feature tensors, ``None`` to skip) and optionally ``_post(y)``.
    """

    _STATE_TENSORS: Tuple[str, ...] = ()
    _extra_state_keys: Tuple[str, ...] = ()

    def __init__(self, feature_dims: A.DimsLike, nan_policy: str) -> None:
        self.feature_dims = feature_dims
        self.nan_policy = nan_policy
        self._check_params()
        self._reset()

    # -- scikit-learn parameter protocol -------------------------------------------------
    @classmethod
    def _param_names(cls):
        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]

    def get_params(self, deep: bool = True) -> Dict[str, Any]:
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params: Any):
        unknown = sorted(set(params) - set(self._param_names()))
        if unknown:
            raise ValueError(f"Invalid parameter(s) {unknown} for {type(self).__name__}; valid: {self._param_names()}")
        old = self.get_params()
        for k, v in params.items():
            setattr(self, k, v)
        try:
            self._check_params()
        except Exception:
            for k, v in old.items():
                setattr(self, k, v)
            raise
        return self

    def __repr__(self) -> str:
        sig = inspect.signature(type(self).__init__).parameters
        args = [f"{k}={v!r}" for k, v in self.get_params().items() if v != sig[k].default]
        return f"{type(self).__name__}({', '.join(args)})"

    def _check_params(self) -> None:
        self._dims = A.as_dims(self.feature_dims)
        check_nan_policy(self.nan_policy)
        self._validate()

    def _validate(self) -> None:
        pass

    # -- state ---------------------------------------------------------------------------
    def _reset(self) -> None:
        self._state: Optional[Dict[str, Tensor]] = None
        self._fshape: Optional[Tuple[int, ...]] = None
        self._numpy_attrs = False
        self._n_rows = 0

    @property
    def _fitted(self) -> bool:
        return self._state is not None

    def _require_fitted(self) -> None:
        if not self._fitted:
            raise NotFittedError(
                f"This {type(self).__name__} instance is not fitted yet. Call 'fit' with "
                f"appropriate arguments before using this estimator."
            )

    def _out(self, t: Tensor):
        """A fitted attribute, as numpy if the first fit saw numpy."""
        return t.detach().cpu().numpy() if self._numpy_attrs else t

    @property
    def n_features_in_(self) -> int:
        self._require_fitted()
        return math.prod(self._fshape)

    @property
    def feature_shape_(self) -> Tuple[int, ...]:
        """Sizes of the feature dims seen in ``fit`` (the shape of every fitted statistic)."""
        self._require_fitted()
        return self._fshape

    def state_dict(self) -> Dict[str, Any]:
        """The fitted statistics (float64 tensors) and their metadata; parameters are not
        included — they come from the constructor, as for a ``torch.nn.Module``."""
        self._require_fitted()
        out: Dict[str, Any] = {k: v.clone() for k, v in self._state.items()}
        out.update(feature_shape=tuple(self._fshape), n_rows=int(self._n_rows), numpy_attrs=self._numpy_attrs)
        out.update(self._extra_state())
        return out

    def _extra_state(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]):
        expected = set(self._STATE_TENSORS) | {"feature_shape", "n_rows", "numpy_attrs"} | set(self._extra_state_keys)
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(
                f"state for {type(self).__name__}: missing keys {missing}, unexpected keys {unexpected}"
            )
        fshape = tuple(int(s) for s in state["feature_shape"])
        tensors = {}
        for k in self._STATE_TENSORS:
            t = torch.as_tensor(state[k]).to(FLOAT64)
            if tuple(t.shape) != fshape:
                raise ValueError(f"state[{k!r}] has shape {tuple(t.shape)}, expected feature_shape {fshape}")
            tensors[k] = t.clone()
        self._check_loaded(state)
        self._state, self._fshape = tensors, fshape
        self._n_rows, self._numpy_attrs = int(state["n_rows"]), bool(state["numpy_attrs"])
        return self

    def _check_loaded(self, state: Dict[str, Any]) -> None:
        pass

    def to(self, device):
        """Move the fitted statistics to ``device`` (in place); returns ``self``."""
        if self._fitted:
            self._state = {k: v.to(device) for k, v in self._state.items()}
        return self

    # -- input handling ------------------------------------------------------------------
    def _prepare(self, X, name: str, *, new_fit: bool):
        t, was_numpy = A.to_tensor(X, name)
        dims = A.resolve_dims(self._dims, t.dim(), name)
        fshape = A.feature_shape(t, dims)
        if math.prod(fshape) == 0:
            raise ValueError(
                f"Found array with 0 feature(s) (shape={list(t.shape)}) while a minimum of 1 is required "
                f"by {type(self).__name__}: {name}'s feature dims {list(dims)} have sizes {list(fshape)}"
            )
        if self._fitted and not new_fit:
            if fshape != self._fshape:
                raise ValueError(
                    f"{name} has {math.prod(fshape)} features (shape {list(fshape)} on feature "
                    f"dims {list(dims)} of input {list(t.shape)}), but {type(self).__name__} is "
                    f"expecting {math.prod(self._fshape)} features (shape {list(self._fshape)})"
                )
            device = next(iter(self._state.values())).device
            if t.device != device:
                raise ValueError(
                    f"{name} is on {t.device} but the fitted statistics of {type(self).__name__} "
                    f"are on {device}; move {name} there or call .to({str(t.device)!r}) on the scaler"
                )
        has_nan = check_values(t, name, self.nan_policy)
        return t, was_numpy, dims, fshape, has_nan

    def _fit_batch(self, X, *, new_fit: bool):
        t, was_numpy, dims, fshape, has_nan = self._prepare(X, "X", new_fit=new_fit)
        rows = A.to_rows(t, dims)
        if rows.shape[0] == 0:
            raise ValueError(f"X has 0 samples (input shape {list(t.shape)}); expected at least 1")
        if new_fit or not self._fitted:
            self._reset()
            self._fshape, self._numpy_attrs = fshape, was_numpy
        self._update(rows, has_nan)
        self._n_rows += rows.shape[0]
        return self

    def _apply(self, X, name: str, inverse: bool):
        self._require_fitted()
        t, was_numpy, dims, _, _ = self._prepare(X, name, new_fit=False)
        view = A.broadcast_shape(t.dim(), dims, self._fshape)
        center, divisor, offset = self._affine()
        center, divisor = (None if v is None else v.reshape(view) for v in (center, divisor))
        if inverse:
            y = affine_inverse(t, center, divisor, offset)
        else:
            y = self._post(affine_forward(t, center, divisor, offset))
        return A.from_tensor(y, was_numpy)

    def _post(self, y: Tensor) -> Tensor:
        return y

    # -- public API ----------------------------------------------------------------------
    def fit(self, X, y=None):
        """Compute the statistics of ``X`` (discarding earlier ones). Returns ``self``."""
        return self._fit_batch(X, new_fit=True)

    def transform(self, X):
        """Scale ``X``; same type, device, dtype and shape as ``X``."""
        return self._apply(X, "X", inverse=False)

    def inverse_transform(self, X):
        """Undo :meth:`transform` (up to the input dtype's rounding; clipped values stay clipped)."""
        return self._apply(X, "X", inverse=True)

    def fit_transform(self, X, y=None):
        return self.fit(X).transform(X)


def _check_finite_range(width: Tensor, name: str, what: str) -> None:
    """A range that overflows float64 (values near ±1.8e308) would give scale 0 or inf silently."""
    bad = torch.isinf(width)
    if bool(bad.any()):
        idx = bad.reshape(-1).nonzero()[:, 0].tolist()
        raise ValueError(
            f"{name}: {what} of feature(s) {idx[:10]}{' ...' if len(idx) > 10 else ''} overflows "
            f"float64 (values near ±1.8e308); rescale {name} first"
        )


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {value!r}")


class MinMaxScaler(_Scaler):
    r"""Rescale each feature to ``feature_range`` (as ``sklearn.preprocessing.MinMaxScaler``).

    .. math::
        \text{scale} = \frac{b - a}{\max(x) - \min(x)},\qquad
        \text{min} = a - \min(x)\cdot \text{scale},\qquad y = x\cdot\text{scale} + \text{min}

    with ``feature_range=(a, b)``, min and max over the sample dims. A constant feature (range 0)
    gets ``scale = b - a`` and maps to ``a``. ``partial_fit`` is exact: running min and max.

    Args:
        feature_range: ``(a, b)`` with ``a < b``.
        clip: clip transformed values to ``feature_range`` (values outside the fitted range).
        feature_dims: the dims that index features (see the module docstring); ``-1`` default.
        nan_policy: ``"raise"`` (default) or ``"omit"`` (NaNs ignored in fit, kept in output).

    Attributes: ``data_min_``, ``data_max_``, ``data_range_``, ``scale_``, ``min_`` (shape of the
    feature dims), ``n_samples_seen_`` (rows, NaN or not), ``n_features_in_``.
    """

    _STATE_TENSORS = ("data_min", "data_max")

    def __init__(self, feature_range=(0, 1), clip: bool = False, *, feature_dims: A.DimsLike = -1, nan_policy: str = "raise"):
        self.feature_range = feature_range
        self.clip = clip
        super().__init__(feature_dims, nan_policy)

    def _validate(self) -> None:
        fr = self.feature_range
        ok = isinstance(fr, (tuple, list)) and len(fr) == 2 and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in fr)
        if not ok or not math.isfinite(fr[0]) or not math.isfinite(fr[1]) or not fr[0] < fr[1]:
            raise ValueError(f"feature_range must be (min, max) with finite min < max, got {fr!r}")
        _check_bool("clip", self.clip)

    def partial_fit(self, X, y=None):
        """Fold ``X`` into the running min and max (exact). Returns ``self``."""
        return self._fit_batch(X, new_fit=False)

    def _update(self, rows: Tensor, has_nan: bool) -> None:
        lo, hi = nan_min_max(rows) if has_nan else torch.aminmax(rows, dim=0)
        if self._state is not None:
            lo, hi = torch.minimum(self._state["data_min"], lo), torch.maximum(self._state["data_max"], hi)
        _check_finite_range(torch.where(lo <= hi, hi - lo, 0.0), "X", "max - min")  # lo > hi: only NaN seen
        self._state = {"data_min": lo, "data_max": hi}

    def _seen(self, t: Tensor) -> Tensor:
        # +inf/-inf mark a feature that has only seen NaN; sklearn reports NaN there.
        empty = self._state["data_min"] > self._state["data_max"]
        return torch.where(empty, float("nan"), t)

    def _params64(self) -> Tuple[Tensor, Tensor]:
        lo, hi = self._seen(self._state["data_min"]), self._seen(self._state["data_max"])
        a, b = (float(v) for v in self.feature_range)
        scale = (b - a) / safe_scale(hi - lo)
        return scale, a - lo * scale

    @property
    def data_min_(self):
        self._require_fitted()
        return self._out(self._seen(self._state["data_min"]))

    @property
    def data_max_(self):
        self._require_fitted()
        return self._out(self._seen(self._state["data_max"]))

    @property
    def data_range_(self):
        self._require_fitted()
        return self._out(self._seen(self._state["data_max"] - self._state["data_min"]))

    @property
    def scale_(self):
        self._require_fitted()
        return self._out(self._params64()[0])

    @property
    def min_(self):
        self._require_fitted()
        return self._out(self._params64()[1])

    @property
    def n_samples_seen_(self) -> int:
        self._require_fitted()
        return self._n_rows

    def _affine(self):
        # x·scale + min_ == (x - data_min) / (range / (b - a)) + a; this form subtracts the
        # data's offset first, so it stays exact for data far from 0.
        lo, hi = self._seen(self._state["data_min"]), self._seen(self._state["data_max"])
        a, b = (float(v) for v in self.feature_range)
        return lo, safe_scale(hi - lo) / (b - a), a

    def _post(self, y: Tensor) -> Tensor:
        return y.clamp(*(float(v) for v in self.feature_range)) if self.clip else y


class StandardScaler(_Scaler):
    r"""Standardize each feature to mean 0 and variance 1 (as ``sklearn.preprocessing.StandardScaler``).

    .. math::
        y = \frac{x - \mu}{\sigma},\qquad \mu = \frac1n\sum_i x_i,\qquad
        \sigma^2 = \frac1n\sum_i (x_i - \mu)^2 \quad\text{(population variance, ddof = 0)}

    over the sample dims. Each batch's :math:`(n, \mu, M_2)` is computed two-pass in float64 and
    merged with Chan et al.'s parallel formula, so ``partial_fit`` over any chunking equals one
    ``fit`` to float64 rounding, even for data with a large offset. A feature whose variance
    is within float64 rounding of 0 gets :math:`\sigma = 1` (sklearn's test).

    Args:
        with_mean: subtract :math:`\mu`.
        with_std: divide by :math:`\sigma`.
        feature_dims, nan_policy: as :class:`MinMaxScaler`.

    Attributes: ``mean_`` (``None`` if neither ``with_mean`` nor ``with_std``), ``var_`` and
    ``scale_`` (``None`` if not ``with_std``), ``n_samples_seen_`` (an int, or a per-feature int
    array when NaNs made the counts differ), ``n_features_in_``.
    """

    _STATE_TENSORS = ("count", "mean", "m2")

    def __init__(self, *, with_mean: bool = True, with_std: bool = True, feature_dims: A.DimsLike = -1, nan_policy: str = "raise"):
        self.with_mean = with_mean
        self.with_std = with_std
        super().__init__(feature_dims, nan_policy)

    def _validate(self) -> None:
        _check_bool("with_mean", self.with_mean)
        _check_bool("with_std", self.with_std)

    def partial_fit(self, X, y=None):
        """Merge the moments of ``X`` into the running ones (exact, Chan et al.). Returns ``self``."""
        return self._fit_batch(X, new_fit=False)

    def _update(self, rows: Tensor, has_nan: bool) -> None:
        batch = batch_moments(rows, has_nan)
        if self._state is not None:
            batch = chan_merge((self._state["count"], self._state["mean"], self._state["m2"]), batch)
        check_finite_moments(batch[1], batch[2], rows, "X")  # an overflow in the batch propagates to the merge
        self._state = dict(zip(self._STATE_TENSORS, batch))

    def _mean_var(self) -> Tuple[Tensor, Tensor]:
        n, mean, m2 = (self._state[k] for k in self._STATE_TENSORS)
        empty = n == 0
        return (torch.where(empty, float("nan"), mean),
                torch.where(empty, float("nan"), m2 / n.clamp_min(1.0)))

    def _scale64(self) -> Tensor:
        mean, var = self._mean_var()
        return safe_scale(var.sqrt(), constant_mask(var, mean, self._state["count"]))

    @property
    def mean_(self):
        self._require_fitted()
        return self._out(self._mean_var()[0]) if (self.with_mean or self.with_std) else None

    @property
    def var_(self):
        self._require_fitted()
        return self._out(self._mean_var()[1]) if self.with_std else None

    @property
    def scale_(self):
        self._require_fitted()
        return self._out(self._scale64()) if self.with_std else None

    @property
    def n_samples_seen_(self):
        self._require_fitted()
        n = self._state["count"]
        if bool((n == n.reshape(-1)[0]).all()):
            return int(n.reshape(-1)[0])
        return self._out(n.to(torch.int64))

    def _affine(self):
        return (self._mean_var()[0] if self.with_mean else None,
                self._scale64() if self.with_std else None, None)


class RobustScaler(_Scaler):
    r"""Center on the median and scale by a quantile range (as ``sklearn.preprocessing.RobustScaler``).

    .. math::
        y = \frac{x - \operatorname{median}(x)}{Q_{q_\max}(x) - Q_{q_\min}(x)}
        \quad\Big[\,\div\,\big(\Phi^{-1}(q_\max) - \Phi^{-1}(q_\min)\big)
        \text{ if } \texttt{unit\_variance}\Big]

    per feature over the sample dims, with numpy's ``"linear"`` quantile interpolation (one sort
    per fit, no size limit). A zero quantile range gets scale 1. With ``unit_variance`` the
    scale is divided by the normal distribution's quantile range, so normal data ends with
    variance 1.

    There is no ``partial_fit``: medians and quantiles cannot be merged exactly from per-chunk
    summaries (the median of medians is not the median), so a streaming version would silently
    be approximate. ``partial_fit`` raises ``NotImplementedError`` saying so; fit on all the
    data, or stream with :class:`StandardScaler` / :class:`MinMaxScaler`.

    Args:
        with_centering: subtract the median.
        with_scaling: divide by the quantile range.
        quantile_range: ``(q_min, q_max)`` in percent, ``0 <= q_min < q_max <= 100``.
        unit_variance: see above.
        feature_dims, nan_policy: as :class:`MinMaxScaler`.

    Attributes: ``center_`` (``None`` without centering), ``scale_`` (``None`` without scaling),
    ``n_features_in_``.
    """

    _STATE_TENSORS = ("median", "q_min", "q_max")

    def __init__(self, *, with_centering: bool = True, with_scaling: bool = True, quantile_range=(25.0, 75.0),
                 unit_variance: bool = False, feature_dims: A.DimsLike = -1, nan_policy: str = "raise"):
        self.with_centering = with_centering
        self.with_scaling = with_scaling
        self.quantile_range = quantile_range
        self.unit_variance = unit_variance
        super().__init__(feature_dims, nan_policy)

    def _validate(self) -> None:
        qr = self.quantile_range
        ok = isinstance(qr, (tuple, list)) and len(qr) == 2 and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in qr)
        if not ok or not 0 <= qr[0] < qr[1] <= 100:
            raise ValueError(f"quantile_range must be (q_min, q_max) in percent with 0 <= q_min < q_max <= 100, got {qr!r}")
        if self.unit_variance and not 0 < qr[0] < qr[1] < 100:
            raise ValueError(f"quantile_range must be inside (0, 100) with unit_variance=True (the normal quantiles of 0 and 100 are infinite), got {qr!r}")
        for name in ("with_centering", "with_scaling", "unit_variance"):
            _check_bool(name, getattr(self, name))

    def partial_fit(self, X, y=None):
        raise NotImplementedError(
            "RobustScaler has no exact partial_fit: medians and quantiles cannot be merged from "
            "per-chunk summaries (the median of chunk medians is not the median of the data). "
            "Call fit() on all the data, or stream with StandardScaler/MinMaxScaler.partial_fit."
        )

    def _update(self, rows: Tensor, has_nan: bool) -> None:
        q_lo, q_hi = (float(q) / 100.0 for q in self.quantile_range)
        qs, _ = nan_quantiles(rows, (0.5, q_lo, q_hi))
        width = qs[2] - qs[1]
        _check_finite_range(torch.where(torch.isnan(width), 0.0, width), "X", "the quantile range")  # NaN: only NaN seen
        self._state = dict(zip(self._STATE_TENSORS, qs.unbind(0)))
        self._fitted_range = tuple(float(q) for q in self.quantile_range)

    _extra_state_keys = ("quantile_range",)

    def _extra_state(self) -> Dict[str, Any]:
        return {"quantile_range": self._fitted_range}

    def _check_loaded(self, state: Dict[str, Any]) -> None:
        fitted_range = tuple(float(q) for q in state["quantile_range"])
        if fitted_range != tuple(float(q) for q in self.quantile_range):
            raise ValueError(f"state was fitted with quantile_range={fitted_range}, but this RobustScaler has quantile_range={tuple(self.quantile_range)}")
        self._fitted_range = fitted_range

    def _scale64(self) -> Tensor:
        if tuple(float(q) for q in self.quantile_range) != self._fitted_range:
            raise ValueError(f"quantile_range was changed to {tuple(self.quantile_range)} after fit with {self._fitted_range}; fit again")
        scale = safe_scale(self._state["q_max"] - self._state["q_min"])
        if self.unit_variance:
            q_lo, q_hi = (float(q) / 100.0 for q in self.quantile_range)
            normal = statistics.NormalDist()
            scale = scale / (normal.inv_cdf(q_hi) - normal.inv_cdf(q_lo))
        return scale

    @property
    def center_(self):
        self._require_fitted()
        return self._out(self._state["median"]) if self.with_centering else None

    @property
    def scale_(self):
        self._require_fitted()
        return self._out(self._scale64()) if self.with_scaling else None

    def _affine(self):
        return (self._state["median"] if self.with_centering else None,
                self._scale64() if self.with_scaling else None, None)
