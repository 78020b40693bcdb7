"""Bit reinterpretation between float32 and 32-bit integers inside numba kernels.

LLVM ``bitcast`` intrinsics: numba has no ``view`` for scalars, and going through a one-element
array defeats vectorization. Used by the numba backend's bfloat16 conversion
(:mod:`normkit.backends.numba_kernels`).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

__all__ = ["f32_as_u32", "u32_as_f32"]


@intrinsic
def u32_as_f32(typingctx, i):
    """Reinterpret the low 32 bits of an integer as a float32."""
    if not isinstance(i, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        v = args[0]
        width = sig.args[0].bitwidth
        if width > 32:
            v = builder.trunc(v, ir.IntType(32))
        elif width < 32:
            v = builder.zext(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())

    return types.float32(i), codegen


@intrinsic
def f32_as_u32(typingctx, f):
    """The bits of a float32 as a uint32."""
    if not isinstance(f, types.Float) or f.bitwidth != 32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(f), codegen
