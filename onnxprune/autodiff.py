"""Reverse-mode gradient graphs with onnx-ad, trimmed to what the requested outputs need.

onnx-ad emits the adjoint of every operand of a differentiated node and leaves the unused
ones (a weight's gradient when only activations are differentiated) in the graph; ONNX
Runtime would still run them, so nodes that feed no output are deleted here. That alone
halves the cost of a gate-gradient pass on the reference models.

The rewrites that prepare a graph for onnx-ad and trim its result are passes
(:mod:`onnxprune.passes`) with checked conditions: :class:`FreezeShapeOperands`,
:class:`DeclareStaticShapes` and :class:`DropDeadNodes`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ad

from onnxprune.errors import OnnxpruneError
from onnxprune.passes import (
    Pass,
    dead_nodes,
    outputs_changed,
    unsorted_nodes,
)
from onnxprune.seed_axis import speed_up_seed_axis

Trace = Mapping[str, np.ndarray]

SEED_PREFIX = "adj_"


class NoGradientError(OnnxpruneError):
    """onnx-ad has no derivative for an op on the path (the message names it)."""


@dataclass
class GradientGraph:
    """A model computing its primal outputs and d(seeded output)/d(each input in ``wrt``).

    Feed the primal inputs plus ``seed`` (:meth:`seed_value`: a [1] array of ones in the
    output's type); the gradient of input ``x`` is output ``gradients[x]``."""

    model: onnx.ModelProto
    seed: str
    gradients: dict[str, str]
    seed_dtype: type = np.float32   # the differentiated output's type

    def seed_value(self) -> np.ndarray:
        return np.ones(1, self.seed_dtype)


def gradient_graph(model: onnx.ModelProto, wrt: Sequence[str], output: str) -> GradientGraph:
    """d``output``/d``wrt`` for a scalar ``output``; raise naming the op onnx-ad lacks."""
    try:
        model = onnx.shape_inference.infer_shapes(model)
        adjoint = onnx_ad.reverse(model, inputs=list(wrt), outputs=[output], layout="onnx",
                                  prefix=SEED_PREFIX)
    except onnx_ad.UnsupportedOperator as exc:
        raise NoGradientError(f"no gradient through this model: {exc}") from exc
    seed = SEED_PREFIX + output
    seed_dtype = np.float32
    for vi in adjoint.graph.input:
        if vi.name == seed:
            if vi.type.tensor_type.elem_type:
                seed_dtype = onnx.helper.tensor_dtype_to_np_dtype(
                    vi.type.tensor_type.elem_type).type
            for dim in vi.type.tensor_type.shape.dim:
                dim.Clear()
                dim.dim_value = 1
    keep = {o.name for o in model.graph.output} | {SEED_PREFIX + x for x in wrt}
    outputs = [o for o in adjoint.graph.output if o.name in keep]
    del adjoint.graph.output[:]
    adjoint.graph.output.extend(outputs)
    drop_dead_nodes(adjoint)
    speed_up_seed_axis(adjoint)
    UpcastHalfKernels().run(adjoint)
    FuseWeightTransposes().run(adjoint)
    return GradientGraph(adjoint, seed, {x: SEED_PREFIX + x for x in wrt}, seed_dtype)


# ops ONNX Runtime's CPU provider runs in float32 but not in float16 (or bfloat16): op ->
# (the operand positions that carry the data, the attribute that must be set for the gap)
_HALF_GAPS = {"ScatterND": ((0, 2), "reduction"), "ScatterElements": ((0, 2), "reduction")}
_HALF_TYPES = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


class UpcastHalfKernels(Pass):
    """Nodes that ONNX Runtime's CPU provider cannot run in half precision (the
    accumulating ScatterND that onnx-ad emits for the adjoint of a Gather) compute in float32
    between Casts; the node keeps its output name and type. Post: same outputs, nodes in
    order."""

    name = "upcast half-precision kernels"

    def apply(self, model: onnx.ModelProto) -> int:
        graph = model.graph
        wanted = [n for n in graph.node if n.op_type in _HALF_GAPS and any(
            a.name == _HALF_GAPS[n.op_type][1] and a.s not in (b"", b"none")
            for a in n.attribute)]
        if not wanted:
            return 0
        typed = onnx.shape_inference.infer_shapes(model)
        elem = {vi.name: vi.type.tensor_type.elem_type
                for vi in [*typed.graph.value_info, *typed.graph.input, *typed.graph.output]}
        elem.update({t.name: t.data_type for t in graph.initializer})
        changed = 0
        nodes = []
        for node in graph.node:
            kind = elem.get(node.input[0]) if node in wanted else None
            if kind not in _HALF_TYPES:
                nodes.append(node)
                continue
            for pos in _HALF_GAPS[node.op_type][0]:
                wide = f"{node.input[pos]}.upcast{changed}.f32"
                nodes.append(onnx.helper.make_node("Cast", [node.input[pos]], [wide],
                                                   name=wide, to=onnx.TensorProto.FLOAT))
                node.input[pos] = wide
            out = node.output[0]
            node.output[0] = f"{out}.f32"
            nodes.append(node)
            nodes.append(onnx.helper.make_node("Cast", [node.output[0]], [out],
                                               name=f"{out}.upcast{changed}", to=kind))
            changed += 1
        del graph.node[:]
        graph.node.extend(nodes)
        self.changed = changed
        return changed

    def post(self, before: onnx.ModelProto, after: onnx.ModelProto) -> list[str]:
        return [*outputs_changed(before, after), *unsorted_nodes(after)]


class FuseWeightTransposes(Pass):
    """``MatMul(x, Transpose(W))`` of a 2-D weight W (the adjoint onnx-ad emits for the
    input of ``x @ W``) becomes ``com.microsoft.FusedMatMul(x, W, transB=1)``: ONNX Runtime
    would otherwise fold each ``Transpose(W)`` into a transposed copy of the weight, one
    more copy of the whole model in the gradient session. Post: same outputs, nodes in
    order."""

    name = "fuse weight transposes"

    def apply(self, model: onnx.ModelProto) -> int:
        graph = model.graph
        dims = {t.name: len(t.dims) for t in graph.initializer}
        dims.update({i.name: len(i.type.tensor_type.shape.dim) for i in graph.input
                     if i.type.tensor_type.HasField("shape")})
        types = {t.name: t.data_type for t in graph.initializer}
        types.update({i.name: i.type.tensor_type.elem_type for i in graph.input})
        transposed = {n.output[0]: n.input[0] for n in graph.node
                      if n.op_type == "Transpose" and dims.get(n.input[0]) == 2
                      and [list(a.ints) for a in n.attribute if a.name == "perm"] in
                      ([], [[1, 0]])}
        changed = 0
        nodes = []
        for node in graph.node:
            if node.op_type == "MatMul" and node.domain in ("", "ai.onnx") \
                    and node.input[1] in transposed:
                node.op_type, node.domain = "FusedMatMul", "com.microsoft"
                node.input[1] = transposed[node.input[1]]
                node.attribute.extend([onnx.helper.make_attribute("transB", 1),
                                       onnx.helper.make_attribute("alpha", 1.0)])
                if types.get(node.input[1]) in _HALF_TYPES:
                    nodes += _widened(node, types[node.input[1]], changed)
                    changed += 1
                    continue
                changed += 1
            nodes.append(node)
        del graph.node[:]
        graph.node.extend(nodes)
        if changed:
            if not any(o.domain == "com.microsoft" for o in model.opset_import):
                model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
            drop_dead_nodes(model)
        return changed

    def post(self, before: onnx.ModelProto, after: onnx.ModelProto) -> list[str]:
        return [*outputs_changed(before, after), *unsorted_nodes(after)]


def _widened(node: onnx.NodeProto, half: int, index: int) -> list[onnx.NodeProto]:
    """A half-precision ``FusedMatMul`` computed in float32 between Casts of its own, as
    ONNX Runtime's CPU provider computes it anyway: ONNX Runtime would widen the weight
    once for this node and the forward MatMul together, and keep that float32 copy from the
    forward pass to the backward one (every weight at once, twice the model)."""
    wide = [f"{name}.wide{index}" for name in node.input[:2]]
    out = node.output[0]
    casts = [onnx.helper.make_node("Cast", [name], [w], name=w, to=onnx.TensorProto.FLOAT)
             for name, w in zip(node.input[:2], wide)]
    node.input[0], node.input[1] = wide
    node.output[0] = f"{out}.wide{index}"
    back = onnx.helper.make_node("Cast", [node.output[0]], [out], name=f"{out}.narrow{index}",
                                 to=half)
    return [*casts, node, back]


# operands onnx-ad needs as constants, by op: input positions
_CONSTANT_OPERANDS = {"Slice": (1, 2, 3, 4), "Split": (1,), "Pad": (1, 2, 3)}
FROZEN_SUFFIX = ".frozen"


def freeze_shape_operands(model: onnx.ModelProto, *traces: Trace) -> int:
    """Replace computed Slice/Split/Pad bounds by constants where every trace (taken at
    different batch sizes) agrees on their value, i.e. they do not depend on the batch.
    Returns how many were frozen. In place."""
    return FreezeShapeOperands(traces).run(model)


@dataclass
class FreezeShapeOperands(Pass):
    """Computed operands that onnx-ad needs constant become initializers holding their
    traced value. Post: same outputs, each frozen operand equals its value in every trace,
    no constant position still reads a computed bound that was frozen, nodes in order."""

    traces: Sequence[Trace]
    frozen: dict[str, np.ndarray] = field(default_factory=dict)
    name = "freeze shape operands"

    def pre(self, model: onnx.ModelProto) -> list[str]:
        return [] if self.traces else ["no trace to read the operand values from"]

    def apply(self, model: onnx.ModelProto) -> int:
        self.frozen = _batch_independent_operands(model, self.traces)
        for node in model.graph.node:
            for i, name in enumerate(node.input):
                if name in self.frozen:
                    node.input[i] = name + FROZEN_SUFFIX
        model.graph.initializer.extend(onnx.numpy_helper.from_array(v, k + FROZEN_SUFFIX)
                                       for k, v in self.frozen.items())
        return len(self.frozen)

    def post(self, before: onnx.ModelProto, after: onnx.ModelProto) -> list[str]:
        inits = {t.name: t for t in after.graph.initializer}
        broken = [*outputs_changed(before, after), *unsorted_nodes(after)]
        for name in self.frozen:
            value = onnx.numpy_helper.to_array(inits[name + FROZEN_SUFFIX])
            broken += [f"{name!r} frozen to {value}, traced as {t[name]}" for t in self.traces
                       if not np.array_equal(value, t[name])
                       or value.dtype != np.asarray(t[name]).dtype]
        broken += [f"{node.op_type} {node.name!r} still reads the frozen {name!r}"
                   for node in after.graph.node for pos in _CONSTANT_OPERANDS.get(
                       node.op_type, ()) if pos < len(node.input)
                   for name in [node.input[pos]] if name in self.frozen]
        return broken


def _batch_independent_operands(model: onnx.ModelProto, traces: Sequence[Trace]
                                ) -> dict[str, np.ndarray]:
    produced = {name for node in model.graph.node for name in node.output}
    frozen: dict[str, np.ndarray] = {}
    for node in model.graph.node:
        for pos in _CONSTANT_OPERANDS.get(node.op_type, ()):
            if pos >= len(node.input) or node.input[pos] not in produced:
                continue
            name = node.input[pos]
            values = [t.get(name) for t in traces]
            if any(v is None for v in values):
                continue
            if all(np.array_equal(values[0], v) for v in values[1:]):
                frozen[name] = np.asarray(values[0])
    return frozen


# ops whose reverse rule in onnx-ad needs static operand shapes: op -> operand positions
_STATIC_OPERANDS = {"Slice": (0,), "Concat": None}


def declare_static_shapes(model: onnx.ModelProto, one: Trace, two: Trace,
                          batch: int | None) -> bool:
    """Declare static shapes (onnx-ad needs them) for Slice and Concat operands whose shape
    inference lost them: the traced dims, the one that doubles between the batch-1 and
    batch-2 traces scaled to ``batch``. Returns whether any depends on the batch (then the
    graph is only valid at that batch size); with ``batch`` None it only checks."""
    if batch is None:
        return any(np.shape(one[n]) != np.shape(two[n]) for n in _shapeless_operands(model,
                                                                                    one, two))
    return DeclareStaticShapes(one, two, batch).run(model)


@dataclass
class DeclareStaticShapes(Pass):
    """Static ``value_info`` for shapeless Slice/Concat operands and for the outputs of
    contrib ops (onnx shape inference cannot type them, so nothing after them, the loss
    included, would get a rank), from two traces (batch 1 and 2) scaled to ``batch``.
    Post: nodes, initializers and outputs unchanged, one ``value_info`` per tensor, each
    declared shape the traced one at ``batch``."""

    one: Trace
    two: Trace
    batch: int
    declared: dict[str, list[int]] = field(default_factory=dict)
    name = "declare static shapes"

    def apply(self, model: onnx.ModelProto) -> bool:
        typed = onnx.shape_inference.infer_shapes(model)
        elem = {vi.name: vi.type.tensor_type.elem_type for vi in typed.graph.value_info}
        self.declared = {name: self._dims(name)
                         for name in _shapeless_operands(model, self.one, self.two, typed)}
        kept = [vi for vi in model.graph.value_info if vi.name not in self.declared]
        del model.graph.value_info[:]
        model.graph.value_info.extend(kept)
        for name, dims in self.declared.items():
            model.graph.value_info.append(onnx.helper.make_tensor_value_info(
                name, elem.get(name) or onnx.helper.np_dtype_to_tensor_dtype(
                    np.asarray(self.one[name]).dtype), dims))
        return any(np.shape(self.one[n]) != np.shape(self.two[n]) for n in self.declared)

    def _dims(self, name: str) -> list[int]:
        return [x if x == y else x * self.batch
                for x, y in zip(np.shape(self.one[name]), np.shape(self.two[name]))]

    def post(self, before: onnx.ModelProto, after: onnx.ModelProto) -> list[str]:
        broken = outputs_changed(before, after)
        if list(before.graph.node) != list(after.graph.node):
            broken.append("the nodes changed")
        if [t.name for t in before.graph.initializer] != [t.name for t in after.graph.initializer]:
            broken.append("the initializers changed")
        names = [vi.name for vi in after.graph.value_info]
        broken += [f"{n!r} has {names.count(n)} value_info entries" for n in set(names)
                   if names.count(n) > 1]
        shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
                  for vi in after.graph.value_info}
        broken += [f"{n!r} declared {shapes.get(n)}, traced {self._dims(n)}"
                   for n in self.declared if shapes.get(n) != self._dims(n)]
        return broken


