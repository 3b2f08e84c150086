"""Reverse-mode gradient graphs with onnx-ad, trimmed to what the requested outputs need.

onnx-ad emits the adjoint of every operand of a differentiated node and leaves the unused
ones (a weight's gradient when only activations are differentiated) in the graph; ONNX
Runtime would still run them, so nodes that feed no output are deleted here. That alone
halves the cost of a gate-gradient pass on the reference models.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ad

from onnxprune.errors import OnnxpruneError
from onnxprune.seed_axis import speed_up_seed_axis

SEED_PREFIX = "adj_"


class NoGradientError(OnnxpruneError):
    """onnx-ad has no derivative for an op on the path (the message names it)."""


@dataclass
class GradientGraph:
    """A model computing its primal outputs and d(seeded output)/d(each input in ``wrt``).

    Feed the primal inputs plus ``seed`` (a [1] array of ones); the gradient of input
    ``x`` is output ``gradients[x]``."""

    model: onnx.ModelProto
    seed: str
    gradients: dict[str, str]


def gradient_graph(model: onnx.ModelProto, wrt: Sequence[str], output: str) -> GradientGraph:
    """d``output``/d``wrt`` for a scalar ``output``; raise naming the op onnx-ad lacks."""
    try:
        model = onnx.shape_inference.infer_shapes(model)
        adjoint = onnx_ad.reverse(model, inputs=list(wrt), outputs=[output], layout="onnx",
                                  prefix=SEED_PREFIX)
    except onnx_ad.UnsupportedOperator as exc:
        raise NoGradientError(f"no gradient through this model: {exc}") from exc
    seed = SEED_PREFIX + output
    for vi in adjoint.graph.input:
        if vi.name == seed:
            for dim in vi.type.tensor_type.shape.dim:
                dim.Clear()
                dim.dim_value = 1
    keep = {o.name for o in model.graph.output} | {SEED_PREFIX + x for x in wrt}
    outputs = [o for o in adjoint.graph.output if o.name in keep]
    del adjoint.graph.output[:]
    adjoint.graph.output.extend(outputs)
    drop_dead_nodes(adjoint)
    speed_up_seed_axis(adjoint)
    return GradientGraph(adjoint, seed, {x: SEED_PREFIX + x for x in wrt})


# operands onnx-ad needs as constants, by op: input positions
_CONSTANT_OPERANDS = {"Slice": (1, 2, 3, 4), "Split": (1,), "Pad": (1, 2, 3)}


def freeze_shape_operands(model: onnx.ModelProto, *traces: Mapping[str, np.ndarray]) -> int:
    """Replace computed Slice/Split/Pad bounds by constants where every trace (taken at
    different batch sizes) agrees on their value, i.e. they do not depend on the batch.
    Returns how many were frozen. In place."""
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
    if not frozen:
        return 0
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in frozen:
                node.input[i] = f"{name}.frozen"
    model.graph.initializer.extend(
        onnx.numpy_helper.from_array(v, f"{k}.frozen") for k, v in frozen.items())
    return len(frozen)


# ops whose reverse rule in onnx-ad needs static operand shapes: op -> operand positions
_STATIC_OPERANDS = {"Slice": (0,), "Concat": None}


def declare_static_shapes(model: onnx.ModelProto, one: Mapping[str, np.ndarray],
                          two: Mapping[str, np.ndarray], batch: int | None) -> bool:
    """Declare static shapes (onnx-ad needs them) for Slice and Concat operands whose shape
    inference lost them: the traced dims, the one that doubles between the batch-1 and
    batch-2 traces scaled to ``batch``. Returns whether any depends on the batch (then the
    graph is only valid at that batch size); with ``batch`` None it only checks."""
    typed = onnx.shape_inference.infer_shapes(model)
    static = {vi.name for vi in [*typed.graph.value_info, *typed.graph.input]
              if vi.type.tensor_type.HasField("shape")
              and all(d.HasField("dim_value") for d in vi.type.tensor_type.shape.dim)}
    static |= {t.name for t in model.graph.initializer}
    elem = {vi.name: vi.type.tensor_type.elem_type for vi in typed.graph.value_info}
    batch_bound = False
    for node in model.graph.node:
        if node.op_type not in _STATIC_OPERANDS:
            continue
        positions = _STATIC_OPERANDS[node.op_type] or range(len(node.input))
        for name in (node.input[p] for p in positions if p < len(node.input)):
            if not name or name in static or name not in one or name not in two:
                continue
            a, b = np.shape(one[name]), np.shape(two[name])
            if len(a) != len(b):
                continue
            batch_bound |= a != b
            if batch is None:
                continue
            dims = [x if x == y else x * batch for x, y in zip(a, b)]
            kept = [vi for vi in model.graph.value_info if vi.name != name]
            del model.graph.value_info[:]
            model.graph.value_info.extend(kept)
            model.graph.value_info.append(onnx.helper.make_tensor_value_info(
                name, elem.get(name) or onnx.helper.np_dtype_to_tensor_dtype(
                    np.asarray(one[name]).dtype), dims))
            static.add(name)
    return batch_bound


def drop_dead_nodes(model: onnx.ModelProto) -> None:
    """Delete nodes and initializers no graph output depends on (in place)."""
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
