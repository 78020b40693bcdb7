"""The README's lab section is generated from a committed results file of the current lab code,
and states no number that is not in that file."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from normkit.lab import claims, table

ROOT = Path(__file__).resolve().parents[1]
NUMBER = re.compile(r"(?<![\w.])[-+−]?\d+(?:[.,]\d+)*(?:e[-+]?\d+)?")


def _lab_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## The lab: the paper's claims, measured")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def _readme_block() -> str:
    text = (ROOT / "README.md").read_text()
    assert text.count(table.BEGIN) == 1 and text.count(table.END) == 1, "README.md must hold one lab-table block"
    return text.split(table.BEGIN, 1)[1].split(table.END, 1)[0].strip("\n")


def _source() -> str:
    match = re.search(r"from `([^`]+\.json)`", _readme_block())
    assert match, "the README's lab table must name the results file it was generated from"
    return match.group(1)


def _estimate_source() -> str:
    match = re.search(r"--estimate (\S+\.json)", _readme_block())
    return match.group(1) if match else ""


def test_readme_lab_results_are_generated_from_the_committed_file_they_name():
    source, est = _source(), _estimate_source()
    results = json.loads((ROOT / source).read_text())
    estimate = json.loads((ROOT / est).read_text()) if est else None
    assert _readme_block() == table.markdown_table(results, source, estimate, est), "README.md is stale: rerun python -m normkit.lab.table"
    meta = results["meta"]
    assert meta["cpu_model"] and meta["date"] and meta["commit"], "a named run: machine, date and commit"
    assert results["preset"] == "quick" and set(results["experiments"]) == {
        "mlp", "lstm", "sequential", "transformer", "online", "cost", "sensitivity", "convnet", "invariance"}
    assert [c["key"] for c in results["claims"]] == [p.key for p in claims.PRIMARY], "the file's primary claims are the code's list"
    for c in results["claims"]:  # every primary claim with its test's numbers and its minimum detectable effect
        assert c["p"] is not None and c["n"] >= 8 and c["mde"] is not None and c["verdict"], c["key"]


def test_every_number_in_the_readme_lab_section_is_in_the_results_file():
    text = (ROOT / _source()).read_text() + ((ROOT / _estimate_source()).read_text() if _estimate_source() else "")
    block = _readme_block()
    known = set(NUMBER.findall(text)) | set(NUMBER.findall(block))  # the block is the file's numbers, formatted
    outside = _lab_section().replace(block, "")
    missing = sorted({n for n in NUMBER.findall(outside) if n.lstrip("+-−") not in {k.lstrip("+-−") for k in known}})
    assert not missing, f"numbers in the README's lab section that the results file does not hold: {missing}"


def test_results_file_comes_from_the_current_lab_code():
    """The run's commit has the lab code of HEAD: a change to src/normkit/lab needs a new run."""
    results = json.loads((ROOT / _source()).read_text())
    commit = results["meta"]["commit"]
    assert not commit.endswith("+dirty"), "the recorded run must come from a clean checkout"
    try:
        diff = subprocess.run(["git", "-C", str(ROOT), "diff", "--stat", commit, "HEAD", "--", "src/normkit/lab"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        pytest.skip("git is not available")
    if diff.returncode != 0:
        pytest.skip(f"commit {commit[:12]} is not in this checkout's history")
    assert diff.stdout.strip() == "", f"src/normkit/lab changed since the recorded run ({commit[:12]}):\n{diff.stdout}"


def test_replace_between_markers():
    text = f"intro\n{table.BEGIN}\nold\n{table.END}\noutro\n"
    assert table.replace_between_markers(text, "new") == f"intro\n{table.BEGIN}\nnew\n{table.END}\noutro\n"
    with pytest.raises(ValueError, match="expected one"):
        table.replace_between_markers("no markers", "new")


def test_cli_prints_and_refuses_old_files(tmp_path, capsys):
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"meta": {}, "experiments": {}}))
    assert table.main([str(old)]) == 2 and "no 'claims' list" in capsys.readouterr().err
