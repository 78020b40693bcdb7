"""The models the lab trains, each taking the normalization as an argument.

Norm kinds (:data:`NORMS`): ``none``, ``batch`` (:class:`torch.nn.BatchNorm1d`), ``torch_layer``
(:class:`torch.nn.LayerNorm`), ``layer`` (:class:`normkit.nn.LayerNorm`), ``rms``
(:class:`normkit.nn.RMSNorm`). Recurrent kinds (:data:`RNNS`): ``lstm``/``gru`` (torch) and
``ln_lstm``/``ln_gru`` (:class:`normkit.nn.LayerNormLSTM` / ``LayerNormGRU``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import normkit

__all__ = ["NORMS", "RNNS", "make_norm", "MLP", "make_rnn", "RNNClassifier", "CharRNN", "CharTransformer", "TRANSFORMER_NORMS", "lr_at", "count_params", "he_init_"]

NORMS = ("none", "batch", "torch_layer", "layer", "rms")
RNNS = ("lstm", "ln_lstm", "gru", "ln_gru")
TRANSFORMER_NORMS = ("post_ln", "pre_ln", "pre_rms", "none")


class _BatchNormLast(nn.BatchNorm1d):
    """BatchNorm over the last dim of a ``(*, C)`` tensor (BatchNorm1d wants ``(N, C)``)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.reshape(-1, x.shape[-1])).view(x.shape)


def make_norm(kind: str, dim: int) -> nn.Module:
    """A normalization layer over the last dimension, of width ``dim``."""
    if kind == "none":
        return nn.Identity()
    if kind == "batch":
        return _BatchNormLast(dim)
    if kind == "torch_layer":
        return nn.LayerNorm(dim)
    if kind == "layer":
        return normkit.nn.LayerNorm(dim)
    if kind == "rms":
        return normkit.nn.RMSNorm(dim)
    raise ValueError(f"norm kind must be one of {', '.join(NORMS)}, got {kind!r}")


