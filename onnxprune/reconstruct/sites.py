"""Where reconstruction can act: the output projection of every block the cut shrank, found
in the verified cut model by its node name (the cut keeps node names), with its weight, its
bias and, per kept weight row, the head or channel the row belongs to.

A block whose projection is in a form the solver cannot rewrite exactly (a weight that is
not a plain 2-D initializer, shared by several nodes, stored outside the model, a Gemm
with alpha/beta/transA) is returned as skipped, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from onnxprune.errors import OnnxpruneError
from onnxprune.structure.blocks import Block
from onnxprune.structure.discover import Analysis
from onnxprune.units import kinds_of
from onnxprune.weightstore import store_of


@dataclass
class OutputProjection:
    """One pruned block's output projection in the cut model: ``y = x·W (+ b)``.

    ``weight`` is stored ``[K, D]`` (MatMul) or ``[D, K]`` (Gemm with ``transB``);
    ``output`` is the block's output in the *original* model (after the bias), the target
    the reconstruction fits. ``groups[r]`` is the head (attention) or channel (FFN) of kept
    row r, None when the cut model's analysis does not know them (then no scales)."""

    block: str
    node: str
    input: str
    weight: str
    transposed: bool
    bias: str | None
    output: str
    groups: np.ndarray | None
    elem_type: int                      # of the weight, the projection's input and output


@dataclass
class Skipped:
    block: str
    reason: str


class _Graph:
    """Producers, consumers and initializers of a model, by tensor name."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.nodes = {n.name: n for n in model.graph.node}
        self.inits = {t.name: t for t in model.graph.initializer}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in model.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)

    def bias_add(self, node: onnx.NodeProto, width: int) -> tuple[onnx.NodeProto, str] | None:
        """The Add right after ``node`` with a constant operand of ``width`` entries."""
        users = self.consumers.get(node.output[0], [])
        if len(users) != 1 or users[0].op_type != "Add" or users[0].domain not in ("", "ai.onnx"):
            return None
        other = [t for t in users[0].input if t != node.output[0]]
        if len(other) == 1 and other[0] in self.inits \
                and int(np.prod(self.inits[other[0]].dims)) == width:
            return users[0], other[0]
        return None


def block_outputs(original: Analysis) -> dict[str, tuple[str, int]]:
    """Block name -> the tensor reconstruction fits to (the output of the block's output
    projection, after its bias) and its element type, for every block with a MatMul/Gemm
    projection on an initializer weight: what the original's calibration pass keeps."""
    graph = _Graph(original.model)
    found = {}
    for block in original.structure.blocks:
        if block.flow is None or not block.flow.sinks:
            continue
        node = graph.nodes.get(block.flow.sinks[0].node)
        if node is None or node.op_type not in ("MatMul", "Gemm") \
                or len(node.input) < 2 or node.input[1] not in graph.inits:
            continue
        init = graph.inits[node.input[1]]
        if len(init.dims) != 2:
            continue
        transposed = node.op_type == "Gemm" and _attr(node, "transB", 0) == 1
        found[block.name] = (_output(node, graph, init.dims[0 if transposed else 1]),
                             init.data_type)
    return found


def _output(node: onnx.NodeProto, graph: _Graph, width: int) -> str:
    """The projection's output after its bias (Gemm's C, or a following Add's constant)."""
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] in graph.inits:
        return node.output[0]
    found = graph.bias_add(node, width)
    return node.output[0] if found is None else found[0].output[0]


def find_projections(original: Analysis, cut: Analysis
                     ) -> tuple[list[OutputProjection], list[Skipped]]:
    """The output projection of every block of ``original`` whose kept rows the cut
    shrank (whole-module removals have nothing to refit), in topological order."""
    orig, graph = _Graph(original.model), _Graph(cut.model)
    groups = _row_groups(cut)
    found, skipped = [], []
    for block in original.structure.blocks:
        if block.flow is None or not block.flow.sinks:
            continue
        name = block.flow.sinks[0].node
        if name not in graph.nodes:
            continue                                   # removed whole
        site = _projection(block, orig, graph, groups.get(name))
        if isinstance(site, OutputProjection) or site.reason:
            (found if isinstance(site, OutputProjection) else skipped).append(site)
    return found, skipped


