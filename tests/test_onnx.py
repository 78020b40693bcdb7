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


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(opset=16), ValueError, r"opset must be an int >= 17 .*got 16"),
        (dict(opset="17"), ValueError, r"opset must be an int >= 17"),
        (dict(dynamo="yes"), TypeError, r"dynamo must be None, True or False, got 'yes'"),
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
    """The fused numba time loop cannot be traced: exports (TorchScript trace or torch.export)
    run the per-step reference, unrolled for the traced sequence length."""
    rnn = cls(6, 5, bidirectional=True, batch_first=True)
    x = randn((2, 3, 6), seed=7)
    result = export_onnx(rnn, (x,), tmp_path / "rnn.onnx", opset=opset)
    assert result.max_abs_error < 1e-5 and {"Sigmoid", "Tanh"} <= set(result.op_types)
    assert rnn.fast_path and rnn.training, "the module is left as it was"
