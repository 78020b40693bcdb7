"""``normkit bench --suite shapes``: paired timing, its statistics, the report, the CLI end to end.

No test here asserts that anything is fast: timings come from a fake clock where a ratio is
checked, and the end-to-end runs only check that every cell was measured and recorded.
"""

import io
import json
import math
import runpy
import statistics
import sys

import pytest
import torch

from normkit import cli
from normkit.bench import paired as P
from normkit.bench import report as R
from normkit.bench import shapes as S

# --- the order-statistic interval ------------------------------------------------------------


def _binom_cdf(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2), by summation."""
    return sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n


@pytest.mark.parametrize("n", [6, 7, 9, 10, 20, 51, 101])
def test_median_interval_is_the_tightest_with_95_percent_coverage(n):
    values = [float(v) for v in range(1, n + 1)]  # x_(i) = i
    low, high, coverage = P.median_interval(values[::-1])  # order of the input does not matter
    k = int(low)
    assert high == n + 1 - k  # symmetric order statistics
    assert coverage == pytest.approx(1 - 2 * _binom_cdf(k - 1, n))
    assert coverage >= 0.95
    assert 1 - 2 * _binom_cdf(k, n) < 0.95  # one step tighter would not cover


def test_median_interval_worked_examples():
    # n = 9: P(X <= 1) = 10/512 <= 2.5 % < P(X <= 2) = 46/512, so [x_(2), x_(8)]
    assert P.median_interval(range(1, 10)) == (2, 8, pytest.approx(1 - 20 / 512))
    # n = 6: the extremes already cover 1 - 2/64 = 96.9 %
    assert P.median_interval([3, 1, 2, 6, 5, 4]) == (1, 6, pytest.approx(1 - 2 / 64))
    # n = 5 is too few for 95 %: the range, with its true (lower) coverage
    assert P.median_interval([5, 1, 4, 2, 3]) == (1, 5, pytest.approx(1 - 2 / 32))


def test_median_interval_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one value"):
        P.median_interval([])
    with pytest.raises(ValueError, match="confidence must be in"):
        P.median_interval([1.0], confidence=1.0)


def test_estimate_ratio_is_the_median_of_per_pair_ratios():
    # pairs (a, b): (2, 1), (4, 1), (6, 2) -> ratios 2, 4, 3; the ratio of medians would be 4 / 1
    t = P.PairedTiming(a_s=(2.0, 4.0, 6.0), b_s=(1.0, 1.0, 2.0), a_first=(True, False, True), inner_a=1, inner_b=1)
    est = P.estimate_ratio(t)
    assert est.median == 3.0 and est.pairs == 3
    assert (est.low, est.high) == (2.0, 4.0) and est.coverage == pytest.approx(0.75)


# --- the paired timer, on a fake clock -------------------------------------------------------


class FakeClock:
    """``perf_counter_ns`` that only moves when a timed function says so."""

    def __init__(self):
        self.ns = 0
        self.log = []

    def perf_counter_ns(self):
        return self.ns

    def fn(self, name, cost_ns):
        def call():
            self.ns += cost_ns
            self.log.append(name)

        return call


def test_measure_pairs_interleaves_and_reports_per_call_times(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(P.time, "perf_counter_ns", clock.perf_counter_ns)
    a, b = clock.fn("a", 3000), clock.fn("b", 1000)  # a takes 3 us a call, b 1 us
    t = P.measure_pairs(a, b, warmup=2, target_batch_s=40e-6, pairs=20)
    assert t.pairs == 20
    assert t.inner_a == 13 and t.inner_b == 40  # batches of ~40 us: round(40 / 3) and 40 calls
    assert set(t.a_s) == {3e-6} and set(t.b_s) == {1e-6}
    assert P.estimate_ratio(t).median == pytest.approx(3.0)
    assert any(t.a_first) and not all(t.a_first)  # both orders occur
    # after warm-up and calibration, the log is whole batches in the recorded order
    timed = clock.log[len(clock.log) - 20 * (13 + 40):]
    pos = 0
    for first in t.a_first:
        order = [("a", 13), ("b", 40)] if first else [("b", 40), ("a", 13)]
        for name, count in order:
            assert timed[pos:pos + count] == [name] * count
            pos += count


def test_measure_pairs_budget_and_bounds(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(P.time, "perf_counter_ns", clock.perf_counter_ns)
    a, b = clock.fn("a", 1000), clock.fn("b", 1000)
    # no time passes on time.perf_counter, so the budget never runs out: max_pairs stops it
    t = P.measure_pairs(a, b, warmup=0, target_batch_s=1e-5, budget_s=1e9, min_pairs=3, max_pairs=7)
    assert t.pairs == 7
    # a zero budget still takes min_pairs
    assert P.measure_pairs(a, b, warmup=0, target_batch_s=1e-5, budget_s=0.0, min_pairs=4, max_pairs=7).pairs == 4
    with pytest.raises(ValueError, match="min_pairs <= max_pairs"):
        P.measure_pairs(a, b, min_pairs=5, max_pairs=4)
    with pytest.raises(ValueError, match="pairs must be >= 1"):
        P.measure_pairs(a, b, pairs=0)


def test_one_slow_warm_up_call_does_not_size_the_batches(monkeypatch):
    # the third warm-up call of b is slow (a thread pool starting, page faults): its batches are
    # still sized from its steady 150 us calls, as a's are
    clock = FakeClock()
    monkeypatch.setattr(P.time, "perf_counter_ns", clock.perf_counter_ns)
    costs = iter([150_000, 150_000, 5_000_000])

    def b():
        clock.ns += next(costs, 150_000)

    a = clock.fn("a", 150_000)
    t = P.measure_pairs(a, b, warmup=3, target_batch_s=3e-3, pairs=6)
    assert t.inner_a == t.inner_b == 20  # 3 ms / 150 us, not one 5 ms call a batch
    assert set(t.b_s) == {150e-6}


def test_a_first_call_longer_than_the_warm_up_budget_is_not_the_only_one(monkeypatch):
    # the process's first backward takes 0.4 s (past half the 0.5 s budget, which ends the
    # warm-up): a second warm-up call still sizes the batches
    clock = FakeClock()
    monkeypatch.setattr(P.time, "perf_counter_ns", clock.perf_counter_ns)
    monkeypatch.setattr(P.time, "perf_counter", lambda: clock.ns / 1e9)
    costs = iter([400_000_000])

    def a():
        clock.ns += next(costs, 150_000)

    b = clock.fn("b", 150_000)
    t = P.measure_pairs(a, b, warmup=3, target_batch_s=3e-3, budget_s=0.5, pairs=6)
    assert t.inner_a == t.inner_b == 20
    assert clock.log.count("b") == 2 + 8 + 6 * 20  # two warm-up calls, a calibration batch of 8, the pairs


def test_calibrate_slow_function_is_one_call_per_batch(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(P.time, "perf_counter_ns", clock.perf_counter_ns)
    slow = clock.fn("slow", 50_000_000)  # 50 ms
    assert P.calibrate(slow, 3e-3, last_call_s=0.05) == 1
    assert clock.log == []  # the warm call's time was enough: no extra call


# --- the suite's pieces ----------------------------------------------------------------------


def test_grid_and_its_order():
    cells = S.make_cells()
    assert len(cells) == 5 * 3 * 2 * 3 * 2  # rows x widths x ops x modes x threads
    assert cells[0] == S.Cell("layer_norm", "inference", 1, 768, 1)
    assert cells[-1] == S.Cell("rms_norm", "add+norm", 4096, 4096, 2)
    with pytest.raises(ValueError, match="unknown mode 'sideways'"):
        S.make_cells(modes=["sideways"])


@pytest.mark.parametrize("op", S.OPS)
def test_modules_share_random_parameters(op):
    ref, mine = S.make_modules(op, 16, torch.float32, seed=3)
    assert type(mine).__module__.startswith("normkit") and isinstance(mine, type(ref))
    assert not torch.equal(ref.weight, torch.ones(16))  # randomized, so they matter
    for (k1, v1), (k2, v2) in zip(ref.state_dict().items(), mine.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)


@pytest.mark.parametrize("op", S.OPS)
def test_calls_compute_the_same_gradients_and_clear_them(op):
    ref, mine = S.make_modules(op, 32, torch.float32, seed=1)
    tensors = S.make_inputs(5, 32, torch.float32, seed=2)
    for mode in ("fwd+bwd", "add+norm"):
        grads = []
        for module, fused in ((ref, False), (mine, True)):
            call = S.build_call(module, mode, tensors, fused)
            seen = {}

            def keep(p):
                seen["dw"] = p.grad.clone()

            hook = module.weight.register_post_accumulate_grad_hook(keep)
            call()
            hook.remove()
            assert module.weight.grad is None  # set to None after each call
            grads.append(seen["dw"])
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-4)
    assert S.build_call(mine, "inference", tensors, True)() is None and not mine.training


def test_thread_count_is_restored():
    saved = torch.get_num_threads()
    with S.torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == saved


def _cell(op="layer_norm", mode="inference", rows=1, width=768, threads=1, ratio=1.0):
    return {"op": op, "mode": mode, "rows": rows, "width": width, "threads": threads, "ratio": ratio,
            "ci_low": ratio * 0.9, "ci_high": ratio * 1.1, "torch_ms": ratio * 0.01, "normkit_ms": 0.01,
            "pairs": 9, "normkit_path": "eager_no_grad/cpu"}


def test_summarize_done_when_statistics():
    cells = [_cell(ratio=0.5), _cell(rows=8, ratio=1.3), _cell(rows=128, ratio=2.0),
             _cell(rows=4096, width=4096, ratio=1.6), _cell(op="rms_norm", mode="fwd+bwd", rows=4096, width=4096,
                                                            ratio=1.4),
             _cell(mode="add+norm", rows=4096, width=4096, ratio=0.95)]  # add+norm is not a 4096^2 target
    s = S.summarize(cells)
    assert s["cells"] == 6 and s["min"]["ratio"] == 0.5 and s["min"]["rows"] == 1
    assert s["median"] == pytest.approx(statistics.median([0.5, 1.3, 2.0, 1.6, 1.4, 0.95]))
    assert [c["ratio"] for c in s["large"]] == [1.6, 1.4]
    floor, median, large = s["targets"]
    assert floor["met"] is False and floor["failing"] == 1 and floor["measured"] == 0.5
    assert median["met"] is True  # 1.35 >= 1.2
    assert large["met"] is False and large["measured"] == 1.4
    no_large = S.summarize([_cell(ratio=1.3)])
    assert no_large["targets"][2]["met"] is None and all(t["met"] for t in no_large["targets"][:2])


def _shapes_doc(cells):
    return {"suite": "shapes", "date": "2026-12-02T04:40:00Z", "git": {"commit": "abc1234", "dirty": False},
            "machine": {"device": "cpu", "cpu": "Test CPU", "cpu_count": 2, "torch": "x",
                        "load_average_start": [0.5, 0.4, 0.3], "load_average_end": [0.7, 0.5, 0.3]},
            "config": {"dtype": "float32"}, "cells": cells, "summary": S.summarize(cells)}


def test_shapes_table_and_markdown():
    cells = [_cell(ratio=0.76), _cell(threads=2, ratio=0.94), _cell(mode="fwd+bwd", ratio=1.05),
             _cell(rows=4096, width=4096, ratio=3.21), _cell(op="rms_norm", ratio=1.4)]
    doc = _shapes_doc(cells)
    header, rows = R.shapes_table_rows(doc, "layer_norm")
    assert header == ["rows x width", "inference, 1 thread", "inference, 2 threads", "fwd+bwd, 1 thread",
                      "fwd+bwd, 2 threads"]
    assert rows == [["1 x 768", "0.76x", "0.94x", "1.05x", "-"], ["4096 x 4096", "3.21x", "-", "-", "-"]]
    md = R.render_markdown(doc)
    assert md.startswith("normkit bench --suite shapes | cpu: Test CPU (2 logical CPUs)")
    assert "commit abc1234" in md and "load average (1 min) 0.50 -> 0.70" in md
    assert "**LayerNorm**" in md and "**RMSNorm**" in md
    assert "| 1 x 768 | 0.76x | 0.94x | 1.05x | - |" in md
    assert "- slowest cell: 0.76x (LayerNorm inference 1 x 768, 1 thread" in md
    assert "target every cell >= 0.9x torch: MISSED (measured 0.76x; 1 cells below)" in md
    assert "LN/RMS inference and fwd+bwd at 4096x4096 >= 1.5x torch: met" in md
    buf = io.StringIO()
    R.print_shapes(doc, file=buf)
    assert "0.76x" in buf.getvalue() and "median over 5 cells: 1.05x" in buf.getvalue()


def test_inline_list_json_round_trips(tmp_path):
    doc = {"a": [1, 2.5, "x"], "b": {"c": [[1, 2], [3]], "d": []}, "e": [{"f": [True, None]}], "g": {}}
    path = tmp_path / "doc.json"
    R.write_json(doc, str(path), inline_lists=True)
    text = path.read_text()
    assert json.loads(text) == doc
    assert '"a": [1, 2.5, "x"]' in text and '"f": [true, null]' in text


# --- the command line, end to end --------------------------------------------------------------


def test_cli_shapes_end_to_end(tmp_path, capsys, monkeypatch):
    out, md = tmp_path / "shapes.json", tmp_path / "shapes.md"
    saved = torch.get_num_threads()
    rc = cli.main(["bench", "--suite", "shapes", "--quick", "--rows", "1,4", "--widths", "64", "--threads", "1,2",
                   "--repeats", "6", "--json", str(out), "--markdown", str(md)])
    assert rc == 0 and torch.get_num_threads() == saved
    doc = json.loads(out.read_text())
    assert doc["suite"] == "shapes" and "--suite shapes" in doc["command"] and doc["date"].endswith("Z")
    assert doc["machine"]["cpu"] and doc["machine"]["torch"] == torch.__version__ and doc["machine"]["load_average_start"]
    assert doc["git"] is None or doc["git"]["commit"]
    assert doc["config"]["pairs"] == 6 and doc["config"]["threads"] == [1, 2]
    cells = doc["cells"]
    assert len(cells) == 2 * 1 * 2 * 3 * 2  # rows x widths x ops x modes x threads
    for c in cells:
        assert c["pairs"] == 6 == len(c["torch_us"]) == len(c["normkit_us"]) == len(c["torch_first"])
        ratios = [t / n for t, n in zip(c["torch_us"], c["normkit_us"])]
        assert c["ratio"] == pytest.approx(statistics.median(ratios), rel=1e-3)
        assert c["ci_low"] <= c["ratio"] <= c["ci_high"] and c["ci_coverage"] >= 0.95
        assert c["torch_ms"] > 0 and c["normkit_ms"] > 0 and c["max_abs_diff"] < 1e-4
    assert doc["summary"]["cells"] == len(cells)
    text = md.read_text()
    assert "**LayerNorm**" in text and "| 4 x 64 |" in text
    # the renderer used for BENCHMARKS.md gives the same markdown from the JSON
    monkeypatch.setattr(sys, "argv", ["json_to_markdown.py", str(out)])
    runpy.run_path("benchmarks/json_to_markdown.py", run_name="__main__")
    assert text.strip() in capsys.readouterr().out


def test_cli_shapes_json_to_stdout(capsys):
    rc = cli.main(["bench", "--suite", "shapes", "--quick", "--ops", "rms_norm", "--modes", "inference",
                   "--rows", "2", "--widths", "32", "--threads", "1", "--repeats", "6", "--quiet", "--json", "-"])
    captured = capsys.readouterr()
    assert rc == 0
    doc = json.loads(captured.out)
    assert [(c["op"], c["mode"]) for c in doc["cells"]] == [("rms_norm", "inference")]
    assert "RMSNorm" in captured.err  # the table goes to stderr


@pytest.mark.parametrize("argv, message", [
    (["--suite", "speed"], "--suite: unknown 'speed'"),
    (["--suite", "shapes", "--modes", "sideways"], "--modes: unknown 'sideways'"),
    (["--suite", "shapes", "--ops", "add_layer_norm"], "--ops: unknown 'add_layer_norm'"),
    (["--suite", "shapes", "--threads", "0"], "--threads expects comma-separated positive integers"),
    (["--suite", "shapes", "--rows", "8,x"], "--rows expects comma-separated positive integers"),
    (["--suite", "shapes", "--device", "cuda"], "--suite shapes measures the CPU path"),
    (["--suite", "shapes", "--directions", "fwd"], "--directions applies to --suite kernels"),
    (["--suite", "shapes", "--no-compile"], "--no-compile applies to --suite kernels"),
    (["--threads", "1"], "--threads applies to --suite shapes"),
    (["--modes", "inference"], "--modes applies to --suite shapes"),
    (["--suite", "shapes", "--cell-seconds", "0"], "--cell-seconds must be > 0"),
    (["--suite", "shapes", "--repeats", "0"], "--repeats (pairs per cell) must be >= 1"),
    (["--suite", "shapes", "--dtype", "float32,bfloat16"], "takes one dtype"),
    (["--suite", "shapes", "--dtype", "int8"], "unknown dtype 'int8'"),
])
def test_cli_shapes_bad_options_exit_2(argv, message, capsys):
    assert cli.main(["bench", "--quick", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
