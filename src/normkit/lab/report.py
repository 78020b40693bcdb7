"""The lab's reports, generated from ``results.json``'s contents: ``report.md`` (images beside it),
a self-contained ``report.html`` (images embedded as base64 data URIs, inline CSS, no external
resources), and the terminal summary table."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Dict, List

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from normkit.lab.stats import INCONCLUSIVE, NOT_RUN, REFUTES, SUPPORTS, fmt_p

__all__ = ["write", "markdown", "html_report", "summary_table", "claim_cells", "estimate_cells", "method_lines"]

_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { border-bottom: 2px solid #444; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; } th { background: #f2f2f2; }
img { max-width: 100%; } .claim { font-style: italic; } .meta { color: #666; font-size: 0.85em; }
.supports { color: #1a7f37; font-weight: bold; } .refutes { color: #b42318; font-weight: bold; }
.inconclusive, .not-measured { color: #9a6700; font-weight: bold; }
"""


def _css_class(verdict: str) -> str:
    if verdict.startswith(INCONCLUSIVE):
        return "inconclusive"
    if verdict.startswith(NOT_RUN):
        return "not-measured"
    return {SUPPORTS: "supports", REFUTES: "refutes", NOT_RUN: "not-measured"}.get(verdict, "")


def _num(x, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:+.{digits}g}"


def _p(x) -> str:
    return "n/a" if x is None else fmt_p(x).replace("p = ", "").replace("p ", "")


def claim_cells(c: Dict) -> List[str]:
    """The row of one primary claim (an entry of ``results["claims"]``): experiment, claim,
    measured, difference with its interval at the claim's level, p, adjusted p, n, minimum
    detectable effect, verdict."""
    if c.get("diff") is None:
        diff = "n/a"
    else:
        diff = f"{_num(c['diff'])} [{_num(c['ci_low'])}, {_num(c['ci_high'])}]"
    if c.get("mde") is None:
        mde = "n/a"
    elif c.get("kind") == "equivalence":
        mde = f"margin ±{c['mde']:.3g} (asked ±{c['margin']:g})"
    else:
        mde = f"{c['mde']:.3g}"
    return [c["experiment"], c["claim"], c.get("measured", ""), diff, _p(c.get("p")), _p(c.get("p_adjusted")), str(c.get("n", "")), mde,
            c["verdict"]]


CLAIM_HEADER = ["experiment", "primary claim", "measured (mean ± std over test seeds)",
                "difference in the claim's favour [CI at the claim's level]", "p", "p × m", "n", "MDE (80 % power)", "verdict"]


def estimate_cells(e: Dict) -> List[str]:
    """The row of one exploratory estimate: no verdict, the unadjusted 95 % interval."""
    diff = "n/a" if e.get("diff") is None else f"{_num(e['diff'])} [{_num(e['ci_low'])}, {_num(e['ci_high'])}]"
    return [e["experiment"], e["statement"], e.get("measured", ""), diff, str(e.get("n", ""))]


ESTIMATE_HEADER = ["experiment", "estimate of", "measured (mean ± std over test seeds)", "difference, > 0 in its favour [95 % CI]", "n"]


def _claims(results: Dict) -> List[Dict]:
    return results.get("claims") or []


def _checks(results: Dict) -> List[Dict]:
    return [c for e in results["experiments"].values() for c in e.get("checks", [])]


