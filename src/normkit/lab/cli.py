"""``normkit lab``: run the experiments that test layer normalization's claims, and report.

    normkit lab [EXPERIMENT ...] [--quick | --full] [--seeds N] [--out DIR] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rich.console import Console

from normkit.lab.config import DEFAULT_SEEDS, PRESET_NAMES
from normkit.lab.experiments import EXPERIMENTS

__all__ = ["add_arguments", "run"]


def _positive(flag: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be an integer >= 1, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{flag} must be an integer >= 1, got {value}")
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiments", nargs="*", metavar="EXPERIMENT",
                        help=f"experiments to run (default: all): {', '.join(EXPERIMENTS)}")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="preset", action="store_const", const="quick",
                      help="small models, few steps, 12-16 test seeds per arm after a learning-rate sweep per arm on tuning seeds: "
                           "all nine experiments within 10 minutes on 2 cores (default)")
    size.add_argument("--full", dest="preset", action="store_const", const="full",
                      help="larger models, more steps, wider sweeps: hours (python -m normkit.lab.estimate --preset full)")
    # tests use a seconds-long preset whose numbers mean nothing
    size.add_argument("--preset", dest="preset", choices=PRESET_NAMES, help=argparse.SUPPRESS)
    parser.set_defaults(preset="quick")
    parser.add_argument("--seeds", type=_positive("--seeds"), default=None, metavar="N",
                        help=f"test seeds per arm, >= 1, for every experiment (default: each experiment's own, {DEFAULT_SEEDS} where "
                             "runs are cheap; a test needs >= 2); tuning seeds are separate")
    parser.add_argument("--out", type=Path, default=Path("lab-report"), metavar="DIR", help="output directory (default lab-report/)")
    parser.add_argument("--threads", type=_positive("--threads"), default=1, metavar="N",
                        help="torch (and normkit kernel) threads (default 1: the lab's models are small, "
                             "and one thread is robust on a shared machine)")


def run(args: argparse.Namespace) -> int:
    names = list(dict.fromkeys(args.experiments)) or list(EXPERIMENTS)
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        print(f"normkit lab: unknown experiment {', '.join(map(repr, unknown))}; expected one of {', '.join(EXPERIMENTS)}", file=sys.stderr)
        return 2
    from normkit.lab.report import print_summary
    from normkit.lab.runner import run_lab

    console = Console()
    console.print(f"normkit lab: {', '.join(names)} — preset {args.preset}, {args.seeds or 'per-experiment'} test seed(s), "
                  f"{args.threads} thread(s), output {args.out}/")
    start = time.perf_counter()
    results = run_lab(names, args.preset, args.seeds, args.out, console, threads=args.threads)
    print_summary(results, console)
    console.print(f"total {time.perf_counter() - start:.1f} s (this process's CPU time {results.get('cpu_s', 0):.1f} s); report: {args.out / 'report.html'} (and report.md, results.json)")
    return 0
