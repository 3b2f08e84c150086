"""ONNX Runtime's ``SkipLayerNormalization`` (com.microsoft): LayerNorm(input + skip + bias)
in one op, with gamma, beta and an optional bias (inputs 2-4), output 0 the normalised sum and
the optional output 3 the sum itself. After ``onnxruntime.transformers.optimizer`` it is the
residual add of every BERT block: input 0 is the block's output projection (its bias moved
into input 4), input 1 the residual stream.

A block whose output enters one of the two summands can be removed whole: the summand is fed
zeros of the other's shape (``Shape`` + ``Expand`` of a scalar zero), which is exactly what a
module gate of 0 on it computes, and the fused op stays.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.errors import NotPrunableError
from onnxprune.ops.registry import LabelEngine, OpRule, Surgeon, register
from onnxprune.structure.graph import GraphView, fresh_name, node_domain

DOMAIN = "com.microsoft"
OPS = frozenset({"SkipLayerNormalization", "SkipSimplifiedLayerNormalization"})


def is_skip_layernorm(node: gs.Node) -> bool:
    return node.op in OPS and node_domain(node) == DOMAIN


def skip_residual(node: gs.Node, tensor: str) -> str | None:
    """The other summand when ``tensor`` is input 0 or 1 of a SkipLayerNormalization."""
    if not is_skip_layernorm(node) or len(node.inputs) < 2:
        return None
    names = [t.name for t in node.inputs[:2]]
    if tensor not in names or names[0] == names[1]:
        return None
    return names[1 - names.index(tensor)]


def zero_summand(graph: gs.Graph, node: gs.Node, module_output: str) -> None:
    """Feed the summand ``module_output`` of SkipLayerNormalization ``node`` with zeros shaped
    like the other summand: LN(0 + residual + bias) is what a module gate of 0 computes."""
    index = [t.name for t in node.inputs[:2]].index(module_output)
    residual = node.inputs[1 - index]
    gamma = node.inputs[2]
    dtype = gamma.values.dtype if isinstance(gamma, gs.Constant) else \
        (residual.dtype or np.float32)
    names = set(graph.tensors())
    shape = gs.Variable(fresh_name(names, f"{node.name}_skip_shape"), dtype=np.int64)
    zeros = gs.Variable(fresh_name(names, f"{node.name}_zero_summand"), dtype=dtype)
    zero = gs.Constant(fresh_name(names, f"{node.name}_zero"), np.zeros((), dtype))
    graph.nodes.append(gs.Node("Shape", shape.name, inputs=[residual], outputs=[shape]))
    graph.nodes.append(gs.Node("Expand", zeros.name, inputs=[zero, shape], outputs=[zeros]))
    node.inputs[index] = zeros


@register
class SkipLayerNormalization(OpRule):
    """Normalises over the hidden axis: a prunable axis must not reach it (the block finder
    stops at the output projection, a sink, before it)."""

    ops = OPS
    domain = DOMAIN

    def propagate(self, engine: LabelEngine, node: gs.Node, flow) -> None:
        raise NotPrunableError(f"com.microsoft.{node.op} node {node.name} normalises over a "
                               "prunable axis")

    def fix(self, surgeon: Surgeon, node: gs.Node) -> None:
        raise NotPrunableError(f"com.microsoft.{node.op} node {node.name} cannot be cut")

    def flops(self, view: GraphView, node: gs.Node, trace: dict[str, np.ndarray]) -> int:
        return 0
