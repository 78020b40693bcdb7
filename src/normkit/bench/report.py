"""Presenting benchmark results: a rich table, a JSON document, a matplotlib plot.

The JSON document is the record (every number with its timing details, the machine and the
command line); the table and the plot are views of it.

Table columns, per case (op, direction, shape, dtype):

* ``ms``: normkit's median time per call;
* ``GB/s``: bytes that must move (:mod:`normkit.bench.cases`) per second;
* ``%copy``: that bandwidth as a percentage of the copy bandwidth measured in the same run;
* for each other implementation (torch eager, torch.compile, Liger, QuACK): its ``GB/s`` and
  ``x``, the speed ratio *its time / normkit's time* (above 1: normkit is faster).
"""

from __future__ import annotations

import json
from typing import IO, Iterable, List, Optional, Sequence, Tuple

from rich.console import Console
from rich.table import Table

DRIFT = 0.15


def header_line(doc: dict) -> str:
    """One line with what the numbers depend on."""
    m = doc["machine"]
    where = m.get("gpu") if m["device"] == "cuda" else m.get("cpu")
    threads = f"{m['torch_threads']} torch threads"
    backends = sorted({r["normkit_backend"] for r in doc["results"]}) or ["-"]
    copy = doc["copy_bandwidth"]
    return (
        f"normkit bench | {m['device']}: {where} | {threads} | torch {m['torch']} | "
        f"normkit backend: {', '.join(backends)} | copy {copy['gbps']:.1f} GB/s "
        f"({copy['buffer_bytes'] / 2**20:.0f} MiB buffers"
        + (f"; {copy['end_gbps']:.1f} after the run)" if "end_gbps" in copy else ")")
    )


def _columns(results: Sequence[dict]) -> List[str]:
    """Other implementations that produced at least one number or are worth an explanation."""
    names: List[str] = []
    for row in results:
        for name, entry in row["impls"].items():
            if name != "normkit" and name not in names and "ms" in entry:
                names.append(name)
    return names


def _cell(entry: Optional[dict], key: str, fmt: str, markup: bool = True) -> str:
    if entry is None or "skipped" in entry:
        return "-"
    if "error" in entry:
        return "[red]err[/red]" if markup else "err"
    return format(entry[key], fmt)


def table_rows(doc: dict, markup: bool = True) -> Tuple[List[str], List[List[str]]]:
    """Column names and one row of cells per case, shared by the terminal and markdown tables."""
    results = doc["results"]
    header = ["op", "dir", "shape", "dtype", "ms", "GB/s", "%copy"]
    others = _columns(results)
    for name in others:
        header += [f"{name} GB/s", f"x {name}"]
    rows = []
    for row in results:
        mine = row["impls"].get("normkit")
        cells = [
            row["op"], row["direction"], f"{row['rows']}x{row['width']}", row["dtype"],
            _cell(mine, "ms", ".3f", markup), _cell(mine, "gbps", ".1f", markup),
            "-" if mine is None or "frac_copy" not in mine else f"{100 * mine['frac_copy']:.0f}%",
        ]
        speedups = (mine or {}).get("speedup", {})
        noisy = (mine or {}).get("unreliable", {})
        for name in others:
            cells.append(_cell(row["impls"].get(name), "gbps", ".1f", markup))
            if name not in speedups:
                cells.append("-")
            elif name in noisy:  # shown, but not as a result (notes() says why)
                cells.append(f"({speedups[name]:.2f}?)")
            else:
                cells.append(f"{speedups[name]:.2f}")
        rows.append(cells)
    return header, rows


def make_table(doc: dict) -> Table:
    table = Table(title=header_line(doc), title_justify="left", show_lines=False)
    header, rows = table_rows(doc)
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i in (0, 1, 3) else "right")
    for cells in rows:
        table.add_row(*cells)
    return table


