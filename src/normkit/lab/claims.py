r"""The lab's pre-registered primary claims: a fixed list, one or two per experiment, each tied to
a sentence of the paper (Ba, Kiros & Hinton 2016) or of the work it names, and tested with a
correction for multiple testing over *this list only*, whatever the command line runs.

Why Bonferroni at the list's size and not Holm's step-down: Holm needs every p-value of the
family, and a run of a subset of the experiments does not have them; its verdicts would then
depend on what else ran. Testing each primary claim at :math:`\alpha/m`, with :math:`m` the size
of :data:`PRIMARY` (Holm's first and strictest step), gives a claim the same verdict from the
same data whatever subset ran, and keeps the family-wise error at most :math:`\alpha`. Its
interval is the :math:`1-\alpha/m` interval (two-sided; :math:`1-2\alpha/m` for the two
one-sided tests of an equivalence claim), so interval and verdict agree.

Each claim also reports its *minimum detectable effect*: the true difference the test at
:math:`\alpha/m` finds with 80 % power given the seeds run and the observed spread of the
per-seed differences (:func:`~normkit.lab.stats.mde_paired`); for an equivalence claim, the
smallest margin it would establish with 80 % power were the arms truly equal
(:func:`~normkit.lab.stats.mde_equivalence`). "Inconclusive" then says how large an effect
could still hide.

Everything else an experiment measures is an *exploratory estimate*: a difference with its
unadjusted 95 % interval and no verdict word.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, List, Optional

from normkit.lab.stats import (
    INCONCLUSIVE,
    NOT_RUN,
    bonferroni,
    mde_equivalence,
    mde_paired,
    test_claim,
    test_equivalence,
)

__all__ = ["Primary", "PRIMARY", "ALPHA", "POWER", "evaluate", "exploratory"]

ALPHA = 0.05  # family-wise, over PRIMARY
POWER = 0.8  # for the minimum detectable effect


@dataclass(frozen=True)
class Primary:
    """One pre-registered claim: the experiment that measures it, the sentence it tests, and
    whether it is a superiority claim ("a beats b") or an equivalence claim ("on par within
    ``margin``")."""

    key: str
    experiment: str
    claim: str
    source: str
    kind: str = "superiority"
    margin: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


PRIMARY = (
    Primary("mlp.speed", "mlp",
            "Layer norm speeds up training of a deep ReLU MLP (batch 32; test accuracy averaged over the training curve; every arm He-initialized, at its tuned rate)",
            "Ba et al. 2016, abstract: \"layer normalization can substantially reduce the training time compared with previously published techniques\""),
    Primary("mlp.batch1", "mlp",
            "Layer norm trains a deep ReLU MLP at batch size 1 better than no norm (final test accuracy)",
            "Ba et al. 2016, §3: layer normalization \"can be used in the pure online regime with batch size 1\""),
    Primary("lstm.early", "lstm",
            "A layer-normalized LSTM language model has a lower validation loss than a plain LSTM early in training (after the preset's steps)",
            "Ba et al. 2016, abstract: \"Layer normalization is very effective at stabilizing the hidden state dynamics in recurrent networks\"; §6: faster convergence"),
    Primary("sequential.lstm", "sequential",
            "Layer norm raises an LSTM's test accuracy on 64-step pixel-by-pixel digits early in training (after the preset's steps)",
            "Ba et al. 2016, §6.2-6.5: layer-normalized LSTMs converge faster on long sequences"),
    Primary("online.affine", "online",
            "At batch size 1, layer norm loses less accuracy than no norm to an input shift x → 3x + 2 (each against its own no-shift control)",
            "Ba et al. 2016, §5.1: layer norm is \"invariant to re-scaling of individual training cases\"; §3: usable \"in the pure online regime\""),
    Primary("sensitivity.rms", "sensitivity",
            "RMSNorm is on par with LayerNorm (final test accuracy within ±0.02, both at their defaults)",
            "Zhang & Sennrich 2019, abstract: \"RMSNorm achieves comparable performance against LayerNorm\"",
            kind="equivalence", margin=0.02),
    Primary("convnet.bn", "convnet",
            "Batch norm beats the paper's layer norm (over C, H, W) in a small ConvNet at batch 64 (final test accuracy after the preset's steps)",
            "Ba et al. 2016, §6.7: \"batch normalization outperforms the other methods\" in ConvNets"),
    Primary("transformer.preln", "transformer",
            "Pre-LN without warm-up is on par with post-LN with warm-up (validation loss within ±0.05 nats/char, each at its tuned rate)",
            "Xiong et al. 2020, abstract: \"Pre-LN Transformers without the warm-up stage can reach comparable results with baselines\"",
            kind="equivalence", margin=0.05),
)


def _by_key() -> Dict[str, Primary]:
    return {p.key: p for p in PRIMARY}


def _sd(d: List[float]) -> float:
    n = len(d)
    if n < 2:
        return math.nan
    mean = sum(d) / n
    return math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))


