r"""The lab's statistics: every verdict in a report is a test computed here.

A claim compares an arm :math:`a` (the one the claim favours) with an arm :math:`b` over seeds
:math:`i = 1..n`. Values are oriented so that a positive difference favours the claim
(:math:`d_i = a_i - b_i` if higher is better, :math:`b_i - a_i` if lower is).

**Paired t interval** (the default, :func:`test_claim`). In the lab, seed :math:`i` fixes both
arms' data order (and, where the models match, their initialization), so the arms share the
seed-to-seed noise and their differences :math:`d_i` vary far less than either arm. With
:math:`\bar d` the mean and :math:`s_d` the sample std of the differences,

.. math::
    \bar d \pm t_{1-\alpha/2,\,n-1}\, s_d/\sqrt n, \qquad
    p = 2\,P\big(T_{n-1} > |\bar d| \sqrt n / s_d\big).

Why t and not a bootstrap: at the lab's 5 seeds a percentile bootstrap's interval is too
narrow (it resamples 5 values, so it cannot see tails it has not drawn; its coverage is well
below nominal at such n), while the t interval is exact for normal differences and robust to
moderate skew at equal n. Without pairing (``paired=False``) the interval is Welch's, with the
Welch–Satterthwaite degrees of freedom.

**Verdict**: *supports* when the interval lies above 0, *does not support* when it lies below 0,
otherwise *inconclusive*. Under no effect each of the first two happens with probability
:math:`\alpha/2` (so "supports" at most :math:`\alpha` of the time at any :math:`n \ge 2`;
``tests/test_lab_stats.py`` checks this by simulation at n = 3, 5, 10).

**Failures** (runs whose metric is not finite: a diverged loss, an arm that raised) are never
dropped silently: :func:`test_claim` counts them per arm, pairs with a failure leave the
interval, and :func:`test_failures` compares the counts with Fisher's exact test.

**Non-inferiority** ("a is no slower than b", :func:`test_noninferiority`): with a stated relative
margin :math:`m`, on the log ratios :math:`r_i = \log(a_i / b_i)`, the claim is supported when the
upper bound of the :math:`1-\alpha` interval of :math:`\bar r` is below :math:`\log(1+m)`.

**Multiple claims**: :func:`holm` adjusts the p-values of one run's claims (Holm's step-down,
family-wise error at most :math:`\alpha`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence

__all__ = [
    "ClaimTest", "SUPPORTS", "REFUTES", "INCONCLUSIVE", "NOT_RUN",
    "test_claim", "test_failures", "test_noninferiority", "holm", "holm_verdict",
]

SUPPORTS = "supports"
REFUTES = "does not support"
INCONCLUSIVE = "inconclusive"  # followed by the reason in parentheses
NOT_RUN = "not measured"


def _t_ppf(q: float, df: float) -> float:
    from scipy.stats import t

    return float(t.ppf(q, df))


def _t_sf(x: float, df: float) -> float:
    from scipy.stats import t

    return float(t.sf(x, df))


@dataclass(frozen=True)
class ClaimTest:
    """The outcome of one test: verdict, the oriented difference (> 0 favours the claim), its
    two-sided ``1 - alpha`` interval, the p-value, the sample size and how it was computed."""

    verdict: str
    diff: float
    ci_low: float
    ci_high: float
    p: float
    n: int
    method: str
    alpha: float = 0.05
    failed_a: int = 0  # runs of arm a with a non-finite value
    failed_b: int = 0
    extra: Dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def interval(self, digits: int = 3) -> str:
        """``+0.084 (95 % CI +0.070 to +0.098, p = 0.0003)``."""
        if not math.isfinite(self.diff):
            return "n/a"
        level = round(100 * (1 - self.alpha))
        return f"{self.diff:+.{digits}f} ({level} % CI {self.ci_low:+.{digits}f} to {self.ci_high:+.{digits}f}, {fmt_p(self.p)})"


def fmt_p(p: float) -> str:
    if not math.isfinite(p):
        return "p n/a"
    return "p < 0.0001" if p < 1e-4 else f"p = {p:.4f}" if p < 0.01 else f"p = {p:.3f}"


def _finite(v) -> bool:
    return v is not None and math.isfinite(float(v))


def _decide(ci_low: float, ci_high: float, why: str = "the interval contains 0") -> str:
    if ci_low > 0:
        return SUPPORTS
    if ci_high < 0:
        return REFUTES
    return f"{INCONCLUSIVE} ({why})"


def _t_interval(d: Sequence[float], alpha: float):
    """Mean, CI and two-sided p of a one-sample t test of ``mean(d) = 0``."""
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    if sd == 0.0:  # every difference equal: no spread to test against
        p = 1.0 if mean == 0.0 else 0.0
        return mean, mean, mean, p
    se = sd / math.sqrt(n)
    half = _t_ppf(1 - alpha / 2, n - 1) * se
    return mean, mean - half, mean + half, min(1.0, 2 * _t_sf(abs(mean) / se, n - 1))


def _welch_interval(a: Sequence[float], b: Sequence[float], alpha: float):
    na, nb = len(a), len(b)
    ma, mb = sum(a) / na, sum(b) / nb
    va = sum((x - ma) ** 2 for x in a) / (na - 1)
    vb = sum((x - mb) ** 2 for x in b) / (nb - 1)
    mean, se2 = ma - mb, va / na + vb / nb
    if se2 == 0.0:
        return mean, mean, mean, (1.0 if mean == 0.0 else 0.0)
    df = se2 ** 2 / ((va / na) ** 2 / (na - 1) + (vb / nb) ** 2 / (nb - 1))
    se = math.sqrt(se2)
    half = _t_ppf(1 - alpha / 2, df) * se
    return mean, mean - half, mean + half, min(1.0, 2 * _t_sf(abs(mean) / se, df))


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


def test_claim(a: Sequence[Optional[float]], b: Sequence[Optional[float]], *, higher_is_better: bool = True,
               paired: bool = True, alpha: float = 0.05) -> ClaimTest:
    """Test the claim "arm ``a`` beats arm ``b``" on per-seed values (see the module docstring).

    ``paired=True`` needs ``a[i]`` and ``b[i]`` from the same seed (equal lengths). ``None`` or
    non-finite values are failed runs: counted in ``failed_a``/``failed_b``; the pair (paired)
    or the value (unpaired) leaves the interval. Fewer than 2 usable values per arm (pairs)
    give an inconclusive verdict with ``nan`` statistics; an arm with no values at all gives
    :data:`NOT_RUN`.
    """
    _check_alpha(alpha)
    a, b = list(a), list(b)
    if not a or not b:
        return ClaimTest(NOT_RUN, math.nan, math.nan, math.nan, math.nan, 0, "none", alpha)
    fa, fb = sum(not _finite(v) for v in a), sum(not _finite(v) for v in b)
    sign = 1.0 if higher_is_better else -1.0
    if paired:
        if len(a) != len(b):
            raise ValueError(f"paired test needs equally many values per arm, got {len(a)} and {len(b)}")
        d = [sign * (float(x) - float(y)) for x, y in zip(a, b) if _finite(x) and _finite(y)]
        n, method = len(d), "paired t"
        if n >= 2:
            mean, lo, hi, p = _t_interval(d, alpha)
    else:
        xa = [sign * float(x) for x in a if _finite(x)]
        xb = [sign * float(y) for y in b if _finite(y)]
        n, method = min(len(xa), len(xb)), "Welch t"
        if n >= 2:
            mean, lo, hi, p = _welch_interval(xa, xb, alpha)
    if n < 2:
        why = f"{n} complete {'pair' if paired else 'value'}{'' if n == 1 else 's'}; an interval needs 2"
        return ClaimTest(f"{INCONCLUSIVE} ({why})", math.nan, math.nan, math.nan, math.nan, n, method, alpha, fa, fb)
    return ClaimTest(_decide(lo, hi), mean, lo, hi, p, n, method, alpha, fa, fb)


def _wilson(k: int, n: int, z: float):
    if n == 0:
        return 0.0, 1.0
    phat = k / n
    centre = (phat + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def test_failures(failed_a: int, n_a: int, failed_b: int, n_b: int, *, alpha: float = 0.05) -> ClaimTest:
    r"""Test the claim "arm ``a`` fails less often than arm ``b``" on failure counts.

    ``diff`` is the difference of failure rates :math:`k_b/n_b - k_a/n_a` (> 0 favours the claim),
    its interval Newcombe's hybrid score interval (from the two Wilson intervals; good coverage
    at small n, unlike the Wald interval); ``p`` is Fisher's exact two-sided test, which alone
    decides the verdict (supports when ``p < alpha`` and ``diff > 0``).
    """
    _check_alpha(alpha)
    for name, k, n in (("a", failed_a, n_a), ("b", failed_b, n_b)):
        if not (isinstance(k, int) and isinstance(n, int) and 0 <= k <= n):
            raise ValueError(f"failure count of arm {name} must be an int in [0, n={n}], got {k!r}")
    if n_a == 0 or n_b == 0:
        return ClaimTest(NOT_RUN, math.nan, math.nan, math.nan, math.nan, 0, "Fisher exact", alpha, failed_a, failed_b)
    from scipy.stats import fisher_exact

    p = float(fisher_exact([[failed_a, n_a - failed_a], [failed_b, n_b - failed_b]])[1])
    z = math.sqrt(2) * _erfinv(1 - alpha)  # the normal quantile 1 - alpha/2
    pa, pb = failed_a / n_a, failed_b / n_b
    la, ua = _wilson(failed_a, n_a, z)
    lb, ub = _wilson(failed_b, n_b, z)
    diff = pb - pa
    lo = diff - math.sqrt((pb - lb) ** 2 + (ua - pa) ** 2)
    hi = diff + math.sqrt((ub - pb) ** 2 + (pa - la) ** 2)
    if p < alpha and diff != 0:
        verdict = SUPPORTS if diff > 0 else REFUTES
    else:
        verdict = f"{INCONCLUSIVE} ({'equal failure counts' if diff == 0 else 'Fisher p ≥ ' + format(alpha, 'g')})"
    return ClaimTest(verdict, diff, lo, hi, min(1.0, p), min(n_a, n_b), "Fisher exact", alpha, failed_a, failed_b,
                     {"rate_a": pa, "rate_b": pb})


def _erfinv(y: float) -> float:
    from scipy.special import erfinv

    return float(erfinv(y))


def test_noninferiority(a: Sequence[Optional[float]], b: Sequence[Optional[float]], *, margin: float,
                        lower_is_better: bool = True, alpha: float = 0.05) -> ClaimTest:
    r"""Test the claim "``a`` is no worse than ``b`` by more than ``margin``" (relative; e.g. 0.05:
    at most 5 % slower), paired by seed, on positive values such as times.

    On :math:`d_i = \log(1+m) - \log(a_i/b_i)` (lower is better; the ratio inverted otherwise),
    a paired t interval: *supports* when it lies above 0 (the ratio's upper bound is below
    :math:`1+m`), *does not support* when below 0 (``a`` is worse by more than the margin),
    else inconclusive. ``extra`` holds the geometric-mean ratio ``a/b`` and its interval.
    """
    if not margin >= 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    bad = [v for v in list(a) + list(b) if _finite(v) and float(v) <= 0]
    if bad:
        raise ValueError(f"non-inferiority on log ratios needs positive values, got {bad[0]}")
    sign = 1.0 if lower_is_better else -1.0
    log_m = math.log1p(margin)
    # log(1+m) - sign*log(a/b) = (log(1+m) + sign*log b) - sign*log a: a paired test of "a' beats b'"
    la = [sign * math.log(float(x)) if _finite(x) else None for x in a]
    lb = [log_m + sign * math.log(float(y)) if _finite(y) else None for y in b]
    t = test_claim(la, lb, higher_is_better=False, paired=True, alpha=alpha)
    extra = {"margin": margin}
    if math.isfinite(t.diff):
        # diff = log(1+m) - sign * mean log ratio
        extra.update(ratio=math.exp(sign * (log_m - t.diff)), ratio_ci_low=math.exp(sign * (log_m - t.ci_high)),
                     ratio_ci_high=math.exp(sign * (log_m - t.ci_low)))
        if sign < 0:
            extra["ratio_ci_low"], extra["ratio_ci_high"] = extra["ratio_ci_high"], extra["ratio_ci_low"]
    verdict = t.verdict
    if verdict.startswith(INCONCLUSIVE) and math.isfinite(t.diff):
        verdict = f"{INCONCLUSIVE} (the interval of the ratio contains the margin {1 + margin:g})"
    return ClaimTest(verdict, t.diff, t.ci_low, t.ci_high, t.p, t.n, f"paired t on log ratios, margin {margin:g}", alpha,
                     t.failed_a, t.failed_b, extra)


def holm(ps: Iterable[float]) -> List[float]:
    r"""Holm's step-down adjusted p-values, in the input order (``nan`` stays ``nan`` and does not
    count towards the number of tests): with :math:`p_{(1)} \le \dots \le p_{(m)}`,
    :math:`\tilde p_{(j)} = \max_{k \le j} \min(1, (m-k+1)\, p_{(k)})`."""
    ps = list(ps)
    order = sorted((i for i, p in enumerate(ps) if p is not None and math.isfinite(p)), key=lambda i: ps[i])
    m, out, running = len(order), [math.nan] * len(ps), 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (m - k) * ps[i]))
        out[i] = running
    return out


def holm_verdict(verdict: str, p_holm: float, alpha: float = 0.05) -> str:
    """The verdict that survives Holm's correction: a directional verdict whose adjusted p is
    not below ``alpha`` becomes inconclusive."""
    if verdict in (SUPPORTS, REFUTES) and not (p_holm < alpha):
        return f"{INCONCLUSIVE} (after Holm)"
    return verdict


def mde_paired(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    r"""The smallest true mean difference a two-sided paired t test at level ``alpha`` on ``n``
    differences of standard deviation ``sd`` detects with probability ``power`` (the minimum
    detectable effect). Exact under normal differences: the test statistic is noncentral t with
    :math:`n-1` degrees of freedom and noncentrality :math:`\delta\sqrt n/\sigma`; solved for
    :math:`\delta` with scipy's ``nct``."""
    if n < 2 or not (sd is not None and math.isfinite(sd)):
        return math.nan
    if sd == 0.0:
        return 0.0
    from scipy.optimize import brentq
    from scipy.stats import nct, t

    df, crit = n - 1, float(t.ppf(1 - alpha / 2, n - 1))

    def gap(effect: float) -> float:
        nc = effect * math.sqrt(n)
        return float(nct.sf(crit, df, nc) + nct.cdf(-crit, df, nc)) - power

    hi = 1.0
    while True:  # bracket the root; at n = 2 and a small alpha the effect can be enormous
        g = gap(hi)
        if not math.isfinite(g) or hi > 1e6:
            return math.inf
        if g >= 0:
            break
        hi *= 2
    return brentq(gap, 1e-9, hi) * sd