def _projection(block: Block, orig: _Graph, graph: _Graph, groups: np.ndarray | None
                ) -> OutputProjection | Skipped:
    node = graph.nodes[block.flow.sinks[0].node]
    refusal = _form_refusal(node, graph)
    if refusal:
        return Skipped(block.name, refusal)
    transposed = node.op_type == "Gemm" and _attr(node, "transB", 0) == 1
    dims = list(graph.inits[node.input[1]].dims)
    rows, width = (dims[1], dims[0]) if transposed else (dims[0], dims[1])
    before = list(orig.inits[orig.nodes[node.name].input[1]].dims) \
        if orig.nodes[node.name].input[1] in orig.inits else dims
    if (before[1] if transposed else before[0]) == rows:
        return Skipped(block.name, "")                 # not cut by units: nothing to refit
    bias = _bias(node, graph, width)
    output = _output(orig.nodes[node.name], orig, width)
    if bias is not None and _shared(bias, graph):
        return Skipped(block.name, f"bias {bias!r} is shared by several nodes")
    if groups is not None and len(groups) != rows:
        groups = None
    return OutputProjection(block.name, node.name, node.input[0], node.input[1], transposed,
                            bias, output, groups, graph.inits[node.input[1]].data_type)


def _form_refusal(node: onnx.NodeProto, graph: _Graph) -> str:
    """Why the projection's weight cannot be rewritten in place ("" when it can)."""
    if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
        return f"output projection {node.name} is a {node.op_type}, not MatMul/Gemm"
    weight = node.input[1]
    if weight not in graph.inits:
        return f"weight of {node.name} is not an initializer"
    init = graph.inits[weight]
    if init.data_location == onnx.TensorProto.EXTERNAL and store_of(init) is None:
        return f"weight {weight!r} is in external data that was not loaded"
    if len(init.dims) != 2:
        return f"weight {weight!r} is not a matrix"
    if init.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                              onnx.TensorProto.DOUBLE):
        return f"weight {weight!r} is not a float tensor"
    if _shared(weight, graph):
        return f"weight {weight!r} is shared by several nodes"
    if node.op_type == "Gemm" and (_attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1
                                   or _attr(node, "beta", 1.0) != 1):
        return f"Gemm {node.name} has transA, alpha or beta"
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] \
            and not _vector(node.input[2], graph, init.dims[0 if _attr(node, "transB", 0) else 1]):
        return f"Gemm {node.name}'s C is not a bias vector"
    return ""


def _vector(name: str, graph: _Graph, width: int) -> bool:
    return name in graph.inits and int(np.prod(graph.inits[name].dims)) == width


def _bias(node: onnx.NodeProto, graph: _Graph, width: int) -> str | None:
    """The bias initializer: Gemm's C, or a following Add's constant."""
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] in graph.inits:
        return node.input[2]
    found = graph.bias_add(node, width)
    return None if found is None else found[1]


def _shared(name: str, graph: _Graph) -> bool:
    return len(graph.consumers.get(name, [])) > 1 \
        or any(o.name == name for o in graph.model.graph.output)


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _row_groups(cut: Analysis) -> dict[str, np.ndarray]:
    """Output projection node -> per weight row its head (attention) or channel (FFN): the
    rows of the block's first kind below the whole module."""
    out = {}
    for block in cut.structure.blocks:
        kind = next((k for k in kinds_of(block) if not k.whole and not k.slotted), None)
        if kind is None or kind.refusal(block) is not None:
            continue
        try:
            node, groups = kind.rows(cut, block)
        except (OnnxpruneError, KeyError, IndexError, ValueError):
            # a form whose kind cannot place its rows: no scales there
            continue
        out[node] = np.asarray(groups)
    return out