def method_lines(results: Dict) -> List[str]:
    claims = _claims(results)
    m = claims[0]["family_size"] if claims else 0
    alpha = claims[0]["alpha"] if claims else 0.05
    return [
        f"**Primary claims** are a fixed, pre-registered list of {m} (`normkit.lab.claims.PRIMARY`), each tied to a sentence of the "
        f"paper or of the work it names. Each is tested at α/m = {alpha:g}/{m} (Holm's first, strictest step over the fixed list: "
        "Holm's later steps need every p of the family, which a run of a subset of the experiments lacks, so this gives a claim the "
        "same verdict from the same data whatever else ran; the family-wise error stays at most α). Its interval is at that level too "
        "(two-sided 1 − α/m; 1 − 2α/m for the two one-sided tests of an equivalence claim), so verdict and interval agree. Superiority: "
        "a paired t test over test seeds, *supports* when the interval lies above 0, *does not support* when below. Equivalence "
        "(\"on par\"): two one-sided tests against the stated margin. **MDE**: the smallest true difference the test finds with 80 % "
        "power at the seeds run and the observed spread (noncentral t); for an equivalence claim, the smallest margin it would establish "
        "were the arms equal. A claim whose experiment did not run is *not measured*.",
        "**Fair arms.** Every ReLU network is He-initialized; each arm runs at the Adam rate of a sweep (3 rates in the quick preset) "
        "that gave it the best score on tuning seeds 1000, 1001, … which the test does not use (test seeds are 0 … n−1).",
        "**Exploratory estimates** are everything else: a difference with its unadjusted 95 % interval, no verdict. **Checks** "
        "(the paper's Table 1) are deterministic and pass or fail. **Cost** is a micro-benchmark of the norm op, not a claim.",
    ]


def _header_lines(results: Dict) -> List[str]:
    m = results["meta"]
    seeds = results["seeds"]
    seed_text = ", ".join(f"{k} {len(v)}" for k, v in seeds.items()) if isinstance(seeds, dict) else str(len(seeds))
    return [
        f"Preset `{results['preset']}`, test seeds per arm: {seed_text}; total {results.get('elapsed_s') or 0:.0f} s, {m['date']}.",
        f"Python {m['python']}, torch {m['torch']}, normkit {m['normkit']} (backends: {', '.join(m['normkit_backends'])}); "
        f"{m.get('cpu_model', '')}, {m['platform']}, {m['cpu_count']} CPUs, torch threads: {m['torch_threads']}; "
        f"commit {m.get('commit') or 'unknown'}; the lab process's CPU time {results.get('cpu_s') or 0:.0f} s; "
        f"load average at the start {m.get('load_average_at_start')}, at the end {m.get('load_average_at_end')}.",
    ] + method_lines(results)


def _md_table(header: List[str], rows: List[List[str]]) -> List[str]:
    esc = lambda c: str(c).replace("|", "\\|")  # noqa: E731
    return ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(map(esc, r)) + " |" for r in rows]


def _check_rows(results: Dict) -> List[List[str]]:
    return [[c["experiment"], c["check"], f"{c['max_change']:.1e}", "pass" if c["passed"] else "FAIL"] for c in _checks(results)]


def markdown(results: Dict) -> str:
    lines = ["# normkit lab report", ""] + _header_lines(results) + ["", "## Primary claims", ""]
    lines += _md_table(CLAIM_HEADER, [claim_cells(c) for c in _claims(results)])
    lines += ["", "## Checks (deterministic)", ""] + _md_table(["experiment", "check", "largest relative change", "result"], _check_rows(results))
    lines += ["", "## Exploratory estimates (no verdict)", ""]
    lines += _md_table(ESTIMATE_HEADER, [estimate_cells(e) for e in results.get("exploratory", [])])
    for name, e in results["experiments"].items():
        lines += ["", f"## {name}: {e['title']}", "", f"*Tests:* {e['claim']}", "", f"*Scale:* {e.get('scale', '')}", "",
                  f"Elapsed: {e['elapsed_s']:.1f} s.", ""]
        lines += [f"![{name}]({p})" for p in e["plots"]] + [""]
        lines += _md_table(e["table"]["header"], e["table"]["rows"]) + [""]
        lines += [f"- {'**primary** — ' if f.get('key') else ''}{f['claim']}: {f['sentence']}" for f in e["findings"]]
    return "\n".join(lines) + "\n"


