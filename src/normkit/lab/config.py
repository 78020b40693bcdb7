"""Experiment configurations: one frozen dataclass per experiment, with ``smoke``/``quick``/``full``
presets.

``quick`` is the ``make demo`` budget: all nine experiments, 5 seeds per arm (the fewest at which
a paired t interval has useful width: :mod:`normkit.lab.stats`), within 10 minutes on two CPU
cores with one thread. ``full`` uses larger models, more steps and wider sweeps; ``smoke`` is a
seconds-long end-to-end check used by the tests (its numbers mean nothing). The defaults below
are the ``quick`` preset, each with its reason.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, Tuple

__all__ = [
    "MLPConfig", "LSTMConfig", "SequentialConfig", "TransformerConfig", "OnlineConfig", "CostConfig",
    "SensitivityConfig", "ConvNetConfig", "InvarianceConfig", "PRESET_NAMES", "DEFAULT_SEEDS", "preset",
]

PRESET_NAMES = ("smoke", "quick", "full")
DEFAULT_SEEDS = 5  # per arm; a verdict at fewer seeds has little power (see normkit.lab.stats)


@dataclass(frozen=True)
class MLPConfig:
    """Deep MLP on digits (permutation invariant), every norm at every batch size."""

    norms: Tuple[str, ...] = ("none", "batch", "layer")
    batch_sizes: Tuple[int, ...] = (1, 4, 32)
    depth: int = 6  # deep enough that the unnormalized ReLU net learns slowly at default init
    width: int = 64
    steps: int = 250  # the same number of Adam steps at every batch size (250 samples seen at batch 1)
    lr: float = 1e-3  # Adam's default: no tuning in favour of any arm
    evals: int = 6  # test-accuracy checkpoints along training (the training curve)


@dataclass(frozen=True)
class LSTMConfig:
    """Character language model on the standard-library corpus."""

    arms: Tuple[str, ...] = ("lstm", "ln_lstm")
    chars: int = 200_000
    seq_len: int = 32
    batch: int = 32
    embed: int = 32
    hidden: int = 96
    steps: int = 160  # both models still far from converged: a comparison of early training
    lr: float = 3e-3
    evals: int = 8
    val_batches: int = 2  # fixed validation windows, batch × seq_len characters each
    clip: float = 1.0


@dataclass(frozen=True)
class SequentialConfig:
    """Pixel-by-pixel digits: 64 steps of one pixel, classify from the last hidden state."""

    arms: Tuple[str, ...] = ("lstm", "ln_lstm", "gru", "ln_gru")
    hidden: int = 48
    batch: int = 32
    steps: int = 90  # every arm is still learning: a comparison of early training
    lr: float = 3e-3
    evals: int = 5
    clip: float = 1.0


@dataclass(frozen=True)
class TransformerConfig:
    """Small causal character transformer: norm placement × warm-up × learning rate."""

    modes: Tuple[str, ...] = ("post_ln", "pre_ln", "none")
    warmups: Tuple[int, ...] = (0, 20)  # steps of linear warm-up; 0 = none
    lrs: Tuple[float, ...] = (4e-3, 1.6e-2, 6.4e-2)  # a sweep per arm (x4 apart): each arm at its own best. At 2e-3
    # 64 steps are too few to get below the unigram threshold (measured), which would read as "stalled"
    chars: int = 200_000
    d: int = 32
    layers: int = 2
    heads: int = 2
    seq_len: int = 32
    batch: int = 16
    steps: int = 64
    evals: int = 4
    val_batches: int = 2


@dataclass(frozen=True)
class OnlineConfig:
    """Batch-size-1 prequential learning on a digits stream whose inputs shift mid-stream."""

    arms: Tuple[str, ...] = ("none", "batch_frozen", "layer", "running")
    shifts: Tuple[str, ...] = ("affine", "feature_affine", "rotation")  # see normkit.lab.data.shift_inputs
    length: int = 600  # samples per stream; the shift happens at length // 2
    scale: float = 3.0  # "affine": x -> scale * x + offset (what per-sample LN cancels)
    offset: float = 2.0
    hidden: int = 64
    lr: float = 1e-3
    momentum: float = 0.01  # RunningNormalizer's forgetting rate
    window: int = 150  # "just after the shift" = the first `window` samples of phase 2
    var_floor: float = 1e-4  # the frozen standardizer: a (near-)constant feature gets scale 1, as scikit-learn does


@dataclass(frozen=True)
class CostConfig:
    """Training-step time of each norm inside the same MLP."""

    norms: Tuple[str, ...] = ("none", "batch", "torch_layer", "layer", "rms")
    width: int = 512
    depth: int = 4
    batch: int = 128
    warmup: int = 3
    repeats: int = 20  # timed steps per seed; the median is reported
    margin: float = 0.05  # "no slower than": at most 5 % slower, with 95 % confidence


@dataclass(frozen=True)
class SensitivityConfig:
    """One small task (digits MLP), one factor at a time around the defaults (gain 1, bias 0,
    eps 1e-5, Adam lr 1e-3), for LayerNorm, RMSNorm and no norm."""

    norms: Tuple[str, ...] = ("none", "layer", "rms")
    gains: Tuple[float, ...] = (0.1, 10.0)
    biases: Tuple[float, ...] = (-1.0, 1.0)
    eps: Tuple[float, ...] = (1e-1,)  # 1e-12 trains like the default 1e-5 here (measured): --full only
    lrs: Tuple[float, ...] = (1e-2, 3e-2)  # 10x and 30x Adam's default (at 0.1 every arm fails: measured)
    depth: int = 4
    width: int = 64
    batch: int = 32
    steps: int = 100
    lr: float = 1e-3


@dataclass(frozen=True)
class ConvNetConfig:
    """A small CNN on 8×8 digits with each channel norm, at a small and a usual batch size."""

    norms: Tuple[str, ...] = ("none", "batch", "layer2d", "layer_chw", "group")
    batch_sizes: Tuple[int, ...] = (4, 64)
    channels: Tuple[int, ...] = (8, 16)  # small: the cost is per step, and 8×8 inputs need few channels
    groups: int = 4  # GroupNorm's groups
    steps: int = 120
    lr: float = 1e-3
    evals: int = 5


@dataclass(frozen=True)
class InvarianceConfig:
    """Table 1 of the paper, measured in float64 on random layers (one per seed)."""

    norms: Tuple[str, ...] = ("batch", "weight", "layer", "rms")
    d_in: int = 16
    d_out: int = 32
    batch: int = 8
    eps: float = 0.0  # eps is what breaks exact scale invariance; the random layers have no constant rows
    tol: float = 1e-9  # "invariant": the output moved by less than this (float64 rounding is ~1e-15)


_QUICK: Dict[str, object] = {
    "mlp": MLPConfig(),
    "lstm": LSTMConfig(),
    "sequential": SequentialConfig(),
    "transformer": TransformerConfig(),
    "online": OnlineConfig(),
    "cost": CostConfig(),
    "sensitivity": SensitivityConfig(),
    "convnet": ConvNetConfig(),
    "invariance": InvarianceConfig(),
}

_SMOKE: Dict[str, object] = {
    "mlp": MLPConfig(batch_sizes=(1, 4), depth=2, width=16, steps=6, evals=2),
    "lstm": LSTMConfig(chars=5000, seq_len=8, batch=4, embed=8, hidden=8, steps=4, evals=2, val_batches=1),
    "sequential": SequentialConfig(hidden=8, batch=8, steps=3, evals=2),
    "transformer": TransformerConfig(chars=5000, d=16, layers=1, heads=2, seq_len=16, batch=4, steps=6, evals=2, warmups=(0, 3),
                                     lrs=(1e-3, 1e-1), val_batches=1),
    "online": OnlineConfig(length=80, hidden=8, window=20),
    "cost": CostConfig(width=16, depth=1, batch=8, warmup=1, repeats=3),
    "sensitivity": SensitivityConfig(gains=(10.0,), biases=(1.0,), eps=(1e-1,), lrs=(1e-1,), depth=2, width=8, steps=5),
    "convnet": ConvNetConfig(batch_sizes=(1, 4), channels=(4, 4), groups=2, steps=4, evals=2),
    "invariance": InvarianceConfig(d_in=4, d_out=6, batch=3),
}

_FULL: Dict[str, object] = {
    "mlp": MLPConfig(norms=("none", "batch", "layer", "rms"), batch_sizes=(1, 4, 32, 128), depth=8, width=256, steps=2000, evals=10),
    "lstm": LSTMConfig(chars=300_000, seq_len=64, batch=64, embed=64, hidden=256, steps=1500, evals=10),
    "sequential": SequentialConfig(hidden=128, batch=64, steps=1000, evals=10),
    # 4 placements x 2 warm-ups x 4 rates x 5 seeds = 160 runs: a CPU-sized model (d=128, 6 layers, 1500 steps: 67 h, estimated)
    "transformer": TransformerConfig(modes=("post_ln", "pre_ln", "pre_rms", "none"), chars=300_000, d=64, layers=4, heads=4,
                                     seq_len=64, batch=16, steps=400, warmups=(0, 100), lrs=(1e-3, 3e-3, 1e-2, 3e-2), evals=8),
    "online": OnlineConfig(shifts=("affine", "feature_affine", "permutation", "rotation"), length=6000, hidden=128, window=1000),
    "cost": CostConfig(width=1024, batch=512, repeats=100),
    "sensitivity": SensitivityConfig(gains=(0.1, 0.3, 3.0, 10.0), biases=(-1.0, 1.0), eps=(1e-12, 1e-3, 1e-1), lrs=(3e-3, 1e-2, 3e-2, 1e-1),
                                     depth=6, width=256, steps=1000),  # lr 0.1 last: the "high lr" claim uses the largest
    "convnet": ConvNetConfig(channels=(32, 64), steps=1000, evals=10),
    "invariance": InvarianceConfig(d_in=64, d_out=128, batch=32),
}

_PRESETS = {"smoke": _SMOKE, "quick": _QUICK, "full": _FULL}


def preset(experiment: str, name: str):
    """The configuration of ``experiment`` under preset ``name``."""
    if name not in _PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESET_NAMES)}, got {name!r}")
    if experiment not in _QUICK:
        raise ValueError(f"experiment must be one of {', '.join(_QUICK)}, got {experiment!r}")
    return replace(_PRESETS[name][experiment])
