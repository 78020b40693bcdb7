"""``normkit bench``: the bytes model, the timer, the CLI end to end on tiny shapes."""

import io
import json
import time

import pytest
import torch

from normkit import cli
from normkit.bench import cases as C
from normkit.bench import impls as I
from normkit.bench import options as bench_options
from normkit.bench.copy_bandwidth import copy_bandwidth
from normkit.bench.report import make_table, markdown_table, notes, print_table
from normkit.bench.runner import build_call
from normkit.bench.timing import measure

MiB64 = 4096 * 4096 * 4  # one 4096 x 4096 float32 tensor: 67,108,864 bytes
ROW = 4096 * 4  # one float32 parameter vector of width 4096: 16,384 bytes

# Worked by hand from the table in normkit.bench.cases (M = N = 4096, float32):
#   fwd: 2 (x, y) or 4 (x, r, y, s) big tensors + one vector per parameter (w[, b])
#   bwd: 3 (x, dy, dx) or 5 (s, dy, ds, dx, dr) big tensors + w read + one gradient per parameter
HAND = {
    ("layer_norm", "fwd"): 2 * MiB64 + 2 * ROW,       # 134,250,496
    ("layer_norm", "bwd"): 3 * MiB64 + 3 * ROW,       # 201,375,744
    ("rms_norm", "fwd"): 2 * MiB64 + 1 * ROW,         # 134,234,112
    ("rms_norm", "bwd"): 3 * MiB64 + 2 * ROW,         # 201,359,360
    ("add_layer_norm", "fwd"): 4 * MiB64 + 2 * ROW,   # 268,468,224
    ("add_layer_norm", "bwd"): 5 * MiB64 + 3 * ROW,   # 335,593,472
    ("add_rms_norm", "fwd"): 4 * MiB64 + 1 * ROW,     # 268,451,840
    ("add_rms_norm", "bwd"): 5 * MiB64 + 2 * ROW,     # 335,577,088
}
HAND_LITERAL = {
    ("layer_norm", "fwd"): 134_250_496, ("layer_norm", "bwd"): 201_375_744,
    ("rms_norm", "fwd"): 134_234_112, ("rms_norm", "bwd"): 201_359_360,
    ("add_layer_norm", "fwd"): 268_468_224, ("add_layer_norm", "bwd"): 335_593_472,
    ("add_rms_norm", "fwd"): 268_451_840, ("add_rms_norm", "bwd"): 335_577_088,
}


# --- the bytes model -------------------------------------------------------------------------


@pytest.mark.parametrize("op", C.OPS)
def test_bytes_model_matches_hand_count(op):
    assert HAND == HAND_LITERAL  # the formulas above and the written-out numbers agree
    for direction in ("fwd", "bwd"):
        assert C.bytes_moved(op, direction, 4096, 4096, torch.float32) == HAND[(op, direction)]
    both = C.bytes_moved(op, "fwd+bwd", 4096, 4096, torch.float32)
    assert both == HAND[(op, "fwd")] + HAND[(op, "bwd")]
    assert C.Case(op, "bwd", 4096, 4096, torch.float32).bytes == HAND[(op, "bwd")]


def test_bytes_model_small_bf16_shape():
    # 3 rows x 5, bfloat16 (2 bytes): layer_norm fwd reads x (30 B), writes y (30 B), reads w, b (10 B each)
    assert C.bytes_moved("layer_norm", "fwd", 3, 5, torch.bfloat16) == 80
    # add_rms_norm bwd: s, dy, ds read and dx, dr written (5 x 30 B); w read, dw written (2 x 10 B)
    assert C.bytes_moved("add_rms_norm", "bwd", 3, 5, torch.bfloat16) == 170
    # float32 weights with bfloat16 activations count 4 bytes per parameter element
    assert C.bytes_moved("rms_norm", "fwd", 3, 5, torch.bfloat16, torch.float32) == 60 + 20


def test_bytes_model_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown op 'group_norm'"):
        C.bytes_moved("group_norm", "fwd", 1, 1, torch.float32)
    with pytest.raises(ValueError, match="unknown direction 'sideways'"):
        C.bytes_moved("layer_norm", "sideways", 1, 1, torch.float32)