def _finite(v) -> bool:
    return v is not None and math.isfinite(float(v))


def _entry(p: Primary, f: Optional[Dict], m: int, alpha: float) -> Dict:
    out = {"key": p.key, "experiment": p.experiment, "claim": p.claim, "source": p.source, "kind": p.kind, "margin": p.margin,
           "family_size": m, "alpha": alpha, "alpha_claim": alpha / m}
    if f is None:
        return {**out, "verdict": f"{NOT_RUN} (experiment not run)", "diff": None, "ci_low": None, "ci_high": None, "p": None,
                "p_adjusted": None, "n": 0, "mde": None, "measured": "", "sentence": "", "method": "none"}
    data = f["data"]
    a, b = data["a"], data["b"]
    pairs = [(float(x), float(y)) for x, y in zip(a, b) if _finite(x) and _finite(y)]
    sign = 1.0 if data.get("higher_is_better", True) else -1.0
    d = [sign * (x - y) for x, y in pairs] if p.kind == "superiority" else [x - y for x, y in pairs]
    level = alpha / m
    if p.kind == "equivalence":
        t = test_equivalence(a, b, margin=p.margin, alpha=level)
        mde = mde_equivalence(_sd(d), len(d), level, POWER)
    else:
        t = test_claim(a, b, higher_is_better=data.get("higher_is_better", True), alpha=level)
        mde = mde_paired(_sd(d), len(d), level, POWER)
    return {**out, "verdict": t.verdict, "diff": t.diff, "ci_low": t.ci_low, "ci_high": t.ci_high, "p": t.p,
            "p_adjusted": bonferroni(t.p, m), "n": t.n, "mde": mde, "failed_a": t.failed_a, "failed_b": t.failed_b,
            "measured": f.get("numbers", ""), "metric": f.get("metric", ""), "sentence": f["sentence"], "method": t.method}


def evaluate(findings: Iterable[Dict], alpha: float = ALPHA) -> List[Dict]:
    """One entry per claim of :data:`PRIMARY`, in its order, from the run's findings (dicts of
    :class:`~normkit.lab.verdict.Finding`): the verdict at ``alpha / len(PRIMARY)``, the
    difference with its interval at that level, the raw and the adjusted p, the minimum
    detectable effect. A claim whose experiment did not run is *not measured*, and still counts
    in the family's size."""
    found = {f["key"]: f for f in findings if f.get("key") in _by_key()}
    return [_entry(p, found.get(p.key), len(PRIMARY), alpha) for p in PRIMARY]


def exploratory(findings: Iterable[Dict]) -> List[Dict]:
    """Every finding that is not a primary claim, as an estimate: the difference (> 0 favours the
    statement) with its unadjusted 95 % interval, n and the measurements; no verdict word."""
    out = []
    for f in findings:
        if f.get("key") in _by_key():
            continue
        t = f["test"]
        data = f.get("data") or {}
        if data.get("kind") == "equivalence":  # TOST's interval is 1 - 2 alpha: the estimate gets the usual 95 % one
            t = test_claim(data["a"], data["b"]).to_dict()
        out.append({"experiment": f["experiment"], "statement": f["claim"], "diff": t.get("diff"), "ci_low": t.get("ci_low"),
                    "ci_high": t.get("ci_high"), "p": t.get("p"), "n": t.get("n"), "method": t.get("method"),
                    "extra": t.get("extra", {}), "measured": f.get("numbers", ""), "metric": f.get("metric", ""),
                    "sentence": f["sentence"], "failed_a": t.get("failed_a"), "failed_b": t.get("failed_b")})
    return out


def is_decided(verdict: str) -> bool:
    return not (verdict.startswith(INCONCLUSIVE) or verdict.startswith(NOT_RUN))
