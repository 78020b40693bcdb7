"""RunningNormalizer: exact streaming statistics, forgetting, eval freeze, state, distributed merge.

Also the float64 accuracy of streaming statistics (shared with StandardScaler.partial_fit) over
10^7 values at a 1e6 offset, fed as float32 chunks generated on the fly.
"""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from normkit.data import RunningNormalizer, StandardScaler


def chunk(seed: int, rows: int, shape=(5,), *, offset=0.0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scales = torch.linspace(0.5, 3.0, int(np.prod(shape)), dtype=torch.float64).reshape(shape)
    shifts = torch.linspace(-4.0, 7.0, int(np.prod(shape)), dtype=torch.float64).reshape(shape)
    x = torch.randn((rows,) + tuple(shape), generator=g, dtype=torch.float64) * scales + shifts + offset
    return x.to(dtype)


def assert_within_ulps(y: torch.Tensor, truth: torch.Tensor, ulps: float = 3.0) -> None:
    """``y`` within ``ulps`` units of its dtype's precision of the float64 ``truth`` (relative,
    with a floor of 1e-3 for values near 0 — the output of a standardization is O(1))."""
    err = ((y.double() - truth).abs() / (truth.abs() + 1e-3)).max().item()
    assert err <= ulps * torch.finfo(y.dtype).eps, f"relative error {err:.3g} > {ulps} ulps of {y.dtype}"


def numpy_moments(x: torch.Tensor, axis=0):
    a = x.double().numpy()
    return a.mean(axis), a.var(axis)  # numpy: pairwise sums, two-pass variance, float64


def test_cumulative_statistics_equal_one_pass_over_all_batches():
    norm = RunningNormalizer((3, 5))
    batches = [chunk(s, r, (3, 5)).reshape(-1, 1, 3, 5) for s, r in [(1, 1), (2, 17), (3, 250), (4, 3)]]
    for b in batches:
        y = norm(b)
    all_x = torch.cat(batches).reshape(-1, 3, 5)
    mean, var = numpy_moments(all_x)
    np.testing.assert_allclose(norm.running_mean.numpy(), mean, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(norm.running_var.numpy(), var, rtol=1e-12)
    assert (norm.count == 271).all()
    truth = (batches[-1].double() - torch.from_numpy(mean)) / torch.from_numpy(var + 1e-8).sqrt()
    assert y.dtype == torch.float32 and y.shape == batches[-1].shape
    assert_within_ulps(y, truth)


def test_streaming_1e7_values_at_offset_1e6_is_float64_accurate():
    """10^7 float32 values of 1e6 + N(0, σ²) in uneven chunks: StandardScaler.partial_fit and
    RunningNormalizer match a float64 two-pass numpy computation (observed: 4.5e-14 relative
    for the variance; a float64 E[x²] − E[x]² is off by 100 %)."""
    norm, scaler = RunningNormalizer(5), StandardScaler()
    rows = [300_000 + 37 * i for i in range(5)]
    rows.append(2_000_000 - sum(rows))  # 2e6 rows x 5 features = 10^7 values

    def features_by_row(i, r):  # (5, r) contiguous: numpy sums along it pairwise (axis 0 it would not)
        return np.ascontiguousarray(chunk(100 + i, r, offset=1e6).double().numpy().T)

    total = np.zeros(5)
    for i, r in enumerate(rows):  # generated on the fly, never all in memory
        x = chunk(100 + i, r, offset=1e6)
        norm.update(x)
        scaler.partial_fit(x)
        total += features_by_row(i, r).sum(1)
    n = sum(rows)
    mean = total / n
    var = sum(((features_by_row(i, r) - mean[:, None]) ** 2).sum(1) for i, r in enumerate(rows)) / n
    for got_mean, got_var in [(norm.running_mean.numpy(), norm.running_var.numpy()), (scaler.mean_.numpy(), scaler.var_.numpy())]:
        np.testing.assert_allclose(got_mean, mean, rtol=1e-15)
        np.testing.assert_allclose(got_var, var, rtol=1e-12)
    assert norm.count[0].item() == scaler.n_samples_seen_ == n
    assert abs(var[0] - 0.25) < 0.01  # the data is what it claims: σ = 0.5 for feature 0


def test_momentum_tracks_a_level_shift_while_cumulative_stays_between():
    # momentum is per sample: alpha with (1 - alpha)^b = 0.95 forgets 5 % per batch of b.
    m, b, k = 0.05, 33, 6
    alpha = 1 - (1 - m) ** (1 / b)
    ema, cumulative = RunningNormalizer(4, momentum=alpha), RunningNormalizer(4)
    for i in range(200):
        x = chunk(i, b, (4,))
        ema(x), cumulative(x)
    for i in range(200, 200 + int(k / m)):  # k / m = 120 batches at a level shifted by +10
        x = chunk(i, b, (4,), offset=10.0)
        ema(x), cumulative(x)
    base = torch.linspace(-4.0, 7.0, 4, dtype=torch.float64)
    sigma = torch.linspace(0.5, 3.0, 4, dtype=torch.float64)
    # what remains of the old level, (1 - m)^(k/m) ≈ e^-k, plus 5 standard deviations of the
    # EW mean's own noise, σ·sqrt(alpha / (2 - alpha))
    allowed = 10 * (1 - m) ** int(k / m) + 5 * sigma * (alpha / (2 - alpha)) ** 0.5
    assert ((ema.running_mean - (base + 10)).abs() < allowed).all(), ema.running_mean - base
    # the cumulative mean weights old and new data 200:120 — it sits in between, near +3.75
    assert ((cumulative.running_mean - (base + 3.75)).abs() < 0.1).all(), cumulative.running_mean - base
    # variance: EMA is the within-level spread plus what its small remaining weight e on the old
    # level adds, e(1 - e)·10² (the per-batch blend never saw that); the cumulative one adds
    # the whole level mixture's
    spread = sigma**2
    e = (1 - m) ** int(k / m)
    assert ((ema.running_var / (spread + e * (1 - e) * 100) - 1).abs() < 0.3).all(), ema.running_var
    assert (cumulative.running_var > spread + 15).all()


def _west_recursion(x: torch.Tensor, alpha: float):
    """West's (1979) weighted update, one sample at a time, weights (1 - alpha)^age:
    W <- qW + 1, mu <- mu + d/W, M2 <- qM2 + d(x - mu); variance M2 / (W - W2/W)."""
    q = 1 - alpha
    W = W2 = M2 = mu = torch.zeros(x.shape[1:], dtype=torch.float64)
    for row in x.double():
        W, W2 = q * W + 1, q * q * W2 + 1
        d = row - mu
        mu = mu + d / W
        M2 = q * M2 + d * (row - mu)
        dof = W - W2 / W
    return mu, torch.where(dof > 0, M2 / dof, 0.0)


def test_momentum_batch_update_equals_the_per_sample_recursion():
    """The closed-form batch update is West's per-sample recursion with bias correction, and
    the direct weighted formula; it replaces the BatchNorm blend of per-batch variances (which
    gave variance 0 at batch size 1 and (B-1)/B of it at batch size B)."""
    alpha = 0.3
    norm = RunningNormalizer(3, momentum=alpha)
    a, b = chunk(1, 11, (3,), dtype=torch.float64), chunk(2, 7, (3,), dtype=torch.float64)
    norm(a)
    norm(b)
    x = torch.cat([a, b])
    mu, var = _west_recursion(x, alpha)
    torch.testing.assert_close(norm.running_mean, mu, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(norm.running_var, var, rtol=1e-12, atol=1e-13)
    w = (1 - alpha) ** torch.arange(17, -1, -1, dtype=torch.float64)[:, None]
    direct_mu = (w * x).sum(0) / w.sum()
    direct_var = (w * (x - direct_mu) ** 2).sum(0) / (w.sum() - (w * w).sum() / w.sum())
    torch.testing.assert_close(norm.running_var, direct_var, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(norm.running_mean, direct_mu, rtol=1e-13, atol=1e-13)
    assert (norm.count == 18).all()
    one = RunningNormalizer(3, momentum=alpha)
    one(a[:1])
    assert torch.equal(one.running_mean, a[0]) and (one.running_var == 0).all(), "one sample: its value, variance 0"


def test_momentum_single_samples_are_standardized():
    """A stream of single samples from N(3, 5²): mean ~0 and std ~1 out (the per-batch blend
    left the variance at 0 here, so the output was only centered: std 5)."""
    g = torch.Generator().manual_seed(11)
    x = 3.0 + 5.0 * torch.randn(4000, 1, 2, generator=g, dtype=torch.float64)
    norm = RunningNormalizer(2, momentum=0.01)
    y = torch.cat([norm(row) for row in x])[500:]  # after ~5 memory lengths of warm-up
    assert abs(y.mean().item()) < 0.1, y.mean()
    assert abs(y.std().item() - 1) < 0.06, y.std()
    assert ((norm.running_mean - 3).abs() < 4 * 5 * (0.01 / 1.99) ** 0.5).all(), norm.running_mean
    assert ((norm.running_var / 25 - 1).abs() < 0.4).all(), norm.running_var


@pytest.mark.parametrize("nan_policy", ["raise", "omit"])
def test_momentum_statistics_do_not_depend_on_the_batch_size(nan_policy):
    x = chunk(21, 800, (3,), offset=1e3, dtype=torch.float64)
    if nan_policy == "omit":
        x[torch.rand(x.shape, generator=torch.Generator().manual_seed(22)) < 0.1] = float("nan")
    ones, eights = RunningNormalizer(3, momentum=0.02, nan_policy=nan_policy), RunningNormalizer(3, momentum=0.02, nan_policy=nan_policy)
    for row in x:
        ones(row[None])
    for batch in x.split(8):
        eights(batch)
    for key in ("running_mean", "running_var", "count", "ew_weight", "ew_weight_sq"):
        torch.testing.assert_close(eights.state_dict()[key], ones.state_dict()[key], rtol=1e-11, atol=1e-11, msg=key)


def test_momentum_tracks_a_drifting_stream():
    """Level 0.002·t, σ = 1, in batches of 8: the EW mean lags by r(1-α)/α and the variance
    stays σ² (the blend of per-batch variances reported 7/8 of it at B = 8)."""
    g = torch.Generator().manual_seed(5)
    alpha, r, n = 0.05, 0.002, 4000
    level = r * torch.arange(n, dtype=torch.float64)
    x = (level + torch.randn(n, generator=g, dtype=torch.float64))[:, None]
    ema, cumulative = RunningNormalizer(1, momentum=alpha), RunningNormalizer(1)
    variances = []
    for batch in x.split(8):
        ema(batch), cumulative(batch)
        variances.append(ema.running_var.item())
    lagged = level[-1] - r * (1 - alpha) / alpha
    assert abs(ema.running_mean.item() - lagged) < 4 * (alpha / (2 - alpha)) ** 0.5, ema.running_mean
    assert abs(cumulative.running_mean.item() - level.mean()) < 0.1  # the cumulative one lags by ~4
    mean_var = sum(variances[50:]) / len(variances[50:])
    assert abs(mean_var - 1) < 0.05, mean_var  # unbiased on average over the stream


def test_momentum_state_saved_before_the_weight_buffers_loads():
    norm = RunningNormalizer(3, momentum=0.1)
    norm(chunk(1, 40, (3,)))
    old = {k: v for k, v in norm.state_dict().items() if not k.startswith("ew_")}
    loaded = RunningNormalizer(3, momentum=0.1)
    loaded.load_state_dict(old)
    torch.testing.assert_close(loaded.ew_weight, norm.ew_weight, rtol=1e-12, atol=0)
    torch.testing.assert_close(loaded.ew_weight_sq, norm.ew_weight_sq, rtol=1e-12, atol=0)


@pytest.mark.parametrize("momentum", [None, 0.1])
def test_overflowing_variance_is_an_error_not_a_constant_feature(momentum):
    x = chunk(3, 50, (3,), dtype=torch.float64)
    x[:, 1] *= 1e170  # finite values whose squares overflow float64
    norm = RunningNormalizer(3, momentum=momentum)
    with pytest.raises(ValueError, match=r"input: the mean or variance of feature\(s\) \[1\] overflows float64"):
        norm(x)


@pytest.mark.parametrize("momentum", [None, 0.1])
def test_eval_mode_is_frozen(momentum):
    norm = RunningNormalizer(5, momentum=momentum)
    norm(chunk(1, 64))
    state = {k: v.clone() for k, v in norm.state_dict().items()}
    norm.eval()
    x = chunk(2, 9, offset=3.0)
    y = norm(x)
    for k, v in norm.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert_within_ulps(y, (x.double() - state["running_mean"]) / (state["running_var"] + 1e-8).sqrt())


@pytest.mark.parametrize("momentum", [None, 0.2])
def test_state_dict_round_trip(momentum):
    norm = RunningNormalizer((2, 3), momentum=momentum, clip=4.0)
    for s in range(3):
        norm(chunk(s, 21, (2, 3)))
    keys = set(norm.state_dict())
    assert {"count", "running_mean", "running_var"} <= keys
    assert all(v.dtype == torch.float64 for v in norm.state_dict().values())
    buf = io.BytesIO()
    torch.save(norm.state_dict(), buf)
    buf.seek(0)
    loaded = RunningNormalizer((2, 3), momentum=momentum, clip=4.0)
    loaded.load_state_dict(torch.load(buf, weights_only=True))
    x = chunk(9, 13, (2, 3), offset=2.0)
    torch.testing.assert_close(loaded(x), norm(x), rtol=0, atol=0)  # same update, same output
    for k, v in norm.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_half_keeps_float64_statistics():
    norm = RunningNormalizer(5).half()
    assert norm.running_mean.dtype == torch.float64
    x = chunk(3, 40, offset=100.0, dtype=torch.float16)
    y = norm(x)
    assert y.dtype == torch.float16
    mean, var = numpy_moments(x)
    np.testing.assert_allclose(norm.running_var.numpy(), var, rtol=1e-12)


def test_clip_and_inverse():
    norm = RunningNormalizer(5, clip=1.5)
    norm(chunk(1, 100, dtype=torch.float64))
    x = chunk(2, 30, dtype=torch.float64)
    y = norm(x)
    assert y.abs().max() == 1.5
    inside = y.abs() < 1.5
    back = norm.inverse(y)
    torch.testing.assert_close(back[inside], x[inside], rtol=1e-13, atol=1e-13)
    norm.eval()
    unclipped = RunningNormalizer(5)
    unclipped.load_state_dict(norm.state_dict())
    torch.testing.assert_close(unclipped.inverse(unclipped(x)), x, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("momentum", [None, 0.5])
def test_constant_features_never_nan_or_inf(momentum):
    norm = RunningNormalizer(4, momentum=momentum, eps=0.0)
    for s in range(3):
        x = chunk(s, 10 + s, (4,), dtype=torch.float64)
        x[:, 1] = 0.1  # sum(11 × 0.1) / 11 != 0.1: a rounded mean would leave a tiny variance
        x[:, 3] = 1e6 + 0.25
        y = norm(x)
    assert torch.isfinite(y).all()
    assert norm.running_var[1] == 0 and norm.running_var[3] == 0
    assert (y[:, [1, 3]] == 0).all()  # exact mean, scale 1
    z = norm.eval()(torch.full((2, 4), 0.6, dtype=torch.float64))
    torch.testing.assert_close(z[:, 1], torch.full((2,), 0.5, dtype=torch.float64), rtol=1e-14, atol=1e-14)  # shifted, not divided by 0


def test_nan_policy_raise_and_omit():
    x = chunk(4, 50, dtype=torch.float64)
    x[3, 1] = x[7, 1] = x[9, 4] = float("nan")
    with pytest.raises(ValueError, match=r"input contains 3 NaN value\(s\) \(of 250\).*nan_policy='omit'"):
        RunningNormalizer(5)(x)
    norm = RunningNormalizer(5, nan_policy="omit")
    y1 = norm(x[:20])
    y2 = norm(x[20:])
    a = x.numpy()
    np.testing.assert_allclose(norm.running_mean.numpy(), np.nanmean(a, 0), rtol=1e-13)
    np.testing.assert_allclose(norm.running_var.numpy(), np.nanvar(a, 0), rtol=1e-12)
    assert norm.count.tolist() == [50, 48, 50, 50, 49]
    assert torch.equal(torch.isnan(torch.cat([y1, y2])), torch.isnan(x))
    bad = x.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"input contains 1 infinite value"):
        norm(bad)


def test_gradient_flows_through_input():
    norm = RunningNormalizer(5)
    x = chunk(5, 12, dtype=torch.float64).requires_grad_(True)
    norm(x).sum().backward()
    torch.testing.assert_close(x.grad, (1 / (norm.running_var + 1e-8).sqrt()).expand_as(x))


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(momentum=0.0), ValueError, r"momentum must be None .* in \(0, 1\) .*got 0.0"),
    (dict(momentum=1.5), ValueError, r"momentum .* got 1.5"),
    # per-sample forgetting: 1 keeps only the newest sample, whose variance is undefined
    (dict(momentum=1.0), ValueError, r"momentum .* got 1.0"),
    (dict(eps=-1e-3), ValueError, r"eps must be a number >= 0, got -0.001"),
    (dict(clip=0), ValueError, r"clip must be None or a number > 0, got 0"),
    (dict(nan_policy="skip"), ValueError, r"nan_policy must be one of"),
    (dict(shape=(3, 0)), ValueError, r"shape must be a non-empty sequence of positive sizes, got \[3, 0\]"),
    (dict(shape="5"), TypeError, r"shape must be an int or a sequence of ints"),
])
def test_bad_arguments(kwargs, exc, match):
    kwargs = {"shape": 5, **kwargs}
    with pytest.raises(exc, match=match):
        RunningNormalizer(**kwargs)


def test_bad_inputs_name_the_argument():
    norm = RunningNormalizer((3, 5))
    with pytest.raises(ValueError, match=r"input must have shape \[\*, 3, 5\].*got input of size \[4, 5, 3\]"):
        norm(torch.randn(4, 5, 3))
    with pytest.raises(TypeError, match=r"input must have a floating dtype.*torch.int64"):
        norm(torch.ones(2, 3, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"input is on meta but RunningNormalizer's statistics are on cpu"):
        norm(torch.empty(2, 3, 5, device="meta"))
    with pytest.raises(ValueError, match=r"y must have shape"):
        norm.inverse(torch.randn(3))


def test_sync_without_process_group_is_a_clear_error():
    with pytest.raises(RuntimeError, match="init_process_group"):
        RunningNormalizer(3).sync_distributed()


# --- distributed: two gloo processes, each sees different data -------------------------------

def _rank_batches(rank: int, phase: int):
    """Rank 0 and rank 1 see different amounts of data at different levels (odd sizes)."""
    sizes = [[7, 130], [51]][rank] if phase == 0 else [[29], [3, 88]][rank]
    return [chunk(1000 * phase + 10 * rank + i, r, (2, 3), offset=5.0 * rank + phase, dtype=torch.float64)
            for i, r in enumerate(sizes)]


def _dist_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        cum, ema = RunningNormalizer((2, 3)), RunningNormalizer((2, 3), momentum=0.25)
        for b in _rank_batches(rank, 0):
            cum(b), ema(b)
        before = {"mean": ema.running_mean.clone(), "var": ema.running_var.clone()}
        cum.sync_distributed()
        ema.sync_distributed()
        first = {k: v.clone() for k, v in cum.state_dict().items()}
        for b in _rank_batches(rank, 1):  # more data, then a second sync: nothing counted twice
            cum(b)
        cum.sync_distributed()
        torch.save({"first": first, "second": cum.state_dict(), "ema": ema.state_dict(), "ema_before": before},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_sync_distributed_two_gloo_ranks(tmp_path):
    mp.spawn(_dist_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    phase0 = torch.cat(_rank_batches(0, 0) + _rank_batches(1, 0))
    both = torch.cat([phase0] + _rank_batches(0, 1) + _rank_batches(1, 1))
    for key, data in [("first", phase0), ("second", both)]:
        mean, var = numpy_moments(data)
        for r in range(2):
            st = res[r][key]
            assert (st["count"] == data.shape[0]).all(), (key, r, st["count"])
            np.testing.assert_allclose(st["running_mean"].numpy(), mean, rtol=1e-13, atol=1e-13)
            np.testing.assert_allclose(st["running_var"].numpy(), var, rtol=1e-12)
        for k in res[0][key]:  # bitwise identical on both ranks
            assert torch.equal(res[0][key][k], res[1][key][k]), (key, k)
    # momentum mode: equal-weight mixture of the two ranks' EMA statistics
    m = [res[r]["ema_before"]["mean"] for r in range(2)]
    v = [res[r]["ema_before"]["var"] for r in range(2)]
    mix_mean = (m[0] + m[1]) / 2
    mix_var = (v[0] + v[1]) / 2 + ((m[0] - m[1]) / 2) ** 2
    for r in range(2):
        torch.testing.assert_close(res[r]["ema"]["running_mean"], mix_mean, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(res[r]["ema"]["running_var"], mix_var, rtol=1e-14, atol=1e-14)
        assert (res[r]["ema"]["count"] == phase0.shape[0]).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("momentum", [None, 0.1])
def test_cuda_matches_cpu(momentum):
    cpu, gpu = RunningNormalizer(7, momentum=momentum), RunningNormalizer(7, momentum=momentum).cuda()
    for s in range(3):
        x = chunk(s, 333, (7,), offset=1e4)
        want, got = cpu(x), gpu(x.cuda())
        assert got.device.type == "cuda" and got.dtype == torch.float32
        torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=1e-6)
    for k, v in cpu.state_dict().items():
        torch.testing.assert_close(gpu.state_dict()[k].cpu(), v, rtol=1e-12, atol=1e-12)