def test_default_shapes():
    # CPU: 64 MiB per tensor whatever the dtype, 4096 x 4096 for float32 (the shape)
    cpu32 = dict((n, m) for m, n in C.default_shapes("cpu", torch.float32))
    assert cpu32[4096] == 4096 and cpu32[256] == 65536 and cpu32[16384] == 1024
    assert all(m * n * 4 == 64 * 2**20 for n, m in cpu32.items())
    assert dict((n, m) for m, n in C.default_shapes("cpu", torch.bfloat16))[4096] == 8192
    # CUDA: rows x widths within the 2**28-element cap
    cuda = C.default_shapes("cuda", torch.bfloat16)
    assert (4096, 65536) in cuda and (8192, 65536) not in cuda and (32768, 8192) in cuda
    assert all(m * n <= C.CUDA_MAX_ELEMENTS for m, n in cuda)
    # explicit rows: the cross product
    assert C.default_shapes("cpu", torch.float32, [256, 512], [1, 8]) == [(1, 256), (8, 256), (1, 512), (8, 512)]


# --- the timer -------------------------------------------------------------------------------


def test_measure_reports_the_median_and_skips_warmup():
    calls = []

    def fn():
        calls.append(time.perf_counter())
        time.sleep(0.004 if len(calls) <= 2 else 0.002)  # warm-up calls are slower

    t = measure(fn, "cpu", warmup=2, repeats=5)
    assert t.samples == 5 and t.inner == 1
    assert 0.0018 <= t.median_s < 0.0035, t  # the 4 ms warm-up calls are not in the median
    assert len(calls) == 2 + 5


class _SlowForward(torch.autograd.Function):
    """Forward takes 60 ms, backward is instant: tells whether a timing contains the forward."""

    @staticmethod
    def forward(ctx, x):
        time.sleep(0.06)
        return x * 2

    @staticmethod
    def backward(ctx, dy):
        return dy * 2


def test_backward_timing_excludes_the_forward():
    case = C.Case("rms_norm", "bwd", 4, 8, torch.float32)
    tensors = C.make_inputs(case, "cpu", seed=1)

    def f(x, r, w, b):
        return _SlowForward.apply(x) * w

    bwd = measure(build_call(f, case, tensors), "cpu", warmup=1, repeats=3)
    both = measure(build_call(f, C.Case("rms_norm", "fwd+bwd", 4, 8, torch.float32), tensors), "cpu",
                   warmup=1, repeats=2)
    assert bwd.median_s < 0.03, f"backward timing {bwd.median_s * 1e3:.1f} ms contains the 60 ms forward"
    assert both.median_s >= 0.06


def test_backward_call_returns_the_gradients_of_every_input():
    case = C.Case("add_layer_norm", "bwd", 3, 7, torch.float32)
    tensors = C.make_inputs(case, "cpu", seed=2)
    grads = build_call(I.torch_add_layer_norm, case, tensors)()
    assert [g.shape for g in grads] == [(3, 7), (3, 7), (7,), (7,)]  # dx, dr, dw, db
    with torch.no_grad():
        out = build_call(I.torch_add_layer_norm, C.Case("add_layer_norm", "fwd", 3, 7, torch.float32), tensors)()
    torch.testing.assert_close(out[1], tensors["x"] + tensors["residual"])


def test_copy_bandwidth_is_positive():
    bw = copy_bandwidth("cpu", 4 * 2**20, warmup=1, repeats=3)
    assert bw.nbytes == 4 * 2**20 and bw.gbps > 0.1


def test_third_party_detection_skips_missing_packages():
    assert "not installed" in I._import_reason("normkit_no_such_module", "cuda", ("cuda",))
    assert "cuda only" in I._import_reason("torch", "cpu", ("cuda",))
    assert [i.name for i in I.implementations("cpu")] == ["normkit", "torch", "compile"]
    assert I.implementations("cpu", compile=False)[2].unavailable == "skipped (--no-compile)"


def test_compiled_functions_are_shared_per_shape_and_reset():
    case = C.Case("layer_norm", "bwd", 2, 8, torch.float32)
    f = I._make_compile(case)
    assert I._make_compile(C.Case("layer_norm", "fwd+bwd", 2, 8, torch.float32)) is f
    I.reset_compiled()
    assert I._make_compile(case) is not f
    I.reset_compiled()


# --- the report ------------------------------------------------------------------------------


def _fake_doc():
    entry = {"ms": 2.0, "gbps": 10.0, "frac_copy": 0.5, "speedup": {"torch": 3.0}}
    return {
        "machine": {"device": "cpu", "cpu": "Test CPU", "torch_threads": 2, "torch": "x"},
        "copy_bandwidth": {"gbps": 20.0, "buffer_bytes": 2**20},
        "results": [{
            "op": "layer_norm", "direction": "fwd", "rows": 4, "width": 8, "dtype": "float32",
            "bytes": 1, "normkit_backend": "cpu",
            "impls": {"normkit": entry, "torch": {"ms": 6.0, "gbps": 3.3, "frac_copy": 0.16},
                      "compile": {"skipped": "skipped (--no-compile)"}, "liger": {"error": "RuntimeError: boom"}},
        }],
    }


