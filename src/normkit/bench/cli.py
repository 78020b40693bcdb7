"""``normkit bench``: kernel speed against the memory bandwidth and against PyTorch.

Four suites:

* ``kernels`` (the default): each op's kernel on 64 MiB tensors, GB/s against the copy
  bandwidth and against torch eager / ``torch.compile`` (:mod:`normkit.bench.runner`);
* ``shapes``: ``normkit.nn`` modules against ``torch.nn``'s at the shapes models use, 1 to 4096
  rows, 1 and 2 threads, interleaved pairs (:mod:`normkit.bench.shapes`);
* ``options``: each fused option's call against a copy of its input and against the bytes one
  fused pass must move (:mod:`normkit.bench.options`);
* ``compile``: a pre-LN transformer block and a tiny Llama converted to normkit, compiled,
  training steps against the compiled torch originals, interleaved pairs
  (:mod:`normkit.bench.compile_suite`).

Examples::

    normkit bench                                   # CPU sweep, float32, widths 256..16384
    normkit bench --quick --no-compile              # a few tiny shapes, seconds
    normkit bench --ops layer_norm --directions fwd --widths 4096 --rows 4096
    normkit bench --rows 1,8 --widths 256,4096      # the inference case
    normkit bench --device cuda --json gpu.json --plot gpu.png
    normkit bench --backend reference               # force a normkit backend
    normkit bench --suite shapes --json shapes.json # module vs module, the whole grid (~3 min)
    normkit bench --suite shapes --quick            # the same in seconds (a smoke test)
    normkit bench --suite shapes --ops layer_norm --modes inference --rows 1,8 --threads 1
    normkit bench --suite options --json options.json  # each fused option against a copy and its one-pass ideal
    normkit bench --suite compile --json compile.json  # compiled converted models against compiled torch (~5 min)
    normkit bench --suite compile --quick --models block  # the same in seconds (a smoke test)

The same harness runs from ``benchmarks/bench_norm.py``. See :mod:`normkit.bench` for what
is measured and how.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time
from typing import List, Optional, Sequence

import torch

from normkit.bench import cases as C
from normkit.bench import shapes as S
from normkit.bench.copy_bandwidth import copy_bandwidth, default_nbytes
from normkit.bench.impls import implementations
from normkit.bench.report import (
    print_shapes,
    print_table,
    render_markdown,
    write_json,
    write_plot,
)
from normkit.bench.runner import machine_info, run_cases

DESCRIPTION = "measure kernel speed against the memory bandwidth and PyTorch"
DEFAULTS = {  # device -> (dtypes, warmup, repeats)
    "cpu": (("float32",), 3, 10),
    "cuda": (("bfloat16", "float32"), 10, 30),
}
QUICK_WARMUP, QUICK_REPEATS = 1, 3
SUITES = ("kernels", "shapes", "options", "compile")
# Options that only one suite reads: naming one with the other suite is an error, not a no-op.
KERNELS_ONLY = ("directions", "plot", "no_compile", "no_third_party")
SHAPES_ONLY = ("threads", "modes", "cell_seconds")


class UsageError(ValueError):
    """A bad option value: reported in one line, exit status 2."""


def _csv(text: str) -> List[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _ints(text: str, what: str) -> List[int]:
    try:
        values = [int(t) for t in _csv(text)]
    except ValueError:
        raise UsageError(f"--{what} expects comma-separated positive integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise UsageError(f"--{what} expects comma-separated positive integers, got {text!r}")
    return values


def _choices(text: str, allowed: Sequence[str], what: str) -> List[str]:
    values = _csv(text)
    if "all" in values:
        return list(allowed)
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise UsageError(f"--{what}: unknown {', '.join(map(repr, bad)) or 'empty list'}; expected "
                         f"a comma-separated subset of {', '.join(allowed)} (or all)")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", default="kernels",
                        help="kernels (default): each kernel's GB/s against the copy bandwidth and torch; "
                             "shapes: normkit.nn modules against torch.nn's at rows 1..4096 x widths "
                             "768, 1024, 4096, 1 and 2 threads, interleaved pairs (cpu); "
                             "options: each fused option against a copy and its one-pass ideal (cpu); "
                             "compile: a converted transformer block and tiny Llama, compiled, training "
                             "steps against the compiled torch originals (cpu)")
    parser.add_argument("--models", default=None,
                        help="compile suite: comma-separated subset of block, llama (default: both)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where to run (default: cpu); cuda also compares Liger-Kernel and QuACK when installed")
    parser.add_argument("--dtype", default=None,
                        help="comma-separated dtypes: float32, bfloat16, float16 "
                             "(default: float32 on cpu; bfloat16,float32 on cuda)")
    parser.add_argument("--ops", default="all",
                        help=f"comma-separated subset of {', '.join(C.OPS)} (default: all; "
                             f"--suite shapes: {', '.join(S.OPS)})")
    parser.add_argument("--directions", default=None,
                        help=f"comma-separated subset of {', '.join(C.DIRECTIONS)} (default: all; kernels suite)")
    parser.add_argument("--modes", default=None,
                        help=f"shapes suite: comma-separated subset of {', '.join(S.MODES)} (default: all)")
    parser.add_argument("--threads", default=None,
                        help="shapes suite: comma-separated torch thread counts (default: 1,2); "
                             "compile suite: one count (default: 1)")
    parser.add_argument("--cell-seconds", type=float, default=None,
                        help=f"shapes suite: seconds of timed pairs per cell (default {S.Settings.cell_seconds}, "
                             f"at least {S.Settings.min_pairs} pairs); compile suite: per model and variant "
                             f"(default 20)")
    parser.add_argument("--widths", default=None,
                        help="comma-separated widths N (default: cpu 256,1024,4096,16384; "
                             "cuda 1024,2048,...,65536; shapes suite 768,1024,4096)")
    parser.add_argument("--rows", default=None,
                        help="comma-separated row counts M, crossed with the widths (default: cpu "
                             "2**24/N rows, i.e. 64 MiB per fp32 tensor; cuda 4096..32768 up to 2**28 elements; "
                             "shapes suite 1,8,128,1024,4096)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed samples per measurement; the median is reported (default: cpu 10, cuda 30; "
                             "shapes suite: exactly this many pairs per cell instead of --cell-seconds)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed calls before timing, compilation included (default: cpu 3, cuda 10)")
    parser.add_argument("--backend", default=None,
                        help="force a normkit backend (e.g. cpu, triton, reference); default: the device's default")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="write all results as JSON to PATH ('-' for stdout; the table then goes to stderr)")
    parser.add_argument("--markdown", metavar="PATH", default=None,
                        help="write the tables as markdown to PATH (as benchmarks/json_to_markdown.py renders them)")
    parser.add_argument("--plot", metavar="PATH.png", default=None, help="write a plot of GB/s against width")
    parser.add_argument("--quick", action="store_true",
                        help="a few tiny shapes, 1 warm-up and 3 repeats: a smoke test in seconds")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile comparison")
    parser.add_argument("--no-third-party", action="store_true", help="skip Liger-Kernel and QuACK on cuda")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random inputs (default: 0)")
    parser.add_argument("--quiet", action="store_true", help="no per-case progress lines on stderr")


def _check_device(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            f"--device cuda needs a CUDA GPU, but torch.cuda.is_available() is False "
            f"(torch {torch.__version__}); run on a GPU machine or use --device cpu"
        )


def _backend_context(name: Optional[str]):
    if name is None:
        return contextlib.nullcontext()
    from normkit.backends import get_backend, use_backend

    try:  # checked here: use_backend itself raises only when its block is entered
        reason = get_backend(name).unavailable_reason()
    except ValueError as exc:
        raise UsageError(f"--backend: {exc}") from None
    if reason is not None:
        raise UsageError(f"--backend {name} is not available here: {reason}")
    return use_backend(name)


def build_plan(args: argparse.Namespace):
    """Validated ``(cases, warmup, repeats, dtypes)`` from the parsed options."""
    device = args.device
    d_dtypes, d_warmup, d_repeats = DEFAULTS[device]
    try:
        dtypes = [C.parse_dtype(d) for d in (_csv(args.dtype) if args.dtype else d_dtypes)]
    except ValueError as exc:
        raise UsageError(f"--dtype: {exc}") from None
    if not dtypes:
        raise UsageError("--dtype: empty list")
    ops = _choices(args.ops, C.OPS, "ops")
    directions = _choices(args.directions or "all", C.DIRECTIONS, "directions")
    widths = _ints(args.widths, "widths") if args.widths else None
    rows = _ints(args.rows, "rows") if args.rows else None
    warmup = args.warmup if args.warmup is not None else (QUICK_WARMUP if args.quick else d_warmup)
    repeats = args.repeats if args.repeats is not None else (QUICK_REPEATS if args.quick else d_repeats)
    if warmup < 0 or repeats < 1:
        raise UsageError(f"--warmup must be >= 0 and --repeats >= 1, got {warmup} and {repeats}")
    cases = []
    for dtype in dtypes:
        if args.quick and widths is None and rows is None:
            shapes = list(C.QUICK_SHAPES)
        elif args.quick and rows is None:
            shapes = [(C.QUICK_SHAPES[0][0], n) for n in widths]
        else:
            shapes = C.default_shapes(device, dtype, widths, rows)
        cases += C.make_cases(ops, directions, shapes, dtype)
    return cases, warmup, repeats, dtypes


def _progress(total: int, out):
    state = {"i": 0, "t0": time.perf_counter()}

    def on_result(row: dict) -> None:
        state["i"] += 1
        parts = []
        for name, e in row["impls"].items():
            if "gbps" in e:
                parts.append(f"{name} {e['gbps']:.1f}")
            elif "error" in e:
                parts.append(f"{name} error")
        print(f"[{state['i']}/{total} {time.perf_counter() - state['t0']:.0f}s] {row['op']} {row['direction']} "
              f"{row['rows']}x{row['width']} {row['dtype']}: GB/s " + ", ".join(parts), file=out, flush=True)

    return on_result


def command_line(args: argparse.Namespace) -> str:
    """The ``normkit bench`` command that reproduces ``args`` (recorded in the JSON)."""
    suite = getattr(args, "suite", "kernels")
    parts = ["normkit bench"] + ([f"--suite {suite}"] if suite != "kernels" else []) + [f"--device {args.device}"]
    for opt in ("dtype", "ops", "models", "directions", "modes", "threads", "cell_seconds", "widths", "rows", "repeats",
                "warmup", "backend", "json", "markdown", "plot"):
        value = getattr(args, opt, None)
        if value is not None and not (opt in ("ops", "directions") and value == "all"):
            parts.append(f"--{opt.replace('_', '-')} {value}")
    if args.seed:
        parts.append(f"--seed {args.seed}")
    parts += [f"--{flag.replace('_', '-')}" for flag in ("quick", "no_compile", "no_third_party") if getattr(args, flag)]
    return " ".join(parts)


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except UsageError as exc:
        print(f"normkit bench: {exc}", file=sys.stderr)
        return 2


def _check_suite_options(args: argparse.Namespace) -> str:
    suite = getattr(args, "suite", "kernels")
    if suite not in SUITES:
        raise UsageError(f"--suite: unknown {suite!r}; expected one of {', '.join(SUITES)}")
    if suite == "options":  # reads --rows, --widths (one each), --threads, --seed, --quick, --json, --markdown
        for opt in KERNELS_ONLY + ("modes", "cell_seconds", "models"):
            if getattr(args, opt, None) not in (None, False):
                raise UsageError(f"--{opt.replace('_', '-')} does not apply to --suite options")
        return suite
    if suite == "compile":  # reads --models, --threads, --cell-seconds, --warmup, --seed, --quick, --json, --markdown
        for opt in KERNELS_ONLY + ("modes", "dtype", "rows", "widths", "repeats", "backend"):
            if getattr(args, opt, None) not in (None, False):
                raise UsageError(f"--{opt.replace('_', '-')} does not apply to --suite compile")
        if args.ops != "all":
            raise UsageError("--ops does not apply to --suite compile (it times whole models: --models)")
        return suite
    if getattr(args, "models", None) is not None:
        raise UsageError(f"--models applies to --suite compile, not --suite {suite}")
    other, foreign = ("shapes", SHAPES_ONLY) if suite == "kernels" else ("kernels", KERNELS_ONLY)
    for opt in foreign:
        value = getattr(args, opt, None)
        if value not in (None, False):
            raise UsageError(f"--{opt.replace('_', '-')} applies to --suite {other}, not --suite {suite}")
    return suite


def _run(args: argparse.Namespace) -> int:
    suite = _check_suite_options(args)
    if suite == "shapes":
        return _run_shapes(args)
    if suite == "options":
        return _run_options(args)
    if suite == "compile":
        return _run_compile(args)
    _check_device(args.device)
    cases, warmup, repeats, _ = build_plan(args)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("--plot needs matplotlib (pip install 'normkit[lab]')") from None
    device = args.device
    table_out = sys.stderr if args.json == "-" else sys.stdout
    with _backend_context(args.backend):
        impls = implementations(device, compile=not args.no_compile, third_party=not args.no_third_party)
        copy = copy_bandwidth(device, default_nbytes(device, args.quick),
                              warmup=max(1, warmup), repeats=max(3, repeats))
        if not args.quiet:
            print(f"copy bandwidth: {copy.gbps:.1f} GB/s; measuring {len(cases)} cases", file=sys.stderr, flush=True)
        results = run_cases(cases, impls, device, copy.gbps, warmup=warmup, repeats=repeats, seed=args.seed,
                            on_result=None if args.quiet else _progress(len(cases), sys.stderr))
        # Measured again at the end: a change means the machine's load changed during the run.
        copy_end = copy_bandwidth(device, copy.nbytes, warmup=max(1, warmup), repeats=max(3, repeats))
    doc = {
        "command": command_line(args),
        "machine": machine_info(device),
        "config": {"device": device, "warmup": warmup, "repeats": repeats, "backend": args.backend,
                   "compile": not args.no_compile, "quick": args.quick, "seed": args.seed},
        "copy_bandwidth": {**copy.as_dict(), "end_gbps": copy_end.gbps},
        "implementations": {i.name: i.unavailable or "available" for i in impls},
        "results": results,
    }
    print_table(doc, file=table_out)
    if args.json:
        write_json(doc, args.json)
    _write_markdown(doc, getattr(args, "markdown", None))
    if args.plot:
        write_plot(doc, args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0


def _write_markdown(doc: dict, path: Optional[str]) -> None:
    if path:
        with open(path, "w") as fh:
            fh.write(render_markdown(doc) + "\n")


def build_shapes_plan(args: argparse.Namespace):
    """Validated ``(cells, settings, dtype)`` for ``--suite shapes``."""
    if args.device != "cpu":
        raise UsageError("--suite shapes measures the CPU path (module against module, 1 and 2 threads); "
                         "use --device cpu, or --suite kernels for CUDA")
    dtypes = _csv(args.dtype) if args.dtype else ["float32"]
    if len(dtypes) != 1:
        raise UsageError(f"--dtype: --suite shapes takes one dtype, got {args.dtype!r}")
    try:
        dtype = C.parse_dtype(dtypes[0])
    except ValueError as exc:
        raise UsageError(f"--dtype: {exc}") from None
    ops = _choices(args.ops, S.OPS, "ops")
    modes = _choices(args.modes or "all", S.MODES, "modes")
    threads = _ints(args.threads, "threads") if args.threads else list(S.THREADS)
    rows = _ints(args.rows, "rows") if args.rows else list(S.QUICK_ROWS if args.quick else S.ROWS)
    widths = _ints(args.widths, "widths") if args.widths else list(S.QUICK_WIDTHS if args.quick else S.WIDTHS)
    settings = S.QUICK if args.quick else S.Settings()
    changes = {}
    if args.cell_seconds is not None:
        if not args.cell_seconds > 0:
            raise UsageError(f"--cell-seconds must be > 0, got {args.cell_seconds}")
        changes["cell_seconds"] = args.cell_seconds
    if args.repeats is not None:
        if args.repeats < 1:
            raise UsageError(f"--repeats (pairs per cell) must be >= 1, got {args.repeats}")
        changes["pairs"] = args.repeats
    if args.warmup is not None:
        if args.warmup < 0:
            raise UsageError(f"--warmup must be >= 0, got {args.warmup}")
        changes["warmup"] = args.warmup
    settings = dataclasses.replace(settings, **changes)
    return S.make_cells(ops, modes, rows, widths, threads), settings, dtype


def _shapes_progress(total: int, out):
    state = {"i": 0, "t0": time.perf_counter()}

    def on_result(c: dict) -> None:
        state["i"] += 1
        print(f"[{state['i']}/{total} {time.perf_counter() - state['t0']:.0f}s] {S.SHORT_OP[c['op']]} {c['mode']} "
              f"{c['rows']}x{c['width']} {c['threads']}t: {c['ratio']:.2f}x ({c['ci_low']:.2f}-{c['ci_high']:.2f}), "
              f"torch {c['torch_ms']:.4f} ms, normkit {c['normkit_ms']:.4f} ms, {c['pairs']} pairs",
              file=out, flush=True)

    return on_result


def _run_shapes(args: argparse.Namespace) -> int:
    cells, settings, dtype = build_shapes_plan(args)
    table_out = sys.stderr if args.json == "-" else sys.stdout
    with _backend_context(args.backend):
        load_start = S.load_average()
        if not args.quiet:
            print(f"measuring {len(cells)} cells, module against module, interleaved pairs "
                  f"(load average {load_start})", file=sys.stderr, flush=True)
        results = S.run_suite(cells, settings, dtype=dtype, seed=args.seed,
                              on_result=None if args.quiet else _shapes_progress(len(cells), sys.stderr))
        load_end = S.load_average()
    doc = {
        "suite": "shapes",
        "command": command_line(args),
        "date": S.utc_now(),
        "git": S.git_commit(),
        "machine": {**machine_info("cpu"), "load_average_start": load_start, "load_average_end": load_end},
        "config": {"dtype": C.dtype_name(dtype), "ops": _unique([c.op for c in cells]),
                   "modes": _unique([c.mode for c in cells]), "rows": _unique([c.rows for c in cells]),
                   "widths": _unique([c.width for c in cells]), "threads": _unique([c.threads for c in cells]),
                   "backend": args.backend, "quick": args.quick, "seed": args.seed,
                   **dataclasses.asdict(settings)},
        "cells": results,
        "summary": S.summarize(results),
    }
    print_shapes(doc, file=table_out)
    if args.json:
        write_json(doc, args.json, inline_lists=True)
    _write_markdown(doc, args.markdown)
    return 0


def _run_options(args: argparse.Namespace) -> int:
    """``--suite options``: each fused option's time against a copy and its fused-pass ideal."""
    from normkit.bench import options as O

    if args.device != "cpu":
        raise UsageError("--suite options measures the CPU path; use --device cpu")
    rows = _ints(args.rows, "rows") if args.rows else [64 if args.quick else 4096]
    widths = _ints(args.widths, "widths") if args.widths else [256 if args.quick else 2048]
    threads = _ints(args.threads, "threads") if args.threads else [1, 2]
    if len(rows) != 1 or len(widths) != 1:
        raise UsageError("--suite options measures one shape: give one --rows and one --widths value")
    load_start = S.load_average()

    def progress(r: dict) -> None:
        if not args.quiet:
            print(f"{r['option']} {r['threads']}t: {r['time_over_copy']:.2f}x copy ({r['ci_low']:.2f}-{r['ci_high']:.2f}), "
                  f"ideal {r['ideal']:.2f}x", file=sys.stderr, flush=True)

    results = O.run_suite(rows[0], widths[0], threads, budget_s=0.2 if args.quick else 2.0, seed=args.seed,
                          on_result=progress)
    doc = {
        "suite": "options", "command": command_line(args), "date": S.utc_now(), "git": S.git_commit(),
        "machine": {**machine_info("cpu"), "load_average_start": load_start, "load_average_end": S.load_average()},
        "results": results,
    }
    return _emit(doc, O.markdown(results), args)


