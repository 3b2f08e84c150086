"""ONNX Runtime's fused ``com.microsoft`` ``GroupQueryAttention`` (what the ONNX Runtime
GenAI model builder and the transformer optimizer make of a Llama-style decoder layer).

Inputs: query [B, S, Nq·d] and key, value [B, S, Nkv·d] (or one packed [B, S, (Nq + 2·Nkv)·d]
query with key and value left out), then past key and value [B, Nkv, P, d], ``seqlens_k``,
``total_sequence_length`` and the rotary cos/sin caches. Query head h reads key/value head
h // (Nq / Nkv); the op applies the rotary embedding (``do_rotary``) within each head and
returns the output [B, S, Nq·d] and the present key and value [B, Nkv, P + S, d].

The rule labels the heads as the decomposed export's repeat does (``layout.Expand``): on the
block finder's second pass (``engine.copy_of``) each query head's copy of its key/value head
gets its own labels, so query heads can be cut inside a group in equal numbers, as well as
whole groups. The present outputs carry the key/value labels, and the past inputs the same
(``caches``), so a cut shrinks the cache along its head axis. There is one head size for
query, key and value (and the CPU kernel wants it a multiple of 8): channels are not cut.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.errors import NotPrunableError
from onnxprune.ops.layout import COPY_SHIFT
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

DOMAIN = "com.microsoft"
PAST_KEY, PAST_VALUE = 3, 4
PRESENT_KEY, PRESENT_VALUE = 1, 2
FIRST_UNSUPPORTED = 10      # attention bias, head sink and later inputs


def _name(node: gs.Node, index: int) -> str:
    return node.inputs[index].name if len(node.inputs) > index else ""


def _packed(node: gs.Node) -> bool:
    return not _name(node, 1)


def _heads(node: gs.Node) -> tuple[int, int]:
    return int(node.attrs["num_heads"]), int(node.attrs["kv_num_heads"])


@register_form
class GroupQueryAttentionForm(AttentionForm):
    """Both contractions are the node; q, k and v its first three inputs (the packed query
    input stands for all three)."""

    ops = frozenset({"GroupQueryAttention"})
    domain = DOMAIN

    def anchors(self, view: GraphView, node: gs.Node) -> AttentionAnchors | None:
        q = node.inputs[0]
        if _packed(node):
            return AttentionAnchors(node, node, q, q, q)
        if not _name(node, 2):
            return None
        return AttentionAnchors(node, node, q, node.inputs[1], node.inputs[2])

    def channel_limit(self, view: GraphView, node: gs.Node) -> str:
        return "GroupQueryAttention has one head size for query, key and value"


def _qkv_labels(node: gs.Node, flow: Flow) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels of q, k and v, [B, S, N·d] each (split off the packed query input)."""
    heads, kv_heads = _heads(node)
    if _packed(node):
        packed = flow.labels.get(node.inputs[0].name)
        if packed is None or packed.ndim != 3 or packed.shape[-1] % (heads + 2 * kv_heads):
            raise NotPrunableError(f"GroupQueryAttention node {node.name}: the packed query "
                                   "must be a tracked [B, S, N] projection")
        d = packed.shape[-1] // (heads + 2 * kv_heads)
        return tuple(np.split(packed, [heads * d, (heads + kv_heads) * d], axis=-1))
    labels = [flow.labels.get(t.name) for t in node.inputs[:3]]
    if any(lab is None or lab.ndim != 3 for lab in labels):
        raise NotPrunableError(f"GroupQueryAttention node {node.name}: query, key and value "
                               "must all be tracked [B, S, N] projections")
    return tuple(labels)


def _check_supported(engine: LabelEngine, node: gs.Node) -> None:
    if any(t.name for t in node.inputs[FIRST_UNSUPPORTED:]):
        raise NotPrunableError(f"GroupQueryAttention node {node.name}: attention bias or "
                               "head sink inputs are not supported")
    for past in (PAST_KEY, PAST_VALUE):
        name = _name(node, past)
        if name and engine.view.graph_input_behind(name) is None:
            raise NotPrunableError(f"GroupQueryAttention node {node.name}: its past "
                                   f"{'key' if past == PAST_KEY else 'value'} is not a graph "
                                   "input")


