r"""``RunningNormalizer``: standardize a stream with statistics kept as the data arrives.

Design: all statistics live in float64 buffers (``module.half()`` does not touch them) and are
updated under ``no_grad`` in training mode only. The normalization runs in float32 for
float32/16-bit inputs with the mean split into two float32 parts, so a stream at offset 1e6
normalizes within ~2 float32 ulps of float64 math at float32 speed (float64 input: float64).
Updates merge per-batch two-pass moments with Chan's formula (:mod:`normkit.data._stats`),
the form that also merges ranks in :meth:`RunningNormalizer.sync_distributed`; with
``momentum`` the moments are exponentially weighted and the formula takes weights for counts.
"""

from __future__ import annotations

import numbers
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from normkit.data._stats import (
    FLOAT64,
    affine_forward,
    affine_inverse,
    batch_moments,
    chan_merge,
    check_finite_moments,
    check_nan_policy,
    check_values,
    ew_batch_moments,
    ew_merge,
    ew_variance,
    merge_all,
)
from normkit.validation import FLOAT_DTYPES as _FLOAT_DTYPES

__all__ = ["RunningNormalizer"]


def _as_shape(shape: Union[int, Sequence[int]]) -> Tuple[int, ...]:
    if isinstance(shape, numbers.Integral) and not isinstance(shape, bool):
        out: Tuple[int, ...] = (int(shape),)
    elif isinstance(shape, (Sequence, torch.Size)) and all(isinstance(d, numbers.Integral) and not isinstance(d, bool) for d in shape):
        out = tuple(int(d) for d in shape)
    else:
        raise TypeError(f"shape must be an int or a sequence of ints, got {shape!r}")
    if not out or any(d <= 0 for d in out):
        raise ValueError(f"shape must be a non-empty sequence of positive sizes, got {list(out)}")
    return out


