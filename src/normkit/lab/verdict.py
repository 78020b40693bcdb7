"""Turning measurements into sentences: every verdict in the report is computed here from numbers.

A claim compares an arm ``a`` (the one the claim favours) with an arm ``b`` on one metric over
seeds. With :math:`\\Delta = \\bar a - \\bar b` oriented so that :math:`\\Delta > 0` favours the
claim, and :math:`s = \\max(s_a, s_b)` the larger sample standard deviation over seeds:

- :math:`\\Delta > s`: **supports**;
- :math:`\\Delta < -s`: **does not support**;
- otherwise **inconclusive (difference within one std)**.

Runs that produced no finite number (divergence, an arm that fails) are left out of the mean
and counted as failed; an arm whose runs all failed loses to one with any finite run. An arm
that was not run at all (skipped) gives **not measured**; two arms that failed every run give
**inconclusive**.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Iterable, Optional

__all__ = ["Stat", "Finding", "SUPPORTS", "REFUTES", "INCONCLUSIVE", "NOT_RUN", "verdict", "compare"]

SUPPORTS = "supports"
REFUTES = "does not support"
INCONCLUSIVE = "inconclusive (difference within one std)"
NOT_RUN = "not measured"


@dataclass(frozen=True)
class Stat:
    """Mean and sample std (ddof=1; 0 for one value) of the finite values, and how many were not."""

    mean: float
    std: float
    n: int
    failed: int = 0

    @classmethod
    def of(cls, values: Iterable[Optional[float]]) -> "Stat":
        vals = [float(v) for v in values if v is not None]
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


def verdict(a: Stat, b: Stat, higher_is_better: bool = True) -> str:
    """The verdict on "``a`` beats ``b``" (see the module docstring for the rule)."""
    if (a.n == 0 and a.failed == 0) or (b.n == 0 and b.failed == 0):
        return NOT_RUN  # an arm that did not run at all (skipped)
    if a.n == 0 and b.n == 0:
        return INCONCLUSIVE  # both failed in every run: nothing tells them apart
    if b.n == 0:
        return SUPPORTS
    if a.n == 0:
        return REFUTES
    delta = (a.mean - b.mean) if higher_is_better else (b.mean - a.mean)
    spread = max(a.std, b.std)
    if delta > spread:
        return SUPPORTS
    if delta < -spread:
        return REFUTES
    return INCONCLUSIVE


@dataclass(frozen=True)
class Finding:
    """One claim, its measurement and the verdict, with the sentence the report prints."""

    experiment: str
    claim: str
    verdict: str
    sentence: str
    numbers: str = ""  # the two measurements, short, for summary tables

    def noted(self, note: str) -> "Finding":
        """The same finding with ``note`` appended to its sentence."""
        return replace(self, sentence=f"{self.sentence} {note}")

    def to_dict(self) -> dict:
        return asdict(self)


def compare(
    experiment: str,
    claim: str,
    metric: str,
    a_label: str,
    a: Stat,
    b_label: str,
    b: Stat,
    *,
    higher_is_better: bool = True,
    digits: int = 3,
    context: str = "",
    better: str = "",
    unit: str = "",
) -> Finding:
    """A :class:`Finding` whose sentence states both measurements and the verdict they give.

    ``better`` names what favours the claim when "better" would mislead (e.g. "slower" for a
    claim that something costs time); by default "higher/lower is better". ``unit`` is a short
    name of the metric for summary tables (e.g. "ms/step").
    """
    v = verdict(a, b, higher_is_better)
    seeds = max(a.n + a.failed, b.n + b.failed)
    direction = f"{'higher' if higher_is_better else 'lower'} is {better or 'better'}"
    text = (
        f"{metric} ({direction}), {seeds} seed{'s' if seeds != 1 else ''}: "
        f"{a_label} {a.fmt(digits)} vs {b_label} {b.fmt(digits)}"
    )
    word = better or "better"
    if v == SUPPORTS and b.n == 0:
        tail = f"{b_label} failed in every run and {a_label} did not, which supports the claim"
    elif v == REFUTES and a.n == 0:
        tail = f"{a_label} failed in every run and {b_label} did not, which does not support the claim"
    elif v == SUPPORTS:
        tail = f"{a_label} is {word} by more than one std, which supports the claim"
    elif v == REFUTES:
        tail = f"{b_label} is {word} by more than one std, which does not support the claim"
    elif v == INCONCLUSIVE and a.n == 0:
        tail = "both arms failed in every run, so the measurement is inconclusive"
    elif v == INCONCLUSIVE:
        tail = "the difference is within one std, so the measurement is inconclusive"
    else:
        tail = "an arm was not run (skipped), so the claim was not measured"
    sentence = f"{context + ' ' if context else ''}{text}; {tail}."
    numbers = f"{a_label} {a.fmt(digits)} vs {b_label} {b.fmt(digits)}" + (f" ({unit})" if unit else "")
    return Finding(experiment, claim, v, sentence[0].upper() + sentence[1:], numbers)
