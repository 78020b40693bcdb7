"""ONNX export of normkit modules: standard operators, checked in onnxruntime against PyTorch."""

from __future__ import annotations

import pytest
import torch

import normkit
from normkit.tools import export_onnx, onnx_op_types

from helpers import randn

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def _init(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(1.0 + 0.4 * torch.randn(p.shape, generator=g))
    return module


class FusedBlock(torch.nn.Module):
    """A pre-norm residual step through normkit's fused path: returns (y, x + h)."""

    def __init__(self, cls, d: int = 24):
        super().__init__()
        self.norm = cls(d)

    def forward(self, x, h):
        return self.norm(x, h, prenorm=True)


X = randn((3, 5, 24), seed=1, offset=1.0, scale=2.0)
H = randn((3, 5, 24), seed=2)
IMG = randn((2, 6, 5, 7), seed=3)
IMG_CL = IMG.to(memory_format=torch.channels_last)

CASES = {
    "LayerNorm": (lambda: normkit.nn.LayerNorm(24), (X,)),
    "LayerNorm-no-affine": (lambda: normkit.nn.LayerNorm(24, elementwise_affine=False), (X,)),
    "RMSNorm": (lambda: normkit.nn.RMSNorm(24, eps=1e-6), (X,)),
    "fused-LayerNorm": (lambda: FusedBlock(normkit.nn.LayerNorm), (X, H)),
    "fused-RMSNorm": (lambda: FusedBlock(normkit.nn.RMSNorm), (X, H)),
    "LayerNorm2d": (lambda: normkit.nn.LayerNorm2d(6), (IMG,)),
    "LayerNorm2d-channels_last": (lambda: normkit.nn.LayerNorm2d(6), (IMG_CL,)),
    "LayerNormCHW": (lambda: normkit.nn.LayerNormCHW(6), (IMG,)),
}

# op types each export must contain (beside whatever else the exporter writes)
OPSET17_OPS = {
    "LayerNorm": {"LayerNormalization"},
    "LayerNorm-no-affine": {"LayerNormalization"},
    "RMSNorm": {"ReduceMean", "Sqrt"},
    "fused-LayerNorm": {"Add", "LayerNormalization"},
    "fused-RMSNorm": {"Add", "ReduceMean", "Sqrt"},
    "LayerNorm2d": {"ReduceMean"},
    "LayerNorm2d-channels_last": {"Transpose", "LayerNormalization"},
    "LayerNormCHW": {"LayerNormalization"},
}


@pytest.mark.parametrize("name", list(CASES))
def test_opset17_export_uses_standard_ops_and_matches_pytorch(name, tmp_path):
    make, args = CASES[name]
    model = _init(make())
    result = export_onnx(model, args, tmp_path / f"{name}.onnx", opset=17)
    assert result.exporter == "torchscript" and result.opset == 17
    assert OPSET17_OPS[name] <= set(result.op_types), result.op_types
    assert result.max_abs_error is not None and result.max_abs_error < 1e-5
    assert result.op_types == onnx_op_types(tmp_path / f"{name}.onnx")
    if name.startswith("fused"):
        import onnxruntime as ort

        session = ort.InferenceSession(str(tmp_path / f"{name}.onnx"), providers=["CPUExecutionProvider"])
        assert len(session.get_outputs()) == 2, "prenorm also returns the residual sum"


@pytest.mark.parametrize(
    "name, opset, ops",
    [
        ("LayerNorm", 18, {"LayerNormalization"}),
        ("RMSNorm", 23, {"RMSNormalization"}),  # onnxruntime runs opset 23's RMSNormalization
        ("fused-RMSNorm", 23, {"Add", "RMSNormalization"}),
        ("LayerNormCHW", 18, {"LayerNormalization"}),
    ],
)
def test_dynamo_export(name, opset, ops, tmp_path):
    make, args = CASES[name]
    result = export_onnx(_init(make()), args, tmp_path / f"{name}.onnx", opset=opset)
    assert result.exporter == "dynamo" and ops <= set(result.op_types), result.op_types
    assert "ReduceMean" not in result.op_types or "RMSNormalization" not in ops
    assert result.max_abs_error < 1e-5


def test_converted_transformer_block_exports(tmp_path):
    """A model with torch norms, converted to normkit, exports and keeps training mode."""
    block = torch.nn.Sequential(torch.nn.Linear(24, 24), torch.nn.LayerNorm(24), torch.nn.GELU(), torch.nn.Linear(24, 24), torch.nn.RMSNorm(24))
    normkit.tools.convert(block)
    block.train()
    result = export_onnx(_init(block), (X,), tmp_path / "block.onnx")
    assert {"LayerNormalization", "MatMul"} <= set(result.op_types) and block.training and block[1].training
    assert "norm_fwd" not in str(result)


def test_outside_an_export_the_custom_op_runs():
    assert not torch.onnx.is_in_onnx_export()
    x = X.clone().requires_grad_(True)  # the differentiable path goes through the custom op
    gm = torch.fx.experimental.proxy_tensor.make_fx(lambda t: normkit.layer_norm(t, (24,)))(x)
    assert any("norm_fwd" in str(node.target) for node in gm.graph.nodes)


def _input_dims(path) -> list:
    """Per graph input, each dim as its symbolic name or its fixed size."""
    import onnx

    model = onnx.load(str(path))
    return [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input]


def test_default_export_is_dynamic_where_the_model_allows_it(tmp_path):
    """Batch and sequence dims are symbolic; the feature dim, which the weight pins, is not;
    the check ran a second shape."""
    result = export_onnx(_init(FusedBlock(normkit.nn.LayerNorm)), (X, H), tmp_path / "block.onnx")
    assert result.opset == 18 and result.exporter == "dynamo"
    dims = _input_dims(tmp_path / "block.onnx")
    assert all(isinstance(d[0], str) and isinstance(d[1], str) and d[2] == 24 for d in dims), dims
    assert dims[0] == dims[1], "the two inputs share their batch and sequence symbols"
    assert result.checked_shapes == ["(3, 5, 24), (3, 5, 24)", "(2, 4, 24), (2, 4, 24)"]
    assert "on inputs [(3, 5, 24), (3, 5, 24)] and [(2, 4, 24), (2, 4, 24)]" in str(result)


def test_dims_torch_export_specialized_are_written_fixed(tmp_path):
    """LayerNormCHW broadcasts its affine over (C, H, W) with Python ints: torch.export fixes H
    and W, and the file must say so (torch.onnx leaves them named), so onnxruntime refuses
    another image size instead of failing inside LayerNormalization."""
    result = export_onnx(_init(normkit.nn.LayerNormCHW(6)), (IMG,), tmp_path / "chw.onnx")
    dims = _input_dims(tmp_path / "chw.onnx")[0]
    assert isinstance(dims[0], str) and dims[1:] == [6, 5, 7], dims
    assert len(result.checked_shapes) == 2


def test_dynamic_false_keeps_the_example_shape(tmp_path):
    result = export_onnx(_init(normkit.nn.LayerNorm(24)), (X,), tmp_path / "ln.onnx", dynamic=False)
    assert _input_dims(tmp_path / "ln.onnx") == [[3, 5, 24]] and result.checked_shapes == ["(3, 5, 24)"]


class Diff(torch.nn.Module):
    """Uses aten::diff, as Hugging Face's mask code does; TorchScript has no lowering for it."""

    def __init__(self):
        super().__init__()
        self.norm = normkit.nn.LayerNorm(24)

    def forward(self, x):
        return self.norm(x).diff(dim=1)


def test_a_missing_lowering_names_the_operator_and_the_opset_that_works(tmp_path):
    with pytest.raises(RuntimeError, match=r"TorchScript exporter .*opset 17.* no lowering for aten::diff; "
                                           r"the dynamo exporter at opset 18 \(export_onnx's default\) exports this model"):
        export_onnx(Diff(), (X,), tmp_path / "diff.onnx", opset=17)
    assert export_onnx(Diff(), (X,), tmp_path / "diff.onnx").max_abs_error < 1e-5


class Airy(torch.nn.Module):
    def forward(self, x):
        return torch.special.airy_ai(x)


def test_a_missing_dynamo_lowering_names_the_operator(tmp_path):
    with pytest.raises(RuntimeError, match=r"dynamo exporter has no ONNX lowering for aten.special_airy_ai .*custom_translation_table"):
        export_onnx(Airy(), (X,), tmp_path / "airy.onnx")


def test_a_converted_llama_exports_at_the_default_opset_and_runs_other_shapes(tmp_path):
    """A tiny float32 Llama from a config (no download), converted to normkit, exports with the
    defaults and runs in onnxruntime at a batch and sequence length it was not exported with."""
    transformers = pytest.importorskip("transformers")
    import onnxruntime as ort

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32, use_cache=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    normkit.tools.convert(model)
    ids = torch.randint(0, 100, (2, 13), generator=torch.Generator().manual_seed(1))
    result = export_onnx(model, (ids,), tmp_path / "llama.onnx")
    assert result.opset == 18 and result.checked_shapes == ["(2, 13)", "(3, 12)"] and result.max_abs_error < 1e-4
    assert all(isinstance(d, str) for d in _input_dims(tmp_path / "llama.onnx")[0])
    session = ort.InferenceSession(str(tmp_path / "llama.onnx"), providers=["CPUExecutionProvider"])
    other = torch.randint(0, 100, (1, 7), generator=torch.Generator().manual_seed(2))
    (logits,) = session.run(None, {session.get_inputs()[0].name: other.numpy()})
    with torch.no_grad():
        want = model(other).logits
    torch.testing.assert_close(torch.from_numpy(logits), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(opset=16), ValueError, r"opset must be an int >= 17 .*got 16"),
        (dict(opset="17"), ValueError, r"opset must be an int >= 17"),
        (dict(dynamo="yes"), TypeError, r"dynamo must be None, True or False, got 'yes'"),
        (dict(dynamic="yes"), TypeError, r"dynamic must be True or False, got 'yes'"),
    ],
)
def test_bad_arguments_get_a_clear_error(kwargs, exc, match, tmp_path):
    with pytest.raises(exc, match=match):
        export_onnx(normkit.nn.LayerNorm(24), (X,), tmp_path / "x.onnx", **kwargs)
    with pytest.raises(TypeError, match=r"torch.nn.Module as model, got function"):
        export_onnx(lambda x: x, (X,), tmp_path / "x.onnx")


@pytest.mark.parametrize("cls", [normkit.nn.LayerNormLSTM, normkit.nn.LayerNormGRU])
@pytest.mark.parametrize("opset", [17, 18])
def test_recurrent_modules_export_through_the_reference_path(cls, opset, tmp_path):
    """The fused C++ time loop cannot be traced: exports (TorchScript trace or torch.export)
    run the per-step reference, unrolled for the traced sequence length."""
    rnn = cls(6, 5, bidirectional=True, batch_first=True)
    x = randn((2, 3, 6), seed=7)
    result = export_onnx(rnn, (x,), tmp_path / "rnn.onnx", opset=opset)
    assert result.max_abs_error < 1e-5 and {"Sigmoid", "Tanh"} <= set(result.op_types)
    assert rnn.fast_path and rnn.training, "the module is left as it was"
