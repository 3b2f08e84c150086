"""ONNX Runtime contrib ops other than attention: ``FusedMatMul`` (MatMul with transA/transB
and a scalar ``alpha``, which the optimizer makes of a scaled Q·Kᵀ) and the cost of the fused
embedding op. The contrib activations are in elementwise.py, SkipLayerNormalization in
skip_layernorm.py, the fused attention ops in attention_ms.py."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.errors import NotPrunableError
from onnxprune.ops.matmul import _contract
from onnxprune.ops.registry import LabelEngine, OpRule, Surgeon, register
from onnxprune.structure.graph import GraphView
from onnxprune.structure.labels import Flow

DOMAIN = "com.microsoft"


def _transposed(labels: np.ndarray, flag: int) -> np.ndarray:
    return np.swapaxes(labels, -1, -2) if flag and labels.ndim >= 2 else labels


@register
class FusedMatMul(OpRule):
    """``alpha · op(A) · op(B)``: labels flow as through MatMul on the transposed operands.
    Two labelled operands are a Q·Kᵀ or A·V contraction; a labelled operand times a constant
    is refused (the cut slices only MatMul/Gemm weights)."""

    ops = frozenset({"FusedMatMul"})
    domain = DOMAIN

    def propagate(self, engine: LabelEngine, node: gs.Node, flow: Flow) -> None:
        la, lb = (flow.labels.get(t.name) for t in node.inputs[:2])
        if la is None or lb is None:
            raise NotPrunableError(f"com.microsoft.FusedMatMul node {node.name}: a prunable "
                                   "axis meets a constant or untracked operand")
        if node.attrs.get("transBatchA", 0) or node.attrs.get("transBatchB", 0):
            raise NotPrunableError(f"com.microsoft.FusedMatMul node {node.name}: transBatch "
                                   "is not supported")
        _contract(engine, node, flow, _transposed(la, node.attrs.get("transA", 0)),
                  _transposed(lb, node.attrs.get("transB", 0)))

    def fix(self, surgeon: Surgeon, node: gs.Node) -> None:
        """Transposes and alpha name no sizes."""

    def flops(self, view: GraphView, node: gs.Node, trace: dict[str, np.ndarray]) -> int:
        a = trace.get(node.inputs[0].name)
        shape = np.shape(a) if a is not None else np.shape(view.const(node.inputs[0]))
        if not shape:
            return 0
        k = shape[-2] if node.attrs.get("transA", 0) and len(shape) >= 2 else shape[-1]
        return 2 * int(np.prod(np.shape(trace[node.outputs[0].name]))) * int(k)
