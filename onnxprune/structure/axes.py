"""Coupled-axis tracking: follow weight columns through the graph by executing the layout ops
on integer label arrays.

A label is an integer id for one column of a projection weight (or a head token, see
labels.py); -1 marks an element no tracked column reaches. Starting from the outputs of the
seed projections, every op downstream is executed on the labels with the shapes and index
values of a real ONNX Runtime trace: reshapes, transposes, splits, gathers and slices need
no pattern matching because numpy does exactly what the op does. How each op does so is its
op rule (``onnxprune.ops``, keyed by domain, op type and opset). The walk records what a cut
must touch: matmuls that contract a labelled axis (weights to slice, or the Q·Kᵀ and A·V
contractions of attention), constant and computed operands that broadcast along a labelled
axis, and Shape ops that read a labelled tensor. Anything it cannot prove raises
``NotPrunableError`` with the op named, as does an op without a rule.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.errors import NotPrunableError
from onnxprune.ops import require_rule, rule_for
from onnxprune.structure.graph import GraphView, node_domain
from onnxprune.structure.labels import (
    TOKEN_BASE,
    Contraction,
    Flow,
    Operand,
    Sink,
    UnionFind,
    column_labels,
    compact,
    varies_along,
)

__all__ = ["TOKEN_BASE", "Contraction", "Flow", "LabelPropagator", "Operand", "Sink",
           "UnionFind", "column_labels", "varies_along"]


class LabelPropagator:
    """The label engine: runs each op's rule on the label arrays, in topological order."""

    def __init__(self, view: GraphView, trace: dict[str, np.ndarray]):
        self.view = view
        self.trace = trace
        self._next_token = TOKEN_BASE

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.trace:
            raise NotPrunableError(f"tensor {name!r} has no traced value")
        return tuple(np.shape(self.trace[name]))

    def value(self, tensor: gs.Tensor) -> np.ndarray:
        const = self.view.const(tensor)
        if const is not None:
            return const
        if tensor.name not in self.trace:
            raise NotPrunableError(f"tensor {tensor.name!r} has no traced value")
        return np.asarray(self.trace[tensor.name])

    def new_token(self) -> int:
        token, self._next_token = self._next_token, self._next_token + 1
        return token

    def propagate(self, seeds: dict[str, np.ndarray]) -> Flow:
        flow = Flow(dict(seeds), [], [], [], [], [], UnionFind())
        first = min(self.view.order[self.view.producer[s].name] for s in seeds)
        for node in self.view.nodes[first:]:
            if not any(t.name in flow.labels for t in node.inputs):
                continue
            if self._is_shape_read(node):
                flow.shape_reads.append(node.name)
                continue
            require_rule(node, self.view.opset).propagate(self, node, flow)
            for out in node.outputs:
                if out.name in flow.labels:
                    flow.labels[out.name] = compact(flow.labels[out.name])
            flow.nodes.append(node.name)
        leaked = self.view.output_names & flow.labels.keys()
        leaked -= set(cache_outputs(self.view, flow))
        if leaked:
            raise NotPrunableError(f"prunable axis reaches graph output {sorted(leaked)[0]!r}")
        return flow

    @staticmethod
    def _is_shape_read(node: gs.Node) -> bool:
        """Shape reads are recorded (the cut restores their values), not labelled; a Size
        read cannot be restored."""
        if node_domain(node):
            return False
        if node.op == "Size":
            raise NotPrunableError(f"Size node {node.name} reads a prunable tensor")
        return node.op == "Shape"


def cache_outputs(view: GraphView, flow: Flow) -> dict[str, str]:
    """Graph outputs that are key/value caches (present), each with its past input: the
    output of a two-input Concat (possibly through Identity ops) whose first input is a past
    graph input (or a copy of one, ``GraphView.graph_input_behind``) that the Concat rule
    labelled as the continuation of the block's new keys or values
    (``ops.layout.past_cache_input``). Only these labelled tensors may reach a graph
    output."""
    found = {}
    for name in view.output_names & flow.labels.keys():
        node = view.producer.get(name)
        while node is not None and node.op == "Identity":
            node = view.producer.get(node.inputs[0].name)
        fused = _fused_past(view, node, name, flow) if node is not None else None
        if fused is not None:
            found[name] = fused
            continue
        if node is None or node.op != "Concat" or len(node.inputs) != 2:
            continue
        chain = view.graph_input_behind(node.inputs[0].name)
        if chain is not None and all(n in flow.labels for n in chain):
            found[name] = chain[0]
    return found


def _fused_past(view: GraphView, node: gs.Node, present: str, flow: Flow) -> str | None:
    """The past graph input of ``present``, an output of a fused attention op that keeps a
    key/value cache (``OpRule.caches``) and labelled its past; None for any other node."""
    rule = rule_for(node, view.opset)
    outputs = [t.name for t in node.outputs]
    for out, past in (rule.caches(node) if rule else {}).items():
        if out < len(outputs) and outputs[out] == present and past < len(node.inputs) \
                and node.inputs[past].name in flow.labels:
            chain = view.graph_input_behind(node.inputs[past].name)
            return chain[0] if chain else None
    return None
