#!/usr/bin/env python
"""gpu-check: verify normkit's Triton backend on a real GPU in under five minutes (issue 17).

GPU machines come rarely and for minutes, so this one command runs everything at once and brings
back one JSON record and one Markdown table::

    make gpu-check                    # CUDA machine: .venv with the pinned stack, then the check
    make gpu-check-dry                # no GPU: the same script on CPU, Triton's interpreter, tiny sizes
    python benchmarks/gpu_check.py --out DIR [--dry] [--budget SECONDS] [--stages a,b,...] [--cells REGEX]

Without a CUDA device (and without ``--dry``) it prints one line and exits 0. ``--dry`` sets
``TRITON_INTERPRET=1`` (re-starting Python if needed: Triton reads it at import) and runs every
stage on CPU tensors at tiny sizes; ``tests/test_gpu_check.py`` runs it in ``make test``.

Stages, in this order; each has a time budget (:data:`PLANS`) inside a budget for the whole run,
and a cell not reached in time is recorded as skipped, never silently dropped:

``correctness``  the Triton backend forced through the public API, forward and every gradient
                 against a float64 evaluation of :mod:`normkit.reference`, allowed twice
                 PyTorch's own error in the input dtype (``tests/helpers.py``'s rule): fp32,
                 bf16 and fp16, widths 1 to 65536 (single-pass and looped kernels), residual +
                 prenorm, no affine, dropout (the kernel's mask read back from a dropout of ones
                 under the same seed, then replayed by the reference), a 1e4 mean offset,
                 NaN/Inf rows, strided and permuted inputs
``determinism``  dx, dresidual, dW, dB bit-identical over three backward passes
``gradcheck``    ``torch.autograd.gradcheck`` in float64 on the device. Float64 is not a Triton
                 dtype, so this runs the reference backend through the op's autograd and
                 dispatch; the Triton gradients are the ``correctness`` stage's job
``compile``      ``torch.compile(fullgraph=True, backend="inductor")`` of a block with normkit's
                 LayerNorm (prenorm) and RMSNorm: same outputs and gradients as eager, and the
                 Triton kernels called inside the graph
``kernels``      forward, backward, fwd+bwd timed with :mod:`normkit.bench` (CUDA events, L2
                 flushed) against torch eager, ``torch.compile``, and Liger-Kernel and QuACK when
                 importable; GB/s and % of a device-to-device copy measured in the same run.
                 layer_norm and rms_norm at rows {4096, 16384, 65536} x widths {1024, 4096,
                 8192, 16384}, the fused residual variants at 16384 rows; bf16, then fp32. Each
                 shape's normkit output is first checked against float64 (first and last
                 rows). torch.compile, Liger and QuACK each get a share of the stage's time
``rnn``          LayerNormLSTM / LayerNormGRU against ``torch.nn.LSTM`` / ``GRU`` (cuDNN) at the
                 three shapes of ``benchmarks/bench_rnn.py``; the fused path checked against
                 the per-step reference
``suite``        ``tests/test_triton_backend.py`` under pytest on the device, in a subprocess
                 with the time that is left (dry: a small subset)

Exit status: 0 when every check that ran gave the right answer (skipped cells do not fail it);
1 on any wrong result or error in normkit; 2 for bad usage.

Installing. ``make gpu-check`` first runs ``make install`` (pinned ``constraints.txt``), then
installs Liger-Kernel and QuACK pinned by ``constraints-gpu.txt`` (optional: a failed install
is recorded and the check goes on). ``torch==2.13.0`` from PyPI is a CUDA build on Linux x86-64,
but on a machine whose pip finds the CPU wheel first (the project machines' wheel cache) the
venv gets ``+cpu`` and the check says "no CUDA device". The one extra step there: put the CUDA
build of torch 2.13.0 into ``.venv`` (with a registry: ``.venv/bin/pip install --force-reinstall
torch==2.13.0 --index-url https://download.pytorch.org/whl/cuXXX``, the CUDA version the driver
takes; offline, its wheel must be carried, and with its nvidia-* libraries that is gigabytes).
On a machine without a registry whose Python already has a CUDA torch, Triton and rich
(an image with PyTorch preinstalled), skip ``make`` and run this file with that Python::

    python3 benchmarks/gpu_check.py --out gpu-check

It finds normkit in ``src/`` when it is not installed, and the record states the torch and
Triton versions that ran next to the pinned ones, so a run on other versions is marked as such.
Liger-Kernel and QuACK can only come along there as carried wheels; without them those columns
are recorded as skipped. ``--cells REGEX`` reruns only the cells whose name matches (the rest
are recorded as not selected), e.g. the failures of a previous run.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
NVIDIA_DEVICE = "/dev/nvidia0"  # present where an NVIDIA driver exposes a GPU, whatever torch sees
STAGES = ("correctness", "determinism", "gradcheck", "compile", "kernels", "rnn", "suite")


@dataclass(frozen=True)
class Plan:
    """Sizes and time budgets for one mode; the defaults carry the reason for their size."""

    budget_s: float  # the whole run; each stage also stops at its own budget
    stage_budget_s: Dict[str, float]
    # correctness: widths of the main sweep (both kernels: rows fit on chip up to 16K forward /
    # 8K backward, wider rows loop), rows per width, and the wide width of the special cases
    widths: Tuple[int, ...]
    rows: Callable[[int], int]
    wide: int
    determinism_shapes: Tuple[Tuple[int, int], ...]
    compile_shape: Tuple[int, int]
    # kernels: (ops, rows) pairs, each crossed with the widths and dtypes, timed in this order
    # (dtype, then op, width, rows), so a budget that runs out cuts the end of the list
    kernel_sweep: Tuple[Tuple[Tuple[str, ...], Tuple[int, ...]], ...]
    kernel_widths: Tuple[int, ...]
    kernel_dtypes: Tuple[str, ...]
    warmup: int
    repeats: int
    copy_bytes: int
    # share of the kernels stage each costly comparison may use (compiles, not kernels, cost)
    impl_share: Dict[str, float] = field(default_factory=lambda: {"compile": 0.3, "liger": 0.15, "quack": 0.15})
    rnn_shapes: Tuple[Tuple[int, int, int], ...] = ()
    suite_select: Optional[str] = None  # pytest -k expression; None: the whole file


PLANS = {
    # 270 s (Python start-up included) leaves 30 s of the 5 minutes for the one cell that may
    # start just before the deadline, and the report. The first call of each kernel variant
    # compiles it (about a second), which is most of what the budgets pay for.
    "gpu": Plan(
        budget_s=270,
        stage_budget_s={"correctness": 80, "determinism": 10, "gradcheck": 10, "compile": 30,
                        "kernels": 100, "rnn": 15, "suite": 60},
        widths=(1, 3, 1000, 4097, 8192, 16384, 65536),
        rows=lambda n: 512 if n <= 4097 else (128 if n <= 16384 else 32),
        wide=65536,
        determinism_shapes=((16384, 4096), (1024, 65536)),
        compile_shape=(4096, 1024),
        # issue 17's rows x widths for the plain norms; the fused residual variants at one row
        # count (all four ops on the full grid are 96 shapes: more than the budget times)
        kernel_sweep=((("layer_norm", "rms_norm"), (4096, 16384, 65536)),
                      (("add_layer_norm", "add_rms_norm"), (16384,))),
        kernel_widths=(1024, 4096, 8192, 16384),
        kernel_dtypes=("bfloat16", "float32"),
        warmup=3,
        repeats=10,
        copy_bytes=2**30,
        rnn_shapes=(),  # benchmarks/bench_rnn.py's SHAPES
    ),
    # Interpreted Triton runs each program in Python: a few rows, one looped width (8200 loops in
    # backward), one kernel shape. The dry run takes 40-90 s on the 2-core project machine with
    # warm caches, and about 3 minutes on a fresh clone of a busy one (inductor compiles
    # its C++); the budgets leave that slack, since the dry run checks
    # the script, not speed (tests/test_gpu_check.py asserts that every stage checked something).
    "dry": Plan(
        budget_s=540,
        stage_budget_s={"correctness": 120, "determinism": 30, "gradcheck": 20, "compile": 120,
                        "kernels": 60, "rnn": 90, "suite": 100},
        widths=(1, 3, 257, 8200),
        rows=lambda n: 3 if n > 4096 else 19,
        wide=8200,
        determinism_shapes=((48, 96), (2, 8200)),
        compile_shape=(5, 24),
        kernel_sweep=((("layer_norm",), (8,)), (("add_rms_norm",), (8,))),
        kernel_widths=(64,),
        kernel_dtypes=("bfloat16", "float32"),
        warmup=1,
        repeats=2,
        copy_bytes=8 * 2**20,
        impl_share={"compile": 0.0},  # inductor on CPU costs seconds a graph: shown skipped
        rnn_shapes=((4, 2, 8), (3, 1, 16), (5, 3, 4)),
        suite_select="strided_inputs or dropout_mask_is_a_function",
    ),
}


# --- the record: stages and cells -------------------------------------------------------------


class Stage:
    """One stage's cells, each checked or skipped against the stage's and the run's deadline."""

    def __init__(self, name: str, budget_s: float, run_deadline: float, select: Optional[str] = None):
        self.name, self.budget_s = name, budget_s
        self.select = re.compile(select) if select else None
        self.t0 = time.perf_counter()
        self.deadline = min(self.t0 + budget_s, run_deadline)
        self.run_deadline = run_deadline
        self.cells: List[dict] = []
        self.note: Optional[str] = None

    def time_left(self) -> float:
        return self.deadline - time.perf_counter()

    def skip_reason(self) -> Optional[str]:
        now = time.perf_counter()
        if now >= self.run_deadline:
            return "time budget of the whole run spent"
        if now >= self.deadline:
            return f"time budget of the stage ({self.budget_s:.0f} s) spent"
        return None

    def skip(self, name: str, reason: str) -> None:
        self.cells.append({"name": name, "status": "skipped", "reason": reason})

    def check(self, name: str, fn: Callable[[], Optional[dict]]) -> Optional[dict]:
        """Run ``fn`` unless time is up. An ``AssertionError`` is a wrong result (``fail``),
        any other exception an ``error``; ``fn`` may return details to record."""
        reason = self.skip_reason()
        if self.select is not None and not self.select.search(name):
            reason = "not selected by --cells"
        if reason is not None:
            self.skip(name, reason)
            return None
        t = time.perf_counter()
        cell: dict = {"name": name}
        try:
            cell.update(fn() or {})
            cell["status"] = "pass"
        except AssertionError as exc:
            cell.update(status="fail", message=_first_lines(exc))
        except Exception as exc:  # one broken cell must not end the run
            cell.update(status="error", message=f"{type(exc).__name__}: {_first_lines(exc)}")
        cell["wall_s"] = round(time.perf_counter() - t, 3)
        self.cells.append(cell)
        if cell["status"] != "pass":
            print(f"gpu-check: {self.name}: {name}: {cell['status'].upper()}: {cell['message']}", file=sys.stderr)
        return cell

    def as_dict(self) -> dict:
        counts = {k: sum(c["status"] == k for c in self.cells) for k in ("pass", "fail", "error", "skipped")}
        if counts["fail"] or counts["error"]:
            status = "fail"
        elif counts["pass"] == 0:
            status = "skipped"
        else:
            status = "partial" if counts["skipped"] else "pass"
        return {"status": status, "counts": counts, "budget_s": self.budget_s,
                "wall_s": round(time.perf_counter() - self.t0, 2), "note": self.note, "cells": self.cells}


