"""Interleaved paired timing of two callables, and the statistics of the per-pair ratios.

A ratio of two medians measured minutes apart mixes the code's speed with the machine's
state at two moments (another process, the CPU clock, memory tiering). Here the baseline
``a`` and the candidate ``b`` are timed back to back, in a random order per pair, so a
disturbance lands on both halves of a pair more often than not, and the quantity reported is
the median of the per-pair ratios ``a / b`` (above 1: ``b`` is faster), with a
distribution-free interval from order statistics. Each half of a pair is a batch of calls
sized to ``target_batch_s``, timed with :func:`time.perf_counter_ns`: long enough for the
timer's resolution and the loop's overhead not to matter, short enough that many pairs fit.
"""

from __future__ import annotations

import gc
import math
import random
import statistics
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

#: A pair count below which no 95 % interval exists: the sample's extremes cover the median
#: with probability 1 - 2 * 0.5**n, which first reaches 95 % at n = 6.
MIN_PAIRS_FOR_95 = 6


@dataclass(frozen=True)
class PairedTiming:
    """Per-call seconds of ``a`` and ``b`` in each pair, and which ran first."""

    a_s: Tuple[float, ...]
    b_s: Tuple[float, ...]
    a_first: Tuple[bool, ...]
    inner_a: int
    inner_b: int

    @property
    def ratios(self) -> List[float]:
        return [a / b for a, b in zip(self.a_s, self.b_s)]

    @property
    def pairs(self) -> int:
        return len(self.a_s)


@dataclass(frozen=True)
class RatioEstimate:
    """The median per-pair ratio with an order-statistic interval of (at least) ``coverage``."""

    median: float
    low: float
    high: float
    coverage: float
    pairs: int


def median_interval(values: Sequence[float], confidence: float = 0.95) -> Tuple[float, float, float]:
    """``(low, high, coverage)``: an interval of order statistics that contains the population
    median with probability ``coverage >= confidence`` for any continuous distribution.

    The number of values below the median is Binomial(n, 1/2); ``[x_(k), x_(n+1-k)]`` (1-based,
    sorted) misses the median with probability ``2 * P(X <= k - 1)``. ``k`` is the largest that
    keeps this within ``1 - confidence``. With fewer values than that needs (``n < 6`` at 95 %)
    the interval is the sample's range and ``coverage`` is below ``confidence``.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    xs = sorted(values)
    n = len(xs)
    if n == 0:
        raise ValueError("median_interval needs at least one value")
    alpha_half = (1 - confidence) / 2
    k, cdf = 0, 0.0  # cdf = P(X <= k - 1) after each step
    while k < n // 2:
        nxt = cdf + math.comb(n, k) / 2 ** n
        if nxt > alpha_half:
            break
        k, cdf = k + 1, nxt
    if k == 0:
        return xs[0], xs[-1], 1 - 2 / 2 ** n
    return xs[k - 1], xs[n - k], 1 - 2 * cdf


def estimate_ratio(timing: PairedTiming, confidence: float = 0.95) -> RatioEstimate:
    ratios = timing.ratios
    low, high, coverage = median_interval(ratios, confidence)
    return RatioEstimate(statistics.median(ratios), low, high, coverage, len(ratios))


def _batch_ns(fn: Callable[[], object], inner: int) -> int:
    t0 = time.perf_counter_ns()
    for _ in range(inner):
        fn()
    return time.perf_counter_ns() - t0


def calibrate(fn: Callable[[], object], target_s: float, max_inner: int = 100_000,
              last_call_s: Optional[float] = None) -> int:
    """Calls per batch so that one batch of ``fn`` takes about ``target_s`` (at least one).
    ``last_call_s``, a warm call's time already measured, saves a call of a slow ``fn``."""
    inner = 1
    while True:
        if last_call_s is not None and inner == 1:
            elapsed = last_call_s
        else:
            elapsed = _batch_ns(fn, inner) / 1e9
        if elapsed >= target_s / 4 or inner >= max_inner:
            # close enough to extrapolate; the factor-of-4 floor keeps timer noise out of it
            return max(1, min(max_inner, round(inner * target_s / max(elapsed, 1e-9))))
        inner = min(max_inner, inner * 8)


def measure_pairs(a: Callable[[], object], b: Callable[[], object], *, warmup: int = 3,
                  target_batch_s: float = 3e-3, budget_s: float = 1.0, min_pairs: int = 9,
                  max_pairs: int = 101, pairs: Optional[int] = None,
                  rng: Optional[random.Random] = None) -> PairedTiming:
    """Time ``a`` and ``b`` in interleaved pairs.

    ``warmup`` untimed calls of each (alternating) come first: they absorb compilation,
    allocator growth and first-touch page faults; fewer (at least two, or the one asked for)
    when they take more than half of ``budget_s``. Each side's batch size comes from its
    fastest warm-up call. Then pairs are timed until ``budget_s`` has
    passed, at least ``min_pairs`` and at most ``max_pairs`` of them, or exactly ``pairs``.
    The garbage collector is paused while timing (as in :func:`normkit.bench.timing.measure`).
    """
    if pairs is not None and pairs < 1:
        raise ValueError(f"pairs must be >= 1, got {pairs}")
    if min_pairs < 1 or max_pairs < min_pairs:
        raise ValueError(f"need 1 <= min_pairs <= max_pairs, got {min_pairs} and {max_pairs}")
    rng = rng or random.Random(0)
    warm_start = time.perf_counter()
    # each side's fastest warm-up call sizes its batches: a single slow warm-up call (a thread
    # pool starting, page faults after a larger call) would otherwise size them for that call,
    # and a side calibrated to one call a batch pays, in every sample, the cost of running just
    # after the other side (its code and data evicted) that a batch of many calls amortizes
    fastest_a = fastest_b = math.inf
    for round_ in range(max(1, warmup)):
        fastest_a = min(fastest_a, _batch_ns(a, 1) / 1e9)
        fastest_b = min(fastest_b, _batch_ns(b, 1) / 1e9)
        if round_ >= 1 and time.perf_counter() - warm_start > budget_s / 2:
            # calls this slow need no more warming, and would eat the cell's budget; but not
            # before a second call of each: the first may be a one-off (the process's first
            # backward initializes the autograd engine) that took the time on its own
            break
    inner_a = calibrate(a, target_batch_s, last_call_s=fastest_a)
    inner_b = calibrate(b, target_batch_s, last_call_s=fastest_b)
    a_s: List[float] = []
    b_s: List[float] = []
    a_first: List[bool] = []
    lo, hi = (pairs, pairs) if pairs is not None else (min_pairs, max_pairs)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        while len(a_s) < hi and (len(a_s) < lo or time.perf_counter() - start < budget_s):
            first = rng.random() < 0.5
            if first:
                ta = _batch_ns(a, inner_a)
                tb = _batch_ns(b, inner_b)
            else:
                tb = _batch_ns(b, inner_b)
                ta = _batch_ns(a, inner_a)
            a_s.append(ta / inner_a / 1e9)
            b_s.append(tb / inner_b / 1e9)
            a_first.append(first)
    finally:
        if gc_was_enabled:
            gc.enable()
    return PairedTiming(tuple(a_s), tuple(b_s), tuple(a_first), inner_a, inner_b)
