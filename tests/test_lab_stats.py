"""``normkit.lab.stats``: the verdicts are tests, calibrated under no effect and able to see a
real one. The simulations draw fresh normal data from a seeded numpy generator (deterministic,
so no flaky reruns; the bounds are binomial margins around the nominal rates)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from normkit.lab import stats
from normkit.lab.stats import INCONCLUSIVE, NOT_RUN, REFUTES, SUPPORTS, holm, holm_verdict

# imported under other names: pytest would collect ``test_*`` functions as tests
claim, failures, noninferiority = stats.test_claim, stats.test_failures, stats.test_noninferiority

ALPHA = 0.05
TRIALS = 2000


def _margin(rate: float, trials: int = TRIALS) -> float:
    """Four binomial standard errors: a correct test passes with probability > 0.9999."""
    return 4 * math.sqrt(rate * (1 - rate) / trials)


def _rates(rng, n, paired, effect=0.0, higher=True):
    supports = refutes = 0
    for _ in range(TRIALS):
        shared = rng.normal(0, 3, n) if paired else 0.0  # seed-to-seed noise both arms share
        a = shared + rng.normal(effect, 1, n)
        b = shared + rng.normal(0, 1, n)
        if not higher:
            a, b = -a, -b
        v = claim(a.tolist(), b.tolist(), paired=paired, higher_is_better=higher, alpha=ALPHA).verdict
        supports += v == SUPPORTS
        refutes += v == REFUTES
    return supports / TRIALS, refutes / TRIALS


@pytest.mark.parametrize("paired", [True, False])
@pytest.mark.parametrize("n", [3, 5, 10])
def test_calibrated_under_no_effect(n, paired):
    rng = np.random.default_rng(1000 * n + paired)
    supports, refutes = _rates(rng, n, paired)
    # "supports" at most alpha of the time (nominal alpha/2 for a two-sided interval) ...
    assert supports <= ALPHA / 2 + _margin(ALPHA / 2), (n, paired, supports)
    # ... and the interval has its nominal size: a z interval instead of t (at n=3: ~19 %
    # rejections), or one that ignored the pairing, would fail here
    assert abs(supports + refutes - ALPHA) <= _margin(ALPHA) + (0.01 if not paired else 0.0), (n, paired, supports + refutes)


def test_lower_is_better_orientation_is_calibrated():
    supports, refutes = _rates(np.random.default_rng(7), 5, True, higher=False)
    assert supports <= ALPHA / 2 + _margin(ALPHA / 2) and refutes <= ALPHA / 2 + _margin(ALPHA / 2)


@pytest.mark.parametrize("higher", [True, False])
def test_detects_a_large_effect(higher):
    """Power: an effect of 3 per-arm sigmas (2.1 sigmas of the difference) at 5 paired seeds is
    found in most trials (the paired t test's power there is about 0.9)."""
    supports, refutes = _rates(np.random.default_rng(3), 5, True, effect=3.0, higher=higher)
    assert supports >= 0.75 and refutes == 0.0


def test_pairing_is_what_finds_a_small_effect_under_large_seed_noise():
    rng = np.random.default_rng(11)
    shared = rng.normal(0, 5, 5)
    a, b = (shared + 1.0 + rng.normal(0, 0.1, 5)).tolist(), (shared + rng.normal(0, 0.1, 5)).tolist()
    paired, unpaired = claim(a, b), claim(a, b, paired=False)
    assert paired.verdict == SUPPORTS and paired.ci_low > 0.5 and paired.method == "paired t"
    assert unpaired.verdict.startswith(INCONCLUSIVE) and unpaired.method == "Welch t"


def test_interval_and_p_value_match_the_t_formula():
    from scipy import stats

    a, b = [0.91, 0.93, 0.95, 0.90, 0.94], [0.85, 0.88, 0.86, 0.87, 0.90]
    t = claim(a, b)
    ref = stats.ttest_rel(a, b)
    d = np.subtract(a, b)
    half = stats.t.ppf(0.975, 4) * d.std(ddof=1) / math.sqrt(5)
    assert t.diff == pytest.approx(d.mean()) and t.p == pytest.approx(ref.pvalue)
    assert (t.ci_low, t.ci_high) == pytest.approx((d.mean() - half, d.mean() + half))
    assert t.n == 5 and t.verdict == SUPPORTS
    lower = claim(b, a, higher_is_better=False)  # the same claim said the other way round
    assert lower.diff == pytest.approx(t.diff) and lower.verdict == SUPPORTS
    welch = claim(a, b, paired=False)
    assert welch.p == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue)


