"""ONNX Runtime's fused ``com.microsoft`` ``Attention`` (what
``onnxruntime.transformers.optimizer`` makes of a BERT layer): the Q, K and V projections are
inside the op, as one packed weight [D, Nq + Nk + Nv] and bias [Nq + Nk + Nv] (inputs 1 and 2),
Nq = Nk = Nv = D unless ``qkv_hidden_sizes`` says otherwise, each split head-major into
``num_heads`` heads. The op computes softmax(Q·Kᵀ·scale + mask)·V and returns [B, S, Nv].

The packed weight is the block's projection seed: the form says which node carries it and how
its columns split (``packed``), the block finder labels the columns and records the Q·Kᵀ and
A·V contractions (``seed``), and the op rule's ``fix`` slices the packed weight and bias and
updates ``num_heads``, ``qkv_hidden_sizes`` and the (then frozen) ``scale``.
"""

from __future__ import annotations

from typing import NamedTuple

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

DOMAIN = "com.microsoft"


class PackedQKV(NamedTuple):
    """Where a fused attention op keeps its Q/K/V projection and how the columns split."""

    node: gs.Node
    weight: int                  # input index of the packed [D, Nq + Nk + Nv] weight
    bias: int | None             # input index of the packed bias, None without one
    sizes: tuple[int, int, int]  # Nq, Nk, Nv
    heads: int

    @property
    def width(self) -> int:
        return sum(self.sizes)


def _optional(node: gs.Node, index: int) -> gs.Tensor | None:
    return node.inputs[index] if len(node.inputs) > index and node.inputs[index].name else None


