r"""``normkit bench --suite options``: what each fused option costs, against one pass over memory.

An option of flash-attn's ``layer_norm_fn`` (residual, prenorm, ``x1``, ``rowscale``,
``weight1``/``bias1``, ``residual_in_fp32``, ``out_dtype``, ``out=``) exists to save memory
passes, so its cost is read against the traffic one fused pass must move. For each row, at 1
and 2 threads, the call is timed in interleaved pairs against ``dst.copy_(src)`` of the input
(:mod:`normkit.bench.paired`), the memory limit for a read-once / write-once op:

* ``time / copy``: the median per-pair ratio, with its 95 % interval;
* ``ideal``: the bytes one fused pass moves over the bytes of that copy (read ``x`` and write
  ``y`` is 1; a residual read adds 0.5; a stored sum, a second output or ``x1`` 0.5 each; a
  bfloat16 tensor counts half a float32 one);
* ``/ ideal``: ``time / copy`` over ``ideal``, 1.0 being a kernel at the copy's bandwidth.

Each row runs in two variants: ``alloc``, the call as written (it allocates its outputs: a fresh
output of tens of MiB is page-faulted and zeroed by the OS on its first write, which the copy
into an existing ``dst`` does not pay), and ``buffers``, the same call writing ``y`` (and ``y1``,
and the prenorm sum) into preallocated ``out=`` / ``out1=`` / ``residual_out=`` buffers: the
kernel's own cost, the like-for-like comparison with the copy. (``out1=`` is normkit's: flash-attn's
API has no buffer for ``y1``.)

All calls run without gradients (inference; the forward pass of training costs the same
passes), on float32 ``(rows, width)`` tensors unless the row says bfloat16.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

import normkit
from normkit._machine import torch_threads
from normkit.bench.paired import estimate_ratio, measure_pairs

__all__ = ["ROWS", "VARIANTS", "OptionRow", "run_suite", "markdown"]

#: ``alloc``: outputs allocated by the call; ``buffers``: written into ``out=`` / ``residual_out=``.
VARIANTS = ("alloc", "buffers")


@dataclass(frozen=True)
class OptionRow:
    """One measured call: ``normkit.layer_norm`` on input ``x`` (a key of the tensors) with the
    keyword options ``kwargs`` (values name tensors where they are strings). In the ``buffers``
    variant ``sum_dtype`` sizes the ``residual_out`` buffer (default ``x``'s dtype; only with
    ``prenorm``), and ``out`` (and ``out1``, with ``weight1``) take ``kwargs``' ``out_dtype``.
    ``fn`` replaces the normkit call (the torch row, which has no variant)."""

    name: str
    ideal: float  # bytes of one fused pass / bytes of the copy of x
    x: str = "x"
    kwargs: Dict[str, object] = field(default_factory=dict)
    sum_dtype: Optional[torch.dtype] = None
    fn: Optional[Callable[[Dict[str, torch.Tensor]], Callable[[], object]]] = None

    def make(self, t: Dict[str, torch.Tensor], variant: str) -> Callable[[], object]:
        if self.fn is not None:
            return self.fn(t)
        x = t[self.x]
        kw = {k: (t[v] if isinstance(v, str) else v) for k, v in self.kwargs.items()}
        if variant == "buffers":
            kw["out"] = torch.empty(x.shape, dtype=kw.get("out_dtype") or x.dtype)
            if kw.get("weight1") is not None:
                kw["out1"] = torch.empty_like(kw["out"])
            if kw.get("prenorm"):
                kw["residual_out"] = torch.empty(x.shape, dtype=self.sum_dtype or x.dtype)
        return lambda: normkit.layer_norm(x, x.shape[-1:], t["w"], t["b"], **kw)


ROWS: Sequence[OptionRow] = (
    OptionRow("layer_norm(x)", 1.0),
    OptionRow("+ residual", 1.5, kwargs={"residual": "r"}),
    OptionRow("+ residual, prenorm", 2.0, kwargs={"residual": "r", "prenorm": True}),
    OptionRow("+ weight1/bias1", 1.5, kwargs={"weight1": "w1", "bias1": "b1"}),
    OptionRow("+ residual + x1", 2.0, kwargs={"residual": "r", "x1": "x1"}),
    OptionRow("+ residual + rowscale", 1.5, kwargs={"residual": "r", "rowscale": "rowscale"}),
    # bf16 x and residual (0.25 + 0.25 of a float32 copy), float32 sum stored (0.5), bf16 y (0.25)
    OptionRow("bf16 residual_in_fp32, prenorm", 1.25, x="x16",
              kwargs={"residual": "r16", "residual_in_fp32": True, "prenorm": True}, sum_dtype=torch.float32),
    OptionRow("out_dtype=bfloat16", 0.75, kwargs={"out_dtype": torch.bfloat16}),
    # dropout's counter hash in the loop (read x, write y)
    OptionRow("dropout 0.1", 1.0, kwargs={"dropout_p": 0.1, "training": True}),
    OptionRow("torch F.layer_norm", 1.0,
              fn=lambda t: lambda: torch.nn.functional.layer_norm(t["x"], t["x"].shape[-1:], t["w"], t["b"])),
)


def _tensors(rows: int, width: int, seed: int) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=g)
    return {
        "x": x,
        "src": torch.randn(rows, width, generator=g),
        "dst": torch.empty(rows, width),
        "r": torch.randn(rows, width, generator=g),
        "x1": torch.randn(rows, width, generator=g),
        "rowscale": torch.rand(rows, generator=g) + 0.5,
        "x16": x.bfloat16(),
        "r16": torch.randn(rows, width, generator=g).bfloat16(),
        "w": torch.randn(width, generator=g),
        "b": torch.randn(width, generator=g),
        "w1": torch.randn(width, generator=g),
        "b1": torch.randn(width, generator=g),
    }


def run_suite(rows: int = 4096, width: int = 2048, threads: Sequence[int] = (1, 2), *, budget_s: float = 2.0,
              seed: int = 0, names: Optional[Sequence[str]] = None, variants: Sequence[str] = VARIANTS,
              on_result: Optional[Callable[[dict], None]] = None) -> List[dict]:
    """One result per option row, variant and thread count: ``time_over_copy`` (median per-pair
    ratio and its interval), ``ideal``, ``over_ideal``, and both sides' median milliseconds."""
    t = _tensors(rows, width, seed)
    copy = lambda: t["dst"].copy_(t["src"])  # noqa: E731
    results = []
    with torch.no_grad():
        for n in threads:
            with torch_threads(n):
                for row in ROWS:
                    if names is not None and row.name not in names:
                        continue
                    for variant in variants if row.fn is None else ("alloc",):
                        timing = measure_pairs(row.make(t, variant), copy, budget_s=budget_s)
                        est = estimate_ratio(timing)
                        result = {
                            "option": row.name, "variant": variant, "threads": n, "rows": rows, "width": width,
                            "time_over_copy": est.median, "ci_low": est.low, "ci_high": est.high, "pairs": est.pairs,
                            "ideal": row.ideal, "over_ideal": est.median / row.ideal,
                            "call_ms": 1e3 * sorted(timing.a_s)[len(timing.a_s) // 2],
                            "copy_ms": 1e3 * sorted(timing.b_s)[len(timing.b_s) // 2],
                        }
                        results.append(result)
                        if on_result is not None:
                            on_result(result)
    return results


def markdown(results: Sequence[dict]) -> str:
    """The results as one markdown table: per variant and thread count, ``time / copy`` with its
    interval and ``/ ideal``."""
    cols = sorted({(r.get("variant", "alloc"), r["threads"]) for r in results}, key=lambda c: (VARIANTS.index(c[0]), c[1]))
    by = {(r["option"], r.get("variant", "alloc"), r["threads"]): r for r in results}
    header = ["call", "ideal"] + [f"{v} {n}t: time / copy [95 %] (/ ideal)" for v, n in cols]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in dict.fromkeys(r["option"] for r in results):
        cells = [name, f"{next(r['ideal'] for r in results if r['option'] == name):.2f}x"]
        for v, n in cols:
            r = by.get((name, v, n))
            cells.append("-" if r is None else
                         f"{r['time_over_copy']:.2f}x [{r['ci_low']:.2f}, {r['ci_high']:.2f}] ({r['over_ideal']:.2f})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
