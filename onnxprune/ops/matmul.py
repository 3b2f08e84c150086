"""MatMul and Gemm: a constant weight contracting a labelled axis is a sink (its rows are
sliced); two labelled operands are a contraction (Q·Kᵀ pairs channels, A·V mixes heads). Conv
is counted for FLOPs only and refused on a prunable path."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.errors import NotPrunableError
from onnxprune.ops.registry import LabelEngine, OpRule, Surgeon, register
from onnxprune.structure.graph import GraphView
from onnxprune.structure.labels import TOKEN_BASE, Contraction, Flow, Sink, varies_along


def _input_shape(view: GraphView, tensor: gs.Tensor, trace: dict[str, np.ndarray]
                 ) -> tuple[int, ...]:
    return np.shape(trace[tensor.name]) if tensor.name in trace else np.shape(view.const(tensor))


def _out_size(node: gs.Node, trace: dict[str, np.ndarray]) -> int:
    return int(np.prod(np.shape(trace[node.outputs[0].name])))


@register
class MatMul(OpRule):
    ops = frozenset({"MatMul", "Gemm"})

    def propagate(self, engine: LabelEngine, node: gs.Node, flow: Flow) -> None:
        a, b = node.inputs[0], node.inputs[1]
        la, lb = flow.labels.get(a.name), flow.labels.get(b.name)
        weight = engine.view.weight_of(node)
        if la is not None and lb is None and weight is not None:
            flow.sinks.append(_sink(node, la))
            return
        if node.op != "MatMul" or la is None or lb is None:
            raise NotPrunableError(f"{node.op} node {node.name}: unsupported use of a prunable "
                                   "tensor (one side computed, the other not tracked)")
        _contract(engine, node, flow, la, lb)

    def fix(self, surgeon: Surgeon, node: gs.Node) -> None:
        """Weight rows and columns are sliced from the flow's seeds and sinks."""

    def flops(self, view: GraphView, node: gs.Node, trace: dict[str, np.ndarray]) -> int:
        shape = _input_shape(view, node.inputs[0], trace)
        k = shape[0] if node.op == "Gemm" and node.attrs.get("transA", 0) else shape[-1]
        return 2 * _out_size(node, trace) * int(k)


@register
class Conv(OpRule):
    ops = frozenset({"Conv"})

    def flops(self, view: GraphView, node: gs.Node, trace: dict[str, np.ndarray]) -> int:
        w = view.const(node.inputs[1])
        if w is None:
            return 0
        return 2 * _out_size(node, trace) * int(np.prod(w.shape[1:]))


def _sink(node: gs.Node, la: np.ndarray) -> Sink:
    if not varies_along(la, -1) and la.shape[-1] > 1:
        raise NotPrunableError(f"{node.op} node {node.name} multiplies a prunable axis "
                               "that it does not contract")
    rows = la.reshape(-1, la.shape[-1])
    if np.any(rows != rows[0]):
        raise NotPrunableError(f"{node.op} node {node.name}: contracted labels differ "
                               "across positions")
    return Sink(node.name, node.inputs[0].name, rows[0].copy())


def _contract(engine: LabelEngine, node: gs.Node, flow: Flow, la: np.ndarray,
              lb: np.ndarray) -> None:
    out_shape = engine.shape(node.outputs[0].name)
    batch = out_shape[:-2]
    m, k = la.shape[-2:]
    n = lb.shape[-1]
    a3 = np.broadcast_to(la, (*batch, m, k)).reshape(-1, m, k)
    b3 = np.broadcast_to(lb, (*batch, k, n)).reshape(-1, k, n)
    if np.all(a3 >= TOKEN_BASE):
        # A·V: attention weights (head tokens) times values (columns along the last axis)
        if varies_along(a3, 1) or varies_along(a3, 2) or varies_along(b3, 1):
            raise NotPrunableError(f"MatMul node {node.name}: attention weights and "
                                   "values combine in an unsupported way")
        left = a3[:, 0, 0].copy()
        right = b3[:, 0, :].copy()
        flow.contractions.append(Contraction(node.name, "mix", left, right))
        flow.labels[node.outputs[0].name] = np.broadcast_to(
            right[:, None, :], (len(right), m, n)).reshape(out_shape).copy()
    elif np.all(a3 >= 0) and np.all(a3 < TOKEN_BASE) and np.all(b3 >= 0):
        contract_channels(engine, node, flow, a3, b3, out_shape)
    else:
        raise NotPrunableError(f"MatMul node {node.name}: prunable axes combine in an "
                               "unsupported way")


def contract_channels(engine: LabelEngine, node: gs.Node, flow: Flow, a3: np.ndarray,
                      b3: np.ndarray, out_shape: tuple[int, ...]) -> None:
    """Q·Kᵀ over [P, M, K] × [P, K, N] labels: record which channels meet at each batch
    position and label the scores with one head token per distinct query row."""
    if varies_along(a3, 1) or varies_along(b3, 2):
        raise NotPrunableError(f"MatMul node {node.name}: labels vary along rows")
    left, right = a3[:, 0, :].copy(), b3[:, :, 0].copy()
    contraction = Contraction(node.name, "channel", left, right)
    tokens = np.empty(len(left), np.int64)
    for p, row in enumerate(map(tuple, left)):
        if row not in contraction.token_of:
            contraction.token_of[row] = engine.new_token()
        tokens[p] = contraction.token_of[row]
    flow.contractions.append(contraction)
    m, n = a3.shape[1], b3.shape[2]
    flow.labels[node.outputs[0].name] = np.broadcast_to(
        tokens[:, None, None], (len(tokens), m, n)).reshape(out_shape).copy()