def _html_table(header: List[str], rows: List[List[str]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def html_report(results: Dict, out: Path) -> str:
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>normkit lab report</title><style>{_CSS}</style></head><body>",
             "<h1>normkit lab report</h1>"]
    parts += [f"<p class='meta'>{html.escape(line).replace('`', '').replace('**', '')}</p>" for line in _header_lines(results)]
    parts.append("<h2>Primary claims</h2>")
    rows = ""
    for c in _claims(results):
        cells = claim_cells(c)
        rows += "<tr>" + "".join(f"<td>{html.escape(x)}</td>" for x in cells[:-1])
        rows += f"<td class='{_css_class(cells[-1])}'>{html.escape(cells[-1])}</td></tr>"
    head = "".join(f"<th>{html.escape(h)}</th>" for h in CLAIM_HEADER)
    parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
    parts.append("<h2>Checks (deterministic)</h2>" + _html_table(["experiment", "check", "largest relative change", "result"], _check_rows(results)))
    parts.append("<h2>Exploratory estimates (no verdict)</h2>"
                 + _html_table(ESTIMATE_HEADER, [estimate_cells(e) for e in results.get("exploratory", [])]))
    for name, e in results["experiments"].items():
        parts.append(f"<h2>{html.escape(name)}: {html.escape(e['title'])}</h2><p class='claim'>Tests: {html.escape(e['claim'])}</p>")
        parts.append(f"<p class='meta'>Scale: {html.escape(str(e.get('scale', '')))}. Elapsed {e['elapsed_s']:.1f} s.</p>")
        for p in e["plots"]:
            data = base64.b64encode((Path(out) / p).read_bytes()).decode("ascii")
            parts.append(f"<img alt='{html.escape(name)}' src='data:image/png;base64,{data}'>")
        parts.append(_html_table(e["table"]["header"], e["table"]["rows"]))
        parts.append("<ul>" + "".join(
            f"<li>{'<b>primary</b> — ' if f.get('key') else ''}{html.escape(f['claim'])}: {html.escape(f['sentence'])}</li>"
            for f in e["findings"]) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _short(verdict: str) -> str:
    """Verdicts as the terminal table prints them (the reports carry the full wording)."""
    return INCONCLUSIVE if verdict.startswith(INCONCLUSIVE) else NOT_RUN if verdict.startswith(NOT_RUN) else verdict


def summary_table(results: Dict) -> Table:
    """The terminal's closing table: the primary claims, each with its test, MDE and verdict."""
    claims = _claims(results)
    m = claims[0]["family_size"] if claims else 0
    table = Table(title="normkit lab: the pre-registered primary claims",
                  caption=f"difference > 0 favours the claim; interval and verdict at α/m = 0.05/{m}, paired by test seed; MDE = smallest "
                          "effect found with 80 % power. Exploratory estimates, checks and cost: report.html")
    table.add_column("experiment", no_wrap=True)
    table.add_column("claim", ratio=3)
    table.add_column("measured", ratio=3)
    table.add_column("difference [CI]", ratio=2)
    table.add_column("MDE", ratio=1)
    table.add_column("verdict", ratio=1)
    style = {SUPPORTS: "green", REFUTES: "red", INCONCLUSIVE: "yellow", NOT_RUN: "yellow"}
    for c in claims:
        cells = claim_cells(c)
        v = _short(c["verdict"])
        table.add_row(c["experiment"], escape(c["claim"]), escape(cells[2]), escape(cells[3]), escape(cells[7]), f"[{style.get(v, '')}]{v}[/]")
    checks = _checks(results)
    if checks:
        table.add_row("invariance", f"checks of Table 1: {sum(c['passed'] for c in checks)}/{len(checks)} pass", "", "", "", "", end_section=True)
    return table


def write(results: Dict, out: Path) -> None:
    out = Path(out)
    (out / "report.md").write_text(markdown(results), encoding="utf-8")
    (out / "report.html").write_text(html_report(results, out), encoding="utf-8")


def print_summary(results: Dict, console: Console) -> None:
    """Print the summary table; when the output is not a terminal (a log, ``make demo | tee``)
    rich would assume 80 columns, so use a width at which each row fits on about two lines."""
    if not console.is_terminal:
        console = Console(file=console.file, width=max(console.width, 140))
    console.print(summary_table(results))