def test_table_shows_numbers_ratios_and_notes():
    buf = io.StringIO()
    print_table(_fake_doc(), file=buf)
    text = buf.getvalue()
    for needle in ("Test CPU", "copy 20.0 GB/s", "normkit backend: cpu", "10.0", "50%", "3.00", "torch GB/s"):
        assert needle in text, needle
    assert "compile GB/s" not in text  # a column that never produced a number is left out
    assert "liger: error in layer_norm fwd 4x8 float32: RuntimeError: boom" in notes(_fake_doc())
    assert "compile: skipped (--no-compile)" in notes(_fake_doc())
    assert make_table(_fake_doc()).row_count == 1
    assert not any("copy bandwidth changed" in n for n in notes(_fake_doc()))


def test_markdown_table_has_the_same_cells_as_the_terminal_table():
    text = markdown_table(_fake_doc())
    lines = text.splitlines()
    assert lines[0].startswith("normkit bench | cpu: Test CPU")
    header = next(line for line in lines if line.startswith("| op |"))
    assert "torch GB/s" in header and "compile GB/s" not in header
    rows = [line for line in lines if line.startswith("| layer_norm |")]
    assert len(rows) == 1 and "| 10.0 |" in rows[0] and "| 50% |" in rows[0] and "| 3.00 |" in rows[0]
    assert "[red]" not in text and "note: liger: error in layer_norm fwd 4x8 float32: RuntimeError: boom" in text


def test_notes_warn_when_the_copy_bandwidth_drifts():
    doc = _fake_doc()
    doc["copy_bandwidth"]["end_gbps"] = 10.0  # half the 20 GB/s measured before the run
    assert any("changed from 20.0 to 10.0 GB/s" in n for n in notes(doc))


# --- the command line, end to end --------------------------------------------------------------


