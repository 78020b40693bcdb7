"""normkit on DTensor inputs (tensor and sequence parallelism): the sharding rule of a norm.

A norm is row-wise: each row is normalized over the ``normalized_shape`` dims on its own. So

* a placement that shards a *row* dim (``Shard(d)`` with ``d`` before the normalized dims)
  passes through: each rank normalizes its own rows, and the output keeps the placement;
* a placement that shards a *normalized* dim, or a ``Partial`` input, is redistributed to
  ``Replicate`` first (a row's statistics need the whole row), as torch's own DTensor rule
  for ``layer_norm`` does;
* the gain and bias are used replicated; their gradients are ``Partial`` (each rank's sum over
  its own rows) on every mesh dim where the rows are sharded, and are reduced when read
  (``full_tensor()``) or redistributed, exactly like torch's rule.

The local call runs whichever backend fits the local shard, so a DTensor input gets the same
kernels as a plain one, eager or compiled. Dropout on sharded rows is refused: every rank
would draw the same mask for its shard (one seed from identically seeded generators), a
silently correlated mask; apply dropout before the norm on DTensors.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

from torch import Tensor

from normkit.errors import NormDeviceError, NormTypeError, UnsupportedModeError

__all__ = ["dtensor_norm"]


def _norm_placements(x, first_norm_dim: int):
    """``x``'s placements with every shard of a normalized dim and every partial replaced by
    ``Replicate``."""
    from torch.distributed.tensor import Replicate

    out = []
    for p in x.placements:
        if p.is_partial() or (p.is_shard() and p.dim % x.ndim >= first_norm_dim):
            out.append(Replicate())
        else:
            out.append(p)
    return tuple(out)


def _local_param(name: str, p: Optional[Tensor], mesh, grad_placements) -> Optional[Tensor]:
    from torch.distributed.tensor import DTensor, Replicate

    if p is None:
        return None
    if not isinstance(p, DTensor):
        raise NormTypeError(
            f"{name} must be a DTensor when input is a DTensor (as torch refuses to mix them), got a "
            f"plain torch.Tensor; distribute it, e.g. distribute_tensor({name}, mesh, [Replicate()])"
        )
    if p.device_mesh != mesh:
        raise NormDeviceError(f"{name} lives on device mesh {p.device_mesh}, input on {mesh}")
    p = p.redistribute(mesh, [Replicate()] * mesh.ndim)
    return p.to_local(grad_placements=grad_placements)


def dtensor_norm(
    norm: Callable,
    x,
    shape: Tuple[int, ...],
    weight,
    bias,
    eps: float,
    is_rms: bool,
    residual,
    prenorm: bool,
    dropout_p: float,
):
    """Run ``norm`` (:func:`normkit.functional._norm`) on the local shards of DTensor ``x``
    (already validated) and re-wrap the result with ``x``'s (row) placements."""
    from torch.distributed.tensor import DTensor, Partial, Replicate

    mesh = x.device_mesh
    placements = _norm_placements(x, x.ndim - len(shape))
    if placements != tuple(x.placements):
        x = x.redistribute(mesh, placements)
    sharded = any(p.is_shard() for p in placements)
    if dropout_p > 0.0 and sharded:
        raise UnsupportedModeError(
            "dropout_p > 0 on a DTensor with sharded rows would draw the same mask on every rank; "
            "apply dropout before the norm (torch.nn.functional.dropout on the DTensor), then call it "
            "with dropout_p=0"
        )
    if residual is not None:
        if not isinstance(residual, DTensor):
            raise NormTypeError("residual must be a DTensor when input is a DTensor, got a plain torch.Tensor")
        residual = residual.redistribute(mesh, placements).to_local()
    # The gain/bias gradient of one rank is the sum over its rows: partial where rows are split.
    grad_placements = [Partial() if p.is_shard() else Replicate() for p in placements]
    w = _local_param("weight", weight, mesh, grad_placements)
    b = _local_param("bias", bias, mesh, grad_placements)
    out = norm(x.to_local(), shape, w, b, eps, is_rms, residual, prenorm, dropout_p, True)

    def wrap(t: Tensor):
        return DTensor.from_local(t, mesh, placements, run_check=False, shape=x.shape, stride=x.stride())

    return (wrap(out[0]), wrap(out[1])) if prenorm else wrap(out)