def _run_compile(args: argparse.Namespace) -> int:
    """``--suite compile``: converted models, compiled, against the compiled torch originals."""
    from normkit.bench import compile_suite as CS

    if args.device != "cpu":
        raise UsageError("--suite compile measures on CPU (inductor's C++ backend); use --device cpu")
    models = _choices(args.models or "all", CS.MODELS, "models")
    threads = _ints(args.threads, "threads") if args.threads else [1]
    if len(threads) != 1:
        raise UsageError(f"--threads: --suite compile takes one thread count, got {args.threads!r}")
    changes = {"threads": threads[0], "seed": args.seed}
    if args.cell_seconds is not None:
        if not args.cell_seconds > 0:
            raise UsageError(f"--cell-seconds must be > 0, got {args.cell_seconds}")
        changes["seconds"] = args.cell_seconds
    if args.warmup is not None:
        if args.warmup < 0:
            raise UsageError(f"--warmup must be >= 0, got {args.warmup}")
        changes["warmup"] = args.warmup
    if "llama" in models:
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise UsageError("--models llama needs transformers (pip install 'normkit[tools]'); "
                             "or use --models block") from None
    settings = dataclasses.replace(CS.QUICK if args.quick else CS.Settings(), **changes)
    load_start = S.load_average()

    def progress(r: dict) -> None:
        if not args.quiet:
            print(f"{r['model']} {r['variant']}: {r['ratio']:.3f}x ({r['ci_low']:.3f}-{r['ci_high']:.3f}), "
                  f"torch {r['torch_ms']:.2f} ms, normkit {r['normkit_ms']:.2f} ms, {r['pairs']} pairs, "
                  f"loss diff {r['loss_diff']:.1e}", file=sys.stderr, flush=True)

    results = CS.run_suite(models, settings, on_result=progress)
    doc = {
        "suite": "compile", "command": command_line(args), "date": S.utc_now(), "git": S.git_commit(),
        "machine": {**machine_info("cpu"), "load_average_start": load_start, "load_average_end": S.load_average()},
        "config": {"models": models, "quick": args.quick, **dataclasses.asdict(settings)},
        "results": results,
    }
    return _emit(doc, CS.markdown(results), args)


def _emit(doc: dict, table: str, args: argparse.Namespace) -> int:
    """Print a suite's Markdown table (to stderr when the JSON goes to stdout) and write the
    JSON record and the table where ``--json`` / ``--markdown`` say."""
    print(table, file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json:
        write_json(doc, args.json, inline_lists=True)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(table + "\n")
    return 0


def _unique(values: list) -> list:
    return list(dict.fromkeys(values))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point for ``python -m normkit.bench`` and ``benchmarks/bench_norm.py``."""
    parser = argparse.ArgumentParser(prog="normkit bench", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
