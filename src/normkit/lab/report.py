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

__all__ = ["write", "markdown", "html_report", "summary_table"]

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
    return {SUPPORTS: "supports", REFUTES: "refutes", NOT_RUN: "not-measured"}.get(verdict, "")


def _num(x, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:+.{digits}g}"


def claim_cells(c: Dict) -> List[str]:
    """The summary row of one entry of ``results["claims"]``: experiment, claim, measured,
    difference with its interval, p, Holm-adjusted p, n, verdict, verdict after Holm."""
    extra = c.get("extra") or {}
    if c.get("diff") is None:
        diff = "n/a"
    elif "ratio" in extra:  # non-inferiority: the ratio and its interval read better than a log difference
        diff = (f"ratio {extra['ratio']:.3f} [{extra['ratio_ci_low']:.3f}, {extra['ratio_ci_high']:.3f}], "
                f"margin {1 + extra['margin']:g}")
    else:
        diff = f"{_num(c['diff'])} [{_num(c['ci_low'])}, {_num(c['ci_high'])}]"
    p = "n/a" if c.get("p") is None else fmt_p(c["p"]).replace("p = ", "").replace("p ", "")
    ph = "n/a" if c.get("p_holm") is None else fmt_p(c["p_holm"]).replace("p = ", "").replace("p ", "")
    return [c["experiment"], c["claim"], c.get("measured", ""), diff, p, ph, str(c.get("n", "")), c["verdict"], c.get("verdict_holm", "")]


CLAIM_HEADER = ["experiment", "claim", "measured (mean ± std over seeds)", "difference in the claim's favour [95 % CI]", "p",
                "p (Holm)", "n", "verdict", "after Holm"]


def _claims(results: Dict) -> List[Dict]:
    return results.get("claims") or []


def _header_lines(results: Dict) -> List[str]:
    m = results["meta"]
    return [
        f"Preset `{results['preset']}`, seeds {results['seeds']}, total {results.get('elapsed_s') or 0:.0f} s, {m['date']}.",
        f"Python {m['python']}, torch {m['torch']}, normkit {m['normkit']} (backends: {', '.join(m['normkit_backends'])}); "
        f"{m.get('cpu_model', '')}, {m['platform']}, {m['cpu_count']} CPUs, torch threads: {m['torch_threads']}; "
        f"commit {m.get('commit') or 'unknown'}; the lab process's CPU time {results.get('cpu_s') or 0:.0f} s; "
        f"load average at the start {m.get('load_average_at_start')}, at the end {m.get('load_average_at_end')}.",
        "Verdicts are tests (normkit.lab.stats): a paired t interval over seeds of the difference between the claim's arm and "
        "its baseline, oriented so that > 0 favours the claim; supports when the 95 % interval lies above 0, does not support "
        "when it lies below, inconclusive otherwise. Failure counts use Fisher's exact test, 'no slower than' a stated "
        "non-inferiority margin. 'After Holm': the verdict that survives Holm's correction over all claims of this run.",
        "Training and step times are the process's CPU time (robust to other jobs on a shared machine; equal to the wall "
        "clock on an idle one) unless marked wall; section times are wall-clock.",
    ]


def _md_table(header: List[str], rows: List[List[str]]) -> List[str]:
    esc = lambda c: str(c).replace("|", "\\|")  # noqa: E731
    return ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(map(esc, r)) + " |" for r in rows]


def markdown(results: Dict) -> str:
    lines = ["# normkit lab report", ""] + _header_lines(results) + ["", "## Summary", ""]
    lines += _md_table(CLAIM_HEADER, [claim_cells(c) for c in _claims(results)])
    for name, e in results["experiments"].items():
        lines += ["", f"## {name}: {e['title']}", "", f"*Claim:* {e['claim']}", "", f"Elapsed: {e['elapsed_s']:.1f} s.", ""]
        lines += [f"![{name}]({p})" for p in e["plots"]] + [""]
        lines += _md_table(e["table"]["header"], e["table"]["rows"]) + [""]
        lines += [f"- **{f['verdict']}** — {f['claim']}: {f['sentence']}" for f in e["findings"]]
    return "\n".join(lines) + "\n"


def _html_table(header: List[str], rows: List[List[str]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def html_report(results: Dict, out: Path) -> str:
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>normkit lab report</title><style>{_CSS}</style></head><body>",
             "<h1>normkit lab report</h1>"]
    parts += [f"<p class='meta'>{html.escape(line).replace('`', '')}</p>" for line in _header_lines(results)]
    parts.append("<h2>Summary</h2>")
    rows = ""
    for c in _claims(results):
        cells = claim_cells(c)
        rows += "<tr>" + "".join(f"<td>{html.escape(x)}</td>" for x in cells[:-2])
        rows += "".join(f"<td class='{_css_class(v)}'>{html.escape(v)}</td>" for v in cells[-2:]) + "</tr>"
    head = "".join(f"<th>{html.escape(h)}</th>" for h in CLAIM_HEADER)
    parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
    for name, e in results["experiments"].items():
        parts.append(f"<h2>{html.escape(name)}: {html.escape(e['title'])}</h2><p class='claim'>Claim: {html.escape(e['claim'])}</p>")
        parts.append(f"<p class='meta'>Elapsed {e['elapsed_s']:.1f} s.</p>")
        for p in e["plots"]:
            data = base64.b64encode((Path(out) / p).read_bytes()).decode("ascii")
            parts.append(f"<img alt='{html.escape(name)}' src='data:image/png;base64,{data}'>")
        parts.append(_html_table(e["table"]["header"], e["table"]["rows"]))
        parts.append("<ul>" + "".join(
            f"<li><span class='{_css_class(f['verdict'])}'>{html.escape(f['verdict'])}</span> — "
            f"{html.escape(f['claim'])}: {html.escape(f['sentence'])}</li>" for f in e["findings"]) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _short(verdict: str) -> str:
    """Verdicts as the terminal table prints them (the reports carry the full wording)."""
    return INCONCLUSIVE if verdict.startswith(INCONCLUSIVE) else verdict


def summary_table(results: Dict) -> Table:
    """The terminal's closing table: one row per claim, its measurements, the test and the verdict."""
    table = Table(title="normkit lab: the claims, measured",
                  caption="difference > 0 favours the claim; [95 % CI], paired by seed; verdict after Holm's correction "
                          "over all claims. Details: report.html")
    table.add_column("experiment", no_wrap=True)
    table.add_column("claim", ratio=3)
    table.add_column("measured", ratio=3)
    table.add_column("difference [CI]", ratio=2)
    table.add_column("p (Holm)", no_wrap=True)
    table.add_column("verdict", ratio=1)
    table.add_column("time (s)", justify="right", no_wrap=True)
    style = {SUPPORTS: "green", REFUTES: "red", INCONCLUSIVE: "yellow", NOT_RUN: "yellow"}
    by_exp: Dict[str, List[Dict]] = {}
    for c in _claims(results):
        by_exp.setdefault(c["experiment"], []).append(c)
    for name, e in results["experiments"].items():
        claims = by_exp.get(name, [])
        for i, c in enumerate(claims):
            cells = claim_cells(c)
            v = _short(c.get("verdict_holm") or c["verdict"])
            table.add_row(name if i == 0 else "", escape(c["claim"]), escape(cells[2]), escape(cells[3]), escape(cells[5]), f"[{style.get(v, '')}]{v}[/]",
                          f"{e['elapsed_s']:.1f}" if i == 0 else "", end_section=i == len(claims) - 1)
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
