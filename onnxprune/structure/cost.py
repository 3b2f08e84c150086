"""Parameter and FLOP counts. FLOPs count 2 per multiply-accumulate of MatMul, Gemm and Conv
at the traced input shapes; elementwise ops are not counted."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.structure.graph import GraphView


def node_flops(view: GraphView, node: gs.Node, trace: dict[str, np.ndarray]) -> int:
    out = trace.get(node.outputs[0].name) if node.outputs else None
    if out is None:
        return 0
    out_size = int(np.prod(np.shape(out)))
    if node.op == "MatMul":
        a = node.inputs[0]
        shape = np.shape(trace[a.name]) if a.name in trace else np.shape(view.const(a))
        return 2 * out_size * int(shape[-1])
    if node.op == "Gemm":
        a = node.inputs[0]
        shape = np.shape(trace[a.name]) if a.name in trace else np.shape(view.const(a))
        k = shape[0] if node.attrs.get("transA", 0) else shape[-1]
        return 2 * out_size * int(k)
    if node.op == "Attention":
        q, k, v = (np.shape(trace[t.name]) for t in node.inputs[:3])
        if len(q) == 3:  # [B, S, H*d]: the per-head split does not change the product
            return 2 * q[0] * q[1] * k[1] * (q[2] + v[2])
        return 2 * q[0] * q[1] * q[2] * k[2] * (q[3] + v[3])
    if node.op == "Conv":
        w = view.const(node.inputs[1])
        if w is None:
            return 0
        return 2 * out_size * int(np.prod(w.shape[1:]))
    return 0


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
