"""Facts about the machine and checkout that every recorded result carries (lab, bench), and
the thread-count context both use."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from pathlib import Path
from typing import Iterator, List, Optional

import torch

__all__ = ["cpu_model", "git_commit", "load_average", "torch_threads"]


def cpu_model() -> str:
    """The processor's model name with, on x86 Linux, its family and model numbers and widest
    vector instructions (``/proc/cpuinfo``): the same name covers several generations (an
    "AMD EPYC" VM is Zen 3 or Zen 4, AVX2 or AVX-512), and the kernels run different code on
    each. Else what :mod:`platform` says."""
    try:
        fields = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break  # the first processor's block
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    except OSError:
        fields = {}
    name = fields.get("model name")
    if not name:
        return platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        flags = set(fields.get("flags", "").split())
        isa = ("AVX-512" + (", AVX-512 BF16" if "avx512_bf16" in flags else "") if "avx512f" in flags
               else "AVX2" if "avx2" in flags else "no AVX2")
        name += f" (family {fields['cpu family']}, model {fields['model']}; {isa})"
    return name


def git_commit() -> Optional[str]:
    """The checkout's commit (``+dirty`` if tracked files changed), or ``None`` outside git."""
    root = Path(__file__).resolve().parents[2]
    try:
        run = dict(capture_output=True, text=True, timeout=10)
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], **run).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"], **run).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("+dirty" if dirty else "")) or None


def load_average() -> Optional[List[float]]:
    """The 1-, 5- and 15-minute load averages, or ``None`` where the OS has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the body with ``torch.set_num_threads(n)`` (normkit's C++ kernels use torch's
    intra-op pool), restoring the previous count afterwards.

    The lab's models are small: one thread is about as fast as two on an idle machine, and on a
    shared one it is many times faster, because a multi-threaded op waits at a barrier for a
    thread that the OS has descheduled (measured: 25-50x per training step under load).
    """
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