def _shapeless_operands(model: onnx.ModelProto, one: Trace, two: Trace,
                        typed: onnx.ModelProto | None = None) -> list[str]:
    """Slice/Concat operands and contrib-op outputs without a static inferred shape, traced
    at the same rank in both traces (in graph order, each once)."""
    typed = typed or onnx.shape_inference.infer_shapes(model)
    static = {vi.name for vi in [*typed.graph.value_info, *typed.graph.input]
              if vi.type.tensor_type.HasField("shape")
              and all(d.HasField("dim_value") for d in vi.type.tensor_type.shape.dim)}
    static |= {t.name for t in model.graph.initializer}
    found: dict[str, None] = {}
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            names = list(node.output)
        elif node.op_type in _STATIC_OPERANDS:
            positions = _STATIC_OPERANDS[node.op_type] or range(len(node.input))
            names = [node.input[p] for p in positions if p < len(node.input)]
        else:
            continue
        for name in names:
            if (name and name not in static and name in one and name in two
                    and len(np.shape(one[name])) == len(np.shape(two[name]))):
                found[name] = None
    return list(found)


def drop_dead_nodes(model: onnx.ModelProto) -> None:
    """Delete nodes and initializers no graph output depends on (in place)."""
    DropDeadNodes().run(model)


class DropDeadNodes(Pass):
    """Nodes and initializers no graph output depends on are deleted. Post: same outputs,
    no node left whose outputs nobody reads, nodes in order, still passes the checker."""

    name = "drop dead nodes"
    keeps_checker = True

    def apply(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        needed = {o.name for o in graph.output}
        kept = []
        for node in reversed(graph.node):
            if any(name in needed for name in node.output):
                kept.append(node)
                needed.update(name for name in node.input if name)
                for attr in node.attribute:  # subgraphs read outer names too
                    for sub in [attr.g, *attr.graphs]:
                        needed.update(n for sn in sub.node for n in sn.input)
        del graph.node[:]
        graph.node.extend(reversed(kept))
        inits = [t for t in graph.initializer if t.name in needed]
        del graph.initializer[:]
        graph.initializer.extend(inits)

    def post(self, before: onnx.ModelProto, after: onnx.ModelProto) -> list[str]:
        return [*outputs_changed(before, after), *dead_nodes(after), *unsorted_nodes(after)]
