"""Experiment configurations: one frozen dataclass per experiment, with ``smoke``/``quick``/``full``
presets.

``quick`` is the ``make demo`` budget: all nine experiments within 10 minutes on two CPU cores
with one thread, with each experiment's own number of test seeds (``seeds``: 12 where runs are
cheap) and, before them, a learning-rate sweep per arm on ``tune_seeds`` separate tuning seeds
(:func:`normkit.lab.experiments._common.tune`): every arm runs at the rate its own advocate
would pick, and the rate is chosen on seeds the test does not use. ``full`` uses larger models, more steps and wider sweeps; ``smoke`` is a
seconds-long end-to-end check used by the tests (its numbers mean nothing). The defaults below
are the ``quick`` preset, each with its reason.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, Tuple

__all__ = [
    "MLPConfig", "LSTMConfig", "SequentialConfig", "TransformerConfig", "OnlineConfig", "CostConfig",
    "SensitivityConfig", "ConvNetConfig", "InvarianceConfig", "PRESET_NAMES", "DEFAULT_SEEDS", "TUNE_SEEDS", "preset",
]

PRESET_NAMES = ("smoke", "quick", "full")
DEFAULT_SEEDS = 12  # test seeds per arm where runs are cheap; each config's ``seeds`` is its own (``--seeds`` overrides all)
TUNE_SEEDS = 2  # tuning seeds per (arm, rate): 1000, 1001, ... never used for a test


@dataclass(frozen=True)
class MLPConfig:
    """Deep MLP on digits (permutation invariant), every norm at every batch size."""

    norms: Tuple[str, ...] = ("none", "batch", "layer")
    batch_sizes: Tuple[int, ...] = (1, 4, 32)
    depth: int = 6  # every ReLU layer He-initialized (models.MLP), so depth alone does not handicap no norm
    width: int = 64
    steps: int = 250  # the same number of Adam steps at every batch size (250 samples seen at batch 1)
    lrs: Tuple[float, ...] = (1e-3, 3e-3, 1e-2)  # Adam rates swept per arm and batch size on the tuning seeds
    evals: int = 6  # test-accuracy checkpoints along training (the training curve)
    seeds: int = 16  # runs cost ~0.3 s each
    tune_seeds: int = TUNE_SEEDS


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
    lrs: Tuple[float, ...] = (3e-3, 1e-2, 3e-2)
    evals: int = 8
    val_batches: int = 2  # fixed validation windows, batch × seq_len characters each
    clip: float = 1.0
    seeds: int = 12  # runs cost ~1.5 s each
    tune_seeds: int = TUNE_SEEDS


@dataclass(frozen=True)
class SequentialConfig:
    """Pixel-by-pixel digits: 64 steps of one pixel, classify from the last hidden state."""

    arms: Tuple[str, ...] = ("lstm", "ln_lstm", "gru", "ln_gru")
    hidden: int = 48
    batch: int = 32
    steps: int = 90  # every arm is still learning: a comparison of early training
    lrs: Tuple[float, ...] = (3e-3, 1e-2, 3e-2)
    evals: int = 5
    clip: float = 1.0
    seeds: int = 16
    tune_seeds: int = TUNE_SEEDS


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
    spike: float = 1.5  # nats above the best training loss so far = a blow-up ("spiked"); batch-to-batch noise alone gives
    # rises of about 0.5-0.6 nats at every placement and rate here (measured), the no-norm blow-ups at 0.064 rise 3-200
    seeds: int = 12  # at each (placement, warm-up)'s tuned rate; the whole grid runs on the tuning seeds
    tune_seeds: int = TUNE_SEEDS


@dataclass(frozen=True)
class OnlineConfig:
    """Batch-size-1 prequential learning on a digits stream whose inputs shift mid-stream."""

    arms: Tuple[str, ...] = ("none", "batch_frozen", "layer", "running")
    shifts: Tuple[str, ...] = ("affine", "feature_affine", "rotation")  # see normkit.lab.data.shift_inputs
    length: int = 600  # samples per stream; the shift happens at length // 2
    scale: float = 3.0  # "affine": x -> scale * x + offset (what per-sample LN cancels)
    offset: float = 2.0
    hidden: int = 64
    lrs: Tuple[float, ...] = (3e-4, 1e-3, 3e-3)  # tuned per arm on the tuning seeds' first half (before any shift)
    momentum: float = 0.01  # RunningNormalizer's forgetting rate
    window: int = 150  # "just after the shift" = the first `window` samples of phase 2
    var_floor: float = 1e-4  # the frozen standardizer: a (near-)constant feature gets scale 1, as scikit-learn does
    seeds: int = 12
    tune_seeds: int = TUNE_SEEDS


@dataclass(frozen=True)
class CostConfig:
    """Micro-benchmarks of the norm op itself, forward and forward + backward (an engineering
    section, not a claim)."""

    ops: Tuple[str, ...] = ("torch_layer", "layer", "torch_rms", "rms")
    shapes: Tuple[Tuple[int, int], ...] = ((128, 512), (1024, 1024))  # (rows, width)
    blocks: int = 10  # interleaved blocks: every op timed once per block, in a rotating order
    calls: int = 20  # calls per timing, timed together (the median call of a block is too short to time alone)
    seeds: int = 1  # the benchmark is not seeded training: one pass of its blocks
    tune_seeds: int = 0


@dataclass(frozen=True)
class SensitivityConfig:
    """One small task (digits MLP), one factor at a time around the defaults (gain 1, bias 0,
    eps 1e-5, Adam lr 1e-3), for LayerNorm, RMSNorm and no norm."""

    norms: Tuple[str, ...] = ("none", "layer", "rms")
    gains: Tuple[float, ...] = (0.1, 10.0)
    biases: Tuple[float, ...] = (-1.0, 1.0)
    eps: Tuple[float, ...] = (1e-1,)  # 1e-12 trains like the default 1e-5 here (measured): --full only
    lrs: Tuple[float, ...] = (1e-2, 3e-2)  # the learning-rate factor (at 0.1 every arm fails: measured)
    tune_lrs: Tuple[float, ...] = (1e-3, 3e-3, 1e-2)  # each norm's default rate, chosen on the tuning seeds
    depth: int = 4
    width: int = 64
    batch: int = 32
    steps: int = 100
    seeds: int = 12
    tune_seeds: int = TUNE_SEEDS


@dataclass(frozen=True)
class ConvNetConfig:
    """A small CNN on 8×8 digits with each channel norm, at a small and a usual batch size."""

    norms: Tuple[str, ...] = ("none", "batch", "layer2d", "layer_chw", "group")
    batch_sizes: Tuple[int, ...] = (4, 64)
    channels: Tuple[int, ...] = (8, 16)  # small: the cost is per step, and 8×8 inputs need few channels
    groups: int = 4  # GroupNorm's groups
    steps: int = 120
    lrs: Tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    evals: int = 5
    seeds: int = 12
    tune_seeds: int = TUNE_SEEDS


@dataclass(frozen=True)
class InvarianceConfig:
    """Table 1 of the paper, measured in float64 on random layers (one per seed)."""

    norms: Tuple[str, ...] = ("batch", "weight", "layer", "rms")
    d_in: int = 16
    d_out: int = 32
    batch: int = 8
    eps: float = 0.0  # eps is what breaks exact scale invariance; the random layers have no constant rows
    tol: float = 1e-9  # "invariant": the output moved by less than this (float64 rounding is ~1e-15)
    seeds: int = 5  # random layers drawn; a deterministic check, not a statistical one
    tune_seeds: int = 0


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

_T = dict(seeds=2, tune_seeds=1)  # smoke: two test seeds, one tuning seed, two rates

_SMOKE: Dict[str, object] = {
    "mlp": MLPConfig(batch_sizes=(1, 4), depth=2, width=16, steps=6, evals=2, lrs=(1e-3, 1e-2), **_T),
    "lstm": LSTMConfig(chars=5000, seq_len=8, batch=4, embed=8, hidden=8, steps=4, evals=2, val_batches=1, lrs=(3e-3, 1e-2), **_T),
    "sequential": SequentialConfig(hidden=8, batch=8, steps=3, evals=2, lrs=(3e-3, 1e-2), **_T),
    "transformer": TransformerConfig(chars=5000, d=16, layers=1, heads=2, seq_len=16, batch=4, steps=6, evals=2, warmups=(0, 3),
                                     lrs=(1e-3, 1e-1), val_batches=1, **_T),
    "online": OnlineConfig(length=80, hidden=8, window=20, lrs=(1e-3, 3e-3), **_T),
    "cost": CostConfig(shapes=((8, 16),), blocks=3, calls=2),
    "sensitivity": SensitivityConfig(gains=(10.0,), biases=(1.0,), eps=(1e-1,), lrs=(1e-1,), depth=2, width=8, steps=5,
                                     tune_lrs=(1e-3, 1e-2), **_T),
    "convnet": ConvNetConfig(batch_sizes=(1, 4), channels=(4, 4), groups=2, steps=4, evals=2, lrs=(1e-3, 1e-2), **_T),
    "invariance": InvarianceConfig(d_in=4, d_out=6, batch=3, seeds=2),
}

# --full: paper-scale settings; 16 test seeds and 3 tuning seeds per arm over a wider rate grid
_F = dict(seeds=16, tune_seeds=3)
_FULL: Dict[str, object] = {
    "mlp": MLPConfig(norms=("none", "batch", "layer", "rms"), batch_sizes=(1, 4, 32, 128), depth=8, width=256, steps=2000, evals=10,
                     lrs=(3e-4, 1e-3, 3e-3, 1e-2), **_F),
    "lstm": LSTMConfig(chars=300_000, seq_len=64, batch=64, embed=64, hidden=256, steps=1500, evals=10, lrs=(1e-3, 3e-3, 1e-2, 3e-2), **_F),
    "sequential": SequentialConfig(hidden=128, batch=64, steps=1000, evals=10, lrs=(1e-3, 3e-3, 1e-2, 3e-2), **_F),
    # deeper, with and without warm-up, the full rate grid: 4 placements x 2 warm-ups x 5 rates on the tuning seeds
    "transformer": TransformerConfig(modes=("post_ln", "pre_ln", "pre_rms", "none"), chars=300_000, d=64, layers=6, heads=4,
                                     seq_len=128, batch=16, steps=1000, warmups=(0, 200), lrs=(3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
                                     evals=8, seeds=10, tune_seeds=3),
    "online": OnlineConfig(shifts=("affine", "feature_affine", "permutation", "rotation"), length=6000, hidden=128, window=1000,
                           lrs=(1e-4, 3e-4, 1e-3, 3e-3), **_F),
    "cost": CostConfig(shapes=((128, 512), (2048, 1024), (4096, 4096)), blocks=20, calls=10),
    "sensitivity": SensitivityConfig(gains=(0.1, 0.3, 3.0, 10.0), biases=(-1.0, 1.0), eps=(1e-12, 1e-3, 1e-1), lrs=(3e-3, 1e-2, 3e-2, 1e-1),
                                     tune_lrs=(3e-4, 1e-3, 3e-3, 1e-2), depth=6, width=256, steps=1000, **_F),  # lr 0.1 last: the "high lr" estimate uses the largest
    "convnet": ConvNetConfig(channels=(32, 64), steps=1000, evals=10, lrs=(3e-4, 1e-3, 3e-3, 1e-2), **_F),
    "invariance": InvarianceConfig(d_in=64, d_out=128, batch=32, seeds=16),
}

_PRESETS = {"smoke": _SMOKE, "quick": _QUICK, "full": _FULL}


def preset(experiment: str, name: str):
    """The configuration of ``experiment`` under preset ``name``."""
    if name not in _PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESET_NAMES)}, got {name!r}")
    if experiment not in _QUICK:
        raise ValueError(f"experiment must be one of {', '.join(_QUICK)}, got {experiment!r}")
    return replace(_PRESETS[name][experiment])
