"""``normkit.lab.claims``: the pre-registered primary claims, tested over the fixed list only."""

from __future__ import annotations

import pytest

from normkit.lab import claims, stats
from normkit.lab.verdict import compare, compare_equivalence


def _finding(key, effect):
    a = [0.90 + effect + 0.01 * ((i * 7) % 5) for i in range(12)]
    b = [0.90 + 0.01 * ((i * 3) % 5) for i in range(12)]
    return compare("mlp", "x", "acc", "A", a, "B", b, key=key).to_dict()


def test_every_primary_claim_is_tied_to_a_source_and_listed_once():
    keys = [p.key for p in claims.PRIMARY]
    assert len(keys) == len(set(keys)) and 5 <= len(keys) <= 12
    for p in claims.PRIMARY:
        assert p.source and p.experiment == p.key.split(".")[0] and p.kind in ("superiority", "equivalence")
        assert (p.margin > 0) == (p.kind == "equivalence")


def test_the_family_is_the_fixed_list_whatever_ran():
    m = len(claims.PRIMARY)
    only = claims.evaluate([_finding("mlp.speed", 0.05)])
    assert [c["key"] for c in only] == [p.key for p in claims.PRIMARY]
    speed = next(c for c in only if c["key"] == "mlp.speed")
    with_others = next(c for c in claims.evaluate([_finding("mlp.speed", 0.05), _finding("mlp.batch1", 0.2)]) if c["key"] == "mlp.speed")
    assert speed == with_others  # the same data, the same verdict, whatever else ran
    t = stats.test_claim(*[_finding("mlp.speed", 0.05)["data"][k] for k in ("a", "b")], alpha=0.05 / m)
    assert speed["verdict"] == t.verdict and speed["ci_low"] == t.ci_low and speed["p_adjusted"] == pytest.approx(min(1, m * t.p))
    assert speed["mde"] > 0 and speed["family_size"] == m
    assert all(c["verdict"].startswith("not measured") for c in only if c["key"] != "mlp.speed")


def test_exploratory_findings_get_no_verdict():
    est = claims.exploratory([_finding("", 0.05), _finding("mlp.speed", 0.05)])
    assert len(est) == 1 and "verdict" not in est[0] and est[0]["ci_low"] < est[0]["diff"] < est[0]["ci_high"]


def test_equivalence_primary_uses_tost_and_reports_the_margin_it_could_establish():
    a = [0.90 + 0.002 * (i % 3) for i in range(12)]
    b = [0.90 + 0.002 * ((i + 1) % 3) for i in range(12)]
    f = compare_equivalence("sensitivity", "x", "acc", "RMSNorm", a, "LayerNorm", b, margin=0.02, key="sensitivity.rms").to_dict()
    c = next(c for c in claims.evaluate([f]) if c["key"] == "sensitivity.rms")
    assert c["verdict"] == stats.SUPPORTS and c["method"].startswith("TOST") and 0 < c["mde"] < 0.02
