"""The fused ONNX ``Attention`` op (ai.onnx, opset 23 on): Q·Kᵀ, softmax and A·V in one node,
with Q/K/V either [B, H, S, d] or [B, S, H*d] (head counts as attributes)."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.errors import NotPrunableError
from onnxprune.ops.matmul import contract_channels
from onnxprune.ops.registry import (
    AttentionAnchors,
    AttentionForm,
    LabelEngine,
    OpRule,
    Surgeon,
    register,
    register_form,
)
from onnxprune.structure.graph import GraphView
from onnxprune.structure.labels import Contraction, Flow

OPSET = 23


@register_form
class OnnxAttentionForm(AttentionForm):
    """Both contractions are the Attention node itself."""

    ops = frozenset({"Attention"})
    since = OPSET

    def anchors(self, view: GraphView, node: gs.Node) -> AttentionAnchors | None:
        q, k, v = node.inputs[:3]
        return AttentionAnchors(node, node, q, k, v)


@register
class OnnxAttention(OpRule):
    ops = frozenset({"Attention"})
    since = OPSET

    def propagate(self, engine: LabelEngine, node: gs.Node, flow: Flow) -> None:
        labels = [flow.labels.get(t.name) for t in node.inputs[:3]]
        _check_supported(engine, node, flow, labels)
        q, k, v = (_heads_first(lab, node, key) for lab, key in
                   zip(labels, ("q_num_heads", "kv_num_heads", "kv_num_heads")))
        batch, heads, seq, _ = q.shape
        group = heads // k.shape[1]
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
        _check_mask(engine, node)
        a3 = q.reshape(-1, seq, q.shape[-1])
        b3 = np.swapaxes(k, -1, -2).reshape(-1, k.shape[-1], k.shape[-2])
        scores = (*q.shape[:3], k.shape[2])
        contract_channels(engine, node, flow, a3, b3, scores)
        tokens = flow.labels.pop(node.outputs[0].name).reshape(-1, seq, k.shape[2])[:, 0, 0]
        right = v.reshape(-1, v.shape[2], v.shape[3])[:, 0, :]
        flow.contractions.append(Contraction(node.name, "mix", tokens.copy(), right.copy()))
        out = np.broadcast_to(right.reshape(batch, heads, 1, -1), (batch, heads, seq,
                                                                    right.shape[-1]))
        if labels[0].ndim == 3:
            out = out.transpose(0, 2, 1, 3).reshape(batch, seq, -1)
        flow.labels[node.outputs[0].name] = out.copy()

    def fix(self, surgeon: Surgeon, node: gs.Node) -> None:
        """Freeze the default 1/sqrt(d) scale and update head counts of the 3-D form."""
        q = node.inputs[0].name
        if not node.attrs.get("scale"):
            width = surgeon.old[q][-1]
            if len(surgeon.old[q]) == 3:
                width //= node.attrs["q_num_heads"]
            node.attrs["scale"] = float(1.0 / np.sqrt(width))
        for key in ("q_num_heads", "kv_num_heads"):
            if node.attrs.get(key):
                heads = len(surgeon.block.q_labels)
                kept = heads - len(surgeon.roles.removed_heads)
                node.attrs[key] = kept if key == "q_num_heads" else \
                    node.attrs[key] * kept // heads

    def flops(self, view: GraphView, node: gs.Node, trace: dict[str, np.ndarray]) -> int:
        q, k, v = (np.shape(trace[t.name]) for t in node.inputs[:3])
        if len(q) == 3:  # [B, S, H*d]: the per-head split does not change the product
            return 2 * q[0] * q[1] * k[1] * (q[2] + v[2])
        return 2 * q[0] * q[1] * q[2] * k[2] * (q[3] + v[3])


def _check_supported(engine: LabelEngine, node: gs.Node, flow: Flow,
                     labels: list[np.ndarray | None]) -> None:
    if any(lab is None for lab in labels):
        raise NotPrunableError(f"Attention node {node.name}: Q, K and V must all come "
                               "from tracked projections")
    extra = [t.name for t in node.inputs[4:] if t.name]
    if extra or any(t.name in flow.labels for t in node.inputs[3:4]):
        raise NotPrunableError(f"Attention node {node.name}: past key/value inputs are "
                               "not supported")
    if any(engine.view.is_read(o.name) for o in node.outputs[1:]):
        raise NotPrunableError(f"Attention node {node.name}: extra outputs are used")


def _check_mask(engine: LabelEngine, node: gs.Node) -> None:
    mask = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3].name else None
    if mask is not None:
        mshape = np.shape(engine.value(mask))
        if len(mshape) == 4 and mshape[1] > 1:
            raise NotPrunableError(f"Attention node {node.name}: per-head mask")


def _heads_first(labels: np.ndarray, node: gs.Node, attr: str) -> np.ndarray:
    if labels.ndim == 4:
        return labels
    heads = node.attrs.get(attr) or node.attrs.get("q_num_heads")
    if labels.ndim != 3 or not heads:
        raise NotPrunableError(f"Attention node {node.name}: unsupported input rank")
    b, s, width = labels.shape
    return labels.reshape(b, s, heads, width // heads).transpose(0, 2, 1, 3)
