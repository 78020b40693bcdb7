r"""``normkit bench --suite compile``: a model converted to normkit, compiled, against the compiled original.

Issue 23 asks that ``torch.compile`` of a converted model train no slower than
``torch.compile`` of the torch original. Under compile, :mod:`normkit.compile_policy` decides
what a norm call becomes: the reference composite's torch ops (inductor fuses them with their
neighbours) or normkit's custom op (opaque to inductor). This suite measures both, on

* ``block``: a pre-LN transformer block (``x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))``, causal
  ``scaled_dot_product_attention``, GELU MLP, ``torch.nn.LayerNorm``; a linear head and a
  mean-square loss);
* ``llama``: a tiny Hugging Face ``LlamaForCausalLM`` built from a config (random weights, no
  download; ``LlamaRMSNorm``), the language-model loss on random token ids.

Each model is built once, deep-copied, and the copies converted with
:func:`normkit.tools.convert` (the same parameters). One training step is ``zero_grad`` (set to
``None``), the loss forward, ``backward`` and an SGD step; only the model is compiled (inductor,
the default backend), as a training script does. Each normkit variant (a key of
:data:`VARIANTS`) is timed in interleaved pairs against the compiled original
(:mod:`normkit.bench.paired`): ``ratio`` is the median per-pair *torch time / normkit time*
(above 1: normkit is faster) with a 95 % order-statistic interval. Before timing, the first
step's loss of each variant is compared with the original's (``loss_diff``): the conversion
keeps the outputs, so a difference beyond rounding is a bug, not a speed-up.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from normkit import compile_policy
from normkit._machine import torch_threads
from normkit.bench.paired import estimate_ratio, measure_pairs

__all__ = ["MODELS", "VARIANTS", "Settings", "QUICK", "PreLNBlock", "run_model", "run_suite", "markdown"]

MODELS: Tuple[str, ...] = ("block", "llama")
#: normkit variant -> the compile_policy mode it is traced under
VARIANTS: Dict[str, str] = {"normkit (auto)": "auto", "normkit op": "op", "normkit decompose": "decompose"}


@dataclass(frozen=True)
class Settings:
    """Sizes and timing. The defaults are a small model that compiles in well under a minute on a
    laptop core (fwd + bwd of both models and each variant) and trains a step in tens of ms."""

    batch: int = 8
    seq: int = 64
    hidden: int = 256
    heads: int = 4
    intermediate: int = 688  # Llama's MLP width for hidden 256 (8/3 * 256, rounded to 16)
    layers: int = 2
    vocab: int = 1024
    seconds: float = 20.0  # timed pairs per comparison (at least min_pairs)
    min_pairs: int = 15
    max_pairs: int = 201
    warmup: int = 3  # untimed steps after the compiling one
    threads: int = 1
    seed: int = 0


QUICK = Settings(batch=2, seq=16, hidden=32, heads=2, intermediate=64, layers=1, vocab=64, seconds=0.5,
                 min_pairs=6, max_pairs=20, warmup=1)


class PreLNBlock(nn.Module):
    """One pre-LN transformer block (GPT-2's layout) and a linear head, loss = mean square."""

    def __init__(self, hidden: int, heads: int, intermediate: int):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.ln_2 = nn.LayerNorm(hidden)
        self.fc = nn.Linear(hidden, intermediate)
        self.fc_out = nn.Linear(intermediate, hidden)
        self.ln_f = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, hidden)

    def attn(self, x):  # (B, T, C)
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, T, D) each
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))

    def forward(self, x, target):
        x = x + self.attn(self.ln_1(x))
        x = x + self.fc_out(F.gelu(self.fc(self.ln_2(x))))
        return F.mse_loss(self.head(self.ln_f(x)), target)