def he_init_(module: nn.Module) -> nn.Module:
    """He (Kaiming) normal initialization of every ``Linear``/``Conv2d`` weight that feeds a ReLU
    (fan-in, gain sqrt 2), biases zero: what an advocate of an unnormalized ReLU network uses, so
    that no arm starts handicapped by PyTorch's default (uniform, gain 1/sqrt 3) initialization.
    The caller leaves out the read-out layer."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


class MLP(nn.Module):
    r"""A deep MLP, normalization before each nonlinearity as in Ba et al.:
    :math:`h_{l+1} = \mathrm{relu}(\mathrm{norm}(W_l h_l + b_l))`; every ReLU layer He-initialized
    (:func:`he_init_`), whatever the norm."""

    def __init__(self, d_in: int, width: int, depth: int, d_out: int, norm: str):
        super().__init__()
        layers = []
        for i in range(depth):
            layers += [he_init_(nn.Linear(d_in if i == 0 else width, width)), make_norm(norm, width), nn.ReLU()]
        layers.append(nn.Linear(width, d_out))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:  # (B, d_in) -> (B, d_out)
        return self.net(x)


def make_rnn(kind: str, input_size: int, hidden_size: int, num_layers: int = 1) -> nn.Module:
    """A ``batch_first`` recurrent network; normkit's layer-normalized ones share torch's interface.

    Raises ``ImportError`` (with the reason) when normkit's recurrent networks are unavailable.
    """
    if kind not in RNNS:
        raise ValueError(f"rnn kind must be one of {', '.join(RNNS)}, got {kind!r}")
    if kind in ("lstm", "gru"):
        cls = nn.LSTM if kind == "lstm" else nn.GRU
    else:
        name = "LayerNormLSTM" if kind == "ln_lstm" else "LayerNormGRU"
        cls = getattr(normkit.nn, name, None)
        if cls is None:
            try:
                from normkit.nn import rnn as _rnn  # noqa: F401  (lands separately)

                cls = getattr(_rnn, name)
            except (ImportError, AttributeError) as exc:
                raise ImportError(f"normkit.nn.{name} is not available ({exc})") from exc
    return cls(input_size, hidden_size, num_layers=num_layers, batch_first=True)


class RNNClassifier(nn.Module):
    """Reads a sequence ``(B, T, input_size)`` and classifies it from the last hidden state."""

    def __init__(self, kind: str, input_size: int, hidden_size: int, n_classes: int):
        super().__init__()
        self.rnn = make_rnn(kind, input_size, hidden_size)
        self.head = nn.Linear(hidden_size, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)  # (B, T, H)
        return self.head(out[:, -1])


class CharRNN(nn.Module):
    """Character language model: embedding, recurrent network, linear read-out."""

    def __init__(self, kind: str, vocab: int, embed: int, hidden_size: int, num_layers: int = 1):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.rnn = make_rnn(kind, embed, hidden_size, num_layers)
        self.head = nn.Linear(hidden_size, vocab)

    def forward(self, ids: Tensor) -> Tensor:  # (B, T) -> (B, T, vocab)
        out, _ = self.rnn(self.embed(ids))
        return self.head(out)


class _Attention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # 3 × (B, h, T, c)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class CharTransformer(nn.Module):
    r"""A small causal character transformer with a choice of norm placement.

    - ``post_ln`` (Vaswani et al.): :math:`x \leftarrow \mathrm{LN}(x + f(x))` after each sublayer.
    - ``pre_ln`` / ``pre_rms`` (Xiong et al. 2020): :math:`x \leftarrow x + f(\mathrm{LN}(x))`, and a
      final norm. Written with normkit's fused residual form: ``h, x = norm(f(h), residual=x,
      prenorm=True)`` adds the branch to the stream ``x`` and normalizes it in one pass.
    - ``none``: :math:`x \leftarrow x + f(x)`.
    """

    def __init__(self, vocab: int, d: int, layers: int, heads: int, seq_len: int, mode: str):
        super().__init__()
        if mode not in TRANSFORMER_NORMS:
            raise ValueError(f"mode must be one of {', '.join(TRANSFORMER_NORMS)}, got {mode!r}")
        self.mode = mode
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(seq_len, d) * 0.02)
        self.branches = nn.ModuleList()
        for _ in range(layers):
            self.branches.append(_Attention(d, heads))
            self.branches.append(nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)))
        norm = {"post_ln": "layer", "pre_ln": "layer", "pre_rms": "rms", "none": "none"}[mode]
        # pre: one norm before each branch plus a final one; post: one after each branch.
        n_norms = len(self.branches) + (1 if mode in ("pre_ln", "pre_rms") else 0)
        self.norms = nn.ModuleList(make_norm(norm, d) for _ in range(n_norms))
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: Tensor) -> Tensor:  # (B, T) -> (B, T, vocab)
        x = self.tok(ids) + self.pos[: ids.shape[1]]  # (B, T, C)
        if self.mode == "post_ln":
            for f, norm in zip(self.branches, self.norms):
                x = norm(f(x), residual=x)  # LN(x + f(x)), fused
            return self.head(x)
        if self.mode == "none":
            for f in self.branches:
                x = x + f(x)
            return self.head(x)
        h = self.norms[0](x)
        for f, norm in zip(self.branches, self.norms[1:]):
            h, x = norm(f(h), residual=x, prenorm=True)  # x += f(h); h = norm(x)
        return self.head(h)


def lr_at(step: int, base: float, warmup: int, total: int) -> float:
    r"""Linear warm-up over ``warmup`` steps (none if 0), then cosine decay to ``base / 10`` at
    step ``total``: :math:`\eta_t = \eta \min(1, \tfrac{t+1}{w})` during warm-up, then
    :math:`\eta (0.1 + 0.45 (1 + \cos \pi \tfrac{t - w}{T - w}))`."""
    if step < warmup:
        return base * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.1 + 0.45 * (1.0 + math.cos(math.pi * frac)))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


