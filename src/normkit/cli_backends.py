"""``normkit backends``: which kernel backends can run here, and why the others cannot;
``--explain`` shows the path and backend one call would take, and why."""

from __future__ import annotations

import argparse

import torch

from normkit.backends import _registry, get_backend

#: The recorded GPU run that verifies the Triton backend: ``(date, device, commit)`` of a
#: ``make gpu-check`` whose table is in BENCHMARKS.md, or ``None`` while there is none.
TRITON_GPU_RUN = None


def _triton_status() -> str:
    if TRITON_GPU_RUN is None:
        return (
            "triton is EXPERIMENTAL: tested only through Triton's interpreter and an ahead-of-time "
            "compile, until a recorded GPU run (date, device, commit) is in BENCHMARKS.md (make gpu-check)"
        )
    date, device, commit = TRITON_GPU_RUN
    return f"triton verified on a GPU: {device}, {date}, commit {commit} (BENCHMARKS.md)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--explain", metavar="SHAPE", help="explain the route of a call on an input of this shape, e.g. 8,512 (normalized over the last dim)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rms", action="store_true", help="rms_norm instead of layer_norm")
    parser.add_argument("--grad", action="store_true", help="the input requires grad (a training call)")
    parser.add_argument("--residual", action="store_true", help="with the fused residual")
    parser.add_argument("--dropout", type=float, default=0.0, metavar="P")


def _explain(args: argparse.Namespace) -> int:
    from normkit.backends import explain_backend
    from normkit.functional import ROUTES, route

    try:
        shape = tuple(int(d) for d in args.explain.split(","))
    except ValueError:
        print(f"normkit backends: --explain expects sizes like 8,512, got {args.explain!r}")
        return 2
    x = torch.empty(shape, dtype=getattr(torch, args.dtype), device=args.device).requires_grad_(args.grad)
    residual = torch.empty_like(x) if args.residual else None
    path = route(x, residual, None, None, args.rms, args.dropout)
    rows = x.numel() // shape[-1] if shape[-1] else 0
    print(f"{'rms_norm' if args.rms else 'layer_norm'} on {list(shape)} {args.dtype} ({args.device}):")
    print(f"  path:    {path}: {ROUTES[path]}")
    if path in ("native", "eager", "eager_no_grad", "op"):
        print(f"  backend: {explain_backend(x.detach().reshape(rows, shape[-1]), args.dropout)}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.explain:
        return _explain(args)
    for name in list(_registry):
        backend = get_backend(name)
        reason = backend.unavailable_reason()
        status = "available" if reason is None else f"unavailable: {reason}"
        default = ", ".join(backend.default_for) or "-"
        print(f"{name:<10} default for: {default:<8} {status}")
    print(_triton_status())
    return 0
