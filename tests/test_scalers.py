"""normkit.data scalers against scikit-learn's, on numpy arrays and torch tensors.

Inputs are fresh random draws with per-feature offsets and scales (never zeros), odd sizes.
"""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch

from normkit.data import MinMaxScaler, NotFittedError, RobustScaler, StandardScaler

P = pytest.importorskip("sklearn.preprocessing")

TIGHT = dict(rtol=1e-12, atol=1e-12)


def data(n=203, f=7, *, seed=0, nan_frac=0.0, outliers=False):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, f)) * rng.uniform(0.5, 3.0, f) + rng.uniform(-5.0, 5.0, f)
    if outliers:
        idx = rng.choice(n * f, size=n * f // 20, replace=False)
        x.flat[idx] += rng.normal(0, 50, idx.size)
    if nan_frac:
        x[rng.random(x.shape) < nan_frac] = np.nan
    return x


# (ours, sklearn's, fitted attributes to compare); one instance per test via the factory.
CASES = {
    "minmax": (lambda **kw: MinMaxScaler((-1.5, 2), **kw), lambda: P.MinMaxScaler((-1.5, 2)),
               ["data_min_", "data_max_", "data_range_", "scale_", "min_", "n_samples_seen_"]),
    "standard": (lambda **kw: StandardScaler(**kw), lambda: P.StandardScaler(),
                 ["mean_", "var_", "scale_", "n_samples_seen_"]),
    "robust": (lambda **kw: RobustScaler(**kw), lambda: P.RobustScaler(), ["center_", "scale_"]),
    "robust_unit": (lambda **kw: RobustScaler(quantile_range=(10.0, 80.0), unit_variance=True, **kw),
                    lambda: P.RobustScaler(quantile_range=(10.0, 80.0), unit_variance=True), ["center_", "scale_"]),
}
STREAMING = ["minmax", "standard"]


def assert_attrs_match(ours, theirs, attrs, as_numpy=True):
    for a in attrs:
        got, want = getattr(ours, a), getattr(theirs, a)
        if isinstance(got, torch.Tensor):
            got = got.cpu().numpy()
        if a == "n_samples_seen_" and np.isscalar(want):
            assert got == want, f"{a}: {got} != {want}"
            continue
        np.testing.assert_allclose(got, want, **TIGHT, err_msg=a)


@pytest.mark.parametrize("kind", CASES)
@pytest.mark.parametrize("as_tensor", [False, True])
def test_fit_transform_inverse_match_sklearn(kind, as_tensor):
    make, make_sk, attrs = CASES[kind]
    x = data(seed=1, outliers=kind.startswith("robust"))
    ours, theirs = make(), make_sk()
    inp = torch.from_numpy(x) if as_tensor else x
    y = ours.fit_transform(inp)
    want = theirs.fit_transform(x)
    assert isinstance(y, torch.Tensor) == as_tensor and y.shape == x.shape
    y_np = y.numpy() if as_tensor else y
    np.testing.assert_allclose(y_np, want, **TIGHT)
    assert_attrs_match(ours, theirs, attrs)
    assert ours.n_features_in_ == theirs.n_features_in_ == 7
    # transform on fresh data, and the inverse round trip
    x2 = data(n=31, seed=2)
    np.testing.assert_allclose(np.asarray(ours.transform(x2)), theirs.transform(x2), **TIGHT)
    np.testing.assert_allclose(np.asarray(ours.inverse_transform(ours.transform(x2))), x2, rtol=1e-12, atol=1e-11)
    np.testing.assert_allclose(np.asarray(ours.inverse_transform(x2)), theirs.inverse_transform(x2), **TIGHT)


@pytest.mark.parametrize("kind", STREAMING)
def test_partial_fit_uneven_chunks_equals_one_fit(kind):
    make, make_sk, attrs = CASES[kind]
    x = data(n=1000, seed=3)
    ours, theirs = make(), make_sk().fit(x)
    for chunk in np.split(x, [1, 4, 333, 334, 900]):  # sizes 1, 3, 329, 1, 566, 100
        ours.partial_fit(torch.from_numpy(chunk))
    assert_attrs_match(ours, theirs, attrs)
    np.testing.assert_allclose(ours.transform(torch.from_numpy(x)).numpy(), theirs.transform(x), **TIGHT)


def test_robust_has_no_partial_fit_and_says_why():
    with pytest.raises(NotImplementedError, match="median of chunk medians"):
        RobustScaler().partial_fit(data())


@pytest.mark.parametrize("with_mean,with_std", [(True, False), (False, True), (False, False)])
def test_standard_options_match_sklearn(with_mean, with_std):
    x = data(seed=4)
    ours = StandardScaler(with_mean=with_mean, with_std=with_std).fit(x)
    theirs = P.StandardScaler(with_mean=with_mean, with_std=with_std).fit(x)
    for a in ("mean_", "var_", "scale_"):
        if getattr(theirs, a) is None:
            assert getattr(ours, a) is None, a
        else:
            np.testing.assert_allclose(getattr(ours, a), getattr(theirs, a), **TIGHT, err_msg=a)
    np.testing.assert_allclose(ours.transform(x), theirs.transform(x), **TIGHT)
    np.testing.assert_allclose(ours.inverse_transform(ours.transform(x)), x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("centering,scaling", [(True, False), (False, True)])
def test_robust_options_match_sklearn(centering, scaling):
    x = data(seed=5, outliers=True)
    ours = RobustScaler(with_centering=centering, with_scaling=scaling).fit(x)
    theirs = P.RobustScaler(with_centering=centering, with_scaling=scaling).fit(x)
    assert (ours.center_ is None) == (not centering) and (ours.scale_ is None) == (not scaling)
    np.testing.assert_allclose(ours.transform(x), theirs.transform(x), **TIGHT)


def test_minmax_clip_matches_sklearn():
    x, x_out = data(seed=6), data(seed=7) * 3.0  # second draw reaches outside the fitted range
    ours, theirs = MinMaxScaler((-1, 1), clip=True).fit(x), P.MinMaxScaler((-1, 1), clip=True).fit(x)
    y = ours.transform(x_out)
    np.testing.assert_allclose(y, theirs.transform(x_out), **TIGHT)
    assert y.min() == -1.0 and y.max() == 1.0  # both bounds hit by this draw
    unclipped = MinMaxScaler((-1, 1)).fit(x).transform(x_out)
    assert unclipped.min() < -1.0 and unclipped.max() > 1.0


@pytest.mark.parametrize("kind", CASES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_constant_features_never_nan_or_inf(kind, dtype):
    make, make_sk, attrs = CASES[kind]
    x = data(seed=8)
    x[:, 1] = 1e6 + 0.1  # a constant whose mean does not round exactly
    x[:, 4] = -3.7
    x = x.astype(dtype)
    ours, theirs = make(), make_sk()
    y = ours.fit_transform(x)
    assert np.isfinite(y).all()
    assert np.all(np.asarray(ours.scale_)[[1, 4]] != 0)
    np.testing.assert_allclose(y[:, [1, 4]], theirs.fit_transform(x)[:, [1, 4]], atol=1e-6)
    np.testing.assert_allclose(ours.inverse_transform(y)[:, [1, 4]], x[:, [1, 4]], rtol=1e-7)
    if kind == "standard":  # exactly constant: exact mean, zero variance, scale 1 (sklearn's rule)
        assert ours.var_[1] == 0.0 and ours.scale_[1] == 1.0 and ours.mean_[1] == x[0, 1]


@pytest.mark.parametrize("kind", CASES)
def test_nan_omit_matches_sklearn(kind):
    make, make_sk, attrs = CASES[kind]
    x = data(seed=9, nan_frac=0.15, outliers=kind.startswith("robust"))
    ours, theirs = make(nan_policy="omit"), make_sk()
    y = ours.fit_transform(torch.from_numpy(x)).numpy()
    want = theirs.fit_transform(x)
    assert np.array_equal(np.isnan(y), np.isnan(x))
    np.testing.assert_allclose(y, want, **TIGHT)
    assert_attrs_match(ours, theirs, attrs)
    if kind == "standard":  # per-feature counts differ, so sklearn reports an array
        assert isinstance(theirs.n_samples_seen_, np.ndarray)


def test_nan_omit_partial_fit_matches_sklearn():
    # Compared with sklearn's one fit on all rows: its partial_fit turns a feature NaN when a
    # chunk holds no value of it (the 1-row chunk here); ours merges a count-0 chunk as a no-op.
    x = data(n=500, seed=10, nan_frac=0.1)
    ours, theirs = StandardScaler(nan_policy="omit"), P.StandardScaler().fit(x)
    chunks = np.split(x, [7, 250, 251])
    assert np.isnan(chunks[2]).any()
    for chunk in chunks:
        ours.partial_fit(chunk)
    assert_attrs_match(ours, theirs, CASES["standard"][2])


@pytest.mark.parametrize("kind", CASES)
def test_nan_raise_names_argument_and_count(kind):
    x = data(seed=11)
    x[3, 2] = x[10, 5] = x[11, 5] = np.nan
    scaler = CASES[kind][0]()
    with pytest.raises(ValueError, match=r"X contains 3 NaN value\(s\).*nan_policy='omit'"):
        scaler.fit(x)
    scaler.fit(data(seed=12))
    with pytest.raises(ValueError, match=r"X contains 3 NaN"):
        scaler.transform(x)


def test_infinity_is_rejected():
    x = data(seed=13)
    x[0, 0] = np.inf
    with pytest.raises(ValueError, match=r"X contains 1 infinite value"):
        StandardScaler(nan_policy="omit").fit(x)


@pytest.mark.parametrize("kind", CASES)
def test_3d_feature_dims_match_sklearn_on_flattened_view(kind):
    make, make_sk, attrs = CASES[kind]
    rng = np.random.default_rng(14)
    # (batch, time, features) with feature_dims=-1
    x = rng.normal(size=(5, 13, 6)) * rng.uniform(0.5, 2, 6) + rng.uniform(-3, 3, 6)
    ours, theirs = make(), make_sk()
    y = ours.fit_transform(torch.from_numpy(x))
    assert y.shape == x.shape and ours.n_features_in_ == 6
    np.testing.assert_allclose(y.numpy().reshape(-1, 6), theirs.fit_transform(x.reshape(-1, 6)), **TIGHT)
    assert_attrs_match(ours, theirs, attrs)
    # the same scaler transforms (batch, features): negative feature dims count from the end
    np.testing.assert_allclose(ours.transform(x[0]), theirs.transform(x[0]), **TIGHT)
    # NCHW images, per channel: feature_dims=(1,) reduces over N, H, W
    img = rng.normal(size=(3, 5, 4, 7)) * rng.uniform(0.5, 2, (1, 5, 1, 1)) + rng.uniform(-3, 3, (1, 5, 1, 1))
    ours, theirs = make(feature_dims=(1,)), make_sk()
    y = ours.fit_transform(torch.from_numpy(img))
    flat = img.transpose(0, 2, 3, 1).reshape(-1, 5)
    want = theirs.fit_transform(flat).reshape(3, 4, 7, 5).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(y.numpy(), want, **TIGHT)
    assert_attrs_match(ours, theirs, attrs)
    assert tuple(np.shape(ours.scale_)) == (5,) and ours.feature_shape_ == (5,)


def test_multiple_feature_dims_give_per_position_statistics():
    rng = np.random.default_rng(15)
    x = rng.normal(size=(9, 3, 4, 5)) + rng.uniform(-3, 3, (1, 1, 4, 5))
    s = StandardScaler(feature_dims=(-2, -1)).fit(x)
    assert s.mean_.shape == (4, 5) and s.n_features_in_ == 20
    np.testing.assert_allclose(s.mean_, x.mean(axis=(0, 1)), **TIGHT)
    np.testing.assert_allclose(s.var_, x.var(axis=(0, 1)), **TIGHT)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tensor_in_tensor_out_keeps_dtype_and_device(dtype):
    x = torch.from_numpy(data(seed=16)).to(dtype)
    s = StandardScaler().fit(x)
    y = s.transform(x)
    assert isinstance(y, torch.Tensor) and y.dtype == dtype and y.device == x.device
    assert isinstance(s.mean_, torch.Tensor) and s.mean_.dtype == torch.float64  # float64 statistics
    truth = (x.double() - x.double().mean(0)) / x.double().std(0, unbiased=False)
    eps = torch.finfo(dtype).eps  # float32 math with a two-part mean: within ~1 ulp of the dtype
    assert ((y.double() - truth).abs() <= 2 * eps * truth.abs() + 1e-30).all()


def test_float32_transform_is_exact_at_large_offset():
    """1e6 + N(0, 1) in float32: the float32 fast path stays within 3 ulps of float64 math, where
    subtracting a float32-rounded mean would be off by up to 0.03."""
    g = torch.Generator().manual_seed(24)
    x = (torch.randn(4001, 3, generator=g, dtype=torch.float64) + 1e6 + torch.tensor([0.1, 0.3, 0.7], dtype=torch.float64)).float()
    for scaler in (StandardScaler(), RobustScaler(), MinMaxScaler((-1, 1))):
        y = scaler.fit_transform(x)
        center, divisor, offset = scaler._affine()  # y = (x - center) / divisor + offset
        truth = (x.double() - center) / divisor + (offset or 0.0)
        err = ((y.double() - truth).abs() / (truth.abs() + 1.0)).max().item()  # outputs are O(1)
        assert err <= 3 * torch.finfo(torch.float32).eps, (type(scaler).__name__, err)
        back = scaler.inverse_transform(y)
        assert (back - x).abs().max().item() <= 0.0625  # 1 ulp of float32 at 1e6
    naive = (x - x.double().mean(0).float()) / x.double().std(0).float()
    assert (naive.double() - (x.double() - x.double().mean(0)) / x.double().std(0)).abs().max() > 1e-3


def test_numpy_in_numpy_out_keeps_dtype():
    x = data(seed=17).astype(np.float32)
    for scaler in (MinMaxScaler(), StandardScaler(), RobustScaler()):
        y = scaler.fit_transform(x)
        assert isinstance(y, np.ndarray) and y.dtype == np.float32 and y.shape == x.shape
        assert isinstance(scaler.scale_, np.ndarray) and scaler.scale_.dtype == np.float64
        assert scaler.inverse_transform(y).dtype == np.float32


def test_transform_is_differentiable_for_tensors():
    x = torch.from_numpy(data(seed=18)).requires_grad_(True)
    s = StandardScaler().fit(x)
    s.transform(x).sum().backward()
    torch.testing.assert_close(x.grad, (1.0 / s.scale_).expand_as(x))


def test_not_fitted_error_is_sklearn_like():
    s = StandardScaler()
    assert issubclass(NotFittedError, ValueError) and issubclass(NotFittedError, AttributeError)
    with pytest.raises(NotFittedError, match="StandardScaler instance is not fitted yet"):
        s.transform(data())
    assert not hasattr(s, "mean_")
    with pytest.raises(NotFittedError):
        MinMaxScaler().inverse_transform(data())


def test_wrong_feature_count_says_expected_and_got():
    s = StandardScaler().fit(data(f=7))
    with pytest.raises(ValueError, match=r"X has 6 features.*expecting 7 features"):
        s.transform(data(f=6))
    with pytest.raises(ValueError, match=r"X has 5 features.*expecting 7"):
        s.partial_fit(data(f=5))


def test_input_errors_name_the_argument():
    with pytest.raises(TypeError, match=r"X must have a floating dtype.*int64"):
        StandardScaler().fit(np.arange(12).reshape(4, 3))
    with pytest.raises(TypeError, match=r"X must have a floating dtype.*torch.int32"):
        MinMaxScaler().fit(torch.arange(12, dtype=torch.int32).reshape(4, 3))
    with pytest.raises(ValueError, match=r"at least one dimension of samples.*1 dimension"):
        StandardScaler().fit(np.random.default_rng(0).normal(size=5))
    with pytest.raises(ValueError, match=r"X has 0 samples"):
        StandardScaler().fit(np.empty((0, 3)))
    with pytest.raises(ValueError, match=r"feature_dims=\[3\] is out of range"):
        StandardScaler(feature_dims=3).fit(data())
    with pytest.raises(TypeError, match="feature_dims must be an int or a sequence"):
        StandardScaler(feature_dims="1")


@pytest.mark.parametrize("kind", CASES)
@pytest.mark.parametrize("dtype", [">f4", ">f8", ">f2"])
def test_big_endian_arrays_are_accepted(kind, dtype):
    """Big-endian floats (FITS files, network data) are floats: converted to native order."""
    x = data(seed=31)
    big = x.astype(dtype)
    assert not big.dtype.isnative
    ours, ref = CASES[kind][0](), CASES[kind][0]()
    y = ours.fit_transform(big)
    want = ref.fit_transform(x.astype(big.dtype.newbyteorder("=")))
    assert y.dtype == want.dtype and y.dtype.isnative
    np.testing.assert_array_equal(y, want)
    np.testing.assert_array_equal(ours.inverse_transform(y.astype(dtype)), ref.inverse_transform(want))


def test_overflowing_variance_is_an_error_not_a_constant_feature():
    """Finite float64 values whose squared deviations overflow: var_ would be inf, which the
    constant-feature test took for 0 and left the feature unscaled, silently."""
    x = data(seed=32)
    x[:, 2] *= 1e170
    with pytest.raises(ValueError, match=r"X: the mean or variance of feature\(s\) \[2\] overflows float64"):
        StandardScaler().fit(x)
    s = StandardScaler().fit(data(seed=33))
    with pytest.raises(ValueError, match=r"overflows float64"):
        s.partial_fit(x)
    y = np.full((5, 2), 1.5e308)
    y[::2] *= -1
    with pytest.raises(ValueError, match=r"X: max - min of feature\(s\) \[0, 1\] overflows float64"):
        MinMaxScaler().fit(y)
    with pytest.raises(ValueError, match=r"X: the quantile range of feature\(s\) \[0, 1\] overflows"):
        RobustScaler(quantile_range=(0.0, 100.0)).fit(y)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_float32_data_near_1e30_is_standardized(as_tensor):
    """Statistics are float64, so float32 data at 1e30 (squares 1e60) scales correctly."""
    x = (data(seed=34) * 1e30).astype(np.float32)
    s = StandardScaler()
    y = s.fit_transform(torch.from_numpy(x) if as_tensor else x)
    y = y.numpy() if as_tensor else y
    np.testing.assert_allclose(y.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(y.astype(np.float64).std(0), 1, rtol=1e-5)


@pytest.mark.parametrize("kind", CASES)
@pytest.mark.parametrize("as_tensor", [False, True])
def test_zero_features_is_a_clear_error(kind, as_tensor):
    x = np.empty((5, 0), dtype=np.float32)
    name = type(CASES[kind][0]()).__name__
    with pytest.raises(ValueError, match=rf"Found array with 0 feature\(s\) \(shape=\[5, 0\]\) while a minimum of 1 is required by {name}"):
        CASES[kind][0]().fit(torch.from_numpy(x) if as_tensor else x)
    fitted = CASES[kind][0]().fit(data(f=3))
    with pytest.raises(ValueError, match=r"Found array with 0 feature"):
        fitted.transform(x)


def test_wrong_device_is_a_clear_error():
    s = StandardScaler().fit(torch.from_numpy(data(seed=19)))
    with pytest.raises(ValueError, match=r"X is on meta but the fitted statistics.*are on cpu"):
        s.transform(torch.empty(4, 7, dtype=torch.float64, device="meta"))
    s.to("meta")
    assert s.mean_.device.type == "meta"


@pytest.mark.parametrize("make,match", [
    (lambda: MinMaxScaler((1, 0)), r"feature_range must be \(min, max\) with finite min < max, got \(1, 0\)"),
    (lambda: MinMaxScaler((0, 0)), r"feature_range .* got \(0, 0\)"),
    (lambda: MinMaxScaler((0, 1, 2)), r"feature_range"),
    (lambda: RobustScaler(quantile_range=(75.0, 25.0)), r"quantile_range must be .*0 <= q_min < q_max <= 100, got \(75.0, 25.0\)"),
    (lambda: RobustScaler(quantile_range=(-1, 50)), r"quantile_range"),
    (lambda: RobustScaler(quantile_range=(0, 100), unit_variance=True), r"inside \(0, 100\) with unit_variance"),
    (lambda: StandardScaler(nan_policy="ignore"), r"nan_policy must be one of \('raise', 'omit'\), got 'ignore'"),
])
def test_bad_arguments_raise_value_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_bool_argument_raises_type_error():
    with pytest.raises(TypeError, match="with_mean must be a bool, got 'yes'"):
        StandardScaler(with_mean="yes")


@pytest.mark.parametrize("kind", CASES)
def test_state_dict_round_trip(kind):
    make, _, attrs = CASES[kind]
    x = torch.from_numpy(data(seed=20))
    fitted = make().fit(x)
    buf = io.BytesIO()
    torch.save(fitted.state_dict(), buf)
    buf.seek(0)
    loaded = make().load_state_dict(torch.load(buf, weights_only=True))
    x2 = torch.from_numpy(data(n=17, seed=21))
    torch.testing.assert_close(loaded.transform(x2), fitted.transform(x2), rtol=0, atol=0)
    for a in attrs:
        torch.testing.assert_close(torch.as_tensor(getattr(loaded, a)), torch.as_tensor(getattr(fitted, a)), rtol=0, atol=0)
    if kind in STREAMING:  # streaming continues identically after a reload
        torch.testing.assert_close(loaded.partial_fit(x2).transform(x), fitted.partial_fit(x2).transform(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="missing keys"):
        make().load_state_dict({})
    assert pickle.loads(pickle.dumps(fitted)).transform(x2).equal(fitted.transform(x2))


def test_sklearn_parameter_protocol_and_clone():
    from sklearn.base import clone

    s = MinMaxScaler((-2, 2), clip=True, nan_policy="omit")
    assert s.get_params() == {"feature_range": (-2, 2), "clip": True, "feature_dims": -1, "nan_policy": "omit"}
    c = clone(s)
    assert c is not s and c.get_params() == s.get_params()
    assert repr(s) == "MinMaxScaler(feature_range=(-2, 2), clip=True, nan_policy='omit')"
    with pytest.raises(ValueError, match="feature_range"):
        s.set_params(feature_range=(3, 3))
    assert s.feature_range == (-2, 2)  # a rejected set_params changes nothing
    with pytest.raises(ValueError, match=r"Invalid parameter\(s\) \['bogus'\]"):
        s.set_params(bogus=1)


def test_importing_normkit_data_does_not_import_sklearn():
    import subprocess
    import sys

    code = "import sys, normkit.data; assert 'sklearn' not in sys.modules and 'scipy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_robust_state_from_another_quantile_range_is_rejected():
    state = RobustScaler().fit(data(seed=22)).state_dict()
    with pytest.raises(ValueError, match=r"fitted with quantile_range=\(25.0, 75.0\).*\(10.0, 90.0\)"):
        RobustScaler(quantile_range=(10.0, 90.0)).load_state_dict(state)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", CASES)
def test_cuda_tensors_keep_device_and_match_cpu(kind):
    make = CASES[kind][0]
    x = torch.from_numpy(data(n=1001, seed=23, nan_frac=0.05)).float()
    cpu, gpu = make(nan_policy="omit"), make(nan_policy="omit")
    want = cpu.fit_transform(x)
    got = gpu.fit_transform(x.cuda())
    assert got.device.type == "cuda" and got.dtype == torch.float32
    assert gpu.scale_.device.type == "cuda" and gpu.scale_.dtype == torch.float64
    torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(gpu.scale_.cpu(), cpu.scale_, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"X is on cpu but the fitted statistics.*are on cuda"):
        gpu.transform(x)


def test_works_inside_an_sklearn_pipeline():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    x = data(seed=25)
    y = (x[:, 0] > np.median(x[:, 0])).astype(int)
    ours = make_pipeline(StandardScaler(), LogisticRegression()).fit(x, y)
    theirs = make_pipeline(P.StandardScaler(), LogisticRegression()).fit(x, y)
    np.testing.assert_allclose(ours.predict_proba(x), theirs.predict_proba(x), rtol=1e-8, atol=1e-10)