def markdown_table(doc: dict) -> str:
    """The same table as markdown (for BENCHMARKS.md), headed by the machine line."""
    header, rows = table_rows(doc, markup=False)
    lines = [header_line(doc), "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines + [""] + [f"note: {n}" for n in notes(doc)])


def notes(doc: dict) -> List[str]:
    """Implementations that were skipped or failed, once each; a warning when the copy
    bandwidth measured after the run differs from the one before by more than ``DRIFT``."""
    out: List[str] = []
    for row in doc["results"]:
        for name, why in row["impls"].get("normkit", {}).get("unreliable", {}).items():
            out.append(f"{row['op']} {row['direction']} {row['rows']}x{row['width']} {row['dtype']}: ratio to {name} "
                       f"unreliable ({why}); rerun with more --repeats on an idle machine")
    copy = doc["copy_bandwidth"]
    end = copy.get("end_gbps")
    if end is not None and abs(end / copy["gbps"] - 1) > DRIFT:
        out.append(f"copy bandwidth changed from {copy['gbps']:.1f} to {end:.1f} GB/s during the run: "
                   f"the machine was not idle, treat the numbers as noisy")
    seen = set()
    for row in doc["results"]:
        for name, entry in row["impls"].items():
            for kind in ("skipped", "error"):
                if kind in entry and (name, entry[kind]) not in seen:
                    seen.add((name, entry[kind]))
                    if kind == "error":
                        out.append(f"{name}: error in {row['op']} {row['direction']} "
                                   f"{row['rows']}x{row['width']} {row['dtype']}: {entry[kind]}")
                    else:
                        out.append(f"{name}: {entry[kind]}")
    return out


def print_table(doc: dict, file: Optional[IO[str]] = None) -> None:
    console = Console(file=file, width=200 if file is not None and not file.isatty() else None)
    console.print(make_table(doc))
    for line in notes(doc):
        console.print(f"  note: {line}", markup=False, highlight=False)


def _dumps_inline_lists(obj, level: int = 0) -> str:
    """JSON indented like ``json.dumps(indent=2)``, but a list of numbers/strings on one line
    (per-sample timings would otherwise take one line per number)."""
    pad, inner = "  " * level, "  " * (level + 1)
    if isinstance(obj, dict) and obj:
        items = [f"{inner}{json.dumps(str(k))}: {_dumps_inline_lists(v, level + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, (list, tuple)) and obj and any(isinstance(v, (dict, list, tuple)) for v in obj):
        return "[\n" + ",\n".join(inner + _dumps_inline_lists(v, level + 1) for v in obj) + "\n" + pad + "]"
    return json.dumps(obj)


def write_json(doc: dict, path: str, stdout: Optional[IO[str]] = None, inline_lists: bool = False) -> None:
    text = _dumps_inline_lists(doc) if inline_lists else json.dumps(doc, indent=2, sort_keys=False)
    if path == "-":
        import sys

        (stdout or sys.stdout).write(text + "\n")
    else:
        with open(path, "w") as fh:
            fh.write(text + "\n")


def write_plot(doc: dict, path: str) -> None:
    """GB/s against width, one panel per (direction, op), one line per implementation (and per
    dtype and row count when several were measured); the dashed line is the copy bandwidth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = doc["results"]
    ops = _unique(r["op"] for r in results)
    directions = _unique(r["direction"] for r in results)
    # One line per (implementation, dtype) when each width has a single row count (the CPU
    # default ties rows to width); per (implementation, dtype, rows) for a rows x widths sweep.
    per_rows = any(
        len({r["rows"] for r in results if (r["width"], r["dtype"]) == (w, d)}) > 1
        for w, d in _unique((r["width"], r["dtype"]) for r in results)
    )
    several_dtypes = len(_unique(r["dtype"] for r in results)) > 1
    fig, axes = plt.subplots(len(directions), len(ops), figsize=(4.2 * len(ops), 3.4 * len(directions)),
                             squeeze=False, sharex=True)
    copy = doc["copy_bandwidth"]["gbps"]
    for i, direction in enumerate(directions):
        for j, op in enumerate(ops):
            ax = axes[i][j]
            lines: dict = {}
            for r in results:
                if r["op"] != op or r["direction"] != direction:
                    continue
                for name, entry in r["impls"].items():
                    if "gbps" not in entry:
                        continue
                    label = name + (f" {r['dtype']}" if several_dtypes else "") + (
                        f" {r['rows']} rows" if per_rows else "")
                    lines.setdefault(label, []).append((r["width"], entry["gbps"]))
            for label, pts in lines.items():
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
            ax.axhline(copy, linestyle="--", color="gray", label="copy")
            ax.set_xscale("log", base=2)
            ax.set_title(f"{op} {direction}")
            ax.set_ylim(bottom=0)
            if j == 0:
                ax.set_ylabel("GB/s")
            if i == len(directions) - 1:
                ax.set_xlabel("width")
            ax.grid(True, alpha=0.3)
    handles: dict = {}
    for ax in axes.flat:  # one legend for the figure: a line may be missing from some panels
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(6, len(handles)),
               fontsize=8, frameon=False)
    m = doc["machine"]
    fig.suptitle(f"normkit bench on {m.get('gpu') or m.get('cpu')} (torch {m['torch']})", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _unique(items: Iterable) -> list:
    out: list = []
    for item in items:
        if item not in out:
            out.append(item)
    return out


# --- the shapes suite (normkit.bench.shapes) ----------------------------------------------------
# One table per op: a row per shape, a column per (mode, threads), each cell the median of the
# per-pair ratios torch time / normkit time.

OP_TITLES = {"layer_norm": "LayerNorm", "rms_norm": "RMSNorm"}


def shapes_header_line(doc: dict) -> str:
    m, cfg = doc["machine"], doc["config"]
    git = doc.get("git") or {}
    commit = git.get("commit", "unknown") + (" (+ uncommitted changes)" if git.get("dirty") else "")
    load = " -> ".join(f"{la[0]:.2f}" for la in (m.get("load_average_start"), m.get("load_average_end")) if la)
    parts = [f"normkit bench --suite shapes | {m['device']}: {m.get('cpu')} ({m.get('cpu_count')} logical CPUs)",
             f"torch {m['torch']}", cfg["dtype"], f"commit {commit}", doc["date"]]
    if load:
        parts.append(f"load average (1 min) {load}")
    return " | ".join(parts)


def _unique_sorted(values: Iterable, order: Sequence = ()) -> list:
    seen = _unique(values)
    return sorted(seen, key=lambda v: (order.index(v), v) if v in order else (len(order), v))


def shapes_table_rows(doc: dict, op: str) -> Tuple[List[str], List[List[str]]]:
    """Column names and one row per shape for ``op``: the issue's table."""
    cells = [c for c in doc["cells"] if c["op"] == op]
    modes = _unique_sorted((c["mode"] for c in cells), ("inference", "fwd+bwd", "add+norm"))
    threads = _unique_sorted(c["threads"] for c in cells)
    columns = [(mode, t) for mode in modes for t in threads]
    shapes = _unique_sorted((c["rows"], c["width"]) for c in cells)
    by_key = {(c["rows"], c["width"], c["mode"], c["threads"]): c for c in cells}
    header = ["rows x width"] + [f"{mode}, {t} thread{'s' if t > 1 else ''}" for mode, t in columns]
    rows = []
    for m, n in shapes:
        row = [f"{m} x {n}"]
        for mode, t in columns:
            c = by_key.get((m, n, mode, t))
            row.append("-" if c is None else f"{c['ratio']:.2f}x")
        rows.append(row)
    return header, rows


def shapes_summary_lines(doc: dict) -> List[str]:
    """The done-when statistics: slowest cell, median over cells, 4096 x 4096 cells, targets."""
    s = doc["summary"]
    if not s.get("cells"):
        return ["no cells measured"]

    def name(c: dict) -> str:
        return (f"{OP_TITLES.get(c['op'], c['op'])} {c['mode']} {c['rows']} x {c['width']}, {c['threads']} "
                f"thread{'s' if c['threads'] > 1 else ''}")

    w = s["min"]
    lines = [f"slowest cell: {w['ratio']:.2f}x ({name(w)}; 95 % interval {w['ci_low']:.2f}-{w['ci_high']:.2f})",
             f"median over {s['cells']} cells: {s['median']:.2f}x"]
    if s["large"]:
        lines.append("4096 x 4096: " + "; ".join(f"{name(c)} {c['ratio']:.2f}x" for c in s["large"]))
    for t in s["targets"]:
        verdict = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        measured = "" if t["measured"] is None else f" (measured {t['measured']:.2f}x" + (
            f"; {t['failing']} cells below" if t.get("failing") else "") + ")"
        lines.append(f"target {t['target']}: {verdict}{measured}")
    return lines


def print_shapes(doc: dict, file: Optional[IO[str]] = None) -> None:
    console = Console(file=file, width=200 if file is not None and not file.isatty() else None)
    console.print(shapes_header_line(doc), markup=False, highlight=False)
    for op in _unique(c["op"] for c in doc["cells"]):
        table = Table(title=f"{OP_TITLES.get(op, op)}: speed ratio torch / normkit (median of interleaved pairs; "
                            "above 1: normkit is faster)", title_justify="left")
        header, rows = shapes_table_rows(doc, op)
        for i, col in enumerate(header):
            table.add_column(col, justify="left" if i == 0 else "right")
        for cells in rows:
            table.add_row(*[f"[red]{v}[/red]" if v.endswith("x") and float(v[:-1]) < 0.9 else v for v in cells])
        console.print(table)
    for line in shapes_summary_lines(doc):
        console.print(line, markup=False, highlight=False)


def shapes_markdown(doc: dict) -> str:
    """The shapes suite's tables, statistics and per-cell details as markdown."""
    out = [shapes_header_line(doc), ""]
    for op in _unique(c["op"] for c in doc["cells"]):
        header, rows = shapes_table_rows(doc, op)
        out += [f"**{OP_TITLES.get(op, op)}** (torch time / normkit time)", "",
                "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
        out += ["| " + " | ".join(cells) + " |" for cells in rows] + [""]
    out += [f"- {line}" for line in shapes_summary_lines(doc)] + [""]
    out += ["<details><summary>Every cell: median ms per call, ratio, 95 % interval, pairs, normkit's path</summary>",
            "", "| op | mode | shape | threads | torch ms | normkit ms | ratio | 95 % interval | pairs | path |",
            "|---|---|---|---:|---:|---:|---:|---|---:|---|"]
    for c in doc["cells"]:
        out.append(f"| {c['op']} | {c['mode']} | {c['rows']} x {c['width']} | {c['threads']} | {c['torch_ms']:.4f} | "
                   f"{c['normkit_ms']:.4f} | {c['ratio']:.2f} | {c['ci_low']:.2f}-{c['ci_high']:.2f} | {c['pairs']} | "
                   f"{c.get('normkit_path') or '-'} |")
    return "\n".join(out + ["", "</details>"])


def render_markdown(doc: dict) -> str:
    """Markdown for any ``normkit bench --json`` record, whichever suite wrote it."""
    return shapes_markdown(doc) if doc.get("suite") == "shapes" else markdown_table(doc)
