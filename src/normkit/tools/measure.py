"""Timings behind the numbers quoted for the tools: ``python -m normkit.tools.measure [monitor|fold]``.

* ``monitor``: one training step (forward, backward, SGD) of a small pre-LN transformer
  (4 ``nn.TransformerEncoderLayer(norm_first=True)`` + final LayerNorm, 9 norms; d=128 with
  batch 8 x 32 tokens, and d=256 with 8 x 128 tokens) without and with :func:`normkit.tools.monitor` (``every=1`` and
  ``every=10``); the overhead is the ratio of median step times.
* ``fold``: inference (``no_grad``) of 6 ``[LayerNorm, Linear, GELU]`` blocks, d=512, 256 rows,
  before and after :func:`normkit.tools.fold`, for torch's and normkit's LayerNorm.

Runs are interleaved (A, B, A, B, ...) so that load from other processes hits both sides alike,
on one intra-op thread, timed in process CPU time (``time.process_time``), which time-sharing
with other processes inflates far less than wall time; each side's median over ``--repeats``
runs is reported. Both together take under a minute.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Callable, Dict

import torch

import normkit
from normkit.tools import fold, monitor


def _interleaved(fns: Dict[str, Callable[[], None]], repeats: int, inner: int) -> Dict[str, float]:
    for fn in fns.values():
        fn()  # warm-up
    times: Dict[str, list] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.process_time()
            for _ in range(inner):
                fn()
            times[name].append((time.process_time() - t) / inner)
    return {k: statistics.median(v) for k, v in times.items()}


def _transformer(d: int = 128) -> torch.nn.Module:
    torch.manual_seed(0)
    layers = [torch.nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True, norm_first=True) for _ in range(4)]
    return torch.nn.Sequential(*layers, torch.nn.LayerNorm(d))


def measure_monitor(repeats: int = 10, d: int = 128, tokens: int = 32) -> Dict[str, float]:
    x = torch.randn(8, tokens, d)
    models = {name: _transformer(d) for name in ("plain", "every=1", "every=10")}
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-3) for k, m in models.items()}
    mons = {"every=1": monitor(models["every=1"]), "every=10": monitor(models["every=10"], every=10)}

    def step(name):
        def run():
            opts[name].zero_grad()
            models[name](x).square().mean().backward()
            opts[name].step()
            if name in mons:
                mons[name].step()

        return run

    result = _interleaved({k: step(k) for k in models}, repeats, inner=3)
    for mon in mons.values():
        mon.remove()
    return result


def measure_fold(repeats: int = 10) -> Dict[str, float]:
    torch.manual_seed(0)
    x = torch.randn(256, 512)
    result = {}
    for label, cls in (("torch.nn.LayerNorm", torch.nn.LayerNorm), ("normkit.nn.LayerNorm", normkit.nn.LayerNorm)):
        blocks = []
        for _ in range(6):
            blocks += [cls(512), torch.nn.Linear(512, 512), torch.nn.GELU()]
        model = torch.nn.Sequential(*blocks).eval()
        folded = copy.deepcopy(model)
        fold(folded)

        def run(m):
            def call():
                with torch.no_grad():
                    m(x)

            return call

        t = _interleaved({"before": run(model), "after": run(folded)}, repeats, inner=5)
        result[f"{label} before"], result[f"{label} after"] = t["before"], t["after"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["monitor", "fold", "all"], nargs="?", default="all")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, normkit backends {normkit.backends.available()}")
    if args.what in ("monitor", "all"):
        for d, tokens in ((128, 32), (256, 128)):
            t = measure_monitor(args.repeats, d, tokens)
            base = t["plain"]
            print(f"monitor (d={d}, 8x{tokens} tokens): train step {base * 1e3:.2f} ms without; " + "; ".join(
                f"{k}: {t[k] * 1e3:.2f} ms ({(t[k] / base - 1) * 100:+.1f}%)" for k in ("every=1", "every=10")))
    if args.what in ("fold", "all"):
        t = measure_fold(args.repeats)
        for label in ("torch.nn.LayerNorm", "normkit.nn.LayerNorm"):
            b, a = t[f"{label} before"], t[f"{label} after"]
            print(f"fold ({label}): {b * 1e3:.3f} ms -> {a * 1e3:.3f} ms per forward, speedup x{b / a:.3f}")


if __name__ == "__main__":
    main()