def mde_equivalence(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    r"""The smallest margin that two one-sided tests at level ``alpha`` each establish with
    probability ``power`` when the true difference is 0: :math:`(t_{1-\alpha} + t_{(1+p)/2})\,
    s/\sqrt n` (the usual t approximation of TOST's power)."""
    if n < 2 or not (sd is not None and math.isfinite(sd)):
        return math.nan
    return (_t_ppf(1 - alpha, n - 1) + _t_ppf((1 + power) / 2, n - 1)) * sd / math.sqrt(n)


def test_equivalence(a: Sequence[Optional[float]], b: Sequence[Optional[float]], *, margin: float,
                     alpha: float = 0.05) -> ClaimTest:
    r"""Two one-sided tests (TOST) of "``a`` and ``b`` are on par": the paired mean difference
    :math:`\bar d = \overline{a - b}` lies within :math:`(-m, m)`.

    ``p`` is the larger of the two one-sided p-values; the interval is the :math:`1 - 2\alpha`
    paired t interval (TOST at level ``alpha`` supports exactly when it lies inside the margins).
    *supports* when it does, *does not support* when it lies wholly outside them (the arms differ
    by more than the margin), otherwise inconclusive. ``extra`` holds the margin and the
    difference's sample std ``sd`` (for :func:`mde_equivalence`).
    """
    _check_alpha(alpha)
    if not margin > 0:
        raise ValueError(f"margin must be > 0, got {margin}")
    a, b = list(a), list(b)
    if not a or not b:
        return ClaimTest(NOT_RUN, math.nan, math.nan, math.nan, math.nan, 0, "TOST", alpha)
    if len(a) != len(b):
        raise ValueError(f"paired test needs equally many values per arm, got {len(a)} and {len(b)}")
    fa, fb = sum(not _finite(v) for v in a), sum(not _finite(v) for v in b)
    d = [float(x) - float(y) for x, y in zip(a, b) if _finite(x) and _finite(y)]
    n, method = len(d), f"TOST, paired t, margin ±{margin:g}"
    if n < 2:
        return ClaimTest(f"{INCONCLUSIVE} ({n} complete pairs; an interval needs 2)", math.nan, math.nan, math.nan, math.nan, n,
                         method, alpha, fa, fb)
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    se = sd / math.sqrt(n)
    if se == 0.0:
        inside = abs(mean) < margin
        p, lo, hi = (0.0 if inside else 1.0), mean, mean
    else:
        p = max(_t_sf((mean + margin) / se, n - 1), _t_sf((margin - mean) / se, n - 1))
        half = _t_ppf(1 - alpha, n - 1) * se
        lo, hi = mean - half, mean + half
    if -margin < lo and hi < margin:
        verdict = SUPPORTS
    elif lo >= margin or hi <= -margin:
        verdict = REFUTES
    else:
        verdict = f"{INCONCLUSIVE} (the interval crosses a margin ±{margin:g})"
    return ClaimTest(verdict, mean, lo, hi, min(1.0, p), n, method, alpha, fa, fb, {"margin": margin, "sd": sd})


def bonferroni(p: Optional[float], m: int) -> float:
    """``min(1, m p)``: the adjusted p-value of one claim of a fixed family of ``m``."""
    return math.nan if p is None or not math.isfinite(p) else min(1.0, m * p)
