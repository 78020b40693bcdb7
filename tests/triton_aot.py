"""Compile the Triton kernels ahead of time for an NVIDIA GPU that is not there.

The interpreter runs the kernels' Python, not Triton's compiler, so a kernel can pass every
interpreter test and still fail to compile (a constexpr misuse, a type mismatch). This script
compiles real variants to cubin for sm_90 with the ptxas Triton ships and prints each one's
registers and spill stack (``cuobjdump -res-usage``). Run in a process *without*
``TRITON_INTERPRET``::

    .venv/bin/python tests/triton_aot.py            # each kernel and branch once, as the test does
    .venv/bin/python tests/triton_aot.py --all      # the launch configs for widths 1K..64K
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from normkit.backends import triton_kernels as k
from normkit.backends.triton import launch_config

TARGET = GPUTarget("cuda", 90, 32)


def _compile(kernel, args: dict, num_warps: int):
    """``args``: name -> Triton type string ("*bf16", "i32", "fp32") or a constexpr value."""
    sig, const = {}, {}
    for name in kernel.arg_names:
        value = args[name]
        if isinstance(value, str):
            sig[name] = value
        else:
            sig[name], const[name] = "constexpr", value
    return triton.compile(ASTSource(kernel, sig, const), target=TARGET, options={"num_warps": num_warps})


def forward(dt, cfg, *, is_rms=False, dropout=True):
    p = f"*{dt}"
    return _compile(k._norm_fwd_kernel, dict(
        X=p, R=p, W="*fp32", B=None if is_rms else "*fp32", Y=p, S=p, MEAN=None if is_rms else "*fp32", RSTD="*fp32",
        M="i32", N="i32", eps="fp32", dropout_p="fp32", dropout_scale="fp32", seed="i32",
        IS_RMS_NORM=is_rms, HAS_RESIDUAL=True, HAS_WEIGHT=True, HAS_BIAS=not is_rms, HAS_DROPOUT=dropout,
        STORE_SUM=True, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SINGLE_PASS=cfg.single_pass), cfg.num_warps)


def backward(dt, cfg, *, is_rms=False, dropout=True):
    p = f"*{dt}"
    c = None if cfg.single_pass else "*fp32"
    return _compile(k._norm_bwd_kernel, dict(
        S=p, DY=p, DSUM=p, W="*fp32", MEAN=None if is_rms else "*fp32", RSTD="*fp32", C1=c, C2=c, DX=p, DRES=p,
        DW_PART="*fp32", DB_PART="*fp32", M="i32", N="i32", dropout_p="fp32", dropout_scale="fp32", seed="i32",
        IS_RMS_NORM=is_rms, HAS_WEIGHT=True, HAS_DSUM=True, HAS_DROPOUT=dropout,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SINGLE_PASS=cfg.single_pass), cfg.num_warps)


def row_stats(dt, cfg, *, is_rms=False):
    return _compile(k._norm_bwd_row_stats_kernel, dict(
        S=f"*{dt}", DY=f"*{dt}", W="*fp32", MEAN=None if is_rms else "*fp32", RSTD="*fp32", C1="*fp32", C2="*fp32",
        M="i32", N="i32", IS_RMS_NORM=is_rms, HAS_WEIGHT=True, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n), cfg.num_warps)


def resources(compiled) -> str:
    """``REG:n STACK:n`` of a compiled kernel, from cuobjdump on its cubin."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    return " ".join(w for w in out.split() if w.startswith(("REG:", "STACK:")))


def main(argv) -> int:
    if "--all" in argv:
        cases = [(dt, n, rms, drop) for dt in ("bf16", "fp32") for n in (1024, 4096, 8192, 16384, 65536)
                 for rms in (False, True) for drop in (False, True)]
    else:  # each kernel and each constexpr branch at least once
        cases = [("bf16", 1000, False, True), ("bf16", 1000, True, False), ("fp32", 65536, False, False), ("bf16", 65536, True, True)]
    for dt, n, is_rms, dropout in cases:
        size = 2 if dt == "bf16" else 4
        fwd = launch_config(8192, n, size, backward=False, sm_count=132, dropout=dropout)
        bwd = launch_config(8192, n, size, backward=True, sm_count=132, dropout=dropout)
        line = f"{dt} N={n:<6} rms={is_rms:d} dropout={dropout:d}"
        print(f"{line} fwd {fwd.block_m}x{fwd.block_n} w{fwd.num_warps}: {resources(forward(dt, fwd, is_rms=is_rms, dropout=dropout))}"
              f" | bwd {bwd.block_m}x{bwd.block_n} w{bwd.num_warps}: {resources(backward(dt, bwd, is_rms=is_rms, dropout=dropout))}"
              + ("" if bwd.single_pass else f" | row stats: {resources(row_stats(dt, bwd, is_rms=is_rms))}"), flush=True)
    return 0


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: this compiles the kernels, it does not interpret them")
    sys.exit(main(sys.argv[1:]))
