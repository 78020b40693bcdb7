"""``normkit backends``: which kernel backends can run here, and why the others cannot."""

from __future__ import annotations

import argparse

from normkit.backends import _registry, get_backend


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    for name in list(_registry):
        backend = get_backend(name)
        reason = backend.unavailable_reason()
        status = "available" if reason is None else f"unavailable: {reason}"
        default = ", ".join(backend.default_for) or "-"
        print(f"{name:<10} default for: {default:<8} {status}")
    return 0
