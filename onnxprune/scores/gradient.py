"""Gradient scores from one exported reverse-mode graph run in ONNX Runtime (no torch).

The gated model (per-sample gates) plus the loss is differentiated once with onnx-ad with
respect to the gate inputs only; every calibration batch is then one run of that graph,
which yields the loss of each sample and each sample's ∂L/∂gate.

- ``taylor``: mean over samples of |g| (Michel et al. 2019).
- ``fisher``: s = ½·mean_n g² over every calibration sample, the diagonal of the empirical
  Fisher: the second-order estimate of the loss increase when the gate goes from 1 to 0
  for a converged model, whose first-order term E[g] is zero (Kwon et al. 2022).
- ``lim``: s = −mean_n g + ½·mean_n g², the same estimate with the first-order term
  measured; its absolute value ranks ("Less is More", Eq. 6). On the trained reference
  models the measured E[g] is mostly noise that cancels the curvature term for some
  important units (docs/RESULTS.md), hence ``fisher`` as the default.
  Across progressive steps both signed values are smoothed, s̃ ← α·s + (1−α)·s̃
  (``pipeline``).
- ``send``: SPAT's module score from S = ∂L/∂A ⊙ A on each softmax output A (the gradient
  of a whole-tensor gate on A): |S|, softmax over keys, mean over heads, standard deviation
  of each row, mean over rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import ClassVar

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
from onnxprune.runtime import initializers_to_inputs, make_session, run
from onnxprune.scores.ablation import Ablation
from onnxprune.scores.activations import Stat
from onnxprune.scores.base import (
    GradientSketch,
    ImportanceScore,
    ScoreArrays,
    ScoreContext,
    register_score,
)
from onnxprune.structure.discover import Analysis
from onnxprune.units import UnitKind, module_kind, unit_kind
from onnxprune.weightstore import full_size, model_store, store_of

# the loss scale for float16 gate gradients (divided by 64 while the gradients overflow)
HALF_LOSS_SCALE = 4096.0
# activations one run of the gradient graph may hold: a batch whose forward tensors (times
# BACKWARD_FACTOR for what the backward pass keeps and makes) would exceed it runs in parts
ACTIVATION_BUDGET = 1 << 30
BACKWARD_FACTOR = 1
# initializers of this size or more are left out while the gradient graph is built
LIFT_BYTES = 1 << 16


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
        # the weights are lifted out while the gradient graph is built (copies, shape
        # inference, onnx-ad hold no copy of them) and put back for ONNX Runtime, which
        # needs them constant: a fed weight changes MatMul's rounding with the thread count
        self.weights = lift_weights(model)
        self.forward = model
        self.threads = threads
        self.graphs: dict[tuple, tuple] = {}
        self.part = micro_batch(analysis)

    def __call__(self, inputs: Mapping[str, np.ndarray], targets: Mapping[str, np.ndarray]
                 ) -> tuple[np.ndarray, dict[Gate, np.ndarray]]:
        """Per-sample losses and gate gradients of a batch, run in parts of at most
        ``self.part`` samples (the per-sample values do not depend on the split)."""
        batch = len(next(iter(inputs.values())))
        if self.part is None or batch <= self.part:
            return self._run(inputs, targets)
        runs = [self._run({k: v[i:i + self.part] for k, v in inputs.items()},
                          {k: v[i:i + self.part] for k, v in targets.items()})
                for i in range(0, batch, self.part)]
        return (np.concatenate([loss for loss, _ in runs]),
                {gate: np.concatenate([grads[gate] for _, grads in runs])
                 for gate in self.gates})

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
            session = make_session(restore_weights(graph.model, self.weights),
                                   threads=self.threads, arena=False)
            self.graphs[key] = (graph, session)
        return self.graphs[key]

    @property
    def graph(self):
        return next(iter(self.graphs.values()))[0]

    def _run(self, inputs: Mapping[str, np.ndarray], targets: Mapping[str, np.ndarray]
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


def lift_weights(model: onnx.ModelProto, least: int | None = None
                 ) -> dict[str, onnx.TensorProto]:
    """Float initializers of ``least`` (default ``LIFT_BYTES``) bytes or more, and every
    weight-store stub, become graph inputs (in place); the initializers, by name. Small ones
    and integer ones (shapes, pads, indices) stay: shape inference and onnx-ad read them."""
    least = LIFT_BYTES if least is None else least
    return initializers_to_inputs(model, {
        t.name for t in model.graph.initializer
        if store_of(t) is not None or (t.data_location != onnx.TensorProto.EXTERNAL
                                       and len(t.raw_data) >= least
                                       and t.data_type in _WEIGHT_TYPES)})  # not shapes


_WEIGHT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                 onnx.TensorProto.DOUBLE)


def restore_weights(model: onnx.ModelProto, weights: Mapping[str, onnx.TensorProto]
                    ) -> onnx.ModelProto:
    """A copy of ``model`` with the lifted ``weights`` it reads as initializers again."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    names = {i.name for i in out.graph.input} & set(weights)
    kept = [i for i in out.graph.input if i.name not in names]
    del out.graph.input[:]
    out.graph.input.extend(kept)
    out.graph.initializer.extend(weights[n] for n in sorted(names))
    return out


