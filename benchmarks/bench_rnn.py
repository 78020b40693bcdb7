"""Forward + backward time of normkit's LN-LSTM / LN-GRU against torch.nn.LSTM / GRU and a naive loop.

For each (seq, batch, hidden) shape (input_size = hidden) and each cell type it times one
forward and backward pass (loss = output.sum() + h_n.sum()) of

* ``torch``   — :class:`torch.nn.LSTM` / :class:`torch.nn.GRU` (no normalization; its native
  fused CPU kernel, so a lower bound for work that also normalizes);
* ``naive``   — a per-step Python loop of matrix products, :class:`torch.nn.LayerNorm` and gate
  arithmetic (what users write without normkit);
* ``normkit`` — :class:`normkit.nn.LayerNormLSTM` / ``LayerNormGRU`` (fused path);
* ``reference`` (``--with-reference``) — the same modules with ``fast_path = False``.

and prints the median over ``--repeats`` runs after ``--warmup`` runs, in milliseconds, with
the ratios normkit/torch and naive/normkit. The implementations are timed in turns (one pass
each per round), so that load from other processes affects them alike. Run::

    .venv/bin/python benchmarks/bench_rnn.py                 # full table
    .venv/bin/python benchmarks/bench_rnn.py --quick         # a few repeats, for a smoke test
    .venv/bin/python benchmarks/bench_rnn.py --threads 1 --stat min   # on a machine shared with other work
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

import normkit

SHAPES = [(100, 1, 512), (100, 32, 256), (200, 64, 128)]


class NaiveLNLSTM(nn.Module):
    """The straightforward per-step LN-LSTM: matmuls, nn.LayerNorm and gate arithmetic in a loop."""

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        H = hidden_size
        self.w_ih = nn.Linear(input_size, 4 * H, bias=False)
        self.w_hh = nn.Linear(H, 4 * H, bias=False)
        self.ln_ih, self.ln_hh, self.ln_c = nn.LayerNorm(4 * H), nn.LayerNorm(4 * H, bias=False), nn.LayerNorm(H)

    def forward(self, x):
        T, B, _ = x.shape
        h = x.new_zeros(B, self.w_hh.in_features)
        c = torch.zeros_like(h)
        outs = []
        for t in range(T):
            gates = self.ln_hh(self.w_hh(h)) + self.ln_ih(self.w_ih(x[t]))
            i, f, g, o = gates.chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(self.ln_c(c))
            outs.append(h)
        return torch.stack(outs), h


class NaiveLNGRU(nn.Module):
    """The straightforward per-step LN-GRU."""

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        H = hidden_size
        self.w_ih = nn.Linear(input_size, 3 * H, bias=False)
        self.w_hh = nn.Linear(H, 3 * H, bias=False)
        self.ln_ih, self.ln_hh = nn.LayerNorm(3 * H), nn.LayerNorm(3 * H)

    def forward(self, x):
        T, B, _ = x.shape
        h = x.new_zeros(B, self.w_hh.in_features)
        outs = []
        for t in range(T):
            xr, xz, xn = self.ln_ih(self.w_ih(x[t])).chunk(3, 1)
            hr, hz, hn = self.ln_hh(self.w_hh(h)).chunk(3, 1)
            r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
            h = (1 - z) * torch.tanh(xn + r * hn) + z * h
            outs.append(h)
        return torch.stack(outs), h


def _final_h(state):
    return state[0] if isinstance(state, tuple) else state


def fwd_bwd(model: nn.Module, x: torch.Tensor) -> float:
    """Seconds of one forward + backward pass (loss = output.sum() + h_n.sum())."""
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    out, state = model(x)
    (out.sum() + _final_h(state).sum()).backward()
    return time.perf_counter() - t0


def time_interleaved(models: Dict[str, nn.Module], x: torch.Tensor, warmup: int, repeats: int,
                     stat: Callable[[List[float]], float] = statistics.median) -> Dict[str, float]:
    """Milliseconds per model (``stat`` of the runs: median, or min on a busy machine, where the
    fastest run is the closest to an unloaded one). The models take turns (one pass each per
    round), so a change in machine load during the measurement hits all of them alike."""
    for _ in range(warmup):
        for m in models.values():
            fwd_bwd(m, x)
    times: Dict[str, List[float]] = {n: [] for n in models}
    for _ in range(repeats):
        for n, m in models.items():
            times[n].append(fwd_bwd(m, x))
    return {n: 1e3 * stat(t) for n, t in times.items()}


def build(kind: str, H: int) -> Dict[str, nn.Module]:
    if kind == "LSTM":
        models = {"torch": nn.LSTM(H, H), "naive": NaiveLNLSTM(H, H), "normkit": normkit.nn.LayerNormLSTM(H, H)}
        ref = normkit.nn.LayerNormLSTM(H, H)
    else:
        models = {"torch": nn.GRU(H, H), "naive": NaiveLNGRU(H, H), "normkit": normkit.nn.LayerNormGRU(H, H)}
        ref = normkit.nn.LayerNormGRU(H, H)
    ref.fast_path = False
    models["reference"] = ref
    return models


def run(shapes: List[Tuple[int, int, int]], kinds: List[str], warmup: int, repeats: int, with_reference: bool,
        stat: Callable[[List[float]], float] = statistics.median):
    names = ["torch", "naive", "normkit"] + (["reference"] if with_reference else [])
    header = f"| cell | (seq, batch, hidden) | " + " | ".join(f"{n} ms" for n in names) + " | normkit / torch | naive / normkit |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for kind in kinds:
        for T, B, H in shapes:
            torch.manual_seed(0)
            x = torch.randn(T, B, H)
            models = build(kind, H)
            ms = time_interleaved({n: models[n] for n in names}, x, warmup, repeats, stat)
            cells = " | ".join(f"{ms[n]:.1f}" for n in names)
            print(
                f"| {kind} | ({T}, {B}, {H}) | {cells} | "
                f"{ms['normkit'] / ms['torch']:.2f}x | {ms['naive'] / ms['normkit']:.2f}x |",
                flush=True,
            )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=15, help="timed runs per entry (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs first (compilation, allocator)")
    p.add_argument("--cells", default="LSTM,GRU", help="comma-separated: LSTM, GRU")
    p.add_argument("--shapes", default=None, help="e.g. '100x1x512,100x32x256' (seq x batch x hidden)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--with-reference", action="store_true", help="also time the per-step reference path")
    p.add_argument("--quick", action="store_true", help="1 warm-up run and 3 repeats")
    p.add_argument("--stat", choices=["median", "min"], default="median",
                   help="statistic over the timed runs (min: best of N, for a machine shared with other work)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = SHAPES if not args.shapes else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    warmup, repeats = (1, 3) if args.quick else (args.warmup, args.repeats)
    kinds = [k.strip().upper() for k in args.cells.split(",") if k.strip()]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.stat} of {repeats} after {warmup} warm-up")
    run(shapes, kinds, warmup, repeats, args.with_reference, {"median": statistics.median, "min": min}[args.stat])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
