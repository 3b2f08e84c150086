"""Gradient scores from one exported reverse-mode graph run in ONNX Runtime (no torch).

The gated model (per-sample gates) plus the loss is differentiated once with onnx-ad with
respect to the gate inputs only; every calibration batch is then one run of that graph,
which yields the loss of each sample and each sample's ∂L/∂gate.

- ``taylor``: mean over samples of |g| (Michel et al. 2019).
- ``fisher``: per batch s = −mean_n g + ½·mean_n g² (the second-order estimate of the loss
  increase when the gate goes from 1 to 0, with the Fisher approximation of the curvature);
  the signed value is smoothed across batches, s̃ ← α·s + (1−α)·s̃, and its absolute value
  ranks ("Less is More", Eq. 6).
- ``send``: SPAT's module score from S = ∂L/∂A ⊙ A on each softmax output A (the gradient
  of a whole-tensor gate on A): |S|, softmax over keys, mean over heads, standard deviation
  of each row, mean over rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace

import numpy as np
import onnx

from onnxprune.autodiff import (
    NoGradientError,
    declare_static_shapes,
    freeze_shape_operands,
    gradient_graph,
)
from onnxprune.errors import OnnxpruneError
from onnxprune.gates import Gate, gate_model
from onnxprune.losses import SAMPLE_LOSS, TOTAL_LOSS, LossSpec, with_loss
from onnxprune.runtime import make_session, run
from onnxprune.scores.ablation import Ablation
from onnxprune.scores.activations import Stat
from onnxprune.scores.base import (
    ImportanceScore,
    ScoreArrays,
    ScoreContext,
    register_score,
)
from onnxprune.structure.discover import Analysis
from onnxprune.units import UnitKind, module_kind, unit_kind

# the loss scale for float16 gate gradients (divided by 64 while the gradients overflow)
HALF_LOSS_SCALE = 4096.0


class GradientPass:
    """Runs the gate-gradient graph on batches: per-sample losses and gate gradients."""

    def __init__(self, analysis: Analysis, spec: LossSpec, kinds: Iterable[UnitKind],
                 threads: int = 0, send: bool = False):
        gated = gate_model(analysis, kinds, per_sample=True, send=send)
        self.gates: list[Gate] = gated.gates
        self.gated = gated
        model = with_loss(gated.model, spec)
        self.traces = (gated.traced(analysis.trace),
                       gated.traced(gated.batch_trace or analysis.trace))
        freeze_shape_operands(model, *self.traces)
        self.forward = model
        self.threads = threads
        self.graphs: dict[tuple, tuple] = {}

    def _graph(self, feeds: Mapping[str, np.ndarray]) -> tuple:
        """The gradient graph for these feed shapes. Each batch size gets its own graph with
        every input shape static: onnx-ad then needs no shape arithmetic for its adjoints,
        ONNX Runtime folds the rest, and Slice/Concat rules get the static shapes they need
        (calibration uses one batch size, plus at most one smaller last batch)."""
        key = tuple(sorted((k, v.shape) for k, v in feeds.items()))
        if key not in self.graphs:
            model = _copy(self.forward)
            batch = len(next(iter(feeds.values())))
            for vi in model.graph.input:
                if vi.name in feeds:
                    shape = vi.type.tensor_type.shape
                    shape.Clear()
                    for size in feeds[vi.name].shape:
                        shape.dim.add().dim_value = int(size)
            declare_static_shapes(model, *self.traces, batch)
            graph = gradient_graph(model, [g.input for g in self.gates], TOTAL_LOSS)
            self.graphs[key] = (graph, make_session(graph.model, threads=self.threads))
        return self.graphs[key]

    @property
    def graph(self):
        return next(iter(self.graphs.values()))[0]

    def __call__(self, inputs: Mapping[str, np.ndarray], targets: Mapping[str, np.ndarray]
                 ) -> tuple[np.ndarray, dict[Gate, np.ndarray]]:
        batch = len(next(iter(inputs.values())))
        feeds = {**inputs, **targets, **self.gated.feeds(batch=batch)}
        graph, session = self._graph(feeds)
        names = [SAMPLE_LOSS, *graph.gradients.values()]
        # half-precision gates: the loss (float32) is scaled before the backward pass so
        # that small adjoints do not underflow float16, and scaled down again on overflow
        half = any(np.dtype(g.dtype).itemsize < 4 for g in self.gates)
        scale = HALF_LOSS_SCALE if half else 1.0
        while True:
            feeds[graph.seed] = graph.seed_value() * graph.seed_dtype(scale)
            values = run(session, feeds, names)
            if scale <= 1 or all(np.isfinite(values[n]).all() for n in names[1:]):
                break
            scale = max(1.0, scale / 64)
        grads = {}
        for gate in self.gates:
            value = values[graph.gradients[gate.input]][..., 0]
            if half:
                value = value.astype(np.float64) / scale
            grads[gate] = gate.per_sample(value, batch)
        return values[SAMPLE_LOSS], grads


class GradientStatistic:
    """Accumulates one gradient metric over batches; ``result()`` gives a score per gate
    (the per-unit vector for vector gates, a scalar for module and SEND gates)."""

    def __init__(self, method: str, ema: float = 0.5, first_order: bool = True):
        self.method = method
        self.ema = ema
        # with sampled (self-distillation) targets E[g] = 0: only the curvature term counts
        self.first_order = first_order
        self.state: dict[Gate, np.ndarray] = {}
        self.count = 0

    def update(self, grads: Mapping[Gate, np.ndarray]) -> None:
        for gate, g in grads.items():
            g = g.astype(np.float64)
            if gate.kind == "send":
                value = send_dispersion(g).sum()
            elif self.method == "taylor":
                value = np.abs(g).sum(axis=0)
            else:
                value = 0.5 * (g ** 2).mean(axis=0)
                if self.first_order:
                    value = value - g.mean(axis=0)
            self._accumulate(gate, value, len(g))
        self.count += len(next(iter(grads.values()))) if grads else 0

    def _accumulate(self, gate: Gate, value: np.ndarray, n: int) -> None:
        old = self.state.get(gate)
        if self.method == "fisher" and gate.kind != "send":
            self.state[gate] = value if old is None else self.ema * value + (1 - self.ema) * old
        else:
            self.state[gate] = value if old is None else old + value

    def result(self) -> dict[Gate, np.ndarray]:
        out = {}
        for gate, value in self.state.items():
            if self.method == "fisher" and gate.kind != "send":
                out[gate] = np.abs(value)
            else:
                out[gate] = value / max(self.count, 1)
        return out


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def send_dispersion(s: np.ndarray) -> np.ndarray:
    """SEND per sample from S [B, ..., Tq, Tk] (heads and other axes in the middle)."""
    a = np.abs(s.reshape(s.shape[0], -1, *s.shape[-2:]))
    a = a - a.max(axis=-1, keepdims=True)
    p = np.exp(a)
    p /= p.sum(axis=-1, keepdims=True)
    return p.mean(axis=1).std(axis=-1).mean(axis=-1)


class GradientScore(ImportanceScore):
    """A score from per-sample gate gradients; falls back to forward-only scores (ablation
    for modules and heads, stat for channels) when onnx-ad cannot differentiate an op."""

    needs_data = True
    needs_gradients = True
    statistic: str

    def compute(self, context: ScoreContext) -> ScoreArrays:
        try:
            return self.gradient_scores(context, context.kinds, send=False)
        except NoGradientError as exc:
            context.fallbacks.append(f"{self.name} -> ablation (modules, heads) and stat "
                                     f"(channels): {exc}")
            return forward_fallback(context)

    def gradient_scores(self, context: ScoreContext, kinds: set[UnitKind],
                        send: bool) -> ScoreArrays:
        analysis = context.analysis
        grad = GradientPass(analysis, context.spec, kinds, context.threads, send=send)
        acc = GradientStatistic(self.statistic, context.ema,
                                first_order=not context.spec.distill)
        data = getattr(context.batches, "gradient_batches", context.batches)()
        for n, (inputs, targets) in enumerate(data):
            _, grads = grad(inputs, targets)
            acc.update(grads)
            if context.progress:
                context.progress(n + 1, len(data))
        context.samples_seen = acc.count
        blocks = {b.name: b for b in analysis.structure.blocks}
        values: ScoreArrays = {}
        for gate, value in acc.result().items():
            block = blocks[gate.block]
            kind = gate.unit or module_kind(block)
            values[(gate.block, kind)] = value.reshape(kind.shape(block)) if gate.size \
                else np.float64(value)
        return values


def forward_fallback(context: ScoreContext) -> ScoreArrays:
    """Ablation for the kinds it scores, stat for the rest."""
    ablation = Ablation()
    exact = {k for k in context.kinds if ablation.scores_kind(k)}
    values = Stat().compute(_with_kinds(context, context.kinds - exact))
    if exact:
        values.update(ablation.compute(_with_kinds(context, exact)))
    return values


def _with_kinds(context: ScoreContext, kinds: set[UnitKind]) -> ScoreContext:
    return replace(context, kinds=kinds)


@register_score
class Fisher(GradientScore):
    """|−mean g + ½ mean g²| per unit ("Less is More", Eq. 6)."""

    name = "fisher"
    statistic = "fisher"


@register_score
class Taylor(GradientScore):
    """Mean over samples of |g| (Michel et al. 2019)."""

    name = "taylor"
    statistic = "taylor"


@register_score
class Send(GradientScore):
    """SPAT's SEND of ∂L/∂A ⊙ A on each softmax output: whole attention modules."""

    name = "send"
    statistic = "send"
    kinds = frozenset({"attn"})

    def compute(self, context: ScoreContext) -> ScoreArrays:
        attention = unit_kind("attn")
        missing = [b.name for b in context.analysis.structure.blocks
                   if attention.fits(b) and context.analysis.view.node[b.anchor].op != "Softmax"]
        if missing:
            raise OnnxpruneError(f"--method send needs the softmax of each attention; "
                                 f"{', '.join(missing)} use a fused Attention op")
        return self.gradient_scores(context, set(), send=True)