def micro_batch(analysis: Analysis, budget: int | None = None) -> int | None:
    """The most samples one gradient run may take (a power of two), from the activations
    of the analysed run (one sample where the batch is dynamic); None when the batch is
    fixed in the graph (it cannot be split). The budget (default: ``ACTIVATION_BUDGET``,
    or a quarter of the weights' bytes for a model in a weight store, whichever is less,
    but never under 64 MiB) keeps a large model's peak near its size."""
    if any(d.dim_value > 0 for vi in analysis.model.graph.input[:1]
           for d in vi.type.tensor_type.shape.dim[:1]):
        return None
    if budget is None:
        budget = ACTIVATION_BUDGET
        if model_store(analysis.model) is not None:
            budget = min(budget, max(64 << 20, full_size(analysis.model) // 4))
    weights = {t.name for t in analysis.model.graph.initializer}
    per_sample = sum(v.nbytes for k, v in analysis.trace.items()
                     if k not in weights and isinstance(v, np.ndarray))
    fits = max(1, budget // max(1, BACKWARD_FACTOR * per_sample))
    return 1 << (int(fits).bit_length() - 1)   # a power of two: batches of 32 split evenly


# rows of a gradient sketch: every sample its own row up to this many, ~4 MB per block
SKETCH_ROWS = (64, 512)
SKETCH_ENTRIES = 1 << 20


@dataclass
class BatchSums:
    """One calibration batch's contribution to a :class:`GradientStatistic`: per gate input,
    the batch's sums of g, g², |g| (or of SEND), and for the sketch the rows it touches with
    what it adds to them. The unit of reduction: adding the contributions of the batches in
    batch order gives the same floating-point sums wherever each batch was run (one process
    or the shard of a Ray worker, ``scores.distributed``)."""

    samples: int
    sums: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    sketch: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def nbytes(self) -> int:
        return (sum(v.nbytes for d in self.sums.values() for v in map(np.asarray, d.values()))
                + sum(i.nbytes + v.nbytes for i, v in self.sketch.values()))


def sketch_rows(size: int) -> int:
    """The rows of a gate's gradient sketch: every sample its own row up to this many."""
    low, high = SKETCH_ROWS
    return min(high, max(low, SKETCH_ENTRIES // size))


def batch_sums(grads: Mapping[Gate, np.ndarray], signs: np.ndarray, offset: int,
               sketch: bool = True) -> BatchSums:
    """The contribution of one batch of per-sample gradients; ``signs`` are the sketch's
    random signs of its samples and ``offset`` the samples before it (sample n goes to sketch
    row n mod rows)."""
    batch = len(next(iter(grads.values()))) if grads else 0
    part = BatchSums(batch)
    for gate, g in grads.items():
        g = g.astype(np.float64)
        if gate.kind == "send":
            part.sums[gate.input] = {"send": send_dispersion(g).sum()}
            continue
        part.sums[gate.input] = {"g": g.sum(axis=0), "g2": (g ** 2).sum(axis=0),
                                 "abs": np.abs(g).sum(axis=0)}
        if gate.size and sketch:
            where = (offset + np.arange(len(g))) % sketch_rows(g.shape[1])
            rows, inverse = np.unique(where, return_inverse=True)
            delta = np.zeros((len(rows), g.shape[1]))
            np.add.at(delta, inverse, signs[:, None] * g)
            part.sketch[gate.input] = (rows, delta)
    return part


class GradientStatistic:
    """Accumulates one gradient metric as a mean over every calibration sample of its
    per-sample statistic; ``result()`` gives a score per gate (the per-unit vector for
    vector gates, a scalar for module and SEND gates). Nothing is smoothed across batches:
    the EMA of ``fisher`` runs across progressive steps (``pipeline.run_prune``).

    For vector gates it also keeps a ``GradientSketch`` (mean g, mean g², a bounded
    random-sign sketch of the per-sample gradients): the block's empirical Fisher.

    The sums are reduced batch by batch: each batch's :class:`BatchSums` (``batch_sums``) is
    added in batch order (``add``), so a run whose batches were scored elsewhere (Ray
    workers) and one that scored them here give identical floats."""

    def __init__(self, method: str, first_order: bool = True, seed: int = 0,
                 sketch: bool = True, gates: Iterable[Gate] = ()):
        self.method = method
        self.sketch = sketch
        # with sampled (self-distillation) targets E[g] = 0: only the curvature term counts
        self.first_order = first_order
        self.gates: dict[str, Gate] = {g.input: g for g in gates}
        self.sums: dict[Gate, dict[str, np.ndarray]] = {}
        self.rows: dict[Gate, np.ndarray] = {}
        self.count = 0
        self.rng = np.random.default_rng(seed)

    def signs(self, batch: int) -> np.ndarray:
        """The sketch's random signs of the next batch (drawn in batch order)."""
        return self.rng.choice((-1.0, 1.0), size=batch)

    def update(self, grads: Mapping[Gate, np.ndarray]) -> None:
        batch = len(next(iter(grads.values()))) if grads else 0
        self.gates.update((g.input, g) for g in grads)
        self.add(batch_sums(grads, self.signs(batch), self.count, self.sketch))

    def add(self, part: BatchSums) -> None:
        """Add the next batch's contribution (batches must come in order)."""
        for name, values in part.sums.items():
            sums = self.sums.setdefault(self.gates[name], {})
            for key, value in values.items():
                sums[key] = value if key not in sums else sums[key] + value
        if self.sketch:
            for name, (where, delta) in part.sketch.items():
                gate = self.gates[name]
                if gate not in self.rows:
                    self.rows[gate] = np.zeros((sketch_rows(delta.shape[1]), delta.shape[1]))
                self.rows[gate][where] += delta
        self.count += part.samples

    def signed(self) -> dict[Gate, np.ndarray]:
        """Per gate the signed statistic: fisher's ½ mean g², lim's −mean g + ½ mean g² (the
        estimated loss increase when the gate goes from 1 to 0), taylor's mean |g|, SEND's
        mean."""
        n = max(self.count, 1)
        out = {}
        for gate, sums in self.sums.items():
            if gate.kind == "send":
                out[gate] = sums["send"] / n
            elif self.method == "taylor":
                out[gate] = sums["abs"] / n
            else:
                value = 0.5 * sums["g2"] / n
                first = self.first_order and self.method == "lim"
                out[gate] = value - sums["g"] / n if first else value
        return out

    def result(self) -> dict[Gate, np.ndarray]:
        """The scores: the signed statistic, lim's as its absolute value (ranking)."""
        return {gate: np.abs(value) if self.method == "lim" and gate.kind != "send"
                else value for gate, value in self.signed().items()}

    def sketches(self) -> dict[Gate, GradientSketch]:
        n = max(self.count, 1)
        return {gate: GradientSketch(self.sums[gate]["g"] / n, self.sums[gate]["g2"] / n,
                                     rows.astype(np.float32), self.count)
                for gate, rows in self.rows.items()}


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
    # the statistic estimates the loss increase (signed, with the empirical Fisher on its
    # diagonal): the run smooths it across steps and rearranges masks with the sketches
    estimates_loss: ClassVar[bool] = False

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
        acc = GradientStatistic(self.statistic, first_order=not context.spec.distill,
                                seed=context.seed, sketch=self.estimates_loss,
                                gates=grad.gates)
        data = getattr(context.batches, "gradient_batches", context.batches)()
        if context.cluster is not None:   # the batches run on Ray workers, added here in order
            for part in context.cluster.gradient_sums(analysis, context.spec, kinds, send,
                                                      context.threads, acc, data,
                                                      context.progress):
                acc.add(part)
        else:
            for n, (inputs, targets) in enumerate(data):
                _, grads = grad(inputs, targets)
                acc.update(grads)
                if context.progress:
                    context.progress(n + 1, len(data))
        context.samples_seen = acc.count
        keys = {gate: self._key(analysis, gate) for gate in acc.sums}
        if self.estimates_loss:
            context.signed.update(self._arrays(analysis, keys, acc.signed()))
            context.gradients.update({keys[gate]: sketch
                                      for gate, sketch in acc.sketches().items()})
        return self._arrays(analysis, keys, acc.result())

    @staticmethod
    def _key(analysis: Analysis, gate: Gate) -> tuple[str, UnitKind]:
        return gate.block, gate.unit or module_kind(analysis.structure.block(gate.block))

    @staticmethod
    def _arrays(analysis: Analysis, keys: Mapping[Gate, tuple[str, UnitKind]],
                values: Mapping[Gate, np.ndarray]) -> ScoreArrays:
        out: ScoreArrays = {}
        for gate, value in values.items():
            block, kind = keys[gate]
            out[(block, kind)] = (value.reshape(kind.shape(analysis.structure.block(block)))
                                  if gate.size else np.float64(value))
        return out


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
    """½ mean g² per unit: the diagonal empirical Fisher (Kwon et al. 2022)."""

    name = "fisher"
    statistic = "fisher"
    estimates_loss = True


@register_score
class LessIsMore(GradientScore):
    """|−mean g + ½ mean g²| per unit ("Less is More", Eq. 6): fisher with the measured
    first-order term."""

    name = "lim"
    statistic = "lim"
    estimates_loss = True


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
