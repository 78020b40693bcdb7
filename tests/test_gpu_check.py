"""``benchmarks/gpu_check.py`` (``make gpu-check`` / ``make gpu-check-dry``) end to end on CPU.

The dry mode is the GPU check itself, run through Triton's interpreter at tiny sizes, so the
day a GPU appears the script is known to work. Each run is a fresh process with
``TRITON_INTERPRET=1`` set before Python starts (Triton reads it at import). A check that cannot
fail proves nothing: the hidden ``--inject-fault`` flag makes the Triton backend's forward or
backward wrong in one element, and the check must then exit 1 and name what was wrong.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
STAGES = ["correctness", "determinism", "gradcheck", "compile", "kernels", "rnn", "suite"]


def run_check(out: Path, *args: str, interpret: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "NORMKIT_BACKEND")}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def load(out: Path) -> dict:
    return json.loads((out / "gpu-check.json").read_text())


def test_dry_run_writes_the_record_and_passes(tmp_path):
    proc = run_check(tmp_path, "--dry")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    record = load(tmp_path)
    assert record["status"] == "pass" and record["failures"] == []
    assert record["mode"] == "dry" and record["machine"]["triton_interpret"] is True
    assert list(record["stages"]) == STAGES
    for name, stage in record["stages"].items():
        # every stage checked something; on a very slow machine a stage may run out of time
        assert stage["status"] in ("pass", "partial") and stage["counts"]["pass"] > 0, (name, stage["counts"])
    # the kernel cells ran every direction for normkit and torch, with the copy bandwidth beside them
    results = record["kernels"]["results"]
    assert {r["direction"] for r in results} == {"fwd", "bwd", "fwd+bwd"}
    assert all("gbps" in r["impls"]["normkit"] and "gbps" in r["impls"]["torch"] for r in results)
    assert all(r["normkit_backend"] == "triton" for r in results)
    assert record["kernels"]["copy_bandwidth"]["gbps"] > 0
    assert {r["cell"] for r in record["rnn"]["rows"]} == {"LSTM", "GRU"}
    md = (tmp_path / "gpu-check.md").read_text()
    assert md.startswith("# normkit gpu-check: PASS") and "NOT a GPU result" in md
    for name in STAGES:
        assert f"| {name} | " in md
    assert "## Kernels" in md and "| layer_norm | fwd |" in md


@pytest.mark.parametrize("fault, stages, cells", [
    # a correctness cell of each kind and the kernels stage's own check of the timed shape
    ("forward", "correctness,kernels", r"^(dropout .* 19x517 fp32|mean 1e4 .*x1000 fp32|strided layer_norm fp32"
                                       r"|residual\+prenorm layer_norm 19x257 bf16|layer_norm 8x64 float32)"),
    ("backward", "correctness", r"^residual\+prenorm .* 19x257 fp16"),
], ids=["forward", "backward"])
def test_a_wrong_kernel_fails_the_check(tmp_path, fault, stages, cells):
    args = ["--dry", "--stages", stages, "--inject-fault", fault, "--cells", cells]
    proc = run_check(tmp_path, *args)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-4000:]
    record = load(tmp_path)
    assert record["status"] == "fail" and record["failures"]
    assert "FAIL" in proc.stdout
    for name in stages.split(","):
        stage = record["stages"][name]
        assert stage["status"] == "fail" and stage["counts"]["pass"] == 0, (name, stage["counts"])
    wrong = " ".join(record["failures"])
    assert ("y: max error" in wrong) if fault == "forward" else ("dx: max error" in wrong)
    assert "## Wrong results" in (tmp_path / "gpu-check.md").read_text()


def test_cells_not_reached_in_time_are_recorded_as_skipped(tmp_path):
    proc = run_check(tmp_path, "--dry", "--stages", "correctness,gradcheck,kernels", "--budget", "0.01")
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = load(tmp_path)
    for name, stage in record["stages"].items():
        assert stage["status"] == "skipped" and stage["counts"]["skipped"] > 0, (name, stage["counts"])
        assert all(c["reason"] == "time budget of the whole run spent" for c in stage["cells"])
    assert "## Skipped" in (tmp_path / "gpu-check.md").read_text()


def test_without_a_gpu_it_says_so_in_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = run_check(tmp_path / "out", interpret=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: no CUDA device here (torch "), proc.stdout
    assert not (tmp_path / "out").exists()


def _load_script(monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", gpu_check)  # dataclasses look their module up
    spec.loader.exec_module(gpu_check)  # the module imports nothing heavy at top level
    return gpu_check


def test_a_gpu_that_torch_cannot_use_fails_in_one_line(tmp_path, monkeypatch, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    gpu_check = _load_script(monkeypatch)
    monkeypatch.setattr(gpu_check, "NVIDIA_DEVICE", str(tmp_path))  # a path that exists
    assert gpu_check.main(["--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sees no CUDA device; install torch's CUDA build" in err[0], err
    monkeypatch.setattr(gpu_check, "NVIDIA_DEVICE", str(tmp_path / "absent"))
    assert gpu_check.main(["--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.startswith("gpu-check: no CUDA device here")


def test_unknown_stage_is_a_usage_error(tmp_path):
    proc = run_check(tmp_path, "--dry", "--stages", "correctness,frobnicate", interpret=False)
    assert proc.returncode == 2 and "frobnicate" in proc.stderr


def test_the_gpu_plan_covers_issue_17_in_under_five_minutes(monkeypatch):
    gpu_check = _load_script(monkeypatch)
    plan = gpu_check.PLANS["gpu"]
    assert set(plan.stage_budget_s) == set(STAGES) == set(gpu_check.STAGES)
    assert plan.budget_s <= 300 - 30, "room for one cell that starts before the deadline, and the report"
    assert 1 in plan.widths and 65536 in plan.widths and plan.wide == 65536
    plain_rows = dict(plan.kernel_sweep)[("layer_norm", "rms_norm")]
    assert set(plain_rows) == {4096, 16384, 65536} and set(plan.kernel_widths) == {1024, 4096, 8192, 16384}
    assert set(plan.kernel_dtypes) == {"bfloat16", "float32"}
    assert len(plan.rnn_shapes) in (0, 3)  # () means benchmarks/bench_rnn.py's three shapes