def test_cli_quick_json_and_plot(tmp_path, capsys):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    rc = cli.main(["bench", "--quick", "--no-compile", "--quiet", "--json", str(out), "--plot", str(png)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert set(doc) >= {"command", "machine", "config", "copy_bandwidth", "implementations", "results"}
    assert doc["copy_bandwidth"]["gbps"] > 0
    assert doc["implementations"]["compile"] == "skipped (--no-compile)"
    assert len(doc["results"]) == len(C.QUICK_SHAPES) * len(C.OPS) * len(C.DIRECTIONS)
    for row in doc["results"]:
        assert row["bytes"] == C.bytes_moved(row["op"], row["direction"], row["rows"], row["width"], torch.float32)
        mine = row["impls"]["normkit"]
        assert mine["ms"] > 0 and mine["gbps"] > 0 and mine["frac_copy"] > 0, row
        assert mine["gbps"] == pytest.approx(row["bytes"] / mine["ms"] / 1e6)
        assert row["impls"]["torch"]["ms"] > 0 and "torch" in mine["speedup"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "layer_norm" in capsys.readouterr().out  # the table


def test_cli_json_to_stdout_puts_the_table_on_stderr(capsys):
    rc = cli.main(["bench", "--quick", "--no-compile", "--quiet", "--ops", "rms_norm", "--directions", "fwd",
                   "--backend", "reference", "--json", "-"])
    captured = capsys.readouterr()
    assert rc == 0
    doc = json.loads(captured.out)
    assert {r["normkit_backend"] for r in doc["results"]} == {"reference"}
    assert doc["config"]["backend"] == "reference" and "--backend reference" in doc["command"]
    assert "rms_norm" in captured.err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_cli_cuda_without_gpu_is_a_one_line_error(capsys):
    assert cli.main(["bench", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda needs a CUDA GPU" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, message", [
    (["--ops", "layer_norm,foo"], "unknown 'foo'"),
    (["--directions", "up"], "unknown 'up'"),
    (["--widths", "0,256"], "positive integers"),
    (["--dtype", "int8"], "unknown dtype 'int8'"),
    (["--backend", "no_such_backend"], "unknown normkit backend"),
    (["--repeats", "0"], "--repeats >= 1"),
])
def test_cli_bad_options_are_one_line_errors(argv, message, capsys):
    assert cli.main(["bench", "--quick", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_noisy_timings_are_flagged_not_reported_as_ratios():
    from normkit.bench import report, runner

    def entry(ms, lo, hi, n):
        return {"ms": ms, "gbps": 1.0, "frac_copy": 0.5,
                "timing": {"median_ms": ms, "min_ms": lo, "max_ms": hi, "samples": n, "inner": 1}}

    steady = {"op": "layer_norm", "direction": "fwd", "rows": 8, "width": 64, "dtype": "float32",
              "impls": {"normkit": entry(1.0, 0.95, 1.05, 10), "torch": entry(2.0, 1.9, 2.1, 10)}}
    stalled = {"op": "layer_norm", "direction": "fwd", "rows": 8, "width": 128, "dtype": "float32",
               "impls": {"normkit": entry(1.0, 0.95, 1.05, 3), "torch": entry(1775.0, 1.9, 3000.0, 3)}}
    for row in (steady, stalled):
        runner._add_ratios(row)
    assert "unreliable" not in steady["impls"]["normkit"]
    why = stalled["impls"]["normkit"]["unreliable"]["torch"]
    assert "3 samples" in why and "max/min" in why
    assert runner.unreliable({"samples": 10, "min_ms": 1.0, "max_ms": 1.6, "median_ms": 1.1, "inner": 1}) is not None
    doc = {"results": [steady, stalled], "copy_bandwidth": {"gbps": 10.0}}
    _, rows = report.table_rows(doc, markup=False)
    assert rows[0][-1] == "2.00" and rows[1][-1] == "(1775.00?)"
    assert any("ratio to torch unreliable" in n for n in report.notes(doc))


def test_options_suite_times_every_row_against_a_copy(tmp_path, capsys):
    import json

    from normkit.bench import options as O
    from normkit.bench.cli import main as bench_main

    out = tmp_path / "options.json"
    assert bench_main(["--suite", "options", "--quick", "--threads", "1", "--json", str(out), "--quiet"]) == 0
    doc = json.loads(out.read_text())
    assert doc["suite"] == "options" and doc["command"].startswith("normkit bench --suite options")
    want = [(r.name, v) for r in O.ROWS for v in (O.VARIANTS if r.fn is None else ("alloc",))]
    assert [(r["option"], r["variant"]) for r in doc["results"]] == want
    for r in doc["results"]:
        assert r["time_over_copy"] > 0 and r["ci_low"] <= r["time_over_copy"] <= r["ci_high"]
        assert abs(r["over_ideal"] - r["time_over_copy"] / r["ideal"]) < 1e-12
    table = capsys.readouterr().out
    assert "| + residual, prenorm | 2.00x |" in table and "buffers 1t" in table
    assert bench_main(["--suite", "options", "--modes", "inference"]) == 2  # a shapes-only option


@pytest.mark.parametrize("row", [r for r in bench_options.ROWS if r.fn is None], ids=lambda r: r.name)
def test_options_suite_buffers_variant_writes_the_buffers(row):
    """The ``buffers`` variant is the same call, its ``y`` (and prenorm sum) landing in the
    preallocated buffers: what it measures is what ``alloc`` computes."""
    t = bench_options._tensors(5, 64, seed=0)
    torch.manual_seed(0)
    alloc = row.make(t, "alloc")()
    torch.manual_seed(0)
    buffered = row.make(t, "buffers")()
    alloc, buffered = (v if isinstance(v, tuple) else (v,) for v in (alloc, buffered))
    assert len(alloc) == len(buffered)
    for a, b in zip(alloc, buffered):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_compile_suite_times_each_variant_against_the_compiled_original(tmp_path, capsys):
    import json

    from normkit.bench import compile_suite as CS
    from normkit.bench.cli import main as bench_main

    out = tmp_path / "compile.json"
    argv = ["--suite", "compile", "--quick", "--models", "block", "--cell-seconds", "0.1", "--json", str(out), "--quiet"]
    assert bench_main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["suite"] == "compile" and doc["command"].startswith("normkit bench --suite compile")
    assert [r["variant"] for r in doc["results"]] == list(CS.VARIANTS)
    for r in doc["results"]:
        assert r["model"] == "block" and r["norms_converted"] == 3
        assert r["ratio"] > 0 and r["ci_low"] <= r["ratio"] <= r["ci_high"] and r["pairs"] >= CS.QUICK.min_pairs
        assert r["loss_diff"] < 1e-5, "the converted model computes another loss"
    assert "| block | normkit op |" in capsys.readouterr().out
    assert bench_main(["--suite", "compile", "--rows", "8"]) == 2  # a kernels/shapes option
    assert bench_main(["--suite", "compile", "--models", "gpt"]) == 2
    assert bench_main(["--suite", "shapes", "--models", "block"]) == 2
