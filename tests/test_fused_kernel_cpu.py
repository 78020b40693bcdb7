"""The C++ fused kernels (``normkit._C.fused_forward`` / ``fused_backward`` through
:class:`normkit.backends.cpu.CpuBackend`) against the contract's reference
(:func:`normkit.reference.fused_forward` / :func:`~normkit.reference.fused_backward`, given the
kernel's own dropout masks) and a float64 truth, by the rule of ``tests/helpers.py``: the
kernel's error is at most twice the reference's own error in the same dtypes, plus a floor."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from helpers import assert_close_to_truth, randn

from normkit import reference
from normkit.backends import cpu as compiled
from normkit.contract import GradNeeds, KernelSpec

pytestmark = pytest.mark.skipif(compiled.extension is None, reason="normkit._C is not built")

BACKEND = compiled.CpuBackend()
F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
SIZES = ((1, 1), (3, 3), (37, 1000), (5, 4097))

# name -> (what the call has); x's dtype comes from the test's parameter. "res" is the
# residual's dtype ("x": the input's), "sum"/"out" the sum / output dtypes ("x": the input's).
OPTIONS = {
    "plain": {},
    "residual": {"res": "x", "store_sum": True},
    "residual_f32": {"res": F32, "sum": F32, "store_sum": True},
    "x1": {"x1": True, "store_sum": True},
    "rowscale": {"rowscale": True},
    "weight1": {"w1": True, "b1": True},
    "dropout": {"p": 0.25},
    "dropout_rowscale": {"p": 0.3, "rowscale": True},
    "dropout_x1_residual": {"p": 0.1, "x1": True, "res": "x", "store_sum": True},
    "out_bf16": {"out": BF16},
    "residual_out_bf16": {"res": "x", "store_sum": True, "out": BF16},
    "out_f32": {"out": F32},
    "out_f64_residual_f64": {"out": F64, "res": F64, "sum": F32, "store_sum": True},
    "sum_f32": {"sum": F32, "store_sum": True},
    "buffers": {"res": "x", "w1": True, "store_sum": True, "buffers": True},
    "everything": {"res": F32, "sum": F32, "x1": True, "rowscale": True, "w1": True, "b1": True, "p": 0.2,
                   "store_sum": True, "buffers": True},
}


def dtype_of(v, x_dtype):
    return x_dtype if v == "x" else v


def make_call(opt, dtype, rows, n, *, is_rms=False, offset=0.0, seed=0):
    """(tensors, spec, buffers) of one contract call."""
    t = {"x": randn((rows, n), dtype, seed=seed, offset=offset)}
    res = opt.get("res")
    t["residual"] = None if res is None else randn((rows, n), dtype_of(res, dtype), seed=seed + 1)
    t["x1"] = randn((rows, n), dtype, seed=seed + 2) if opt.get("x1") else None
    t["rowscale"] = (randn((rows,), F32, seed=seed + 3).abs() + 0.5) if opt.get("rowscale") else None
    t["weight"] = randn((n,), F32, seed=seed + 4, scale=0.5, offset=1.0)
    t["bias"] = randn((n,), F32, seed=seed + 5, scale=0.5)  # RMS norm takes a bias too
    t["weight1"] = randn((n,), F32, seed=seed + 6, scale=0.5, offset=1.0) if opt.get("w1") else None
    t["bias1"] = randn((n,), F32, seed=seed + 7, scale=0.5) if opt.get("b1") else None
    sum_dtype = dtype_of(opt.get("sum", t["residual"].dtype if t["residual"] is not None else dtype), dtype)
    out_dtype = dtype_of(opt.get("out", dtype), dtype)
    spec = KernelSpec(is_rms=is_rms, eps=1e-5, dropout_p=opt.get("p", 0.0), sum_dtype=sum_dtype, out_dtype=out_dtype,
                      store_sum=opt.get("store_sum", False), store_mask=opt.get("p", 0.0) > 0)
    bufs = {}
    if opt.get("buffers"):
        bufs["out"] = torch.empty(rows, n, dtype=out_dtype)
        if t["weight1"] is not None:
            bufs["out1"] = torch.empty(rows, n, dtype=out_dtype)
        bufs["residual_out"] = torch.empty(rows, n, dtype=sum_dtype)
    return t, spec, bufs


def args(t):
    return t["x"], t["residual"], t["x1"], t["rowscale"], t["weight"], t["bias"], t["weight1"], t["bias1"]


def as64(t):
    return {k: (None if v is None else v.double()) for k, v in t.items()}


def truth_forward(t, spec, keep, keep1):
    return reference.fused_forward(*args(as64(t)), replace(spec, sum_dtype=F64, out_dtype=F64), keep, keep1)


def check_forward(opt, dtype, rows, n, *, is_rms=False, offset=0.0):
    t, spec, bufs = make_call(opt, dtype, rows, n, is_rms=is_rms, offset=offset)
    got = BACKEND.fused_forward(*args(t), spec, 1234, **bufs)
    ref = reference.fused_forward(*args(t), spec, got.mask, got.mask1)
    truth = truth_forward(t, spec, got.mask, got.mask1)
    what = f"{sorted(opt)} {dtype} {rows}x{n} rms={is_rms}"
    assert got.y.dtype == spec.out_dtype and got.y.shape == (rows, n)
    assert_close_to_truth(got.y, truth.y, ref.y, what=what + " y")
    for name in ("out", "out1", "residual_out"):
        if name in bufs:
            field = {"out": got.y, "out1": got.y1, "residual_out": got.s}[name]
            assert field.data_ptr() == bufs[name].data_ptr(), f"{what}: {name} not written in place"
    assert (got.y1 is None) == (t["weight1"] is None)
    if got.y1 is not None:
        assert_close_to_truth(got.y1, truth.y1, ref.y1, what=what + " y1")
    if spec.store_sum:
        assert got.s.dtype == spec.sum_dtype
        # the same sum in the same order, rounded once: the same bits as the reference
        torch.testing.assert_close(got.s, ref.s, rtol=0, atol=0, msg=what + " s")
    else:
        assert got.s is None
    assert (got.mean is None) == is_rms
    acc = F64 if F64 in (dtype, spec.sum_dtype) else F32
    assert got.rstd.dtype == acc and got.rstd.shape == (rows,)
    torch.testing.assert_close(got.rstd, ref.rstd, rtol=1e-4 if acc == F32 else 1e-10, atol=0)
    if not is_rms:
        assert_close_to_truth(got.mean, truth.mean, ref.mean, floor=1e-6, what=what + " mean")
    if spec.dropout_p > 0:
        assert got.mask.dtype == torch.bool and got.mask.shape == (rows, n)
        assert (got.mask1 is None) == (t["x1"] is None)
    else:
        assert got.mask is None and got.mask1 is None
    return t, spec, got


@pytest.mark.parametrize("name", sorted(OPTIONS))
@pytest.mark.parametrize("dtype", [F32, BF16, F16, F64])
@pytest.mark.parametrize("is_rms", [False, True])
def test_forward_matches_reference_and_float64(name, dtype, is_rms):
    for rows, n in SIZES:
        check_forward(OPTIONS[name], dtype, rows, n, is_rms=is_rms)


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("name", ["plain", "residual", "everything"])
def test_forward_large_mean(name, dtype):
    check_forward(OPTIONS[name], dtype, 19, 1000, offset=1e4)


def test_sum_is_input_returns_x_and_writes_nothing():
    t, spec, _ = make_call({"store_sum": True}, F32, 4, 16)
    got = BACKEND.fused_forward(*args(t), spec, 0)
    assert got.s is t["x"]


@pytest.mark.parametrize("rows, n", [(0, 8), (5, 0), (0, 0)])
def test_empty_dims(rows, n):
    t, spec, bufs = make_call(OPTIONS["everything"], F32, rows, n)
    got = BACKEND.fused_forward(*args(t), spec, 7, **bufs)
    assert got.y.shape == (rows, n) and got.y1.shape == (rows, n) and got.s.shape == (rows, n)
    assert got.mask.shape == (rows, n) and got.rstd.shape == (rows,)
    dy = torch.randn(rows, n)
    grads = BACKEND.fused_backward(dy, dy, None, got.s, t["weight"], t["weight1"], t["rowscale"], got.mean, got.rstd,
                                   spec, 7, GradNeeds(True, True, True, True, True, True, True), F32, F32)
    assert grads.dx.shape == (rows, n) and grads.dweight.shape == (n,)
    assert torch.count_nonzero(grads.dweight) == 0 and torch.count_nonzero(grads.dbias1) == 0


def last_level_cache_bytes():
    """The largest cache sysfs lists for cpu0 (the kernels' own rule, cpu_runtime.h), else 32 MiB."""
    sizes = []
    for index in range(8):
        try:
            with open(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size") as f:
                text = f.read().strip()
        except OSError:
            continue
        unit = {"K": 2**10, "M": 2**20}.get(text[-1:].upper(), 1)
        sizes.append(int(text.rstrip("KkMm")) * unit)
    return max(sizes, default=32 * 2**20)


def large_call(name, dtype, is_rms, offset_bytes=0):
    """A call whose streams exceed the last-level cache: (tensors, spec, buffers), its output
    buffers (out= when the call has none) offset_bytes past a 64-byte line."""
    llc = last_level_cache_bytes()
    if llc > 256 * 2**20:
        pytest.skip(f"a last-level cache of {llc >> 20} MiB: the call would take too long")
    n = 2048
    rows = -(-llc * 5 // 4 // (n * 2 * torch.finfo(dtype).bits // 8))  # x and y alone exceed the cache
    t, spec, bufs = make_call(OPTIONS[name], dtype, rows, n, is_rms=is_rms, seed=3)
    if offset_bytes:
        for key, buf in list(bufs.items()) or [("out", torch.empty(rows, n, dtype=spec.out_dtype))]:
            step = offset_bytes // buf.element_size()
            flat = torch.empty(rows * n + 64, dtype=buf.dtype)
            start = (-flat.data_ptr() % 64) // buf.element_size() + step
            bufs[key] = flat[start:start + rows * n].view(rows, n)
    return t, spec, bufs


@pytest.mark.parametrize("name, dtype, is_rms", [
    ("plain", F32, False), ("residual", F32, False), ("everything", F32, False), ("everything", BF16, False),
    ("dropout", BF16, False), ("out_bf16", F32, False), ("residual_out_bf16", F32, False),
    # the option loop's wide code (dropout on x alone): 64-byte streamed stores; two outputs
    ("dropout", F32, False), ("weight1", F32, False),
    # RMS norm: the overlapped loop (each chunk's last row: write_row_streamed), the row passes
    # (norm_row's stage)
    ("plain", F32, True), ("residual", BF16, True), ("everything", F32, True), ("out_bf16", F32, True),
])
@pytest.mark.parametrize("offset_bytes", [0, 8, 16])
def test_calls_beyond_the_last_level_cache(name, dtype, is_rms, offset_bytes):
    """Calls whose streams exceed the last-level cache write with non-temporal stores (in the
    overlapped loop by its stores, which prefetch the next row; elsewhere through an L1 stage:
    fused_rows.h, row_math.h's stream_bytes): 16-byte stores, or 64-byte ones in the wide loop.
    Into a buffer 8 bytes off 16-byte alignment they may not (can_stream), 16 bytes off a line
    the wide loop may not stream: each against the reference, s bit for bit."""
    t, spec, bufs = large_call(name, dtype, is_rms, offset_bytes)
    got = BACKEND.fused_forward(*args(t), spec, 77, **bufs)
    ref = reference.fused_forward(*args(t), spec, got.mask, got.mask1)
    tol = dict(rtol=1e-5, atol=1e-5) if spec.out_dtype == F32 else dict(rtol=1.6e-2, atol=1.6e-2)
    torch.testing.assert_close(got.y, ref.y, **tol)
    if got.y1 is not None:
        torch.testing.assert_close(got.y1, ref.y1, **tol)
    if spec.store_sum:
        assert torch.equal(got.s, ref.s)
    torch.testing.assert_close(got.rstd, ref.rstd, rtol=1e-4, atol=0)


def page_distance(a, b):
    """How far apart two page offsets are, in bytes, around the 4 KiB page."""
    return min((a - b) % 4096, (b - a) % 4096)


def test_scratch_rows_are_placed_clear_of_the_streams_in_their_pages():
    """The row loops' scratch rows (cpu_runtime.h ScratchRows) start on a 64-byte line at the
    page offset farthest from the call's streams, all at one offset, whole pages apart (4K
    aliasing; rows at different offsets met each other's stores): fresh tensors of one size share
    an offset; rows of 3 KiB move a stream's offset by 3 KiB a row; random streams get a row as
    far from all of them as the best line of the page, within a line."""
    place = compiled.extension.scratch_row_offsets
    assert place(2, 2048, [(0x7F0000010040, 8192)] * 4) == [64 + 2048] * 2
    # a stride of 4000 bytes puts the stream at 64, 4064, 3968, 3872: the middle of 64..3872
    assert place(3, 1000, [(0x7F0000010040, 4000)]) == [1920] * 3
    (only,) = place(1, 768, [(0x7F0000020000, 3072)])  # the stream at 0, 3072, 2048, 1024 in rows 0..3
    assert min(page_distance(only, o) for o in (0, 1024, 2048, 3072)) == 512
    g = torch.Generator().manual_seed(5)
    for _ in range(50):
        streams = [(int(torch.randint(0, 2**40, (), generator=g)) * 64,
                    int(torch.randint(0, 4, (), generator=g)) * 768) for _ in range(4)]
        taken = [(a + k * rb) % 4096 for a, rb in streams for k in range(4 if rb else 1)]
        (got,) = place(1, 1000, streams)
        best = max(min(page_distance(c, t) for t in taken) for c in range(0, 4096, 64))
        assert got % 64 == 0 and min(page_distance(got, t) for t in taken) >= best - 64
    assert place(0, 16, []) == [] and place(1, 16, []) == [0]
    # a chunk of fewer than 2**16 elements takes its rows one after another, unplaced (placing
    # cost more than aliasing can in so few rows); from 2**16 elements on, placed
    stream = [(0x7F0000010040, 3072)]  # at 64, 3136, 2112, 1088 in rows 0..3
    a, b, c = place(3, 768, stream, rows=85)
    assert b == (a + 3072) % 4096 and c == (b + 3072) % 4096
    (placed,) = place(1, 768, stream, rows=86)
    assert min(page_distance(placed, o) for o in (64, 3136, 2112, 1088)) == 512
    # for benchmarks, an offset forced from the first stream (rounded down to a line)
    before = compiled.extension.set_scratch_offset(200)
    try:
        assert place(2, 2048, [(0, 0), (0x7F0000010040, 8192)]) == [256, 256]
        assert place(2, 1000, [(0x7F0000010040, 4000)]) == [256, 256]
    finally:
        assert compiled.extension.set_scratch_offset(before) == 200
    with pytest.raises(ValueError, match="offset >= 0"):
        compiled.extension.set_scratch_offset(-2)


def test_the_write_order_is_chosen_by_page_offset():
    """writes_descend (cpu_runtime.h): the overlapped loop writes its outputs in descending
    column order when one starts 1..256 bytes after a stream it loads, in their pages (ascending,
    every load would follow a store it aliases: 4K aliasing), and descending would alias none of
    the write's own loads (the next row's read runs ascending: descending writes cross it)."""
    descend = compiled.extension.writes_descend
    x = 0x7F0000100040
    assert descend([x + 64], [x]) and descend([x + 3 * 4096 + 256], [x]) and descend([x + 4096, x + 64], [x])
    assert not descend([x], [x]) and not descend([x + 320], [x]) and not descend([x - 64], [x])
    assert not descend([x + 64], [x, x + 128])  # descending would alias the load 64 bytes after y
    assert not descend([], [x]) and not descend([x + 64], [])
    assert descend([x + 64], [], [x]) and descend([x + 64], [x + 4096], [x + 8192])
    assert not descend([x + 64], [x + 128], [x]) and not descend([x + 64], [], [x + 128])


def place_parameters(t):
    """The gains and biases moved to 1024, 1536, 2048, 2560 bytes after x in their pages, clear
    of outputs placed a line after x or w (a heap placement would decide the write order too)."""
    for k, key in enumerate(("weight", "bias", "weight1", "bias1")):
        if t[key] is not None:
            flat = torch.empty(t[key].numel() + 1024)
            start = ((t["x"].data_ptr() + 1024 + 512 * k - flat.data_ptr()) % 4096) // 4
            t[key] = flat[start:start + t[key].numel()].copy_(t[key])
    return t


def placed_outputs(t, spec, anchor, delta):
    """out (and out1) starting `delta` bytes after t[anchor] in its page."""
    rows, n = t["x"].shape
    size = torch.empty((), dtype=spec.out_dtype).element_size()
    bufs = {}
    for key in ("out",) + (("out1",) if t["weight1"] is not None else ()):
        flat = torch.empty(rows * n + 4096 // size, dtype=spec.out_dtype)
        start = ((t[anchor].data_ptr() + delta - flat.data_ptr()) % 4096) // size
        bufs[key] = flat[start:start + rows * n].view(rows, n)
        assert (bufs[key].data_ptr() - t[anchor].data_ptr()) % 4096 == delta
    return bufs


@pytest.mark.parametrize("name, dtype, is_rms, rows, n, anchor", [
    ("plain", F32, False, 7, 1003, "x"),  # rows of 4 KiB: overlapped at any size; a tail of 3
    ("plain", BF16, False, 6, 1000, "x"),
    ("plain", F32, True, 520, 2048, "x"),  # RMS norm: overlapped from 4 MiB
    ("residual", F32, False, 5, 1003, "x"),  # the row normalized is a scratch row; x read ahead
    ("weight1", F32, False, 5, 1000, "x"),  # the option loop, two outputs
    ("dropout", F32, False, 5, 1001, "weight"),
])
def test_descending_writes_give_the_ascending_bits(name, dtype, is_rms, rows, n, anchor):
    """The output a line after a stream the loop loads (x, or w) in its page: the loop writes in
    descending column order (writes_descend, checked with the pointers the kernel gets); at an
    offset where it writes ascending: the same bits, and the reference's values."""
    t, spec, _ = make_call(OPTIONS[name], dtype, rows, n, is_rms=is_rms, seed=11)
    t = place_parameters(t)
    # what the kernel weighs: the write's loads (x unless the row is formed in a scratch row; the
    # float32 parameters where y has their element size) and, formed, the next row's read
    formed = t["residual"] is not None or spec.dropout_p > 0
    keys = (() if formed else ("x",)) + (("weight", "bias", "weight1", "bias1") if dtype == F32 else ())
    loads = [t[k].data_ptr() for k in keys if t[k] is not None]
    next_loads = [t[k].data_ptr() for k in ("x", "residual", "x1") if formed and t[k] is not None]

    def descends(bufs):
        return compiled.extension.writes_descend([b.data_ptr() for b in bufs.values()], loads, next_loads)

    down = placed_outputs(t, spec, anchor, 64)
    assert descends(down)
    up = next(b for b in (placed_outputs(t, spec, anchor, d) for d in range(0, 4096, 64)) if not descends(b))
    got = [BACKEND.fused_forward(*args(t), spec, 99, **bufs) for bufs in (down, up)]
    for field in ("y", "y1", "s", "mean", "rstd", "mask"):
        a, b = getattr(got[0], field), getattr(got[1], field)
        assert (a is None) == (b is None), field
        if a is not None:
            assert torch.equal(a.view(torch.uint8) if a.dtype != torch.bool else a,
                               b.view(torch.uint8) if b.dtype != torch.bool else b), field
    ref = reference.fused_forward(*args(t), spec, got[0].mask, got[0].mask1)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype != BF16 else dict(rtol=1.6e-2, atol=1.6e-2)
    torch.testing.assert_close(got[0].y, ref.y, **tol)


@pytest.mark.parametrize("name, is_rms", [("plain", False), ("plain", True), ("weight1", False)])
def test_descending_streamed_writes_give_the_ascending_bits(name, is_rms):
    """Beyond the last-level cache the overlapped loop's stores are non-temporal, which need
    aligned addresses: written in descending column order (the output 64 bytes after x in its
    page) they give the bits of the ascending order."""
    t, spec, _ = large_call(name, F32, is_rms)
    t = place_parameters(t)
    loads = [t[k].data_ptr() for k in ("x", "weight", "bias", "weight1", "bias1") if t[k] is not None]

    def descends(bufs):
        return compiled.extension.writes_descend([b.data_ptr() for b in bufs.values()], loads)

    down = placed_outputs(t, spec, "x", 64)
    assert descends(down)
    up = next(b for b in (placed_outputs(t, spec, "x", d) for d in range(0, 4096, 64)) if not descends(b))
    got = [BACKEND.fused_forward(*args(t), spec, 5, **bufs) for bufs in (down, up)]
    for field in ("y", "y1", "rstd"):
        a, b = getattr(got[0], field), getattr(got[1], field)
        assert (a is None) == (b is None), field
        if a is not None:
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), field


@pytest.fixture
def vector_codes():
    """(codes, set): the settings of the option loop's wide code this CPU has ((False, True)
    with AVX-512, else (False,)) and set(on), which turns it on or off for the test
    (set_wide_vectors(False) also turns off the AVX-512 BF16 code). The setting before the test
    is restored after it."""
    ext = compiled.extension
    before = ext.set_wide_vectors(True)
    codes = (False, True) if ext.wide_vectors() else (False,)
    yield codes, ext.set_wide_vectors
    ext.set_wide_vectors(before)


@pytest.fixture
def wide_vectors(vector_codes):
    """set(on): the option loop's wide code (AVX-512) on or off for the test; skips where the
    CPU has none."""
    codes, set_code = vector_codes
    if len(codes) == 1:
        pytest.skip("this CPU has no AVX-512 (x86-64-v4): the option loop has one code")
    return set_code


def forward_both_ways(wide_vectors, t, spec, bufs, seed):
    """The call with the wide code off, then on (its buffers refilled with NaN before each)."""
    outs = []
    for on in (False, True):
        wide_vectors(on)
        for buf in bufs.values():
            buf.fill_(float("nan"))
        got = BACKEND.fused_forward(*args(t), spec, seed, **bufs)
        outs.append(got._replace(**{f: getattr(got, f).clone() for f in ("y", "y1", "s")
                                       if getattr(got, f) is not None}))
    return outs


def assert_same_bits(narrow, wide, what):
    """Every output bit for bit."""
    for field in ("y", "y1", "s", "mean", "rstd", "mask", "mask1"):
        a, b = getattr(narrow, field), getattr(wide, field)
        assert (a is None) == (b is None), f"{what}: {field}"
        if a is None:
            continue
        assert torch.equal(a.view(-1).view(torch.uint8) if a.dtype != torch.bool else a,
                           b.view(-1).view(torch.uint8) if b.dtype != torch.bool else b), f"{what}: {field}"


@pytest.mark.parametrize("name", sorted(OPTIONS))
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_wide_and_narrow_loops_give_the_same_bits(wide_vectors, name, dtype):
    """The option loop's 64-byte vectors (block_sums_wide: dropout on x alone) sum the same lanes
    in the same order as its 32-byte ones: every output, bit for bit, at widths that leave
    8-lane tails (48 = 32 + 2 x 8, 1000 = 31 x 32 + 8) and scalar ones (4097, 2049), and with
    a misaligned start (a view one element in). A bfloat16 y is rounded by AVX-512 BF16's
    vcvtneps2bf16 where the CPU has it and in integer operations in the 32-byte loop: the same
    bits."""
    for rows, n in ((3, 48), (37, 1000), (5, 4097), (9, 2049)):
        t, spec, bufs = make_call(OPTIONS[name], dtype, rows, n, seed=rows)
        narrow, wide = forward_both_ways(wide_vectors, t, spec, bufs, seed=11)
        assert_same_bits(narrow, wide, f"{name} {dtype} {rows}x{n}")
    t, spec, bufs = make_call(OPTIONS[name], dtype, 7, 1025, seed=2)
    t["x"] = randn((7 * 1025 + 1,), dtype, seed=9)[1:].view(7, 1025)
    narrow, wide = forward_both_ways(wide_vectors, t, spec, bufs, seed=3)
    assert_same_bits(narrow, wide, f"{name} {dtype} misaligned x")


def bf16_bits_of(y32):
    """store<BFloat16> (row_math.h) of float32 values, as int64 bits: round to nearest even,
    float32 denormals included; a NaN keeps its sign and upper bits with the quiet bit set."""
    b = y32.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    rounded = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    return torch.where((b & 0x7FFFFFFF) > 0x7F800000, (b >> 16) | 0x40, rounded)


def gain_of_every_rounding_case(n, seed):
    """(n,) float32 gains whose bits cover what the rounding to bfloat16 must get right: lower
    halves spread over 0x0000-0xFFFF (a stride of 4099), every third one a tie or beside one
    (0x7FFF, 0x8000, 0x8001, 0x0000, 0xFFFF), under random upper halves (sign, exponent with
    denormals among them, upper mantissa); and, every 7th, a special value: infinities, NaNs of
    several payloads, the largest float (rounds to inf), denormals that round up or to a tie."""
    g = torch.Generator().manual_seed(seed)
    upper = torch.randint(0, 1 << 16, (n,), generator=g, dtype=torch.int64)
    lower = (torch.arange(n, dtype=torch.int64) * 4099 + int(torch.randint(0, 1 << 16, (1,), generator=g))) % (1 << 16)
    lower[::3] = torch.tensor([0x7FFF, 0x8000, 0x8001, 0x0000, 0xFFFF])[torch.arange(len(lower[::3])) % 5]
    bits = (upper << 16) | lower
    special = torch.tensor([0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFBFFFFF, 0x7F7FFFFF,
                            0x00008000, 0x80018000, 0x0012ABCD, 0x8040C000], dtype=torch.int64)
    bits[::7] = special[torch.arange(len(bits[::7])) % len(special)]
    return torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32).view(torch.float32)


@pytest.mark.parametrize("x_dtype", [F32, BF16])
# rows of at most 8 KiB (the option loop: overlap_pays), of an even width (a mean of 0) with an
# 8-lane tail (1000 = 31 x 32 + 8) and a scalar one (2046 = 63 x 32 + 3 x 8 + 6)
@pytest.mark.parametrize("n", [48, 1000, 2046])
def test_bfloat16_outputs_are_the_float32_outputs_rounded(vector_codes, x_dtype, n):
    """The option loop rounds a bfloat16 y in vector code of its own: AVX-512 BF16's
    vcvtneps2bf16 (which flushes float32 denormals to zero, so a vector holding one takes the
    integer code) or integer operations (row_math.h bf16_upper). Either gives, bit for bit,
    store<BFloat16> of the float32 y of the same call, in every code this CPU has
    (set_wide_vectors(False) turns the AVX-512 BF16 code off). Rows of +-2 with eps = 0
    normalize to exactly +-1, so y is +-gain exactly and the gains' bits reach the rounding as
    chosen (gain_of_every_rounding_case); a row with a NaN is NaN throughout."""
    rows = 5
    sign = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0)
    x = torch.stack([2.0 * sign * (1 if i % 2 == 0 else -1) for i in range(rows)]).to(x_dtype)
    x[3, n // 2] = float("nan")
    # a rowscale of ones: the float32-output call then runs the option loop too (without an
    # option it is the plain kernel's), the same sums in the same order
    t = {"x": x, "residual": None, "x1": None, "rowscale": torch.ones(rows), "weight": gain_of_every_rounding_case(n, n),
         "bias": None, "weight1": None, "bias1": None}

    def spec(out_dtype):
        return KernelSpec(eps=0.0, is_rms=False, dropout_p=0.0, sum_dtype=x_dtype, out_dtype=out_dtype,
                          store_sum=False, store_mask=False)

    codes, set_code = vector_codes
    w = t["weight"]
    for on in codes:
        set_code(on)
        got = BACKEND.fused_forward(*args(t), spec(BF16), 0).y
        y32 = BACKEND.fused_forward(*args(t), spec(F32), 0).y
        assert torch.equal(y32[0][~w.isnan()], (sign * w)[~w.isnan()]), "the rows do not normalize to +-1"
        assert torch.equal(got.view(torch.int16).to(torch.int64) & 0xFFFF, bf16_bits_of(y32)), \
            f"wide code {on}: a bfloat16 output is not store<BFloat16> of its float32 output"
        assert got[3].isnan().all()
    ref = reference.fused_forward(*args(t), spec(BF16), None, None)
    torch.testing.assert_close(got.float(), ref.y.float(), rtol=2 ** -8, atol=0, equal_nan=True)


@pytest.mark.parametrize("name", ["dropout", "dropout_rowscale"])
@pytest.mark.parametrize("offset_bytes", [0, 16])
def test_wide_and_narrow_loops_give_the_same_bits_beyond_the_cache(wide_vectors, name, offset_bytes):
    """The same beyond the last-level cache, where the wide loop streams 64-byte stores (its
    outputs on 64-byte lines) or, 16 bytes off a line, stores without streaming."""
    t, spec, bufs = large_call(name, F32, False, offset_bytes)
    narrow, wide = forward_both_ways(wide_vectors, t, spec, bufs, seed=5)
    assert_same_bits(narrow, wide, f"{name} +{offset_bytes} bytes")


def test_storing_the_masks_does_not_change_the_call():
    t, spec, _ = make_call(OPTIONS["everything"], BF16, 37, 1000)
    with_masks = BACKEND.fused_forward(*args(t), spec, 5)
    without = BACKEND.fused_forward(*args(t), replace(spec, store_mask=False), 5)
    assert with_masks.mask is not None and without.mask is None and without.mask1 is None
    for a, b in [(with_masks.y, without.y), (with_masks.y1, without.y1), (with_masks.s, without.s)]:
        assert torch.equal(a, b)


# --- backward ------------------------------------------------------------------------------------

ALL = GradNeeds(x=True, x1=True, residual=True, weight=True, bias=True, weight1=True, bias1=True)
NEEDS = {
    "all": ALL,
    "x_only": GradNeeds(),
    "params_only": GradNeeds(x=False, weight=True, bias=True),
    "residual_and_w1": GradNeeds(x=False, residual=True, weight1=True),
}


def check_backward(opt, dtype, rows, n, needs, *, is_rms=False, dsum=True, dy1=True):
    t, spec, got = check_forward({**opt, "store_sum": True}, dtype, rows, n, is_rms=is_rms)  # backward reads s
    s = got.s
    has_w1 = t["weight1"] is not None
    needs = replace(needs, x1=needs.x1 and t["x1"] is not None, residual=needs.residual and t["residual"] is not None,
                    weight1=needs.weight1 and has_w1, bias1=needs.bias1 and has_w1)
    dy = randn((rows, n), spec.out_dtype, seed=11)
    dy1_t = randn((rows, n), spec.out_dtype, seed=12) if has_w1 and dy1 else None
    ds_t = randn((rows, n), s.dtype, seed=13) if dsum else None
    rdt = None if t["residual"] is None else t["residual"].dtype
    grads = BACKEND.fused_backward(dy, dy1_t, ds_t, s, t["weight"], t["weight1"], t["rowscale"], got.mean, got.rstd,
                                   spec, 1234, needs, dtype, rdt)
    ref = reference.fused_backward(dy, dy1_t, ds_t, s, t["weight"], t["weight1"], t["rowscale"], spec, needs, dtype,
                                   rdt, got.mask, got.mask1)
    f64 = lambda v: None if v is None else v.double()  # noqa: E731
    truth = reference.fused_backward(f64(dy), f64(dy1_t), f64(ds_t), s.double(), f64(t["weight"]),
                                     f64(t["weight1"]), f64(t["rowscale"]), spec, needs, F64, F64, got.mask, got.mask1)
    what = f"{sorted(opt)} {dtype} {rows}x{n} rms={is_rms} {needs}"
    for field in GradsOut_fields:
        g, r, tr = getattr(grads, field), getattr(ref, field), getattr(truth, field)
        assert (g is None) == (r is None), f"{what}: {field} is {'None' if g is None else 'computed'}, expected the reverse"
        if g is not None:
            assert g.dtype == r.dtype and g.shape == r.shape, f"{what}: {field} {g.dtype} {g.shape} vs {r.dtype} {r.shape}"
            assert_close_to_truth(g, tr, r, floor=2e-5, what=f"{what} {field}")
    return t, spec, got, grads


GradsOut_fields = ("dx", "dx1", "dresidual", "dweight", "dbias", "dweight1", "dbias1")


@pytest.mark.parametrize("name", ["plain", "residual", "residual_f32", "x1", "rowscale", "weight1", "dropout",
                                  "dropout_x1_residual", "out_bf16", "out_f64_residual_f64", "sum_f32",
                                  "everything"])
@pytest.mark.parametrize("dtype", [F32, BF16, F16, F64])
@pytest.mark.parametrize("is_rms", [False, True])
def test_backward_matches_reference_and_float64(name, dtype, is_rms):
    for rows, n in SIZES:
        check_backward(OPTIONS[name], dtype, rows, n, ALL, is_rms=is_rms)


@pytest.mark.parametrize("needs", sorted(NEEDS))
@pytest.mark.parametrize("grads_in", ["dy", "dy_dsum", "dy1_only"])
def test_backward_computes_only_what_is_needed(needs, grads_in):
    opt = OPTIONS["everything"]
    t, spec, got = check_forward(opt, F32, 9, 130)
    n = NEEDS[needs]
    dy = None if grads_in == "dy1_only" else torch.randn(9, 130)
    dsum = torch.randn(9, 130) if grads_in == "dy_dsum" else None
    g = BACKEND.fused_backward(dy, torch.randn(9, 130), dsum, got.s, t["weight"], t["weight1"], t["rowscale"],
                               got.mean, got.rstd, spec, 1234, n, F32, F32)
    for field, want in zip(GradsOut_fields, (n.x, n.x1, n.residual, n.weight, n.bias, n.weight1, n.bias1)):
        assert (getattr(g, field) is not None) == want, f"{field}: expected {'a tensor' if want else 'None'}"
    if dy is None and n.weight:
        assert torch.count_nonzero(g.dweight) == 0 and torch.count_nonzero(g.dbias) == 0


@pytest.mark.parametrize("needs", sorted(NEEDS))
@pytest.mark.parametrize("is_rms", [False, True])
def test_backward_with_dy1_of_another_dtype(needs, is_rms):
    """dy and dy1 of one dtype take the pass that forms g = dy w + dy1 w1 in registers; a dy1 of
    another dtype the route through a g buffer. Both give the reference's gradients."""
    opt = OPTIONS["weight1"]
    t, spec, got = check_forward({**opt, "store_sum": True}, F32, 37, 515, is_rms=is_rms)
    dy, dy1 = randn((37, 515), F32, seed=31), randn((37, 515), F32, seed=32)
    n = replace(NEEDS[needs], x1=False, residual=False)
    same = BACKEND.fused_backward(dy, dy1, None, got.s, t["weight"], t["weight1"], None, got.mean, got.rstd, spec, 0, n,
                                  F32, None)
    mixed = BACKEND.fused_backward(dy, dy1.double(), None, got.s, t["weight"], t["weight1"], None, got.mean, got.rstd,
                                   spec, 0, n, F32, None)
    ref = reference.fused_backward(dy, dy1, None, got.s, t["weight"], t["weight1"], None, spec, n, F32, None)
    for field in GradsOut_fields:
        r = getattr(ref, field)
        for name, g in (("same dtype", getattr(same, field)), ("float64 dy1", getattr(mixed, field))):
            assert (g is None) == (r is None), f"{name} {field}"
            if g is not None:
                torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4, msg=f"{name} {field}")


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("is_rms", [False, True])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("rows, n", [(33, 257), (300, 1000)])  # one serial chunk; many chunks, threads
def test_plain_backward_equals_the_native_node_bit_for_bit(dtype, is_rms, residual, rows, n):
    """One C++ backward: the eager node of the native route (``NormBackward``, ``_C.norm``) and
    the plain contract call (``_C.fused_backward``, no option) give the same bits: dx, the
    residual's gradient (from dsum), dW and dB, at 1 and 2 threads."""
    x = randn((rows, n), dtype, seed=21, offset=0.0 if is_rms else 1e3)
    r = randn((rows, n), dtype, seed=22) if residual else None
    w = randn((n,), F32, seed=23, scale=0.5, offset=1.0)
    b = randn((n,), F32, seed=24, scale=0.5)
    dy = randn((rows, n), dtype, seed=25)
    dsum = randn((rows, n), dtype, seed=26) if residual else None
    _, s, mean, rstd = compiled.extension.forward(x, r, w, b, 1e-5, is_rms, residual)
    s = x if s is None else s
    spec = KernelSpec(is_rms=is_rms, eps=1e-5, dropout_p=0.0, sum_dtype=dtype, out_dtype=dtype, store_sum=residual)
    needs = GradNeeds(x=True, residual=residual, weight=True, bias=True)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            leaves = [t.detach().clone().requires_grad_(True) for t in (x, r, w, b) if t is not None]
            xx, rr = leaves[0], (leaves[1] if residual else None)
            ww, bb = leaves[-2:]
            outs = compiled.extension.norm(xx, n, ww, bb, 1e-5, is_rms, rr)
            native = torch.autograd.grad(outs, leaves, [dy] + ([dsum] if residual else []))
            fused = BACKEND.fused_backward(dy, None, dsum, s, w, None, None, mean, rstd, spec, 0, needs, dtype,
                                           dtype if residual else None)
            want = [fused.dx] + ([fused.dresidual] if residual else []) + [fused.dweight, fused.dbias]
            names = ["dx"] + (["dresidual"] if residual else []) + ["dweight", "dbias"]
            for name, a, c in zip(names, native, want):
                assert a.dtype == c.dtype and torch.equal(a, c), f"{name} differs at {threads} threads"
    finally:
        torch.set_num_threads(before)


# --- determinism and dropout ---------------------------------------------------------------------


def test_bit_identical_for_any_thread_count():
    opt = OPTIONS["everything"]
    t, spec, _ = make_call(opt, BF16, 301, 1000)
    spec = replace(spec, store_mask=True)
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            f = BACKEND.fused_forward(*args(t), spec, 99)
            dy = randn((301, 1000), spec.out_dtype, seed=5)
            g = BACKEND.fused_backward(dy, dy, None, f.s, t["weight"], t["weight1"], t["rowscale"], f.mean, f.rstd,
                                       spec, 99, ALL, BF16, F32)
            results.append([v for v in (*f, *g) if v is not None])
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_dropout_masks_are_bernoulli_and_backward_regenerates_them():
    rows, n, p = 200, 1000, 0.3
    t, spec, _ = make_call({"p": p, "x1": True, "rowscale": True, "w1": True, "store_sum": True}, F32, rows, n)
    f = BACKEND.fused_forward(*args(t), spec, 4321)
    for mask in (f.mask, f.mask1):
        frac = mask.float().mean().item()
        sigma = math.sqrt(p * (1 - p) / mask.numel())
        assert abs(frac - (1 - p)) < 5 * sigma, f"keep fraction {frac:.4f}, expected {1 - p} +- {5 * sigma:.4f}"
        # no row or column structure: each row's and column's keep fraction is plausible
        assert mask.float().mean(1).sub(1 - p).abs().max() < 6 * math.sqrt(p * (1 - p) / n)
        assert mask.float().mean(0).sub(1 - p).abs().max() < 6 * math.sqrt(p * (1 - p) / rows)
    agree = (f.mask == f.mask1).float().mean().item()  # independent streams: p^2 + (1-p)^2
    assert abs(agree - (p * p + (1 - p) ** 2)) < 0.01
    assert not torch.equal(f.mask, BACKEND.fused_forward(*args(t), spec, 4322).mask)
    assert torch.equal(f.mask, BACKEND.fused_forward(*args(t), spec, 4321).mask)
    dy = torch.randn(rows, n)
    g = BACKEND.fused_backward(dy, dy, None, f.s, t["weight"], t["weight1"], t["rowscale"], f.mean, f.rstd, spec,
                               4321, GradNeeds(x=True, x1=True), F32, None)
    assert torch.equal(g.dx != 0, f.mask) and torch.equal(g.dx1 != 0, f.mask1)


def same_float_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit, NaN payloads aside (a NaN where the other has a NaN)."""
    nan = a.isnan()
    if not torch.equal(nan, b.isnan()):
        return False
    ints = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16,
            torch.float16: torch.int16}[a.dtype]
    return torch.equal(a[~nan].view(ints), b[~nan].view(ints))


@pytest.mark.parametrize("is_rms", [False, True])
@pytest.mark.parametrize("opt", [{"p": 0.5}, {"p": 0.5, "res": "x"}, {"p": 0.5, "x1": True, "rowscale": True},
                                 {"p": 0.5, "out": BF16}, {"p": 0.5, "res": F32, "sum": F32}])
@pytest.mark.parametrize("dtype", [F32, BF16, F64])
def test_dropout_of_infinities_nans_and_signed_zeros_is_the_contracts(opt, dtype, is_rms):
    # The kernels apply dropout as v * (keep ? scale : 0), the contract as (v * keep) * scale: the
    # same bits only if a dropped inf or NaN still gives NaN and a dropped -x still gives -0.
    rows, n = 6, 40  # small: the option loop (layer norm, float32 y) and the row passes
    t, spec, _ = make_call(dict(opt, store_sum=True), dtype, rows, n, is_rms=is_rms)
    specials = torch.tensor([math.inf, -math.inf, math.nan, -0.0, 0.0, -1.5], dtype=dtype)
    x = t["x"].clone()
    x.view(-1)[torch.randperm(rows * n, generator=torch.Generator().manual_seed(3))[:60]] = specials.repeat(10)
    t["x"] = x
    got = BACKEND.fused_forward(*args(t), spec, 99)
    ref = reference.fused_forward(*args(t), spec, got.mask, got.mask1)
    dropped_special = ~got.mask & (x.isinf() | x.isnan() | (x == 0))
    assert dropped_special.any() and (got.mask & (x.isinf() | x.isnan())).any()
    assert same_float_bits(got.s, ref.s), f"{opt} {dtype} rms={is_rms}: s differs from the contract's"


# --- argument checks -------------------------------------------------------------------------------


def test_bad_arguments_raise_named_errors():
    t, spec, _ = make_call(OPTIONS["residual"], F32, 4, 8)
    C = compiled.extension
    base = dict(zip(["x", "residual", "x1", "rowscale", "weight", "bias", "weight1", "bias1"], args(t)))

    def call(**kw):
        a = {**base, "eps": 1e-5, "is_rms": False, "dropout_p": 0.0, "seed": 0, "sum_dtype": F32, "out_dtype": F32,
             "store_sum": True, "store_mask": False, **kw}
        return C.fused_forward(**a)

    call()
    for kw, err, text in [
        ({"x": t["x"].t()}, RuntimeError, "x: expected a contiguous"),
        ({"residual": torch.randn(4, 9)}, RuntimeError, "residual: expected sizes"),
        ({"x1": torch.randn(4, 8, dtype=F64)}, TypeError, "x1: expected dtype"),
        ({"rowscale": torch.randn(5)}, RuntimeError, "rowscale: expected sizes"),
        ({"bias1": torch.randn(8)}, ValueError, "bias1"),
        ({"dropout_p": 1.0}, ValueError, "dropout_p"),
        ({"eps": float("nan")}, ValueError, "eps"),
        ({"sum_dtype": torch.int32}, TypeError, "sum_dtype"),
        ({"out_dtype": "float32"}, TypeError, "out_dtype"),
        ({"seed": 2**70}, ValueError, "seed"),
        ({"out": t["x"]}, RuntimeError, "out: expected a buffer that shares no memory with x"),
        ({"out": torch.empty(4, 8, dtype=F64)}, TypeError, "out: expected dtype"),
        ({"residual_out": torch.empty(4, 8), "store_sum": False}, ValueError, "residual_out"),
    ]:
        with pytest.raises(err, match=text):
            call(**kw)
    out = torch.empty(4, 8)
    with pytest.raises(RuntimeError, match="residual_out: expected a buffer that shares no memory with out"):
        call(out=out, residual_out=out)