def _first_lines(exc: BaseException, n: int = 3) -> str:
    return " | ".join(str(exc).strip().splitlines()[:n]) or type(exc).__name__


# --- environment --------------------------------------------------------------------------------


def _import_normkit() -> bool:
    """Import normkit, from ``src/`` when it is not installed; True when ``src/`` was used."""
    try:
        import normkit  # noqa: F401
        return False
    except ImportError:
        sys.path.insert(0, str(REPO / "src"))
        import normkit  # noqa: F401
        return True


def _pins() -> Dict[str, str]:
    pins = {}
    for path in ("constraints.txt", "constraints-gpu.txt"):
        try:
            for line in (REPO / path).read_text().splitlines():
                m = re.match(r"^\s*([A-Za-z0-9_.-]+)==([^\s#]+)", line)
                if m:
                    pins[m.group(1).lower()] = m.group(2)
        except OSError:
            pass
    return pins


def _commit() -> Optional[str]:
    try:
        sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if not sha:
            return None
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def install_optional(timeout_s: float = 300) -> Dict[str, str]:
    """pip-install Liger-Kernel and QuACK under both constraints files, each on its own (one
    failing must not stop the other); returns what happened to each. Outside the check's budget."""
    out = {}
    for name in ("liger-kernel", "quack-kernels"):
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--retries", "1", "--timeout", "30", "-c", str(REPO / "constraints.txt"),
               "-c", str(REPO / "constraints-gpu.txt"), name]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
            out[name] = "installed" if r.returncode == 0 else "pip failed: " + _first_lines(RuntimeError(r.stderr[-600:]), 2)
        except (OSError, subprocess.SubprocessError) as exc:
            out[name] = f"pip failed: {type(exc).__name__}: {exc}"
    return out