def test_reversed_effect_does_not_support():
    t = claim([1.0, 1.1, 1.2, 1.05, 1.15], [2.0, 2.2, 2.1, 2.05, 2.12])
    assert t.verdict == REFUTES and t.ci_high < 0


def test_failed_runs_are_counted_not_dropped_silently():
    t = claim([0.9, math.nan, 0.92, None, 0.93], [0.8, 0.81, math.inf, 0.79, 0.82])
    assert (t.failed_a, t.failed_b, t.n) == (2, 1, 2)
    one = claim([0.9, math.nan, math.nan], [0.8, 0.8, 0.7])
    assert one.verdict.startswith(INCONCLUSIVE) and "1 complete pair" in one.verdict and math.isnan(one.p)
    assert claim([], [0.1, 0.2]).verdict == NOT_RUN
    with pytest.raises(ValueError, match="equally many values per arm, got 2 and 3"):
        claim([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"alpha must be in \(0, 1\), got 1.5"):
        claim([1.0, 2.0], [1.0, 2.0], alpha=1.5)


def test_fisher_failure_counts():
    from scipy.stats import fisher_exact

    f = failures(0, 5, 5, 5)
    assert f.verdict == SUPPORTS and f.p == pytest.approx(fisher_exact([[0, 5], [5, 0]])[1]) and f.diff == 1.0
    assert f.method == "Fisher exact" and 0 < f.ci_low < 1.0 <= f.ci_high + 1e-12
    assert failures(5, 5, 0, 5).verdict == REFUTES
    weak = failures(1, 5, 3, 5)  # 1/5 vs 3/5 is not significant at 5 seeds
    assert weak.verdict.startswith(INCONCLUSIVE) and weak.p > ALPHA and weak.ci_low < 0 < weak.ci_high
    assert failures(0, 5, 0, 5).verdict == f"{INCONCLUSIVE} (equal failure counts)"
    with pytest.raises(ValueError, match=r"failure count of arm b must be an int in \[0, n=5\], got 6"):
        failures(0, 5, 6, 5)


def test_fisher_is_calibrated_under_equal_failure_rates():
    rng = np.random.default_rng(5)
    hits = sum(failures(int(rng.binomial(10, 0.4)), 10, int(rng.binomial(10, 0.4)), 10).verdict == SUPPORTS for _ in range(TRIALS))
    assert hits / TRIALS <= ALPHA / 2 + _margin(ALPHA / 2)


def test_noninferiority_margin():
    base = [10.0, 11.0, 9.5, 10.2, 10.8]
    same = noninferiority([x * 1.01 for x in base], base, margin=0.05)
    assert same.verdict == SUPPORTS and same.extra["ratio"] == pytest.approx(1.01) and same.extra["ratio_ci_high"] == pytest.approx(1.01)
    noisy = [x * r for x, r in zip(base, (1.03, 1.05, 1.04, 1.06, 1.02))]
    t = noninferiority(noisy, base, margin=0.05)
    assert t.extra["ratio_ci_low"] < 1.05 < t.extra["ratio_ci_high"] and t.verdict.startswith(INCONCLUSIVE) and "1.05" in t.verdict
    slow = noninferiority([x * r for x, r in zip(base, (1.10, 1.12, 1.11, 1.13, 1.09))], base, margin=0.05)
    assert slow.verdict == REFUTES and slow.extra["ratio_ci_low"] > 1.05
    higher = noninferiority([x * 0.99 for x in base], base, margin=0.05, lower_is_better=False)  # e.g. throughput
    assert higher.verdict == SUPPORTS and higher.extra["ratio"] == pytest.approx(0.99)
    with pytest.raises(ValueError, match="needs positive values, got -1.0"):
        noninferiority([-1.0, 1.0], [1.0, 1.0], margin=0.05)


def test_noninferiority_is_calibrated_at_the_margin():
    """When the true slowdown is exactly the margin, "no slower" is supported at most alpha/2."""
    rng = np.random.default_rng(9)
    hits = 0
    for _ in range(TRIALS):
        b = np.exp(rng.normal(0, 0.2, 5))
        a = b * 1.05 * np.exp(rng.normal(0, 0.02, 5))
        hits += noninferiority(a.tolist(), b.tolist(), margin=0.05).verdict == SUPPORTS
    assert hits / TRIALS <= ALPHA / 2 + _margin(ALPHA / 2)


def test_holm_step_down():
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    adj = holm([0.2, math.nan, 0.01])
    assert adj[0] == pytest.approx(0.2) and math.isnan(adj[1]) and adj[2] == pytest.approx(0.02)
    assert holm_verdict(SUPPORTS, 0.06) == f"{INCONCLUSIVE} (after Holm)"
    assert holm_verdict(SUPPORTS, 0.01) == SUPPORTS and holm_verdict(f"{INCONCLUSIVE} (x)", 0.01) == f"{INCONCLUSIVE} (x)"


# -- power: the minimum detectable effect, and two one-sided tests ---------------------------
@pytest.mark.parametrize("n, alpha", [(5, 0.05), (12, 0.05 / 8)])
def test_mde_has_the_stated_power(n, alpha):
    """At the MDE a simulated paired t test at ``alpha`` rejects about 80 % of the time."""
    rng = np.random.default_rng(7)
    mde = stats.mde_paired(1.0, n, alpha)
    hits = sum(claim(rng.normal(mde, 1, n).tolist(), [0.0] * n, alpha=alpha).verdict == SUPPORTS for _ in range(TRIALS))
    assert abs(hits / TRIALS - 0.8) < _margin(0.8)
    assert stats.mde_paired(2.0, n, alpha) == pytest.approx(2 * mde)  # scales with the spread
    assert stats.mde_paired(1.0, 2 * n, alpha) < mde  # and falls with seeds
    assert math.isnan(stats.mde_paired(1.0, 1, alpha)) and stats.mde_paired(0.0, n, alpha) == 0.0


def test_equivalence_tost():
    equal = [0.90, 0.91, 0.92, 0.89, 0.90, 0.91]
    near = [0.905, 0.905, 0.915, 0.895, 0.90, 0.91]
    t = stats.test_equivalence(equal, near, margin=0.02)
    assert t.verdict == SUPPORTS and -0.02 < t.ci_low <= t.diff <= t.ci_high < 0.02 and t.p < 0.05
    far = [v - 0.1 for v in equal]
    assert stats.test_equivalence(equal, far, margin=0.02).verdict == REFUTES
    noisy = stats.test_equivalence([0.9, 0.8, 0.95, 0.7], [0.85, 0.9, 0.75, 0.9], margin=0.02)
    assert noisy.verdict.startswith(INCONCLUSIVE) and noisy.p > 0.05
    with pytest.raises(ValueError, match="margin must be > 0"):
        stats.test_equivalence(equal, near, margin=0.0)


def test_equivalence_is_calibrated_at_the_margin():
    """With the true difference on the margin, TOST says "supports" at most alpha of the time."""
    rng = np.random.default_rng(11)
    hits = sum(stats.test_equivalence(rng.normal(0.5, 1, 8).tolist(), [0.0] * 8, margin=0.5).verdict == SUPPORTS for _ in range(TRIALS))
    assert hits / TRIALS < ALPHA + _margin(ALPHA)


def test_equivalence_mde_has_the_stated_power():
    rng = np.random.default_rng(5)
    n = 10
    margin = stats.mde_equivalence(1.0, n, ALPHA)
    hits = sum(stats.test_equivalence(rng.normal(0, 1, n).tolist(), [0.0] * n, margin=margin).verdict == SUPPORTS for _ in range(TRIALS))
    assert hits / TRIALS > 0.8 - _margin(0.8)  # the t approximation is slightly conservative
