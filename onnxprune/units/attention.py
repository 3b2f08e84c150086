"""Unit kinds of an attention block: the whole module, a head, and a per-head channel of
the query-key or the value-output space (DESIGN.md, "Blocks and units")."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from onnxprune.errors import OnnxpruneError
from onnxprune.ops import form_for
from onnxprune.structure.blocks import AttentionBlock, Block
from onnxprune.structure.graph import ELEMENTWISE
from onnxprune.units.base import (
    BlockBudget,
    Candidate,
    GateSite,
    Index,
    LabelRoles,
    ModuleKind,
    Unit,
    UnitKind,
    kinds_of,
    projection_cols,
    projection_rows,
    register_kind,
)

if TYPE_CHECKING:
    from onnxprune.structure.discover import Analysis
    from onnxprune.units.removal import BlockCut


def _value_positions(block: AttentionBlock) -> dict[int, tuple[int, int]]:
    """V label id (of each query head's copy, where grouped-query attention repeats V) ->
    (head, channel)."""
    values = block.v_labels if block.v_copies is None else block.v_copies
    return {int(v): (h, d) for h, row in enumerate(values) for d, v in enumerate(row)}


def split_heads(block: AttentionBlock) -> bool:
    """Whether query heads of a grouped-query block can be cut inside their group: the
    export repeats K/V with an Expand, whose copies the label flow tells apart."""
    return block.k_copies is not None and block.v_copies is not None


def group_rank(block: AttentionBlock) -> np.ndarray:
    """Per query head: its position among the heads of its group."""
    rank = np.zeros(block.heads, np.int64)
    for g in range(block.kv_heads):
        heads = np.flatnonzero(block.groups == g)
        rank[heads] = np.arange(len(heads))
    return rank


def head_of_rows(block: AttentionBlock) -> np.ndarray:
    """Per output-projection row: the query head whose values it reads (in grouped-query
    attention, where heads share value rows, some head of the row's group)."""
    positions = _value_positions(block)
    return np.array([positions[int(r)][0] for r in block.flow.sinks[0].rows], np.int64)


@register_kind
class AttentionModule(ModuleKind):
    key, plural = "attn", "attention modules"
    block_type = AttentionBlock
    granularities = ("module", "auto")

    def projections(self, block: AttentionBlock) -> dict[str, str]:
        """The block's projection nodes by role."""
        if not block.heads:
            return {}
        return {role: name for role, name in (("q", block.q_proj), ("k", block.k_proj),
                                              ("v", block.v_proj), ("o", block.o_proj)) if name}

    def base_roles(self, block: AttentionBlock) -> LabelRoles:
        """Head and channel of every Q/K/V label id and head token of the block."""
        roles = LabelRoles()
        for labels in (block.q_labels, block.k_labels, block.v_labels):
            for h, row in enumerate(labels):
                for d, label in enumerate(row.tolist()):
                    roles.head[label], roles.channel[label] = h, d
        if block.grouped and split_heads(block):
            # shared K/V heads are "head" H + g; the copy of a query head (rank r in its
            # group) is head H + g, channel r·d + c: the repeat axis then counts kept
            # copies per group and the group axis kept groups (surgery.new_shape)
            rank = group_rank(block)
            for labels, copies in ((block.k_labels, block.k_copies),
                                   (block.v_labels, block.v_copies)):
                width = labels.shape[1]
                for h in range(block.heads):
                    group = block.heads + int(block.groups[h])
                    for label in labels[h].tolist():
                        roles.head[label] = group
                    for d, label in enumerate(copies[h].tolist()):
                        roles.head[label] = group
                        roles.channel[label] = int(rank[h]) * width + d
        for token, h in block.tokens.items():
            roles.head[token] = h
        return roles

    def columns(self, block: AttentionBlock) -> np.ndarray:
        return np.concatenate([block.q_labels.ravel(), block.k_labels.ravel(),
                               block.v_labels.ravel()])


@register_kind
class Head(UnitKind):
    key, gate, plural, template = "head", "head", "heads", "{block}.head<h>"
    block_type = AttentionBlock
    granularities = ("head", "auto")
    pattern = r"head(\d+)"
    axes = ("head",)

    def format(self, block: str, index: Index) -> str:
        return f"{block}.head{index[0]}"

    def shape(self, block: AttentionBlock) -> tuple[int, ...]:
        return (block.heads,)

    def describe(self, block: AttentionBlock) -> dict:
        if not block.heads:
            return {}
        if not block.cache:
            return {"heads": block.heads}
        # a decoder's key/value cache: the past inputs and present outputs a head cut shrinks
        return {"heads": block.heads, "cache": {"past": list(block.cache),
                                                "present": list(block.cache.values())}}

    def refusal(self, block: Block) -> str | None:
        reason = super().refusal(block)
        if reason is None and block.grouped and not split_heads(block):
            return (f"query heads of {block.name} share key/value heads that the graph does "
                    f"not repeat with an Expand: cut whole groups ({block.name}.kv<g>)")
        return reason

    def limitation(self, block: Block) -> str | None:
        if block.prunable and isinstance(block, AttentionBlock) and block.grouped \
                and not split_heads(block):
            return "query heads are cut with their KV group only"
        return None

    def normalise(self, cut: BlockCut, block: AttentionBlock) -> None:
        if not block.grouped:
            if len(cut.removed.get(self.key, ())) == block.heads:
                cut.remove_whole(block, "every head")
            return
        # grouped-query: every query head of a group is the group (attn{i}.kv{g}); the
        # repeat stays rectangular only with equal counts in the other groups
        groups = {g for (g,) in cut.removed.get("kv", ())}
        heads = {h for (h,) in cut.removed.get(self.key, ())}
        for g in range(block.kv_heads):
            if set(np.flatnonzero(block.groups == g).tolist()) <= heads:
                groups.add(g)
        heads = {h for h in heads if int(block.groups[h]) not in groups}
        if groups:
            cut.removed["kv"] = {(g,) for g in groups}
        if not heads:
            cut.removed.pop(self.key, None)
            return
        cut.removed[self.key] = {(h,) for h in heads}
        counts = {g: sum(1 for h in heads if block.groups[h] == g)
                  for g in range(block.kv_heads) if g not in groups}
        if len(set(counts.values())) != 1:
            detail = ", ".join(f"group {g}: {n}" for g, n in counts.items())
            raise OnnxpruneError(f"{block.name}: a head cut of a grouped-query layer must "
                                 f"remove the same number of query heads from every kept "
                                 f"KV group ({detail})")

    def site(self, analysis: Analysis, block: AttentionBlock) -> GateSite:
        return GateSite(block.flow.sinks[0].input, head_of_rows(block), block.heads)

    def mark(self, roles: LabelRoles, block: AttentionBlock, removed: set[Index]) -> None:
        self.mark_heads(roles, block, {h for (h,) in removed})

    def mark_heads(self, roles: LabelRoles, block: AttentionBlock, heads: set[int],
                   groups_too: bool = False) -> None:
        """Remove the Q columns, K/V copies and head tokens of ``heads``, and their K/V
        columns unless they are shared with kept heads (grouped-query attention: only whole
        groups, ``groups_too``, take their K/V columns)."""
        roles.removed_heads |= heads
        shared = block.grouped and not groups_too
        for labels in (block.q_labels,) if shared else (block.q_labels, block.k_labels,
                                                         block.v_labels):
            for h in heads:
                roles.removed.update(labels[h].tolist())
        if block.grouped and split_heads(block):
            for h in heads:
                roles.removed.update(block.k_copies[h].tolist())
                roles.removed.update(block.v_copies[h].tolist())
            if groups_too:
                roles.removed_heads |= {block.heads + int(block.groups[h]) for h in heads}
        roles.removed.update(t for t, h in block.tokens.items() if h in heads)

    def cost(self, analysis: Analysis, block: AttentionBlock) -> float:
        if block.grouped:   # the planner takes query heads by whole groups: a head's share
            return group_cost(analysis, block) * block.kv_heads / block.heads
        return float(block.qk_dim * _qk_cost(analysis, block)
                     + block.vo_dim * _vo_cost(analysis, block))

    def columns(self, block: AttentionBlock) -> np.ndarray:
        return np.concatenate([block.q_labels, block.k_labels, block.v_labels], axis=1)

    def rows(self, analysis: Analysis, block: AttentionBlock) -> tuple[str, np.ndarray]:
        site = self.site(analysis, block)
        return block.flow.sinks[0].node, site.index

    def candidates(self, block: Block, scores: np.ndarray, cost: float) -> list[Candidate]:
        """One per head; in a grouped-query block one per KV group (its query heads, index
        g): heads inside a group are cut by name only, with equal counts per group."""
        if not block.grouped:
            return super().candidates(block, scores, cost)
        values = np.asarray(scores)
        out = []
        for g in range(block.kv_heads):
            heads = np.flatnonzero(block.groups == g)
            out.append(Candidate(block.name, self, g,
                                 [Unit(self, block.name, (int(h),)) for h in heads],
                                 float(values[heads].sum()), cost * len(heads)))
        return out

    def gain(self, cand: Candidate, block: AttentionBlock, taken: BlockBudget,
             costs: Mapping[str, float]) -> float:
        if block.grouped:
            return group_gain(cand, block, taken)
        if taken.count(self.key) + 1 >= block.heads:
            return 0.0
        in_head = sum(taken.slots.get(k.key, 0) * costs.get(k.key, 0.0) for k in kinds_of(block)
                      if k.slotted)
        return cand.cost - in_head


class _ChannelSlot(UnitKind):
    """A per-head channel of the QK or VO space. The planner removes them in slots: slot j
    of a layer takes the j-th least important channel of every head, so all heads keep
    equal widths (reshapes stay rectangular) while the kept indices differ per head."""

    block_type = AttentionBlock
    granularities = ("channel",)
    slotted = True
    axes = ("head", "channel")
    space: str                   # "QK" or "VO", for messages
    dim: str                     # the block's per-head width attribute

    def width(self, block: AttentionBlock) -> int:
        return getattr(block, self.dim)

    def format(self, block: str, index: Index) -> str:
        return f"{block}.{self.key}{index[0]}.{index[1]}"

    def refusal(self, block: Block) -> str | None:
        reason = super().refusal(block)
        if reason is None and not block.channel_prunable:
            return f"channels of {block.name} cannot be cut: {block.channel_reason}"
        if reason is None and self.own_reason(block):
            return f"{self.space} channels of {block.name} cannot be cut: " \
                   f"{self.own_reason(block)}"
        return reason

    def limitation(self, block: Block) -> str | None:
        if block.prunable and not block.channel_prunable:
            return f"no QK/VO channel cuts: {block.channel_reason}"
        if block.prunable and self.own_reason(block):
            return f"no {self.space} channel cuts: {self.own_reason(block)}"
        return None

    def own_reason(self, block: Block) -> str:
        """Why this space alone cannot be cut ("" when it can)."""
        return ""

    def labels(self, block: AttentionBlock) -> list[np.ndarray]:
        raise NotImplementedError

    def shape(self, block: AttentionBlock) -> tuple[int, ...]:
        return (block.heads, self.width(block))

    def zero_gate(self, value: np.ndarray, width: int, cut: BlockCut) -> None:
        for (h,) in cut.removed.get(Head.key, ()):
            value[..., h * width:(h + 1) * width] = 0
        super().zero_gate(value, width, cut)

    def mark(self, roles: LabelRoles, block: AttentionBlock, removed: set[Index]) -> None:
        for labels in self.labels(block):
            roles.removed.update(int(labels[h, c]) for h, c in removed)

    def normalise(self, cut: BlockCut, block: AttentionBlock) -> None:
        heads = {h for (h,) in cut.removed.get(Head.key, ())}
        chosen = {i for i in cut.removed.get(self.key, ()) if i[0] not in heads}
        if not chosen:
            cut.removed.pop(self.key, None)
            return
        cut.removed[self.key] = chosen
        counts = {h: sum(1 for i in chosen if i[0] == h) for h in range(block.heads)
                  if h not in heads}
        if len(set(counts.values())) != 1:
            detail = ", ".join(f"head {h}: {n}" for h, n in counts.items())
            raise OnnxpruneError(f"{block.name}: a {self.space} cut must remove the same "
                                 f"number of channels from every kept head ({detail})")
        if next(iter(counts.values())) == self.width(block):
            raise OnnxpruneError(f"{block.name}: cannot remove every {self.space} channel; "
                                 "remove the heads or the module instead")

    def columns(self, block: AttentionBlock) -> np.ndarray:
        return np.stack(self.labels(block), axis=-1)

    def candidates(self, block: Block, scores: np.ndarray, cost: float) -> list[Candidate]:
        values = np.asarray(scores)                                   # [H, d]
        order = np.argsort(values, axis=1, kind="stable")
        out = []
        for slot in range(values.shape[1] - 1):                      # keep >= 1 per head
            chans = order[:, slot]
            units = [Unit(self, block.name, (h, int(c))) for h, c in enumerate(chans)]
            score = float(values[np.arange(len(chans)), chans].sum())
            out.append(Candidate(block.name, self, slot, units, score, cost * block.heads))
        return out

    def gain(self, cand: Candidate, block: AttentionBlock, taken: BlockBudget,
             costs: Mapping[str, float]) -> float:
        if taken.slots.get(self.key, 0) != cand.index:
            return 0.0
        return cand.cost * (block.heads - taken.count(Head.key)) / block.heads

    def take(self, cand: Candidate, taken: BlockBudget) -> None:
        taken.slots[self.key] = cand.index + 1


@register_kind
class QkChannel(_ChannelSlot):
    key, gate, plural, template = "qk", "qk", "QK channels", "{block}.qk<h>.<c>"
    pattern = r"qk(\d+)\.(\d+)"
    space, dim = "QK", "qk_dim"

    def own_reason(self, block: AttentionBlock) -> str:
        return block.qk_reason

    def describe(self, block: AttentionBlock) -> dict:
        if not block.heads:
            return {}
        return {"qk_dim": block.qk_dim, "channel_prunable": block.channel_prunable}

    def labels(self, block: AttentionBlock) -> list[np.ndarray]:
        return [block.q_labels, block.k_labels]

    def site(self, analysis: Analysis, block: AttentionBlock) -> GateSite:
        """The query projection's output after its bias; column c reads entry h·d + c. A
        fused op with its Q/K/V projection packed inside: the packed weight's and bias's
        columns (``GateSite.weights``)."""
        q_pos = {int(q): h * block.qk_dim + d for h, row in enumerate(block.q_labels)
                 for d, q in enumerate(row)}
        size = block.heads * block.qk_dim
        packed = packed_projection(analysis, block)
        if packed is not None:
            cols = block.seeds[block.q_proj] + np.arange(packed.width, dtype=np.int64)
            index = np.array([q_pos.get(int(c), -1) for c in cols])
            node = packed.node
            weights = [node.inputs[packed.weight].name]
            if packed.bias is not None:
                weights.append(node.inputs[packed.bias].name)
            return GateSite(node.inputs[0].name, index, size, block.qk_dim, tuple(weights))
        tensor = _after_elementwise(analysis, block.q_proj, block)
        labels = block.flow.labels[tensor]
        cols = labels.reshape(-1, np.shape(labels)[-1])[0]
        index = np.array([q_pos.get(int(c), -1) for c in cols])
        return GateSite(tensor, index, size, block.qk_dim)

    def cost(self, analysis: Analysis, block: AttentionBlock) -> float:
        return float(_qk_cost(analysis, block))


@register_kind
class VoChannel(_ChannelSlot):
    key, gate, plural, template = "vo", "vo", "VO channels", "{block}.vo<h>.<c>"
    pattern = r"vo(\d+)\.(\d+)"
    space, dim = "VO", "vo_dim"

    def describe(self, block: AttentionBlock) -> dict:
        return {"vo_dim": block.vo_dim} if block.heads else {}

    def labels(self, block: AttentionBlock) -> list[np.ndarray]:
        return [block.v_labels]

    def site(self, analysis: Analysis, block: AttentionBlock) -> GateSite:
        """The output projection's input; row r reads entry h·d + c of its value channel."""
        sink = block.flow.sinks[0]
        positions = _value_positions(block)
        index = np.array([positions[int(r)][0] * block.vo_dim + positions[int(r)][1]
                          for r in sink.rows])
        return GateSite(sink.input, index, block.heads * block.vo_dim, block.vo_dim)

    def rows(self, analysis: Analysis, block: AttentionBlock) -> tuple[str, np.ndarray]:
        return block.flow.sinks[0].node, self.site(analysis, block).index

    def cost(self, analysis: Analysis, block: AttentionBlock) -> float:
        return float(_vo_cost(analysis, block))


def group_cost(analysis: Analysis, block: AttentionBlock) -> float:
    """Weights of one KV group of a grouped-query block: the Q columns and output rows of
    its query heads, and its K and V columns."""
    per_head = (block.qk_dim * projection_rows(analysis, block.q_proj)
                + block.vo_dim * projection_cols(analysis, block.flow.sinks[0].node))
    kv = (block.qk_dim * projection_rows(analysis, block.k_proj)
          + block.vo_dim * projection_rows(analysis, block.v_proj))
    return float(per_head * block.heads // block.kv_heads + kv)


def group_gain(cand: Candidate, block: AttentionBlock, taken: BlockBudget) -> float:
    """A KV group candidate (of the kv kind, or the head kind's per-group one) removes its
    cost unless that group was taken or it is the last kept group."""
    groups = taken.taken.get("head", set()) | taken.taken.get("kv", set())
    if cand.index in groups or len(groups) + 1 >= block.kv_heads:
        return 0.0
    return cand.cost


def _qk_cost(analysis: Analysis, block: AttentionBlock) -> int:
    """Weights of one QK channel: a query and a key column."""
    return projection_rows(analysis, block.q_proj) + projection_rows(analysis, block.k_proj)


def _vo_cost(analysis: Analysis, block: AttentionBlock) -> int:
    """Weights of one VO channel: a value column and an output-projection row."""
    return (projection_rows(analysis, block.v_proj)
            + projection_cols(analysis, block.flow.sinks[0].node))


def packed_projection(analysis: Analysis, block: AttentionBlock):
    """The packed Q/K/V projection inside a fused attention op (``PackedQKV``), or None."""
    node = analysis.view.node[block.q_proj]
    form = form_for(node, analysis.view.opset)
    packed = getattr(form, "packed", None)
    return packed(analysis.view, node) if packed is not None else None


def _after_elementwise(analysis: Analysis, projection: str, block: AttentionBlock) -> str:
    """The projection output after its bias (and other elementwise ops with constants)."""
    view = analysis.view
    tensor = view.node[projection].outputs[0].name
    while True:
        users = [u for u in view.consumers.get(tensor, []) if u.op != "Shape"]
        if len(users) != 1 or users[0].op not in ELEMENTWISE:
            return tensor
        if any(t.name in block.flow.labels for t in view.data_inputs(users[0])
               if t.name != tensor):
            return tensor
        tensor = users[0].outputs[0].name
