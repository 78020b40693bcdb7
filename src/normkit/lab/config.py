"""Experiment configurations: one frozen dataclass per experiment, with ``smoke``/``quick``/``full``
presets.

``quick`` is the ``make demo`` budget (all six experiments, 3 seeds, a few minutes on two CPU
cores); ``full`` uses larger models and more steps; ``smoke`` is a seconds-long end-to-end check
used by the tests (its numbers mean nothing). The defaults below are the ``quick`` preset, each
with its reason.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, Tuple

__all__ = [
    "MLPConfig", "LSTMConfig", "SequentialConfig", "TransformerConfig", "OnlineConfig", "CostConfig",
    "PRESET_NAMES", "preset",
]

PRESET_NAMES = ("smoke", "quick", "full")


@dataclass(frozen=True)
class MLPConfig:
    """Deep MLP on digits (permutation invariant), every norm at every batch size."""

    norms: Tuple[str, ...] = ("none", "batch", "layer", "rms")
    batch_sizes: Tuple[int, ...] = (1, 4, 32, 128)
    depth: int = 6  # deep enough that the unnormalized ReLU net learns slowly at default init
    width: int = 128
    steps: int = 500  # the same number of Adam steps at every batch size (500 samples seen at batch 1)
    lr: float = 1e-3  # Adam's default: no tuning in favour of any arm
    evals: int = 8  # test-accuracy checkpoints along training (the training curve)


@dataclass(frozen=True)
class LSTMConfig:
    """Character language model on the standard-library corpus."""

    arms: Tuple[str, ...] = ("lstm", "ln_lstm")
    chars: int = 200_000
    seq_len: int = 32
    batch: int = 32
    embed: int = 32
    hidden: int = 128
    steps: int = 300  # at 150 both models are still far from converged
    lr: float = 3e-3
    evals: int = 10
    val_batches: int = 2  # fixed validation windows, batch × seq_len characters each
    clip: float = 1.0


@dataclass(frozen=True)
class SequentialConfig:
    """Pixel-by-pixel digits: 64 steps of one pixel, classify from the last hidden state."""

    arms: Tuple[str, ...] = ("lstm", "ln_lstm", "gru", "ln_gru")
    hidden: int = 64
    batch: int = 64
    steps: int = 200  # at 100 every arm is still below 0.65 test accuracy
    lr: float = 3e-3
    evals: int = 6
    clip: float = 1.0


@dataclass(frozen=True)
class TransformerConfig:
    """Small causal character transformer: norm placement × learning-rate warm-up."""

    modes: Tuple[str, ...] = ("post_ln", "pre_ln", "pre_rms", "none")
    warmups: Tuple[int, ...] = (0, 75)  # steps of linear warm-up; 0 = none
    chars: int = 200_000
    d: int = 64
    layers: int = 4
    heads: int = 4
    seq_len: int = 32
    batch: int = 16
    steps: int = 150
    lr: float = 1.5e-2  # high on purpose: post-LN without warm-up should show trouble (Xiong et al. 2020)
    evals: int = 5
    val_batches: int = 2


@dataclass(frozen=True)
class OnlineConfig:
    """Batch-size-1 prequential learning on a digits stream whose inputs shift mid-stream."""

    arms: Tuple[str, ...] = ("none", "batch_frozen", "layer", "running")
    length: int = 2000  # samples; the shift happens at length // 2
    scale: float = 3.0  # second half: x -> scale * x + offset
    offset: float = 2.0
    hidden: int = 64
    lr: float = 1e-3
    momentum: float = 0.01  # RunningNormalizer's forgetting rate
    window: int = 250  # "just after the shift" = the first `window` samples of phase 2


@dataclass(frozen=True)
class CostConfig:
    """Training-step time of each norm inside the same MLP."""

    norms: Tuple[str, ...] = ("none", "batch", "torch_layer", "layer", "rms")
    width: int = 512
    depth: int = 4
    batch: int = 256
    warmup: int = 5
    repeats: int = 30  # timed steps per seed; the median is reported


_QUICK: Dict[str, object] = {
    "mlp": MLPConfig(),
    "lstm": LSTMConfig(),
    "sequential": SequentialConfig(),
    "transformer": TransformerConfig(),
    "online": OnlineConfig(),
    "cost": CostConfig(),
}

_SMOKE: Dict[str, object] = {
    "mlp": MLPConfig(batch_sizes=(1, 4), depth=2, width=16, steps=6, evals=2),
    "lstm": LSTMConfig(chars=5000, seq_len=8, batch=4, embed=8, hidden=8, steps=4, evals=2, val_batches=1),
    "sequential": SequentialConfig(hidden=8, batch=8, steps=3, evals=2),
    "transformer": TransformerConfig(chars=5000, d=16, layers=1, heads=2, seq_len=16, batch=4, steps=6, evals=2, warmups=(0, 3), val_batches=1),
    "online": OnlineConfig(length=80, hidden=8, window=20),
    "cost": CostConfig(width=16, depth=1, batch=8, warmup=1, repeats=3),
}

_FULL: Dict[str, object] = {
    "mlp": MLPConfig(depth=8, width=256, steps=2000, evals=10),
    "lstm": LSTMConfig(chars=300_000, seq_len=64, batch=64, embed=64, hidden=256, steps=1500, evals=10),
    "sequential": SequentialConfig(hidden=128, steps=1000, evals=10),
    "transformer": TransformerConfig(chars=300_000, d=128, layers=6, seq_len=128, batch=32, steps=1500, warmups=(0, 300), evals=10),
    "online": OnlineConfig(length=10000, hidden=128, window=1000),
    "cost": CostConfig(width=1024, batch=512, repeats=100),
}

_PRESETS = {"smoke": _SMOKE, "quick": _QUICK, "full": _FULL}


def preset(experiment: str, name: str):
    """The configuration of ``experiment`` under preset ``name``."""
    if name not in _PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESET_NAMES)}, got {name!r}")
    if experiment not in _QUICK:
        raise ValueError(f"experiment must be one of {', '.join(_QUICK)}, got {experiment!r}")
    return replace(_PRESETS[name][experiment])
