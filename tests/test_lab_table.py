"""The README's lab table is generated from the committed results file it names, and matches it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from normkit.lab import table

ROOT = Path(__file__).resolve().parents[1]


def _readme_block() -> str:
    text = (ROOT / "README.md").read_text()
    assert text.count(table.BEGIN) == 1 and text.count(table.END) == 1, "README.md must hold one lab-table block"
    return text.split(table.BEGIN, 1)[1].split(table.END, 1)[0].strip("\n")


def test_readme_lab_table_matches_the_committed_results_file_it_names():
    block = _readme_block()
    match = re.search(r"from `([^`]+\.json)`", block)
    assert match, "the README's lab table must name the results file it was generated from"
    source = match.group(1)
    results = json.loads((ROOT / source).read_text())
    assert block == table.markdown_table(results, source), "README.md is stale: rerun python -m normkit.lab.table"
    meta = results["meta"]
    assert meta["cpu_model"] and meta["date"] and meta["commit"], "a named run: machine, date and commit"
    assert len(results["seeds"]) >= 5 and results["preset"] == "quick"
    for c in results["claims"]:  # every claim with its test's numbers
        assert {"experiment", "claim", "verdict", "diff", "ci_low", "ci_high", "p", "n"} <= set(c), c["claim"]
        assert c["verdict"] == "not measured" or (c["p"] is not None and c["n"] >= 5), c["claim"]
    assert {c["experiment"] for c in results["claims"]} == set(results["experiments"]) and len(results["experiments"]) == 9


def test_replace_between_markers():
    text = f"intro\n{table.BEGIN}\nold\n{table.END}\noutro\n"
    assert table.replace_between_markers(text, "new") == f"intro\n{table.BEGIN}\nnew\n{table.END}\noutro\n"
    with pytest.raises(ValueError, match="expected one"):
        table.replace_between_markers("no markers", "new")


def test_cli_prints_and_refuses_old_files(tmp_path, capsys):
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"meta": {}, "experiments": {}}))
    assert table.main([str(old)]) == 2 and "no 'claims' list" in capsys.readouterr().err