def packed_qkv(view: GraphView, node: gs.Node) -> PackedQKV | None:
    """The packed Q/K/V projection of a com.microsoft Attention node, None when its weight is
    not a constant 2-D matrix."""
    weight = view.const(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None or weight.ndim != 2:
        return None
    heads = int(node.attrs.get("num_heads", 0))
    sizes = node.attrs.get("qkv_hidden_sizes")
    if sizes:
        sizes = tuple(int(s) for s in sizes)
    else:
        third = weight.shape[1] // 3
        sizes = (third, third, third)
    if not heads or sum(sizes) != weight.shape[1] or any(s % heads for s in sizes):
        return None
    bias = _optional(node, 2)
    if bias is not None and view.const(bias) is None:
        return None
    return PackedQKV(node, 1, None if bias is None else 2, sizes, heads)


@register_form
class MicrosoftAttentionForm(AttentionForm):
    """Both contractions are the Attention node; so are the Q/K/V projections (``packed``)."""

    ops = frozenset({"Attention"})
    domain = DOMAIN

    def anchors(self, view: GraphView, node: gs.Node) -> AttentionAnchors | None:
        x = node.inputs[0]
        return AttentionAnchors(node, node, x, x, x)

    def packed(self, view: GraphView, node: gs.Node) -> PackedQKV | None:
        return packed_qkv(view, node)

    def seed(self, engine: LabelEngine, node: gs.Node, base: int, flow: Flow) -> None:
        """Label the packed columns base + c, record Q·Kᵀ and A·V of the op, and label its
        output with the value columns (head-major, as the op writes them)."""
        packed = packed_qkv(engine.view, node)
        _check_supported(engine, node)
        nq, nk, _ = packed.sizes
        heads = packed.heads
        cols = base + np.arange(packed.width, dtype=np.int64)
        q = cols[:nq].reshape(heads, -1)
        k = cols[nq:nq + nk].reshape(heads, -1)
        v = cols[nq + nk:].reshape(heads, -1)
        if q.shape != k.shape:
            raise NotPrunableError(f"Attention node {node.name}: query and key widths differ")
        channel = Contraction(node.name, "channel", q.copy(), k.copy())
        tokens = np.array([engine.new_token() for _ in range(heads)], np.int64)
        channel.token_of = {tuple(row): int(t) for row, t in zip(q.tolist(), tokens)}
        flow.contractions.append(channel)
        flow.contractions.append(Contraction(node.name, "mix", tokens.copy(), v.copy()))
        out = node.outputs[0].name
        flow.labels[out] = np.broadcast_to(v.reshape(-1), engine.shape(out)).copy()
        flow.nodes.append(node.name)


def _check_supported(engine: LabelEngine, node: gs.Node) -> None:
    if any(t.name for t in node.inputs[4:]):
        raise NotPrunableError(f"Attention node {node.name}: past state, attention bias or "
                               "past sequence length inputs are not supported")
    if any(engine.view.is_read(o.name) for o in node.outputs[1:]):
        raise NotPrunableError(f"Attention node {node.name}: its present-state output is used")
    if node.attrs.get("do_rotary", 0):
        raise NotPrunableError(f"Attention node {node.name}: rotary embedding")


@register
class MicrosoftAttention(OpRule):
    """The op on the label path: it is a seed (its packed weight), never fed labels."""

    ops = frozenset({"Attention"})
    domain = DOMAIN

    def propagate(self, engine: LabelEngine, node: gs.Node, flow: Flow) -> None:
        raise NotPrunableError(f"com.microsoft.Attention node {node.name} reads a prunable "
                               "axis (its input must be the residual stream)")

    def fix(self, surgeon: Surgeon, node: gs.Node) -> None:
        """Slice the packed weight's and bias's columns; head count, per-part widths and the
        1/sqrt(d) scale follow."""
        original = surgeon.view.node[node.name]
        packed = packed_qkv(surgeon.view, original)
        base = surgeon.block.seeds[node.name]
        keep = surgeon.roles.keep(base + np.arange(packed.width, dtype=np.int64))
        weight = surgeon.view.const(original.inputs[packed.weight])
        node.inputs[packed.weight] = surgeon.const(f"{node.inputs[packed.weight].name}_pruned",
                                                   weight[:, keep])
        if packed.bias is not None:
            bias = surgeon.view.const(original.inputs[packed.bias])
            node.inputs[packed.bias] = surgeon.const(f"{node.inputs[packed.bias].name}_pruned",
                                                     bias[keep])
        nq, nk, _ = packed.sizes
        parts = np.split(keep, [nq, nq + nk])
        kept = [int(p.sum()) for p in parts]
        heads = packed.heads - len(surgeon.roles.removed_heads)
        if heads < 1 or any(n % heads for n in kept):
            raise NotPrunableError(f"Attention node {node.name}: the cut leaves unequal "
                                   "head widths")
        if not node.attrs.get("scale"):
            node.attrs["scale"] = float(1.0 / np.sqrt(nq // packed.heads))
        node.attrs["num_heads"] = heads
        if kept[0] == kept[1] == kept[2] and "qkv_hidden_sizes" not in node.attrs:
            return
        node.attrs["qkv_hidden_sizes"] = kept

    def flops(self, view: GraphView, node: gs.Node, trace: dict[str, np.ndarray]) -> int:
        x = np.shape(trace[node.inputs[0].name]) if node.inputs[0].name in trace else None
        weight = view.const(node.inputs[1]) if len(node.inputs) > 1 else None
        packed = packed_qkv(view, node)
        if x is None or weight is None or packed is None or len(x) != 3:
            return 0
        batch, seq, width = x
        nq, _, nv = packed.sizes
        return int(2 * batch * seq * width * weight.shape[1] + 2 * batch * seq * seq * (nq + nv))


# -- MultiHeadAttention: Q, K, V projected outside the op, their biases packed inside ----------


def _mha_inputs_supported(engine: LabelEngine, node: gs.Node) -> None:
    if len(node.inputs) > 5 and node.inputs[5].name:
        shape = np.shape(engine.value(node.inputs[5]))
        if len(shape) == 4 and shape[1] > 1:
            raise NotPrunableError(f"MultiHeadAttention node {node.name}: per-head "
                                   "attention bias")
    if any(t.name for t in node.inputs[6:]):
        raise NotPrunableError(f"MultiHeadAttention node {node.name}: past key/value inputs "
                               "are not supported")
    if any(engine.view.is_read(o.name) for o in node.outputs[1:]):
        raise NotPrunableError(f"MultiHeadAttention node {node.name}: present key/value "
                               "outputs are used")


@register_form
class MultiHeadAttentionForm(AttentionForm):
    """Both contractions are the node; Q, K and V are its first three inputs ([B, S, N] each;
    the packed-KV and packed-QKV layouts are not taken)."""

    ops = frozenset({"MultiHeadAttention"})
    domain = DOMAIN

    def anchors(self, view: GraphView, node: gs.Node) -> AttentionAnchors | None:
        if len(node.inputs) < 3 or not node.inputs[1].name or not node.inputs[2].name:
            return None
        q, k, v = node.inputs[:3]
        return AttentionAnchors(node, node, q, k, v)


@register
class MultiHeadAttention(OpRule):
    ops = frozenset({"MultiHeadAttention"})
    domain = DOMAIN

    def propagate(self, engine: LabelEngine, node: gs.Node, flow: Flow) -> None:
        labels = [flow.labels.get(t.name) for t in node.inputs[:3]]
        if any(lab is None or lab.ndim != 3 for lab in labels):
            raise NotPrunableError(f"MultiHeadAttention node {node.name}: query, key and "
                                   "value must all be tracked [B, S, N] projections")
        _mha_inputs_supported(engine, node)
        heads = int(node.attrs["num_heads"])
        q, k, v = (lab.reshape(*lab.shape[:2], heads, -1).transpose(0, 2, 1, 3)
                   for lab in labels)
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

    def fix(self, surgeon: Surgeon, node: gs.Node) -> None:
        """Slice the packed Q|K|V bias, update ``num_heads``, freeze the 1/sqrt(d) scale."""
        original = surgeon.view.node[node.name]
        heads = int(original.attrs["num_heads"])
        names = [t.name for t in original.inputs[:3]]
        cols = [surgeon.flow.labels[n].reshape(-1, surgeon.old[n][-1])[0] for n in names]
        keeps = [surgeon.roles.keep(c) for c in cols]
        bias = surgeon.view.const(original.inputs[3]) if len(original.inputs) > 3 \
            and original.inputs[3].name else None
        if bias is not None:
            keep = np.concatenate(keeps)
            kept_heads = np.ones(heads, bool)
            kept_heads[list(surgeon.roles.removed_heads)] = False
            qk_bias = bias[:len(cols[0]) + len(cols[1])].reshape(2 * heads, -1)
            dropped = ~keep[:qk_bias.size].reshape(2 * heads, -1) & np.tile(kept_heads, 2)[:, None]
            if np.any(qk_bias[dropped] != 0):
                # the query bias is added inside the op, after the QK gate: a cut of Q/K
                # columns with a bias could not be verified against it
                raise NotPrunableError(f"MultiHeadAttention node {node.name}: QK channel cuts "
                                       "with a query/key bias inside the op are not supported")
            node.inputs[3] = surgeon.const(f"{original.inputs[3].name}_pruned", bias[keep])
        if not node.attrs.get("scale"):
            node.attrs["scale"] = float(1.0 / np.sqrt(len(cols[0]) // heads))
        node.attrs["num_heads"] = heads - len(surgeon.roles.removed_heads)

    def flops(self, view: GraphView, node: gs.Node, trace: dict[str, np.ndarray]) -> int:
        shapes = [np.shape(trace[t.name]) if t.name in trace else None
                  for t in node.inputs[:3]]
        if any(s is None or len(s) != 3 for s in shapes):
            return 0
        q, k, v = shapes
        return int(2 * q[0] * q[1] * k[1] * (q[2] + v[2]))
