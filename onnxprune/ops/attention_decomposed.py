"""Decomposed attention: a Softmax between the Q·Kᵀ matmul (above it, through scaling,
masking and casts) and the A·V matmul (below it)."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from onnxprune.ops.registry import AttentionAnchors, AttentionForm, register_form
from onnxprune.structure.graph import GraphView

# ops allowed between the score matmul, the softmax and the A·V matmul
SCORE_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Where", "Cast", "Identity", "Dropout"})


@register_form
class SoftmaxAttentionForm(AttentionForm):
    ops = frozenset({"Softmax"})

    def anchors(self, view: GraphView, node: gs.Node) -> AttentionAnchors | None:
        qk = walk_back_matmul(view, node.inputs[0])
        av = walk_forward_matmul(view, node.outputs[0].name)
        if qk is None or av is None:
            return None
        return AttentionAnchors(qk, av, qk.inputs[0], qk.inputs[1], av.inputs[1])


def _two_data_inputs(view: GraphView, node: gs.Node) -> bool:
    return node.op == "MatMul" and len(view.data_inputs(node)) == 2


def walk_back_matmul(view: GraphView, tensor: gs.Tensor) -> gs.Node | None:
    """The Q·Kᵀ matmul above a softmax, through scaling, masking and casts."""
    def follow(node: gs.Node) -> list[str]:
        return [t.name for t in view.data_inputs(node)] if node.op in SCORE_OPS else []

    for node in view.walk_up(tensor.name, follow, 16):
        if node is not None and _two_data_inputs(view, node):
            return node
    return None


def walk_forward_matmul(view: GraphView, tensor: str) -> gs.Node | None:
    """The A·V matmul that reads the softmax output as its left operand."""
    for _ in range(6):
        users = view.consumers.get(tensor, [])
        for user in users:
            if _two_data_inputs(view, user) and user.inputs[0].name == tensor:
                return user
        passing = [u for u in users if u.op in SCORE_OPS]
        if len(passing) != 1:
            return None
        tensor = passing[0].outputs[0].name
    return None
