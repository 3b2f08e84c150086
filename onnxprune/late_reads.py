"""Half-precision weights fed to ONNX Runtime, read only when their node runs.

ONNX Runtime's CPU provider computes half-precision matmuls in float32: it casts every
float16 weight to a float32 copy. For a weight fed as a graph input that cast depends on
nothing computed, so the scheduler may run all of them first and hold every float32 copy
at once: twice the model's half-precision bytes on top of them (a 1.1B decoder's forward
pass peaked at 4.0 GB over its 2.1 GB of weights; 2.8 GB with this rewrite).

:func:`read_late` makes each reader of such a weight read ``Concat([W, empty])`` instead,
where ``empty`` is a zero-row tensor sliced from another input of that reader: the same
values, available only once that input is computed, so each weight is widened just before
its node and freed after it.
"""

from __future__ import annotations

from collections.abc import Mapping

import onnx
from onnx import helper

from onnxprune.structure.graph import fresh_name

_FLAT, _NONE = "late_read.flat", "late_read.none"


def read_late(model: onnx.ModelProto, weights: Mapping[str, onnx.TensorProto]) -> int:
    """In place: every node that reads one of ``weights`` (graph inputs now; their
    initializers as they were, for type and dims) directly, or through a Cast read by one
    node, reads it once another of that node's inputs is computed. Returns how many reads
    were delayed; a reader with no other computed input is left as it is."""
    graph = model.graph
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    constant = {t.name for t in graph.initializer} | set(weights)
    names = {o for n in graph.node for o in n.output} | {i.name for i in graph.input} | \
        {t.name for t in graph.initializer}
    before: dict[int, list[onnx.NodeProto]] = {}
    shapes: list[onnx.TensorProto] = []
    delayed = 0
    for weight, tensor in weights.items():
        for node in readers.get(weight, []) if tensor.dims else []:
            reader, via = _reader(node, readers, weight)
            after = next((i for i in reader.input if i and i != via and i not in constant),
                         None)
            if after is None:
                continue
            late = fresh_name(names, f"{weight}.late")
            shape = helper.make_tensor(f"{late}.shape", onnx.TensorProto.INT64,
                                       [len(tensor.dims)], [0, *tensor.dims[1:]])
            shapes.append(shape)
            before.setdefault(id(node), []).extend(
                _late_nodes(weight, after, late, tensor.data_type, shape.name))
            node.input[list(node.input).index(weight)] = late
            delayed += 1
    if delayed:
        nodes = [new for node in graph.node for new in (*before.get(id(node), []), node)]
        del graph.node[:]
        graph.node.extend(nodes)
        graph.initializer.extend([helper.make_tensor(_FLAT, onnx.TensorProto.INT64, [1], [-1]),
                                  helper.make_tensor(_NONE, onnx.TensorProto.INT64, [1], [0]),
                                  *shapes])
    return delayed


def _reader(node: onnx.NodeProto, readers: Mapping[str, list[onnx.NodeProto]], weight: str
            ) -> tuple[onnx.NodeProto, str]:
    """The node whose other inputs say when ``node`` (a reader of ``weight``) is due, and
    the tensor it reads the weight as: the one node reading a Cast's output, else
    ``node`` itself."""
    if node.op_type == "Cast" and len(readers.get(node.output[0], [])) == 1:
        return readers[node.output[0]][0], node.output[0]
    return node, weight


def _late_nodes(weight: str, after: str, late: str, elem_type: int, shape: str
                ) -> list[onnx.NodeProto]:
    """``late = Concat([weight, empty])`` with ``empty`` a zero-row slice of ``after``."""
    flat, none, cast, empty = (f"{late}.{s}" for s in ("flat", "none", "cast", "empty"))
    return [helper.make_node("Reshape", [after, _FLAT], [flat], name=flat),
            helper.make_node("Slice", [flat, _NONE, _NONE], [none], name=none),
            helper.make_node("Cast", [none], [cast], name=cast, to=elem_type),
            helper.make_node("Reshape", [cast, shape], [empty], name=empty),
            helper.make_node("Concat", [weight, empty], [late], name=late, axis=0)]