class RunningNormalizer(torch.nn.Module):
    r"""Standardize inputs with running per-feature mean and variance.

    .. math::
        y = \operatorname{clip}\Big(\frac{x - \mu}{\sigma}\Big),\qquad
        \sigma = \sqrt{\sigma^2_\text{run} + \epsilon}\ \ (\sigma = 1 \text{ where } \sigma^2_\text{run} = 0)

    The last ``len(shape)`` dims of the input are the features; all leading dims are samples.
    In training mode each call first folds the batch into the statistics, then normalizes with
    the updated ones; in eval mode the statistics are frozen.

    - ``momentum=None`` (default): exact cumulative statistics of everything seen. Each batch's
      :math:`(n_b, \mu_b, M_{2,b})` is computed two-pass in float64 and merged with Chan et al.'s
      formula :math:`\mu \leftarrow \mu + \delta\,n_b/n`,
      :math:`M_2 \leftarrow M_2 + M_{2,b} + \delta^2 n_a n_b / n` (:math:`\delta = \mu_b - \mu`):
      the result equals a float64 two-pass computation over the whole stream to ~1e-12, for any
      batching, even with a large offset.
    - ``momentum=α`` in (0, 1): exponential forgetting *per sample*, for non-stationary
      streams. The statistics are the exponentially weighted mean and variance of all samples
      seen, the sample :math:`k` steps before the newest weighted :math:`w = (1-\alpha)^k`:

      .. math::
          W = \sum_i w_i,\quad \mu = \frac{1}{W}\sum_i w_i x_i,\quad
          \sigma^2 = \frac{\sum_i w_i (x_i - \mu)^2}{W - \sum_i w_i^2 / W}

      This is the per-sample update of West (1979, "Updating mean and variance estimates: an
      improved method") and Finch (2009, "Incremental calculation of weighted mean and
      variance", §5) — :math:`\delta = x - \mu`, :math:`\mu \leftarrow \mu + \alpha\delta`,
      :math:`S \leftarrow (1-\alpha)(S + \alpha\delta^2)` — with two corrections:

      * *start-up*: the weights are not normalized to include a prior (no initial 0/1 pulls
        early estimates, Adam's bias correction :math:`\hat m = m / (1 - (1-\alpha)^n)` for the
        mean), and
      * *bias*: the variance divides by :math:`W - \sum w_i^2/W`, the reliability-weights
        correction (Bessel's for equal weights), so it is unbiased for i.i.d. data at every
        :math:`n` — the plain EW variance underestimates by the factor
        :math:`2(1-\alpha)/(2-\alpha)` at steady state and by far more at start-up.

      A batch of :math:`B` samples is folded in as :math:`B` consecutive samples in row order,
      in closed form: the old weights are multiplied by :math:`(1-\alpha)^B` and the batch's
      weighted moments merged with Chan's formula. So batch size changes nothing (batch size 1
      works, and a stream gives the same statistics whether fed as 8 × 1 or 1 × 8 rows), and a
      drift *between* batches is seen exactly as one within a batch. The effective number of
      samples remembered is :math:`W^2/\sum w^2 \to (2-\alpha)/\alpha`; a level shift is
      tracked within a few :math:`1/\alpha` samples. With one sample the variance is 0 (the
      output is then centered, not scaled). Earlier, ``momentum`` blended per-batch
      variances BatchNorm-style, which gave variance 0 at batch size 1.

    Statistics: buffers ``count``, ``running_mean``, ``running_var`` (float64, shape ``shape``;
    before any data mean 0 and variance 1, so the module is the identity). With ``momentum``
    also ``ew_weight`` :math:`W` and ``ew_weight_sq`` :math:`\sum w^2`. ``count`` is per
    feature because ``nan_policy="omit"`` leaves NaNs out feature by feature. The cumulative
    mode also keeps ``synced_*`` (statistics as of the last :meth:`sync_distributed`, equal on
    all ranks) and ``local_*`` (this rank's data since then), with
    ``running = merge(synced, local)``, so repeated syncs never count data twice.

    Constant features (variance exactly 0, which the update guarantees when every value seen
    was equal) get :math:`\sigma = 1`: no NaN or Inf even with ``eps=0``.

    Args:
        shape: feature shape (int or tuple): the trailing input dims that are features.
        momentum: ``None`` for cumulative statistics, else the per-sample forgetting factor
            :math:`\alpha` in (0, 1) (1 would keep only the newest sample, whose variance is
            undefined).
        eps: added to the variance, ``>= 0``.
        clip: if given (``> 0``), clamp the output to ``[-clip, clip]`` (not undone by
            :meth:`inverse`).
        nan_policy: ``"raise"`` (``ValueError`` on NaN input) or ``"omit"`` (NaNs are left out
            of the statistics per feature and stay NaN in the output). Infinities always raise.

    Shape:
        Input ``(*, *shape)``; output the same shape, dtype and device.

    Examples::

        >>> norm = RunningNormalizer(17)                     # observations with 17 features
        >>> y = norm(obs_batch)                              # (B, 17): update, then normalize
        >>> norm.eval(); y = norm(obs)                       # frozen statistics
        >>> norm.sync_distributed()                          # merge the ranks' statistics exactly
    """

    def __init__(self, shape: Union[int, Sequence[int]], momentum: Optional[float] = None, eps: float = 1e-8,
                 clip: Optional[float] = None, nan_policy: str = "raise", *, device=None) -> None:
        super().__init__()
        self.shape = _as_shape(shape)
        if momentum is not None and (isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or not 0 < momentum < 1):
            raise ValueError(f"momentum must be None (cumulative statistics) or a number in (0, 1) (the per-sample "
                             f"forgetting factor), got {momentum!r}")
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps >= 0:
            raise ValueError(f"eps must be a number >= 0, got {eps!r}")
        if clip is not None and (isinstance(clip, bool) or not isinstance(clip, numbers.Real) or not clip > 0):
            raise ValueError(f"clip must be None or a number > 0, got {clip!r}")
        self.momentum = None if momentum is None else float(momentum)
        self.eps = float(eps)
        self.clip = None if clip is None else float(clip)
        self.nan_policy = check_nan_policy(nan_policy)

        names = ["count", "running_mean", "running_var", "synced_count", "local_count"]
        if self.momentum is None:
            names += ["synced_mean", "synced_m2", "local_mean", "local_m2"]
        else:
            names += ["ew_weight", "ew_weight_sq"]
        for name in names:
            self.register_buffer(name, torch.zeros(self.shape, dtype=FLOAT64, device=device))
        self.reset_running_stats()

    def extra_repr(self) -> str:
        return (f"{self.shape}, momentum={self.momentum}, eps={self.eps}, clip={self.clip}, "
                f"nan_policy={self.nan_policy!r}")

    def reset_running_stats(self) -> None:
        for name, buf in self.named_buffers(recurse=False):
            buf.fill_(1.0 if name == "running_var" else 0.0)

    def _apply(self, fn, recurse=True):
        # .half()/.float() would round the float64 statistics; let them follow the device only.
        saved = dict(self._buffers)
        out = super()._apply(fn, recurse)
        for name, old in saved.items():
            new = self._buffers[name]
            if old is not None and new is not None and new.dtype != FLOAT64:
                self._buffers[name] = old.to(device=new.device)
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A momentum-mode state saved before ew_weight/ew_weight_sq existed: weights as if its
        # statistics came from ``count`` samples, W = sum_k (1-a)^k, W_2 = sum_k (1-a)^2k.
        if self.momentum is not None and prefix + "count" in state_dict and prefix + "ew_weight" not in state_dict:
            n = state_dict[prefix + "count"].to(FLOAT64)
            q = 1.0 - self.momentum
            state_dict[prefix + "ew_weight"] = (1.0 - q ** n) / (1.0 - q)
            state_dict[prefix + "ew_weight_sq"] = (1.0 - q ** (2 * n)) / (1.0 - q * q)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- input checks --------------------------------------------------------------------
    def _check(self, x: Tensor, name: str = "input") -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must have a floating dtype (float16, bfloat16, float32, float64), got {x.dtype}")
        k = len(self.shape)
        if x.dim() < k or tuple(x.shape[x.dim() - k:]) != self.shape:
            raise ValueError(
                f"{name} must have shape [*, {', '.join(map(str, self.shape))}] (the trailing dims are the "
                f"features), but got {name} of size {list(x.shape)}"
            )
        if x.device != self.running_mean.device:
            raise ValueError(
                f"{name} is on {x.device} but RunningNormalizer's statistics are on "
                f"{self.running_mean.device}; move one of them (module.to(device))"
            )

    # -- statistics ----------------------------------------------------------------------
    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Fold the batch ``x`` (``(*, *shape)``) into the statistics, whatever the mode."""
        self._check(x)
        self._update(x, check_values(x, "input", self.nan_policy))

    def _update(self, x: Tensor, has_nan: bool) -> None:
        rows = x.detach().reshape((-1,) + self.shape).to(FLOAT64)
        if rows.shape[0] == 0:
            return
        if self.momentum is None:
            n_b, mean_b, m2_b = batch_moments(rows, has_nan)
            local = chan_merge((self.local_count, self.local_mean, self.local_m2), (n_b, mean_b, m2_b))
            check_finite_moments(local[1], local[2], rows, "input")  # an overflow in the batch propagates here
            for buf, val in zip((self.local_count, self.local_mean, self.local_m2), local):
                buf.copy_(val)
            self._refresh_cumulative()
            return
        self._update_ew(rows, has_nan)
        self.local_count.add_((~torch.isnan(rows)).sum(0, dtype=FLOAT64) if has_nan else float(rows.shape[0]))
        self.count.copy_(self.synced_count + self.local_count)

    def _update_ew(self, rows: Tensor, has_nan: bool) -> None:
        decay, batch = ew_batch_moments(rows, self.momentum, has_nan)
        old = (self.local_count, self.ew_weight, self.ew_weight_sq, self.running_mean, self._ew_m2())
        _, weight, weight_sq, mean, m2 = ew_merge(old, decay, batch)
        check_finite_moments(mean, m2, rows, "input")  # an overflow in the batch propagates here
        self.ew_weight.copy_(weight)
        self.ew_weight_sq.copy_(weight_sq)
        self.running_mean.copy_(mean)
        self.running_var.copy_(torch.where(weight > 0, ew_variance(weight, weight_sq, m2), self.running_var))

    def _ew_m2(self) -> Tensor:
        r""":math:`M_2 = \sigma^2 (W - W_2/W)`, the inverse of :func:`ew_variance`."""
        w = self.ew_weight
        dof = w - self.ew_weight_sq / w.clamp_min(torch.finfo(FLOAT64).tiny)
        return torch.where(dof > 0, self.running_var * dof, 0.0)

    def _refresh_cumulative(self) -> None:
        n, mean, m2 = chan_merge((self.synced_count, self.synced_mean, self.synced_m2),
                                 (self.local_count, self.local_mean, self.local_m2))
        seen = n > 0
        self.count.copy_(n)
        self.running_mean.copy_(torch.where(seen, mean, 0.0))
        self.running_var.copy_(torch.where(seen, m2 / n.clamp_min(1.0), 1.0))

    def _std(self) -> Tensor:
        var = self.running_var
        return torch.where(var > 0, (var + self.eps).sqrt(), 1.0)

    # -- forward and inverse -------------------------------------------------------------
    def forward(self, input: Tensor) -> Tensor:
        """Training mode: update the statistics with ``input``, then normalize it. Eval: normalize."""
        self._check(input)
        has_nan = check_values(input, "input", self.nan_policy)  # once: a host sync per call
        if self.training:
            with torch.no_grad():
                self._update(input, has_nan)
        return self._normalize(input)

    def normalize(self, input: Tensor) -> Tensor:
        """``clip((input - mean) / std)`` with the current statistics (no update), as
        ``input.dtype``; float64 input in float64, others in float32 with a two-part mean
        (exact at large offsets, :func:`normkit.data._stats.affine_forward`). Differentiable."""
        self._check(input)
        check_values(input, "input", self.nan_policy)
        return self._normalize(input)

    def _normalize(self, input: Tensor) -> Tensor:
        y = affine_forward(input, self.running_mean, self._std())
        return y if self.clip is None else y.clamp(-self.clip, self.clip)

    def inverse(self, y: Tensor) -> Tensor:
        """``y * std + mean``: undoes :meth:`normalize` (except where the output was clipped)."""
        self._check(y, "y")
        return affine_inverse(y, self.running_mean, self._std())

    # -- distributed ---------------------------------------------------------------------
    @torch.no_grad()
    def sync_distributed(self, group=None) -> None:
        r"""Merge the statistics of all ranks of ``group`` (default: the world); every rank
        ends with the same, bitwise identical, statistics. Collective: call it on every rank.

        Cumulative mode (exact): each rank's data since the last sync, :math:`(n, \mu, M_2)`,
        is all-gathered and folded with Chan's formula in rank order, then merged into the
        statistics of the last sync. The result equals the statistics of the concatenation of
        all ranks' data, and calling it again later adds only the data seen since.

        Momentum mode: each rank's statistics describe its own recent stream, so the ranks are
        weighted equally: the result is the moments of the equal-weight mixture of the ranks'
        distributions, :math:`\mu = \frac1R\sum_r \mu_r`,
        :math:`\sigma^2 = \frac1R\sum_r \big(\sigma_r^2 + (\mu_r - \mu)^2\big)` over the ranks
        that have seen data (others do not dilute it), with :math:`W` and :math:`\sum w^2` the
        ranks' averages (the merged state ages like one rank's). Being normalized, repeated
        syncs never count a rank's past twice. ``count`` becomes the total count.

        The buffers must be on a device the process group's backend supports (CPU for gloo,
        CUDA for NCCL). Under ``DistributedDataParallel`` pass ``broadcast_buffers=False`` (DDP
        otherwise copies rank 0's buffers over every rank's at each forward, discarding the
        other ranks' data), or keep the normalizer outside the wrapped module.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "sync_distributed() needs an initialized torch.distributed process group; "
                "call torch.distributed.init_process_group(...) first"
            )
        world = dist.get_world_size(group)
        if self.momentum is None:
            mine = torch.stack([self.local_count, self.local_mean, self.local_m2])
        else:
            mine = torch.stack([self.count, self.running_mean, self.running_var, self.local_count,
                                self.ew_weight, self.ew_weight_sq])
        gathered = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(gathered, mine.contiguous(), group=group)

        if self.momentum is None:
            delta = merge_all([tuple(g.unbind(0)) for g in gathered])
            synced = chan_merge((self.synced_count, self.synced_mean, self.synced_m2), delta)
            for buf, val in zip((self.synced_count, self.synced_mean, self.synced_m2), synced):
                buf.copy_(val)
            for buf in (self.local_count, self.local_mean, self.local_m2):
                buf.zero_()
            self._refresh_cumulative()
            return
        # Equal-weight mixture = Chan's merge with weight 1 per rank that has data, M2 = var.
        parts = [((g[0] > 0).to(FLOAT64), g[1], g[2] * (g[0] > 0)) for g in gathered]
        w, mean, m2 = merge_all(parts)
        seen = w > 0
        self.running_mean.copy_(torch.where(seen, mean, self.running_mean))
        self.running_var.copy_(torch.where(seen, m2 / w.clamp_min(1.0), self.running_var))
        has = [(g[0] > 0).to(FLOAT64) for g in gathered]
        for buf, row in ((self.ew_weight, 4), (self.ew_weight_sq, 5)):
            avg = sum(h * g[row] for h, g in zip(has, gathered)) / w.clamp_min(1.0)
            buf.copy_(torch.where(seen, avg, buf))
        self.synced_count.add_(sum(g[3] for g in gathered))
        self.local_count.zero_()
        self.count.copy_(self.synced_count)
