"""DistributedDataParallel: 2 CPU processes (gloo) train a normkit model exactly like 1 process.

Each rank takes half of the batch; DDP averages the gradients, which equals the gradient of the
mean loss over the whole batch on one process. After a few SGD steps the parameters of both
ranks must equal the single-process ones (to float32 rounding of the all-reduce).
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

import normkit

from helpers import run_two_gloo_processes

WORLD = 2
STEPS = 3
BATCH = 10  # 5 rows per rank
JOIN_TIMEOUT_S = 180  # the run takes ~5 s; past this the workers are hung


class Net(torch.nn.Module):
    """Linear -> LayerNorm -> GELU -> Linear, fused residual + RMSNorm (prenorm), head."""

    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(13, 24)
        self.ln = normkit.nn.LayerNorm(24)
        self.mid = torch.nn.Linear(24, 24)
        self.rms = normkit.nn.RMSNorm(24)
        self.head = torch.nn.Linear(24, 3)

    def forward(self, x):
        h = self.inp(x)
        branch = self.mid(torch.nn.functional.gelu(self.ln(h)))
        y, _ = self.rms(branch, h, prenorm=True)  # normalizes branch + h in one fused pass
        return self.head(y)


def _make():
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        for norm in (net.ln, net.rms):
            norm.weight.normal_(1.0, 0.3)
        net.ln.bias.normal_(0.0, 0.3)
    return net


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, BATCH, 13, generator=g), torch.randn(STEPS, BATCH, 3, generator=g)


def _train(model, xs, ts):
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    for x, t in zip(xs, ts):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), t).backward()
        opt.step()


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        model = torch.nn.parallel.DistributedDataParallel(_make())
        xs, ts = _data()
        rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        _train(model, xs[:, rows], ts[:, rows])
        torch.save(model.module.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # neither rank tears down the group while the other still uses it
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_match_one_process_on_the_combined_batch(tmp_path):
    run_two_gloo_processes(_worker, (str(tmp_path),), timeout_s=JOIN_TIMEOUT_S)

    single = _make()
    _train(single, *_data())
    want = single.state_dict()
    initial = _make().state_dict()
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert list(got) == list(want)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=f"rank {rank}: {name}")
    assert any(not torch.allclose(want[n], initial[n]) for n in ("ln.weight", "ln.bias", "rms.weight")), "norm parameters trained"
