"""The ``normkit`` command line: one entry point, one module per subcommand.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported only when their subcommand runs, so
``normkit --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from typing import List, Optional

# name -> (module, one-line help, the extra that brings its dependencies or None)
SUBCOMMANDS = {
    "backends": ("normkit.cli_backends", "list the kernel backends available on this machine", None),
    "bench": ("normkit.bench.cli", "measure kernel speed against the memory bandwidth and PyTorch", "bench"),
    "lab": ("normkit.lab.cli", "reproduce the layer-norm paper's claims on shipped data", "lab"),
    "demo": ("normkit.demo", "what `make demo` runs: the lab's quick preset (= normkit lab --quick)", "lab"),
}


def _available() -> dict:
    """The subcommands whose module is present (the lab and bench ship in later issues)."""
    found = {}
    for name, spec in SUBCOMMANDS.items():
        try:
            present = importlib.util.find_spec(spec[0]) is not None
        except ModuleNotFoundError as exc:
            # the package is there but imports a missing extra: main() names the extra
            present = spec[2] is not None and not (exc.name or "").startswith("normkit")
        if present:
            found[name] = spec
    return found


def _usage(commands: dict) -> str:
    lines = ["usage: normkit [--version] COMMAND [options]", "", "Layer normalization and its family for PyTorch.", "", "commands:"]
    lines += [f"  {name:<10} {help_text}" for name, (_, help_text, _) in commands.items()]
    lines += ["", "Run `normkit COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = _available()
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(commands))
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(version_line())
        return 0
    if argv[0] not in commands:
        print(f"normkit: unknown command {argv[0]!r}; expected one of {', '.join(commands)}", file=sys.stderr)
        return 2
    module_name, help_text, extra = commands[argv[0]]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if extra is None or (exc.name or "").split(".")[0] == "normkit":
            raise
        print(
            f"normkit {argv[0]} needs the {exc.name!r} package, part of normkit's {extra!r} extra: "
            f"pip install 'normkit[{extra}]'",
            file=sys.stderr,
        )
        return 2
    parser = argparse.ArgumentParser(prog=f"normkit {argv[0]}", description=help_text)
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(argv[1:])) or 0)


def version_line() -> str:
    """normkit's version, the torch it runs with, and whether the compiled kernels loaded."""
    import torch

    import normkit
    from normkit.backends import cpu

    kernels = "compiled CPU kernels loaded" if cpu.extension is not None else f"no compiled CPU kernels ({cpu.unavailable_reason()})"
    return f"normkit {normkit.__version__} (torch {torch.__version__}; {kernels})"


if __name__ == "__main__":
    sys.exit(main())