# --- entry point --------------------------------------------------------------------------------


def _write(out: Path, record: dict, markdown: Callable[[dict], str], t_start: float, final: bool) -> None:
    record["wall_s"] = round(time.perf_counter() - t_start, 1)
    record["failures"] = [f"{name}: {c['name']}: {c['status']}: {c.get('message', '')}"
                          for name, st in record["stages"].items() for c in st["cells"]
                          if c["status"] in ("fail", "error")]
    record["status"] = "fail" if record["failures"] else ("pass" if final else "incomplete")
    (out / "gpu-check.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    (out / "gpu-check.md").write_text(markdown(record))


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu-check", help="folder for gpu-check.json and gpu-check.md (default: gpu-check/)")
    p.add_argument("--dry", action="store_true",
                   help="no GPU needed: CPU tensors through Triton's interpreter, tiny sizes")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole run (default: 270 on a GPU, 540 dry); stages stop early to fit")
    p.add_argument("--commit", default=None,
                   help="the commit being checked, for a copy of the tree without .git (default: git rev-parse HEAD)")
    p.add_argument("--stages", default="all", help=f"comma-separated subset of {', '.join(STAGES)} (default: all)")
    p.add_argument("--cells", default=None, metavar="REGEX",
                   help="check only the cells whose name matches (e.g. to rerun failures); others are skipped")
    p.add_argument("--install-optional", action="store_true",
                   help="on a CUDA machine, first pip-install Liger-Kernel and QuACK (constraints-gpu.txt)")
    # Tests only: perturb the Triton backend's output so the check must fail (a check that
    # cannot fail proves nothing).
    p.add_argument("--inject-fault", choices=("forward", "backward"), default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    stages = list(STAGES) if "all" in stages else stages
    bad = [s for s in stages if s not in STAGES]
    if bad or not stages:
        p.error(f"--stages: unknown {', '.join(bad) or 'empty list'}; expected a subset of {', '.join(STAGES)}")
    args.stages = stages
    if args.budget is not None and args.budget <= 0:
        p.error(f"--budget must be positive, got {args.budget}")
    if args.cells is not None:
        try:
            re.compile(args.cells)
        except re.error as exc:
            p.error(f"--cells: not a regular expression ({exc}): {args.cells!r}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.dry and os.environ.get("TRITON_INTERPRET") != "1":
        # Triton decides at import whether to interpret, and `import torch` may import it.
        env = dict(os.environ, TRITON_INTERPRET="1")
        cmd = [sys.executable, os.path.abspath(__file__)] + list(sys.argv[1:] if argv is None else argv)
        return subprocess.run(cmd, env=env).returncode
    t_begin = time.perf_counter()
    import torch

    if not args.dry:
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "cpu build"
            if os.path.exists(NVIDIA_DEVICE):  # a GPU this torch cannot use: the check did not run
                print(f"gpu-check: {NVIDIA_DEVICE} exists but torch {torch.__version__} ({build}) sees no CUDA "
                      f"device; install torch's CUDA build (see benchmarks/gpu_check.py); nothing checked",
                      file=sys.stderr)
                return 1
            print(f"gpu-check: no CUDA device here (torch {torch.__version__}, {build}); nothing to check. "
                  f"`make gpu-check-dry` runs the same check on CPU.")
            return 0
        if os.environ.get("TRITON_INTERPRET") == "1":
            print("gpu-check: TRITON_INTERPRET=1 is set; unset it to run the kernels on the GPU "
                  "(or use --dry)", file=sys.stderr)
            return 2
    t_install = time.perf_counter()
    optional = install_optional() if args.install_optional and not args.dry else None
    # The budget counts from the start, less the optional installs (they need a registry).
    install_s = time.perf_counter() - t_install
    t_start = t_begin + install_s
    from_src = _import_normkit()
    sys.path[:0] = [str(REPO / "tests"), str(REPO / "benchmarks")]
    import gpu_check_stages as S  # noqa: E402  (needs the paths above)

    mode = "dry" if args.dry else "gpu"
    plan = PLANS[mode]
    budget = args.budget or plan.budget_s
    run_deadline = t_start + budget
    device = "cpu" if args.dry else "cuda"
    record = S.environment(device, mode)
    record.update(commit=args.commit or _commit(), pins=_pins(), normkit_from_src=from_src, optional_install=optional,
                  install_s=round(install_s, 1),
                  command=" ".join(["python benchmarks/gpu_check.py"] + list(sys.argv[1:] if argv is None else argv)),
                  budget_s=budget, started_utc=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record["stages"] = stages = {}
    unavailable = S.get_backend("triton").unavailable_reason()
    if unavailable is not None:  # nothing can be checked: say why, in the record too
        record["stages"]["setup"] = {"status": "fail", "counts": {"pass": 0, "fail": 0, "error": 1, "skipped": 0},
                                     "budget_s": 0, "wall_s": 0, "note": None,
                                     "cells": [{"name": "triton backend", "status": "error", "message": unavailable}]}
        _write(out, record, S.markdown, t_start, final=True)
        print(f"gpu-check: FAIL: the Triton backend cannot run here: {unavailable}", file=sys.stderr)
        return 1
    with S.forced_triton(args.inject_fault):
        for name in args.stages:
            stage = Stage(name, plan.stage_budget_s[name], run_deadline, args.cells)
            print(f"gpu-check: {name} (budget {stage.budget_s:.0f} s, {run_deadline - time.perf_counter():.0f} s "
                  f"left of the run)", file=sys.stderr, flush=True)
            try:
                extra = S.RUNNERS[name](stage, plan, device, from_src)
            except Exception as exc:  # the stage's own set-up broke: record it, go on
                stage.cells.append({"name": "(stage set-up)", "status": "error",
                                    "message": f"{type(exc).__name__}: {_first_lines(exc)}"})
                extra = None
            stages[name] = stage.as_dict()
            if extra:
                record[name] = extra
            # written after every stage, so a run killed from outside still leaves its record
            _write(out, record, S.markdown, t_start, final=name == args.stages[-1])
    failed = record["failures"]
    skipped = sum(st["counts"]["skipped"] for st in stages.values())
    checked = sum(st["counts"]["pass"] + st["counts"]["fail"] + st["counts"]["error"] for st in stages.values())
    print(f"gpu-check ({mode}): {record['status'].upper()}: {checked} cells checked, {len(failed)} wrong, "
          f"{skipped} skipped, in {record['wall_s']:.0f} s; wrote {out / 'gpu-check.json'} and {out / 'gpu-check.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
