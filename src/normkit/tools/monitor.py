r"""``monitor``: watch every normalization layer of a model while it trains.

For each norm layer (torch's Layer/RMS/Group/BatchNorm, normkit's, Hugging Face RMS norms) and
each recorded step, the monitor keeps

==================  ==========================================================================
``in_mean``         :math:`\operatorname{mean}(x)` of the layer's input (all elements)
``in_std``          :math:`\operatorname{std}(x)` (population, ``correction=0``)
``out_std``         std of the layer's output
``weight_mean/std`` mean and std of the gain :math:`g` (absent without a gain)
``bias_mean/std``   mean and std of the bias :math:`b` (absent without a bias)
``grad_in_norm``    :math:`\lVert \partial L / \partial x \rVert_2`, the gradient that flows into
                    the layer through its input (this layer's share only, not the residual stream)
``weight_grad_norm``, ``bias_grad_norm``: :math:`\lVert \nabla g \rVert_2`,
                    :math:`\lVert \nabla b \rVert_2` once the gradient is accumulated
==================  ==========================================================================

A layer called several times in one step gets the mean over its calls (``calls`` says how many).
Gain and bias statistics are taken once per step, when the model's forward starts (the values
that step computes with); parameter gradient norms once per backward, when it ends (the
accumulated gradient).

Cheap enough to leave on. Per layer and call the hooks launch two-pass reductions of the
activations (mean and std of the input, std of the output) and one of the input gradient, and
keep the results as device tensors: nothing is copied to the host per layer. The parameters of all
layers are reduced together (one concatenation, two ``index_add_`` segment sums), their
gradient norms with one ``torch._foreach_norm`` at the end of backward. When a step ends
(``step()``, or the next forward in automatic mode) and when results are read, everything
pending is concatenated per device and copied once. Then the health checks run and raise
:class:`NormHealthWarning` (once per layer and kind) on

* ``nonfinite``: NaN/Inf in an input, output or gradient statistic;
* ``collapse``: input std below ``collapse_std`` (default: below :math:`\sqrt{\epsilon}` of the
  layer, where :math:`\epsilon` dominates the variance and the layer stops normalizing);
* ``explosion``: input or output std above ``explode_std``.

Under ``torch.compile`` (``fullgraph=True`` included) the hooks do nothing: their step
bookkeeping and host copies cannot be part of a graph, and a graph break per norm layer would
cost more than the monitor is worth. They note that they ran, and the next read of the results
(or ``step()``, or leaving the ``with`` block) raises a :class:`MonitorCompileWarning` saying
that compiled calls were not recorded; eager calls under the same monitor still are (the
gradient norms of a step whose forward was compiled are skipped too).

The input gradient is caught by passing the layer an alias (``x.view_as(x)``, no copy) of its
input from a forward pre-hook and hooking that alias, so the model code is untouched and only
this layer's share of the gradient is seen.
"""

from __future__ import annotations

import json
import math
import numbers
import warnings
from collections import defaultdict
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from normkit.tools.layers import is_norm_layer

__all__ = ["MonitorCompileWarning", "NormHealthWarning", "NormMonitor", "monitor"]

FORWARD_STATS = ("in_mean", "in_std", "out_std", "weight_mean", "weight_std", "bias_mean", "bias_std")
GRAD_STATS = ("grad_in_norm", "weight_grad_norm", "bias_grad_norm")
STATS = FORWARD_STATS + GRAD_STATS

# One pending measurement: (step, 1-D tensor of values, what each value is: (layer, stat, last)).
# last=True: a later value replaces it (parameter statistics); else values of a step are averaged.
_Pending = Tuple[int, Tensor, List[Tuple[str, str, bool]]]


class NormHealthWarning(UserWarning):
    """A normalization layer's input collapsed, exploded, or went NaN/Inf."""


class MonitorCompileWarning(UserWarning):
    """The monitored model ran under ``torch.compile``, where the monitor records nothing."""


def _first_tensor(value) -> Optional[Tensor]:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], Tensor):
        return value[0]
    return None


