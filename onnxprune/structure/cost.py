"""Parameter and FLOP counts. FLOPs count 2 per multiply-accumulate of MatMul, Gemm, Conv and
the fused Attention op at the traced input shapes (each op rule's ``flops``, onnxprune.ops);
elementwise ops are not counted."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.ops import rule_for
from onnxprune.structure.graph import GraphView


def node_flops(view: GraphView, node: gs.Node, trace: dict[str, np.ndarray]) -> int:
    """FLOPs of one node at the traced shapes, as its op rule counts them (0 without one)."""
    out = trace.get(node.outputs[0].name) if node.outputs else None
    if out is None:
        return 0
    rule = rule_for(node, view.opset)
    return 0 if rule is None else int(rule.flops(view, node, trace))


def model_flops(view: GraphView, trace: dict[str, np.ndarray]) -> int:
    return sum(node_flops(view, n, trace) for n in view.nodes)


def model_params(view: GraphView) -> int:
    """Floating-point constants of the graph (shape and index constants are not parameters)."""
    total = 0
    for tensor in view.tensors.values():
        if (isinstance(tensor, gs.Constant) and np.issubdtype(tensor.dtype, np.floating)
                and tensor.shape and int(np.prod(tensor.shape)) > 1):
            total += int(np.prod(tensor.shape))
    return total


def const_size(view: GraphView, tensor: gs.Tensor) -> int:
    value = view.const(tensor)
    return 0 if value is None else int(value.size)