def _build(model: str, s: Settings) -> Tuple[nn.Module, Tuple[torch.Tensor, ...]]:
    """The torch original (seeded) and its inputs."""
    torch.manual_seed(s.seed)
    if model == "block":
        net = PreLNBlock(s.hidden, s.heads, s.intermediate)
        inputs = (torch.randn(s.batch, s.seq, s.hidden), torch.randn(s.batch, s.seq, s.hidden))
    elif model == "llama":
        import transformers

        cfg = transformers.LlamaConfig(
            hidden_size=s.hidden, intermediate_size=s.intermediate, num_hidden_layers=s.layers,
            num_attention_heads=s.heads, num_key_value_heads=s.heads, vocab_size=s.vocab,
            max_position_embeddings=max(s.seq, 32), attn_implementation="sdpa",
        )
        net = transformers.LlamaForCausalLM(cfg)
        ids = torch.randint(0, s.vocab, (s.batch, s.seq))
        inputs = (ids,)
    else:
        raise ValueError(f"model must be one of {', '.join(MODELS)}, got {model!r}")
    with torch.no_grad():  # gains away from 1 (and biases away from 0), so a wrong gain shows in the loss
        for m in net.modules():
            if "Norm" in type(m).__name__:
                for p in m.parameters():
                    p.add_(0.1 * torch.randn_like(p))
    return net.train(), inputs


def _loss(model: str, net: nn.Module, inputs) -> torch.Tensor:
    if model == "llama":
        return net(input_ids=inputs[0], labels=inputs[0]).loss
    return net(*inputs)


def _step_fn(model: str, net: nn.Module, inputs, mode: Optional[str]) -> Callable[[], float]:
    compiled = torch.compile(net)
    opt = torch.optim.SGD(net.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        if mode is None:
            loss = _loss(model, compiled, inputs)
        else:
            with compile_policy.use(mode):  # Dynamo guards on the mode: each variant keeps its graph
                loss = _loss(model, compiled, inputs)
        loss.backward()
        opt.step()
        return loss

    return step


def run_model(model: str, settings: Settings, variants: Sequence[str] = tuple(VARIANTS),
              on_result: Optional[Callable[[dict], None]] = None) -> List[dict]:
    """One result per normkit variant: the paired ratio against the compiled original."""
    from normkit.tools import convert

    base, inputs = _build(model, settings)
    results = []
    with torch_threads(settings.threads):
        torch._dynamo.reset()
        t0 = time.perf_counter()
        ref_step = _step_fn(model, copy.deepcopy(base), inputs, None)
        ref_loss = float(ref_step().detach())  # the first step compiles
        ref_compile = time.perf_counter() - t0
        for name in variants:
            net = copy.deepcopy(base)
            summary = convert(net)
            t0 = time.perf_counter()
            step = _step_fn(model, net, inputs, VARIANTS[name])
            loss = float(step().detach())
            compile_s = time.perf_counter() - t0
            timing = measure_pairs(ref_step, step, warmup=settings.warmup, target_batch_s=0.0,
                                   budget_s=settings.seconds, min_pairs=settings.min_pairs,
                                   max_pairs=settings.max_pairs)
            est = estimate_ratio(timing)
            result = {
                "model": model, "variant": name, "mode": VARIANTS[name], "norms_converted": len(summary.replaced),
                "ratio": est.median, "ci_low": est.low, "ci_high": est.high, "ci_coverage": est.coverage,
                "pairs": est.pairs,
                "torch_ms": 1e3 * _median(timing.a_s), "normkit_ms": 1e3 * _median(timing.b_s),
                "torch_compile_s": ref_compile, "normkit_compile_s": compile_s,
                "loss_diff": abs(loss - ref_loss),
            }
            results.append(result)
            if on_result is not None:
                on_result(result)
    return results


def run_suite(models: Sequence[str] = MODELS, settings: Settings = Settings(), variants: Sequence[str] = tuple(VARIANTS),
              on_result: Optional[Callable[[dict], None]] = None) -> List[dict]:
    results = []
    for model in models:
        results += run_model(model, settings, variants, on_result)
    return results


def _median(xs: Sequence[float]) -> float:
    ys = sorted(xs)
    n = len(ys)
    return ys[n // 2] if n % 2 else 0.5 * (ys[n // 2 - 1] + ys[n // 2])


def markdown(results: Sequence[dict]) -> str:
    """The results as one markdown table."""
    lines = ["| model | normkit variant | torch / normkit [95 %] | pairs | torch ms | normkit ms | loss diff |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['variant']} | {r['ratio']:.3f}x [{r['ci_low']:.3f}, {r['ci_high']:.3f}] | "
                     f"{r['pairs']} | {r['torch_ms']:.2f} | {r['normkit_ms']:.2f} | {r['loss_diff']:.1e} |")
    return "\n".join(lines)
