"""normkit under torch's distributed engines, 2 CPU processes on gloo, each compared with the
torch.nn modules in the same run: FSDP2 (``fully_shard``) training, and DTensor inputs
(sequence parallel ``Shard(1)``, batch ``Shard(0)``, and a shard of the normalized dim, which
must be redistributed). The workers assert; a failed assertion fails the test with the
worker's traceback, and a deadline turns a hang into a failure.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

import normkit

from helpers import run_two_gloo_processes

WORLD = 2
JOIN_TIMEOUT_S = 240  # the run takes ~15 s; past this the workers are hung


def _model(kind: str) -> torch.nn.Module:
    """Linear -> LN -> GELU -> Linear -> RMS -> head, with torch's or normkit's norms."""
    torch.manual_seed(0)
    ln = normkit.nn.LayerNorm if kind == "normkit" else torch.nn.LayerNorm
    rms = normkit.nn.RMSNorm if kind == "normkit" else torch.nn.RMSNorm
    net = torch.nn.Sequential(
        torch.nn.Linear(11, 24), ln(24), torch.nn.GELU(), torch.nn.Linear(24, 24), rms(24), torch.nn.Linear(24, 3)
    )
    with torch.no_grad():
        net[1].weight.normal_(1.0, 0.3)
        net[1].bias.normal_(0.0, 0.3)
        net[4].weight.normal_(1.0, 0.3)
    return net


def _check_fsdp2(rank: int) -> None:
    from torch.distributed.fsdp import fully_shard

    g = torch.Generator().manual_seed(10 + rank)  # each rank its own data, as in real training
    xs, ts = torch.randn(4, 6, 11, generator=g), torch.randn(4, 6, 3, generator=g)
    losses = {}
    for kind in ("torch", "normkit"):
        net = _model(kind)
        for layer in (net[1], net[4]):
            fully_shard(layer)
        fully_shard(net)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        losses[kind] = []
        for x, t in zip(xs, ts):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(net(x), t)
            loss.backward()
            opt.step()
            losses[kind].append(loss.item())
        losses[kind + "_weight"] = net[1].weight.full_tensor().detach().clone()
    torch.testing.assert_close(torch.tensor(losses["normkit"]), torch.tensor(losses["torch"]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["normkit_weight"], losses["torch_weight"], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(losses["torch_weight"], _model("torch")[1].weight), "the norm's gain trained"


def _check_dtensor(rank: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    g = torch.Generator().manual_seed(3)  # the same global tensors on both ranks
    full = torch.randn(4, 6, 16, generator=g, dtype=torch.float64) * 2 + 3
    dy_full = torch.randn(4, 6, 16, generator=g, dtype=torch.float64)
    w_full = torch.randn(16, generator=g, dtype=torch.float64)
    b_full = torch.randn(16, generator=g, dtype=torch.float64)
    for placement in (Shard(1), Shard(0), Shard(2)):
        results = {}
        for kind, fn in (("torch", torch.nn.functional.layer_norm), ("normkit", normkit.layer_norm)):
            x = distribute_tensor(full, mesh, [placement]).requires_grad_(True)
            w = distribute_tensor(w_full, mesh, [Replicate()]).requires_grad_(True)
            b = distribute_tensor(b_full, mesh, [Replicate()]).requires_grad_(True)
            y = fn(x, (16,), w, b, 1e-5)
            dy = distribute_tensor(dy_full, mesh, y.placements)
            (y * dy).sum().backward()
            results[kind] = (y, x.grad, w.grad, b.grad)
        ty, tx, tw, tb = results["torch"]
        ny, nx, nw, nb = results["normkit"]
        if placement.dim != 2:
            assert ny.placements == (placement,), f"{placement}: output placement {ny.placements}"
        for what, got, want in (("y", ny, ty), ("dx", nx, tx), ("dweight", nw, tw), ("dbias", nb, tb)):
            torch.testing.assert_close(got.full_tensor(), want.full_tensor(), rtol=1e-10, atol=1e-10, msg=f"{placement} {what}")
        truth = torch.nn.functional.layer_norm(full, (16,), w_full, b_full, 1e-5)
        torch.testing.assert_close(ny.full_tensor(), truth, rtol=1e-10, atol=1e-10)

    # A module whose parameters are DTensors (tensor-parallel style), fed a sequence shard.
    ln = normkit.nn.RMSNorm(16, eps=1e-6).double()
    for name, p in list(ln.named_parameters()):
        setattr(ln, name, torch.nn.Parameter(distribute_tensor(p.detach(), mesh, [Replicate()])))
    x = distribute_tensor(full, mesh, [Shard(1)])
    want = torch.nn.functional.rms_norm(full, (16,), ln.weight.full_tensor(), 1e-6)
    torch.testing.assert_close(ln(x).full_tensor(), want, rtol=1e-10, atol=1e-10)

    # Mixing a DTensor input with a plain gain is refused, as torch refuses it.
    try:
        normkit.layer_norm(x, (16,), w_full)
    except TypeError as exc:
        assert "weight must be a DTensor" in str(exc)
    else:
        raise AssertionError("a plain weight with a DTensor input must raise")


def _worker(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60)
    )
    try:
        _check_dtensor(rank)
        _check_fsdp2(rank)
        dist.barrier()  # neither rank tears down the group while the other still uses it
    finally:
        dist.destroy_process_group()


def test_fsdp2_and_dtensor_match_torch_nn():
    run_two_gloo_processes(_worker, timeout_s=JOIN_TIMEOUT_S)