def _per_query_head(kv: np.ndarray, heads: int, engine: LabelEngine) -> np.ndarray:
    """[B, Nkv, S, d] key/value labels as each query head reads them, [B, Nq, S, d]: on the
    block finder's grouped pass every copy gets its own labels (recorded in ``copy_of``)."""
    group = heads // kv.shape[1]
    shared = np.repeat(kv, group, axis=1)
    copies = getattr(engine, "copy_of", None)
    if copies is None:
        return shared
    rank = np.tile(np.arange(group, dtype=np.int64), kv.shape[1])
    fresh = shared + ((rank + 1) << COPY_SHIFT).reshape(1, -1, 1, 1)
    copies.update(zip(fresh.ravel().tolist(), shared.ravel().tolist()))
    return fresh


@register
class GroupQueryAttention(OpRule):
    ops = frozenset({"GroupQueryAttention"})
    domain = DOMAIN

    def caches(self, node: gs.Node) -> dict[int, int]:
        return {PRESENT_KEY: PAST_KEY, PRESENT_VALUE: PAST_VALUE}

    def propagate(self, engine: LabelEngine, node: gs.Node, flow: Flow) -> None:
        _check_supported(engine, node)
        heads, kv_heads = _heads(node)
        q, k, v = _qkv_labels(node, flow)
        q, k, v = (lab.reshape(*lab.shape[:2], n, -1).transpose(0, 2, 1, 3)
                   for lab, n in ((q, heads), (k, kv_heads), (v, kv_heads)))
        self._caches(engine, node, flow, k, v)
        k, v = _per_query_head(k, heads, engine), _per_query_head(v, heads, engine)
        batch, _, seq, _ = q.shape
        a3 = q.reshape(-1, seq, q.shape[-1])
        b3 = np.swapaxes(k, -1, -2).reshape(-1, k.shape[-1], k.shape[-2])
        contract_channels(engine, node, flow, a3, b3, (*q.shape[:3], k.shape[2]))
        tokens = flow.labels.pop(node.outputs[0].name).reshape(-1, seq, k.shape[2])[:, 0, 0]
        right = v.reshape(-1, v.shape[2], v.shape[3])[:, 0, :]
        flow.contractions.append(Contraction(node.name, "mix", tokens.copy(), right.copy()))
        out = np.broadcast_to(right.reshape(batch, heads, 1, -1),
                              (batch, heads, seq, right.shape[-1]))
        flow.labels[node.outputs[0].name] = out.transpose(0, 2, 1, 3).reshape(
            batch, seq, -1).copy()

    @staticmethod
    def _caches(engine: LabelEngine, node: gs.Node, flow: Flow, k: np.ndarray,
                v: np.ndarray) -> None:
        """Present (and past) key/value: the new keys/values' labels along every position."""
        for (out, past), labels in zip(((PRESENT_KEY, PAST_KEY), (PRESENT_VALUE, PAST_VALUE)),
                                       (k, v)):
            first = labels[:, :, :1, :]
            if out < len(node.outputs) and node.outputs[out].name:
                name = node.outputs[out].name
                flow.labels[name] = np.broadcast_to(first, engine.shape(name)).copy()
            if _name(node, past):
                for name in engine.view.graph_input_behind(_name(node, past)):
                    flow.labels[name] = np.broadcast_to(first, engine.shape(name)).copy()

    def fix(self, surgeon: Surgeon, node: gs.Node) -> None:
        """Query and key/value head counts follow the kept columns; the head size (and so
        the scale) does not change."""
        original = surgeon.view.node[node.name]
        q, k, _ = _qkv_labels(original, surgeon.flow)
        d = q.shape[-1] // _heads(original)[0]
        kept_q = int(surgeon.roles.keep(q.reshape(-1, q.shape[-1])[0]).sum())
        kept_k = int(surgeon.roles.keep(k.reshape(-1, k.shape[-1])[0]).sum())
        if kept_q % d or kept_k % d or not kept_q or not kept_k:
            raise NotPrunableError(f"GroupQueryAttention node {node.name}: the cut leaves a "
                                   "partial head")
        node.attrs["num_heads"], node.attrs["kv_num_heads"] = kept_q // d, kept_k // d

    def flops(self, view: GraphView, node: gs.Node, trace: dict[str, np.ndarray]) -> int:
        q = trace.get(node.inputs[0].name)
        key = trace.get(node.outputs[PRESENT_KEY].name) if len(node.outputs) > 1 else None
        if q is None or np.ndim(q) != 3:
            return 0
        batch, seq, width = np.shape(q)
        heads, kv_heads = _heads(node)
        if _packed(node):
            width = width * heads // (heads + 2 * kv_heads)
        total = np.shape(key)[2] if key is not None and np.ndim(key) == 4 else seq
        return int(4 * batch * seq * total * width)
