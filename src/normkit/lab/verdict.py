"""Turning measurements into sentences: every verdict in a report is a test from
:mod:`normkit.lab.stats`, and its sentence states the numbers it rests on.

A claim compares an arm ``a`` (the one the claim favours) with an arm ``b`` on one metric, per
seed. :func:`compare` runs :func:`~normkit.lab.stats.test_claim` (paired by seed unless told
otherwise), :func:`compare_failures` Fisher's exact test on failure counts, and
:func:`compare_noninferior` a non-inferiority test with a stated margin. Each returns a
:class:`Finding`: the claim, the verdict, the test's numbers (difference, interval, p, n) and
one sentence for the report. Failed runs (a non-finite metric) are counted in the sentence,
never dropped silently.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Dict, Iterable, Optional, Sequence

from normkit.lab.stats import (
    INCONCLUSIVE,
    NOT_RUN,
    REFUTES,
    SUPPORTS,
    ClaimTest,
    test_claim,
    test_equivalence,
    test_failures,
    test_noninferiority,
)

__all__ = ["Stat", "Finding", "SUPPORTS", "REFUTES", "INCONCLUSIVE", "NOT_RUN", "compare", "compare_failures",
           "compare_noninferior", "compare_equivalence", "not_measured"]


@dataclass(frozen=True)
class Stat:
    """Mean and sample std (ddof=1; 0 for one value) of the finite values, and how many were not."""

    mean: float
    std: float
    n: int
    failed: int = 0

    @classmethod
    def of(cls, values: Iterable[Optional[float]]) -> "Stat":
        vals = [math.nan if v is None else float(v) for v in values]
        finite = [v for v in vals if math.isfinite(v)]
        failed = len(vals) - len(finite)
        if not finite:
            return cls(math.nan, math.nan, 0, failed)
        mean = sum(finite) / len(finite)
        var = sum((v - mean) ** 2 for v in finite) / (len(finite) - 1) if len(finite) > 1 else 0.0
        return cls(mean, math.sqrt(var), len(finite), failed)

    def fmt(self, digits: int = 3) -> str:
        if self.n == 0:
            return f"n/a ({self.failed} failed)" if self.failed else "n/a"
        text = f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"
        return text + (f" ({self.failed} failed)" if self.failed else "")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Finding:
    """One claim, its test and the verdict, with the sentence the report prints."""

    experiment: str
    claim: str
    verdict: str
    sentence: str
    numbers: str = ""  # the two measurements, short, for summary tables
    test: Dict = field(default_factory=dict)  # ClaimTest.to_dict()
    metric: str = ""
    key: str = ""  # the id of the pre-registered primary claim it measures (normkit.lab.claims), or "" (exploratory)
    data: Dict = field(default_factory=dict)  # the per-seed values the test ran on: a, b, higher_is_better

    def noted(self, note: str) -> "Finding":
        """The same finding with ``note`` appended to its sentence."""
        return replace(self, sentence=f"{self.sentence} {note}")

    def to_dict(self) -> dict:
        return asdict(self)


def _tail(v: str, a_label: str, b_label: str, word: str) -> str:
    if v == SUPPORTS:
        return f"{a_label} is {word}, which supports the claim"
    if v == REFUTES:
        return f"{b_label} is {word}, which does not support the claim"
    if v == NOT_RUN:
        return "an arm was not run (skipped), so the claim was not measured"
    return f"the measurement is {v}"


def _failure_note(t: ClaimTest, a_label: str, b_label: str, n_a: int, n_b: int) -> str:
    if not (t.failed_a or t.failed_b):
        return ""
    f = test_failures(t.failed_a, n_a, t.failed_b, n_b, alpha=t.alpha)
    return (f" Failed runs (non-finite): {a_label} {t.failed_a}/{n_a}, {b_label} {t.failed_b}/{n_b} "
            f"(Fisher's exact test p = {f.p:.3f}); the interval uses the {t.n} seeds where both arms finished.")


def compare(experiment: str, claim: str, metric: str, a_label: str, a: Sequence[Optional[float]], b_label: str,
            b: Sequence[Optional[float]], *, higher_is_better: bool = True, paired: bool = True, alpha: float = 0.05,
            digits: int = 3, context: str = "", better: str = "", unit: str = "", key: str = "") -> Finding:
    """A :class:`Finding` for "``a`` beats ``b``" on per-seed values (``a[i]``, ``b[i]`` from seed
    ``i`` when ``paired``), whose sentence states both measurements, the difference with its
    interval and p-value, and the verdict.

    ``better`` names what favours the claim when "better" would mislead (e.g. "slower" for a
    claim that something costs time). ``unit`` is a short name of the metric for summary tables.
    """
    a, b = list(a), list(b)
    t = test_claim(a, b, higher_is_better=higher_is_better, paired=paired, alpha=alpha)
    sa, sb = Stat.of(a), Stat.of(b)
    seeds = max(len(a), len(b))
    direction = f"{'higher' if higher_is_better else 'lower'} is {better or 'better'}"
    diff = "" if not math.isfinite(t.diff) else f"; difference in the claim's favour {t.interval(digits)}, {t.method}"
    text = (f"{metric} ({direction}), {seeds} seed{'s' if seeds != 1 else ''}: "
            f"{a_label} {sa.fmt(digits)} vs {b_label} {sb.fmt(digits)}{diff}")
    sentence = f"{context + ' ' if context else ''}{text}."
    sentence += _failure_note(t, a_label, b_label, len(a), len(b))
    numbers = f"{a_label} {sa.fmt(digits)} vs {b_label} {sb.fmt(digits)}" + (f" ({unit})" if unit else "")
    return Finding(experiment, claim, t.verdict, sentence[0].upper() + sentence[1:], numbers, t.to_dict(), unit or metric, key,
                   {"a": a, "b": b, "higher_is_better": higher_is_better, "kind": "superiority"})


def compare_equivalence(experiment: str, claim: str, metric: str, a_label: str, a: Sequence[Optional[float]], b_label: str,
                        b: Sequence[Optional[float]], *, margin: float, alpha: float = 0.05, digits: int = 3, context: str = "",
                        unit: str = "", key: str = "") -> Finding:
    """A :class:`Finding` for "``a`` and ``b`` are on par within ``margin``" (two one-sided tests,
    paired by seed; the difference is ``a - b``)."""
    a, b = list(a), list(b)
    t = test_equivalence(a, b, margin=margin, alpha=alpha)
    sa, sb = Stat.of(a), Stat.of(b)
    level = round(100 * (1 - 2 * alpha))
    diff = "" if not math.isfinite(t.diff) else (f"; difference {a_label} − {b_label} {t.diff:+.{digits}f} ({level} % CI "
                                                 f"{t.ci_low:+.{digits}f} to {t.ci_high:+.{digits}f}), margin ±{margin:g}, {t.method}")
    sentence = (f"{context + ' ' if context else ''}{metric}, {max(len(a), len(b))} seeds: {a_label} {sa.fmt(digits)} vs "
                f"{b_label} {sb.fmt(digits)}{diff}.")
    sentence += _failure_note(t, a_label, b_label, len(a), len(b))
    numbers = f"{a_label} {sa.fmt(digits)} vs {b_label} {sb.fmt(digits)}" + (f" ({unit})" if unit else "")
    return Finding(experiment, claim, t.verdict, sentence[0].upper() + sentence[1:], numbers, t.to_dict(), unit or metric, key,
                   {"a": a, "b": b, "kind": "equivalence", "margin": margin})


def compare_failures(experiment: str, claim: str, a_label: str, failed_a: int, n_a: int, b_label: str, failed_b: int,
                     n_b: int, *, what: str = "failed", alpha: float = 0.05, context: str = "") -> Finding:
    """A :class:`Finding` for "``a`` fails less often than ``b``" (Fisher's exact test)."""
    t = test_failures(failed_a, n_a, failed_b, n_b, alpha=alpha)
    text = (f"runs that {what}: {a_label} {failed_a}/{n_a} vs {b_label} {failed_b}/{n_b}; difference of failure rates "
            f"in the claim's favour {t.interval(2)} (Newcombe interval, Fisher's exact test)")
    word = "less often " + what
    sentence = f"{context + ' ' if context else ''}{text}: {_tail(t.verdict, a_label, b_label, word)}."
    numbers = f"{what}: {a_label} {failed_a}/{n_a} vs {b_label} {failed_b}/{n_b}"
    return Finding(experiment, claim, t.verdict, sentence[0].upper() + sentence[1:], numbers, t.to_dict(), f"runs that {what}")


def compare_noninferior(experiment: str, claim: str, metric: str, a_label: str, a: Sequence[Optional[float]], b_label: str,
                        b: Sequence[Optional[float]], *, margin: float, alpha: float = 0.05, context: str = "",
                        unit: str = "", digits: int = 3) -> Finding:
    """A :class:`Finding` for "``a`` is at most ``margin`` (relative) worse than ``b``", lower is
    better (times), paired by seed."""
    a, b = list(a), list(b)
    t = test_noninferiority(a, b, margin=margin, alpha=alpha)
    sa, sb = Stat.of(a), Stat.of(b)
    level = round(100 * (1 - alpha))
    if "ratio" in t.extra:
        ratio = (f"; ratio {a_label}/{b_label} {t.extra['ratio']:.3f} ({level} % CI {t.extra['ratio_ci_low']:.3f} to "
                 f"{t.extra['ratio_ci_high']:.3f}, {t.method})")
    else:
        ratio = ""
    text = f"{metric}, {max(len(a), len(b))} seeds: {a_label} {sa.fmt(digits)} vs {b_label} {sb.fmt(digits)}{ratio}"
    if t.verdict == SUPPORTS:
        tail = f"the interval lies below the margin {1 + margin:g}, which supports the claim"
    elif t.verdict == REFUTES:
        tail = f"{a_label} is slower than {b_label} by more than the margin {1 + margin:g}, which does not support the claim"
    else:
        tail = f"the measurement is {t.verdict}"
    sentence = f"{context + ' ' if context else ''}{text}: {tail}."
    sentence += _failure_note(t, a_label, b_label, len(a), len(b))
    numbers = f"{a_label} {sa.fmt(digits)} vs {b_label} {sb.fmt(digits)}" + (f" ({unit})" if unit else "")
    return Finding(experiment, claim, t.verdict, sentence[0].upper() + sentence[1:], numbers, t.to_dict(), unit or metric)


def not_measured(experiment: str, claim: str, why: str) -> Finding:
    """A claim that could not be measured in this run, and why."""
    t = ClaimTest(NOT_RUN, math.nan, math.nan, math.nan, math.nan, 0, "none")
    return Finding(experiment, claim, NOT_RUN, f"Not measured: {why}.", "", t.to_dict())
