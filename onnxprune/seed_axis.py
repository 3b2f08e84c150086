"""Rewrites that stop onnx-ad's trailing seed axis from slowing ONNX Runtime down.

With ``layout="onnx"`` every adjoint tensor carries the seed count as a trailing axis of
size 1. ONNX Runtime's CPU kernels handle that axis badly: a Reduce over any other axis
becomes a strided loop (20× slower on an attention-score tensor), a Mul of such a tensor
by a lower-rank scalar loses the scalar fast path (30× slower), and a Transpose that
carries the axis along cannot be folded into a MatMul. Each rewrite keeps the node's
output names and values; only how they are computed changes.

:class:`SpeedUpSeedAxis` is the pass: it needs the nodes in topological order, and
guarantees the same graph outputs, every tensor still computed under its name, nodes still
in order, and a model that still passes ``onnx.checker`` if it did.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxprune.passes import (
    Pass,
    node_outputs_lost,
    outputs_changed,
    unsorted_nodes,
)
from onnxprune.weightstore import tensor_array

Shapes = dict[str, list[int | None]]

_REDUCES = {"ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceSumSquare"}
_BROADCASTS = {"Add", "Sub", "Mul", "Div"}


def speed_up_seed_axis(model: onnx.ModelProto) -> dict[str, int]:
    """Apply every rewrite in place; returns how many nodes each one changed."""
    return SpeedUpSeedAxis().run(model)


class SpeedUpSeedAxis(Pass):
    """The rewrites above, node by node; ``apply`` returns how many nodes each changed."""

    name = "speed up seed axis"
    keeps_checker = True

    def pre(self, model: onnx.ModelProto) -> list[str]:
        return unsorted_nodes(model)  # new nodes go where the old one was

    def apply(self, model: onnx.ModelProto) -> dict[str, int]:
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                     13)
        counts = {"transpose": 0, "reduce": 0, "broadcast": 0}
        if opset < 13:
            return counts
        shapes = static_shapes(model)
        constants = _constants(model)
        nodes: list[onnx.NodeProto] = []
        for node in model.graph.node:
            new, kind = _rewrite(model, node, shapes, constants)
            if new is None:
                nodes.append(node)
            else:
                nodes.extend(new)
                counts[kind] += 1
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        return counts

    def post(self, before: onnx.ModelProto, after: onnx.ModelProto) -> list[str]:
        return [*outputs_changed(before, after), *node_outputs_lost(before, after),
                *unsorted_nodes(after)]


def _rewrite(model, node, shapes: Shapes, constants) -> tuple[list[onnx.NodeProto] | None, str]:
    if node.op_type == "Transpose":
        return _transpose_without_units(model, node, shapes), "transpose"
    if node.op_type in _REDUCES:
        return _reduce_without_seed(model, node, shapes, constants), "reduce"
    if node.op_type in _BROADCASTS:
        return _broadcast_at_full_rank(model, node, shapes, constants), "broadcast"
    return None, ""


def static_shapes(model: onnx.ModelProto) -> Shapes:
    # data propagation resolves the shapes onnx-ad computes with Shape/Concat at run time
    typed = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes = {vi.name: [d.dim_value if d.HasField("dim_value") else None
                        for d in vi.type.tensor_type.shape.dim]
              for vi in [*typed.graph.value_info, *typed.graph.input, *typed.graph.output]
              if vi.type.tensor_type.HasField("shape")}
    shapes.update({t.name: list(t.dims) for t in model.graph.initializer})
    return shapes


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {t.name: tensor_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _known(shape: list[int | None] | None) -> bool:
    return shape is not None and all(d is not None for d in shape)


def _add_ints(model: onnx.ModelProto, name: str, values: list[int]) -> str:
    model.graph.initializer.append(numpy_helper.from_array(np.array(values, np.int64), name))
    return name


def _squeeze(model, source: str, axes: list[int], out: str) -> onnx.NodeProto:
    return helper.make_node("Squeeze", [source, _add_ints(model, f"{out}.axes", axes)],
                            [out], name=f"{out}.squeeze")


def _unsqueeze(model, source: str, axes: list[int], out: str) -> onnx.NodeProto:
    return helper.make_node("Unsqueeze", [source, _add_ints(model, f"{out}.unit_axes", axes)],
                            [out], name=f"{out}.unsqueeze")


def _transpose_without_units(model, node, shapes: Shapes) -> list[onnx.NodeProto] | None:
    """Squeeze the size-1 axes, transpose the rest only if their order changes, unsqueeze."""
    shape = shapes.get(node.input[0])
    perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
    if not _known(shape) or perm is None or len(perm) != len(shape) or 1 not in shape:
        return None
    units = [a for a, d in enumerate(shape) if d == 1]
    rest = [a for a, d in enumerate(shape) if d != 1]
    moving = [p for p in perm if shape[p] != 1]
    base = f"{node.output[0]}.unit"
    nodes = [_squeeze(model, node.input[0], units, f"{base}.squeezed")]
    moved = f"{base}.squeezed"
    if moving != sorted(moving):
        moved = f"{base}.transposed"
        nodes.append(helper.make_node("Transpose", [f"{base}.squeezed"], [moved],
                                      name=f"{base}.transpose",
                                      perm=[rest.index(p) for p in moving]))
    out_units = [j for j, p in enumerate(perm) if shape[p] == 1]
    nodes.append(_unsqueeze(model, moved, out_units, node.output[0]))
    return nodes


def _reduce_axes(node, constants) -> list[int] | None:
    attr = next((a for a in node.attribute if a.name == "axes"), None)
    if attr is not None:
        return list(attr.ints)
    if len(node.input) > 1 and node.input[1]:
        value = constants.get(node.input[1])
        return None if value is None else [int(v) for v in np.ravel(value)]
    return None  # no axes: reduces everything (or nothing), leave it


def _reduce_without_seed(model, node, shapes: Shapes, constants) -> list[onnx.NodeProto] | None:
    """Reduce with the trailing unit axis squeezed out, then put it back."""
    shape = shapes.get(node.input[0])
    axes = _reduce_axes(node, constants)
    if not _known(shape) or len(shape) < 2 or shape[-1] != 1 or not axes:
        return None
    rank = len(shape)
    axes = sorted({a % rank for a in axes})
    if rank - 1 in axes:
        return None
    keepdims = next((a.i for a in node.attribute if a.name == "keepdims"), 1)
    base = f"{node.output[0]}.seed"
    reduce = onnx.NodeProto()
    reduce.CopyFrom(node)
    reduce.name = f"{base}.reduce"
    reduce.input[0] = f"{base}.squeezed"
    reduce.output[0] = f"{base}.reduced"
    if any(a.name == "axes" for a in reduce.attribute):
        next(a for a in reduce.attribute if a.name == "axes").ints[:] = axes
    else:
        reduce.input[1] = _add_ints(model, f"{base}.reduce_axes", axes)
    out_rank = rank if keepdims else rank - len(axes)
    return [_squeeze(model, node.input[0], [rank - 1], f"{base}.squeezed"), reduce,
            _unsqueeze(model, f"{base}.reduced", [out_rank - 1], node.output[0])]


def _broadcast_at_full_rank(model, node, shapes: Shapes, constants
                            ) -> list[onnx.NodeProto] | None:
    """Give a lower-rank operand the output's rank when the output ends in a unit axis."""
    out = shapes.get(node.output[0])
    ranks = [len(shapes[i]) if i in shapes else None for i in node.input]
    if not _known(out) or not out or out[-1] != 1 or None in ranks:
        return None
    low = [i for i, r in enumerate(ranks) if r < len(out)]
    if not low:
        return None
    nodes, node = [], _copy(node)
    for i in low:
        name, lead = node.input[i], len(out) - ranks[i]
        widened = f"{node.output[0]}.operand{i}.full_rank"
        if name in constants and not any(t.name == widened for t in model.graph.initializer):
            value = constants[name].reshape((1,) * lead + constants[name].shape)
            model.graph.initializer.append(numpy_helper.from_array(value, widened))
        else:
            nodes.append(_unsqueeze(model, name, list(range(lead)), widened))
        node.input[i] = widened
    return [*nodes, node]


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    out = onnx.NodeProto()
    out.CopyFrom(node)
    return out