def _std_mean(t: Tensor) -> Tuple[Tensor, Tensor]:
    """Population std and mean over all elements, two-pass (exact at large means), float32 or
    more. ``torch.std_mean`` computes the same but with a Welford loop ~10x slower on CPU."""
    t = t.detach()
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    mean = t.mean()
    return torch.linalg.vector_norm(t - mean) / math.sqrt(max(t.numel(), 1)), mean


def _grouped(items: Iterable, key) -> Dict:
    groups: Dict = defaultdict(list)
    for item in items:
        groups[key(item)].append(item)
    return groups


class NormMonitor:
    """Hooks on a model's norm layers recording their statistics per step; see :func:`monitor`."""

    def __init__(
        self,
        model: nn.Module,
        every: int = 1,
        *,
        layers: Union[None, Iterable[str], Callable[[str, nn.Module], bool]] = None,
        grads: bool = True,
        step_on: str = "auto",
        collapse_std: Optional[float] = None,
        explode_std: float = 1e4,
        warn: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"monitor expects a torch.nn.Module as model, got {type(model).__name__}")
        if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
            raise ValueError(f"every must be a positive int (record every k-th step), got {every!r}")
        for name, value in (("collapse_std", collapse_std), ("explode_std", explode_std)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0):
                raise ValueError(f"{name} must be a positive number{' or None' if name == 'collapse_std' else ''}, got {value!r}")
        if step_on not in ("auto", "forward", "manual"):
            raise ValueError(f"step_on must be 'auto', 'forward' or 'manual', got {step_on!r}")
        self.every, self.step_on = int(every), step_on
        self.collapse_std, self.explode_std, self.warn = collapse_std, float(explode_std), warn
        self.layers: Dict[str, nn.Module] = self._select(model, layers)
        self.events: List[dict] = []  # every health-check finding: step, layer, kind, value
        self._step, self._forwards, self._manual = 0, 0, step_on == "manual"
        self._pending: List[_Pending] = []
        self._records: Dict[Tuple[int, str], dict] = {}
        self._params_step: Optional[int] = None  # the step whose gain/bias statistics were taken
        self._segments: Dict[tuple, Tuple[Tensor, Tensor]] = {}  # cached segment ids and sizes
        self._grad_params: List[Tuple[str, str, Tensor]] = []  # gradients accumulated this backward
        self._callback_queued = False
        self._warned: set = set()  # (layer, kind) already warned about
        self._seen: set = set()  # (step, layer, kind) already in events
        self._compiled_calls = False  # a hook ran inside torch.compile (and did nothing)
        self._compiled_step = False  # the latest forward of the model was compiled
        self._warned_compiled = False
        self._active = True  # a plain bool for the hooks to read (Dynamo cannot trace a handle list)
        self._handles: list = [model.register_forward_pre_hook(self._on_model_forward)]
        for name, layer in self.layers.items():
            self._handles.append(layer.register_forward_hook(self._forward_hook(name)))
            if grads:
                self._handles.append(layer.register_forward_pre_hook(self._input_grad_hook(name)))
                for pname in ("weight", "bias"):
                    p = getattr(layer, pname, None)
                    if isinstance(p, nn.Parameter) and p.requires_grad:
                        self._handles.append(p.register_post_accumulate_grad_hook(self._param_grad_hook(name, pname)))

    # --- selection and stepping

    @staticmethod
    def _select(model: nn.Module, layers) -> Dict[str, nn.Module]:
        found = {name: m for name, m in model.named_modules() if is_norm_layer(m)}
        if layers is None:
            return found
        if callable(layers):
            return {name: m for name, m in found.items() if layers(name, m)}
        if isinstance(layers, str):
            raise TypeError(f"layers must be an iterable of names (not one string), a callable or None, got {layers!r}")
        names = list(layers)
        unknown = [n for n in names if n not in found]
        if unknown:
            raise ValueError(f"layers names {unknown} are not normalization layers of the model; expected some of {sorted(found)}")
        return {n: found[n] for n in names}

    @property
    def current_step(self) -> int:
        return self._step

    def _recording(self) -> bool:
        return self._active and self._step % self.every == 0

    def step(self) -> None:
        """End the current step (call once per optimizer step). With ``step_on="auto"``, from
        the first call on steps are counted by these calls instead of by forward calls."""
        if self.step_on == "forward":
            raise RuntimeError("step() was called on a monitor with step_on='forward', which counts forward calls")
        self._manual = True
        self._flush()
        self._step += 1

    def _skip_compiled(self) -> bool:
        """Inside a ``torch.compile`` graph the hooks do nothing but note it (see the class
        docstring); Dynamo traces this to a constant and one attribute store."""
        if torch.compiler.is_compiling():
            self._compiled_calls = self._compiled_step = True
            return True
        return False

    def _on_model_forward(self, module, args) -> None:
        if self._skip_compiled():
            return
        self._compiled_step = False
        if not self._manual and self._forwards > 0:
            self._flush()
            self._step += 1
        self._forwards += 1
        if self._recording() and self._params_step != self._step:
            self._params_step = self._step
            self._parameter_stats()

    # --- measurements: on-device reductions only

    def _segment_ids(self, device: torch.device, sizes: Tuple[int, ...]) -> Tuple[Tensor, Tensor]:
        key = (device, sizes)
        if key not in self._segments:
            counts = torch.tensor(sizes, dtype=torch.float64)
            ids = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
            self._segments[key] = (ids.to(device), counts.to(device))
        return self._segments[key]

    @torch.no_grad()
    def _parameter_stats(self) -> None:
        """Mean and std of every monitored gain and bias, all layers at once per device."""
        params = [
            (name, pname, p.detach())
            for name, layer in self.layers.items()
            for pname in ("weight", "bias")
            for p in [getattr(layer, pname, None)]
            if isinstance(p, Tensor) and p.is_floating_point() and p.numel() > 0
        ]
        for device, items in _grouped(params, lambda item: item[2].device).items():
            ids, counts = self._segment_ids(device, tuple(t.numel() for _, _, t in items))
            flat = torch.cat([t.reshape(-1).to(torch.float64) for _, _, t in items])
            sums = flat.new_zeros(len(items)).index_add_(0, ids, flat)
            squares = flat.new_zeros(len(items)).index_add_(0, ids, flat * flat)
            mean = sums / counts
            std = (squares / counts - mean * mean).clamp_min_(0.0).sqrt_()  # float64: no cancellation worry
            targets = [(name, f"{pname}_{stat}", True) for name, pname, _ in items for stat in ("mean", "std")]
            self._pending.append((self._step, torch.stack((mean, std), 1).reshape(-1), targets))

    def _forward_hook(self, name: str):
        keys = [(name, "in_mean", False), (name, "in_std", False), (name, "out_std", False)]

        def hook(module, args, output) -> None:
            if self._skip_compiled():
                return
            x, y = _first_tensor(args), _first_tensor(output)
            if not self._recording() or x is None or y is None or not x.is_floating_point():
                return
            with torch.no_grad():
                x_std, x_mean = _std_mean(x)
                y_std = _std_mean(y)[0].to(x_std.dtype)
                self._pending.append((self._step, torch.stack((x_mean, x_std, y_std)), keys))

        return hook

    def _input_grad_hook(self, name: str):
        keys = [(name, "grad_in_norm", False)]

        def pre_hook(module, args):
            if self._skip_compiled():
                return None
            x = args[0] if args and isinstance(args[0], Tensor) else None
            if x is None or not (x.requires_grad and torch.is_grad_enabled()) or not self._recording():
                return None
            alias = x.view_as(x)  # this layer's own handle on x: its gradient is the layer's share
            step = self._step

            def grad_hook(grad: Tensor) -> None:
                if self._active:  # a late backward still lands in the step of its forward
                    self._pending.append((step, torch.linalg.vector_norm(grad.detach(), dtype=torch.float64).reshape(1), keys))

            alias.register_hook(grad_hook)
            return (alias,) + tuple(args[1:])

        return pre_hook

    def _param_grad_hook(self, name: str, pname: str):
        def hook(p: Tensor) -> None:
            # a backward of a compiled forward runs eagerly: its forward was not seen, skip it too
            if self._compiled_step or not self._recording() or p.grad is None:
                return
            self._grad_params.append((name, pname, p))
            if not self._callback_queued:  # norms of all accumulated gradients once backward ends
                self._callback_queued = True
                torch.autograd.Variable._execution_engine.queue_callback(self._gradient_norms)

        return hook

    @torch.no_grad()
    def _gradient_norms(self) -> None:
        items, self._grad_params, self._callback_queued = self._grad_params, [], False
        unique = {id(p): (name, pname, p) for name, pname, p in items if p.grad is not None}.values()
        for _, group in _grouped(unique, lambda item: (item[2].grad.device, item[2].grad.dtype)).items():
            norms = torch._foreach_norm([p.grad for _, _, p in group])
            targets = [(name, f"{pname}_grad_norm", True) for name, pname, _ in group]
            self._pending.append((self._step, torch.stack(norms).to(torch.float64), targets))

    # --- flushing: one concatenation and one copy per device

    def _flush(self) -> None:
        if self._compiled_calls and not self._warned_compiled:
            self._warned_compiled = True
            warnings.warn(
                "normkit.monitor: the model ran under torch.compile, where the monitor's hooks are "
                "disabled (their per-step host bookkeeping cannot be part of a graph); nothing was "
                "recorded for compiled calls. Monitor the uncompiled model, e.g. run every k-th step "
                "eagerly, or compile only the submodules between norm layers.",
                MonitorCompileWarning, stacklevel=3)
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        host = {
            device: torch.cat([values.reshape(-1).to(torch.float64) for values in group]).cpu().tolist()
            for device, group in _grouped((v for _, v, _ in pending), lambda v: v.device).items()
        }
        offsets = dict.fromkeys(host, 0)
        changed = {}
        for step, values, targets in pending:
            dev = values.device
            vals = host[dev][offsets[dev]: offsets[dev] + len(targets)]
            offsets[dev] += len(targets)
            for (name, key, last), val in zip(targets, vals):
                record = self._records.get((step, name)) or self._records.setdefault((step, name), self._new_record(step, name))
                changed[(step, name)] = record
                if key == "in_mean":
                    record["calls"] += 1
                if last:
                    record[key] = val
                else:
                    total, n = record["_sums"].get(key, (0.0, 0))
                    record["_sums"][key] = (total + val, n + 1)
                    record[key] = (total + val) / (n + 1)
        for record in changed.values():
            self._check(record)

    def _new_record(self, step: int, name: str) -> dict:
        record = {"step": step, "layer": name, "type": type(self.layers[name]).__name__, "calls": 0}
        record.update(dict.fromkeys(STATS))
        record["_sums"] = {}
        return record

    def _check(self, record: dict) -> None:
        layer = self.layers[record["layer"]]
        findings = []
        for key in ("in_mean", "in_std", "out_std") + GRAD_STATS:
            value = record[key]
            if value is not None and not math.isfinite(value):
                findings.append(("nonfinite", key, value, f"{key} is {value}"))
                break
        in_std = record["in_std"]
        if in_std is not None and math.isfinite(in_std):
            eps = getattr(layer, "eps", None) or getattr(layer, "variance_epsilon", None)
            floor = self.collapse_std or max(math.sqrt(float(eps)) if isinstance(eps, numbers.Real) else 0.0, 1e-6)
            if in_std < floor:
                findings.append(("collapse", "in_std", in_std, f"input std {in_std:.3g} < {floor:.3g}: the layer no longer normalizes"))
        for key in ("in_std", "out_std"):
            value = record[key]
            if value is not None and math.isfinite(value) and value > self.explode_std:
                findings.append(("explosion", key, value, f"{key} {value:.3g} > explode_std={self.explode_std:.3g}"))
                break
        for kind, key, value, text in findings:
            if (record["step"], record["layer"], kind) in self._seen:
                continue
            self._seen.add((record["step"], record["layer"], kind))
            self.events.append({"step": record["step"], "layer": record["layer"], "kind": kind, "stat": key, "value": value})
            if self.warn and (record["layer"], kind) not in self._warned:
                self._warned.add((record["layer"], kind))
                warnings.warn(f"normkit.monitor: {record['layer']} ({record['type']}) at step {record['step']}: {text}", NormHealthWarning, stacklevel=2)

    # --- reading results

    def records(self) -> List[dict]:
        """All recorded rows (one per step and layer), oldest first, as plain dicts."""
        self._flush()
        order = {name: i for i, name in enumerate(self.layers)}
        rows = sorted(self._records.values(), key=lambda r: (r["step"], order[r["layer"]]))
        return [{k: v for k, v in r.items() if k != "_sums"} for r in rows]

    def to_dataframe(self):
        """The records as a ``pandas.DataFrame`` (columns ``step, layer, type, calls`` + stats)."""
        import pandas as pd  # lazily: pandas is an optional dependency

        return pd.DataFrame(self.records(), columns=["step", "layer", "type", "calls", *STATS])

    def to_json(self, path=None) -> str:
        """``{"every", "records", "events"}`` as JSON (NaN/Inf written as strings); written to
        ``path`` too when given."""

        def clean(v):
            return str(v) if isinstance(v, float) and not math.isfinite(v) else v

        doc = {
            "every": self.every,
            "records": [{k: clean(v) for k, v in r.items()} for r in self.records()],
            "events": [{k: clean(v) for k, v in e.items()} for e in self.events],
        }
        text = json.dumps(doc, indent=1)
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        return text

    def plot(self, path, stats: Sequence[str] = ("in_std", "out_std", "weight_mean", "grad_in_norm")):
        """Save a PNG with one panel per statistic over steps, one line per layer; returns ``path``."""
        unknown = [s for s in stats if s not in STATS]
        if unknown or not stats:
            raise ValueError(f"stats must be a non-empty sequence of {list(STATS)}, got {list(stats)}")
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazily, no pyplot state
        from matplotlib.figure import Figure

        rows = self.records()
        fig = Figure(figsize=(6.4, 2.2 * len(stats)), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(len(stats), 1, sharex=True, squeeze=False)[:, 0]
        for ax, stat in zip(axes, stats):
            for name in self.layers:
                pts = [(r["step"], r[stat]) for r in rows if r["layer"] == name and r[stat] is not None]
                if pts:
                    ax.plot(*zip(*pts), label=name, linewidth=1)
            if stat.endswith(("std", "norm")) and all(r[stat] is None or r[stat] > 0 for r in rows):
                ax.set_yscale("log")
            ax.set_ylabel(stat)
        axes[-1].set_xlabel("step")
        if 0 < len(self.layers) <= 12:
            axes[0].legend(fontsize="x-small", ncol=2)
        fig.savefig(path, dpi=100)
        return path

    # --- lifetime

    def remove(self) -> None:
        """Read what is pending and remove every hook (the records stay readable)."""
        self._flush()
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._active = False

    def __enter__(self) -> "NormMonitor":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"NormMonitor({len(self.layers)} layers, every={self.every}, step={self._step}, active={self._active})"


def monitor(model: nn.Module, every: int = 1, **kwargs) -> NormMonitor:
    """Record normalization statistics of ``model`` every ``every`` steps.

    Use as a context manager (hooks are removed on exit) or keep the object and call
    :meth:`NormMonitor.remove`::

        with normkit.monitor(model, every=10) as mon:
            for batch in data:
                loss = model(batch).sum(); loss.backward(); opt.step(); opt.zero_grad()
                mon.step()
        mon.to_dataframe(); mon.plot("norms.png")

    Steps: with ``step_on="auto"`` (default) each forward call of ``model`` starts a new step
    until :meth:`NormMonitor.step` is first called, and from then on only ``step()`` does (so
    inference needs no ``step()`` calls and a training loop calls it once per optimizer step);
    ``"manual"`` counts ``step()`` calls only (several forwards per step: gradient
    accumulation, evaluation passes), ``"forward"`` forward calls only.

    Other keyword arguments: ``layers`` (qualified names, or ``callable(name, module)``; default
    every norm layer), ``grads`` (record gradient norms, default ``True``), ``collapse_std``,
    ``explode_std`` (thresholds of the health checks) and ``warn`` (``False``: only record
    findings in ``events``).
    """
    return NormMonitor(model, every, **kwargs)
