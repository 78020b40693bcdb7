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

All calls run without gradients (inference; the forward pass of training costs the same
passes), on float32 ``(rows, width)`` tensors unless the row says bfloat16.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

import normkit
from normkit._machine import torch_threads
from normkit.bench.paired import estimate_ratio, measure_pairs

__all__ = ["ROWS", "OptionRow", "run_suite", "markdown"]


@dataclass(frozen=True)
class OptionRow:
    """One measured call: ``make(t) -> fn`` builds it from the tensors ``t``."""

    name: str
    ideal: float  # bytes of one fused pass / bytes of the copy of x
    make: Callable[[Dict[str, torch.Tensor]], Callable[[], object]]


def _ln(t, **kw):
    return lambda: normkit.layer_norm(t["x"], t["x"].shape[-1:], t["w"], t["b"], **kw)


ROWS: Sequence[OptionRow] = (
    OptionRow("layer_norm(x)", 1.0, lambda t: _ln(t)),
    OptionRow("out=buf", 1.0, lambda t: _ln(t, out=t["out"])),
    OptionRow("+ residual", 1.5, lambda t: _ln(t, residual=t["r"])),
    OptionRow("+ residual, prenorm", 2.0, lambda t: _ln(t, residual=t["r"], prenorm=True)),
    OptionRow("+ weight1/bias1", 1.5, lambda t: _ln(t, weight1=t["w1"], bias1=t["b1"])),
    OptionRow("+ residual + x1", 2.0, lambda t: _ln(t, residual=t["r"], x1=t["x1"])),
    OptionRow("+ residual + rowscale", 1.5, lambda t: _ln(t, residual=t["r"], rowscale=t["rowscale"])),
    # bf16 x and residual (0.25 + 0.25 of a float32 copy), float32 sum stored (0.5), bf16 y (0.25)
    OptionRow(
        "bf16 residual_in_fp32, prenorm",
        1.25,
        lambda t: lambda: normkit.layer_norm(
            t["x16"], t["x16"].shape[-1:], t["w"], t["b"], residual=t["r16"], residual_in_fp32=True, prenorm=True
        ),
    ),
    OptionRow("out_dtype=bfloat16", 0.75, lambda t: _ln(t, out_dtype=torch.bfloat16)),
    OptionRow(
        "torch F.layer_norm", 1.0,
        lambda t: lambda: torch.nn.functional.layer_norm(t["x"], t["x"].shape[-1:], t["w"], t["b"]),
    ),
)


def _tensors(rows: int, width: int, seed: int) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=g)
    return {
        "x": x,
        "src": torch.randn(rows, width, generator=g),
        "dst": torch.empty(rows, width),
        "out": torch.empty(rows, width),
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
              seed: int = 0, names: Optional[Sequence[str]] = None,
              on_result: Optional[Callable[[dict], None]] = None) -> List[dict]:
    """One result per option row and thread count: ``time_over_copy`` (median per-pair ratio
    and its interval), ``ideal``, ``over_ideal``, and both sides' median milliseconds."""
    t = _tensors(rows, width, seed)
    copy = lambda: t["dst"].copy_(t["src"])  # noqa: E731
    results = []
    with torch.no_grad():
        for n in threads:
            with torch_threads(n):
                for row in ROWS:
                    if names is not None and row.name not in names:
                        continue
                    timing = measure_pairs(row.make(t), copy, budget_s=budget_s)
                    est = estimate_ratio(timing)
                    result = {
                        "option": row.name, "threads": n, "rows": rows, "width": width,
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
    """The results as one markdown table, a column pair per thread count."""
    threads = sorted({r["threads"] for r in results})
    by = {(r["option"], r["threads"]): r for r in results}
    header = ["call", "ideal"] + [f"{n}t: time / copy [95 %]" for n in threads] + [f"{n}t: / ideal" for n in threads]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in dict.fromkeys(r["option"] for r in results):
        cells = [name, f"{next(r['ideal'] for r in results if r['option'] == name):.2f}x"]
        for n in threads:
            r = by.get((name, n))
            cells.append("-" if r is None else f"{r['time_over_copy']:.2f}x [{r['ci_low']:.2f}, {r['ci_high']:.2f}]")
        for n in threads:
            r = by.get((name, n))
            cells.append("-" if r is None else f"{r['over_ideal']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
