"""A one-minute demo: the same deep MLP trained with and without layer normalization.

Runs on synthetic data (no download) so a fresh machine can check the install; the full
experiments live in ``normkit lab``.
"""

from __future__ import annotations

import argparse
import time

import torch

import normkit


def _model(depth: int, width: int, norm: str) -> torch.nn.Module:
    layers = [torch.nn.Linear(32, width)]
    for _ in range(depth):
        if norm == "layer_norm":
            layers.append(normkit.nn.LayerNorm(width))
        elif norm == "rms_norm":
            layers.append(normkit.nn.RMSNorm(width))
        layers += [torch.nn.Tanh(), torch.nn.Linear(width, width)]
    layers += [torch.nn.Tanh(), torch.nn.Linear(width, 10)]
    return torch.nn.Sequential(*layers)


def train(norm: str, *, steps: int = 300, depth: int = 8, width: int = 128, seed: int = 0) -> list:
    """Train on a fixed random teacher task; returns the loss every 50 steps."""
    torch.manual_seed(seed)
    teacher = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10))
    x = torch.randn(2048, 32) * 3 + 1
    with torch.no_grad():
        y = teacher(x).argmax(-1)
    torch.manual_seed(seed + 1)
    model = _model(depth, width, norm)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for step in range(steps):
        idx = torch.randint(0, x.shape[0], (64,))
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 49:
            with torch.no_grad():
                losses.append(torch.nn.functional.cross_entropy(model(x), y).item())
    return losses


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=300)


def run(args: argparse.Namespace) -> int:
    print(f"normkit {normkit.__version__}, backends here: {', '.join(normkit.backends.available())}")
    print(f"deep tanh MLP (8 hidden layers), SGD, full-data loss every 50 of {args.steps} steps")
    for norm in ("none", "layer_norm", "rms_norm"):
        start = time.perf_counter()
        losses = train(norm, steps=args.steps)
        print(f"{norm:>11}: " + "  ".join(f"{v:.3f}" for v in losses) + f"   ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))
