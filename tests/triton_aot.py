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
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from normkit.backends import triton_kernels as k
from normkit.backends.triton import launch_config

TARGET = GPUTarget("cuda", 90, 32)
_TL = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


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


def forward(dt, cfg, *, is_rms=False, dropout=True, fused=False):
    """The plain contract's variant (residual, weight, bias, stored sum), or with ``fused`` every
    option on (float32 residual and sum, x1, rowscale, weight1/bias1, stored masks)."""
    p = f"*{dt}"
    f = fused or None
    return _compile(k._fused_fwd_kernel, dict(
        X=p, R="*fp32" if fused else p, X1=f and p, ROWSCALE=f and "*fp32", W="*fp32", B="*fp32" if fused or not is_rms else None, W1=f and "*fp32",
        B1=f and "*fp32", Y=p, Y1=f and p, S="*fp32" if fused else p, MASK="*i1" if fused and dropout else None,
        MASK1="*i1" if fused and dropout else None, MEAN=None if is_rms else "*fp32", RSTD="*fp32",
        M="i32", N="i32", eps="fp32", dropout_p="fp32", dropout_scale="fp32", seed="i32", stream1="i32",
        IS_RMS_NORM=is_rms, HAS_RESIDUAL=True, HAS_X1=fused, HAS_ROWSCALE=fused, HAS_DROPOUT=dropout,
        STORE_DROPOUT_MASK=fused and dropout, HAS_W=True, HAS_B=not is_rms or fused, HAS_W1=fused, HAS_B1=fused,
        STORE_SUM=True, SUM_DTYPE=tl.float32 if fused else getattr(tl, _TL[dt]),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SINGLE_PASS=cfg.single_pass), cfg.num_warps)


def backward(dt, cfg, *, is_rms=False, dropout=True, fused=False):
    p = f"*{dt}"
    f = fused or None
    c = None if cfg.single_pass else "*fp32"
    part = "*fp32"
    return _compile(k._fused_bwd_kernel, dict(
        S="*fp32" if fused else p, DY=p, DY1=f and p, DSUM="*fp32" if fused else p, W="*fp32", W1=f and "*fp32",
        ROWSCALE=f and "*fp32", MEAN=None if is_rms else "*fp32", RSTD="*fp32", C1=c, C2=c, DX=p, DX1=f and p,
        DRES="*fp32" if fused else (p if dropout else None),
        DW_PART=part, DB_PART=part, DW1_PART=f and part, DB1_PART=f and part,
        M="i32", N="i32", dropout_p="fp32", dropout_scale="fp32", seed="i32", stream1="i32",
        IS_RMS_NORM=is_rms, HAS_DY=True, HAS_DY1=fused, HAS_DSUM=True, HAS_W=True, HAS_ROWSCALE=fused,
        HAS_DROPOUT=dropout, NEED_DX=True, NEED_DX1=fused, NEED_DRES=fused or dropout, NEED_DW=True, NEED_DB=True,
        NEED_DW1=fused, NEED_DB1=fused,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SINGLE_PASS=cfg.single_pass), cfg.num_warps)


def row_stats(dt, cfg, *, is_rms=False, fused=False):
    f = fused or None
    return _compile(k._fused_bwd_row_stats_kernel, dict(
        S="*fp32" if fused else f"*{dt}", DY=f"*{dt}", DY1=f and f"*{dt}", W="*fp32", W1=f and "*fp32",
        MEAN=None if is_rms else "*fp32", RSTD="*fp32", C1="*fp32", C2="*fp32", M="i32", N="i32",
        IS_RMS_NORM=is_rms, HAS_DY=True, HAS_DY1=fused, HAS_W=True, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n),
        cfg.num_warps)


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
        cases += [("bf16", n, False, True, True) for n in (1024, 4096, 8192, 16384)]
    else:  # each kernel and each constexpr branch at least once
        cases = [("bf16", 1000, False, True), ("bf16", 1000, True, False), ("fp32", 65536, False, False), ("bf16", 65536, True, True),
                 ("bf16", 1000, False, True, True), ("bf16", 65536, True, True, True)]
    for dt, n, is_rms, dropout, fused in [c if len(c) == 5 else (*c, False) for c in cases]:
        size = 2 if dt == "bf16" else 4
        fwd = launch_config(8192, n, size, backward=False, sm_count=132, dropout=dropout)
        bwd = launch_config(8192, n, size, backward=True, sm_count=132, dropout=dropout, second_output=fused)
        kw = dict(is_rms=is_rms, fused=fused)
        line = f"{dt} N={n:<6} rms={is_rms:d} dropout={dropout:d}" + (" all-options" if fused else "")
        print(f"{line} fwd {fwd.block_m}x{fwd.block_n} w{fwd.num_warps}: {resources(forward(dt, fwd, dropout=dropout, **kw))}"
              f" | bwd {bwd.block_m}x{bwd.block_n} w{bwd.num_warps}: {resources(backward(dt, bwd, dropout=dropout, **kw))}"
              + ("" if bwd.single_pass else f" | row stats: {resources(row_stats(dt, bwd, **kw))}"), flush=True)
    return 0


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: this compiles the kernels, it does not interpret them")
    sys.exit(main(sys.argv[1:]))
