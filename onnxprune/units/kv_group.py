"""Unit kind ``attn{i}.kv{g}``: key/value head g of a grouped-query (or multi-query) attention
layer together with the query heads that read it (DESIGN.md, "Blocks and units").

The cut removes the K and V columns of the group, the Q columns and output-projection rows
of its query heads, and the head tokens of those heads; the label flow updates the KV-head
count, the repeat (``repeat_kv``'s Expand and Reshape) and every reshape target on the way.
Its gate is a vector over the groups on the output projection's input (each row reads the
entry of its head's group), so the gated model with a group's entry at 0 equals the cut.

Planning: a kept module keeps at least one group. The kind is a candidate in ``auto`` only;
``--granularity head`` plans the same groups through the head kind, whose candidates in a
grouped-query block are whole groups (so a score that knows heads but not KV groups still
plans these blocks). Query heads inside a group are cut by name, with equal counts per group.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from onnxprune.structure.blocks import AttentionBlock, Block
from onnxprune.units.attention import Head, group_cost, group_gain, head_of_rows
from onnxprune.units.base import (
    BlockBudget,
    Candidate,
    GateSite,
    Index,
    LabelRoles,
    UnitKind,
    register_kind,
)

if TYPE_CHECKING:
    from onnxprune.structure.discover import Analysis
    from onnxprune.units.removal import BlockCut


@register_kind
class KvGroup(UnitKind):
    key, gate, plural, template = "kv", "kv", "KV groups", "{block}.kv<g>"
    block_type = AttentionBlock
    granularities = ("auto",)
    pattern = r"kv(\d+)"
    axes = ("group",)

    def fits(self, block: Block) -> bool:
        """Only grouped-query blocks have KV groups (in multi-head attention a group is a
        head, which ``attn{i}.head{h}`` already names)."""
        return isinstance(block, AttentionBlock) and block.grouped

    def format(self, block: str, index: Index) -> str:
        return f"{block}.kv{index[0]}"

    def shape(self, block: AttentionBlock) -> tuple[int, ...]:
        return (block.kv_heads,)

    def describe(self, block: AttentionBlock) -> dict:
        return {"kv_heads": block.kv_heads, "kv_groups": block.groups.tolist()}

    def heads_of(self, block: AttentionBlock, groups: set[int]) -> set[int]:
        """The query heads that read the given groups."""
        return {int(h) for h in np.flatnonzero(np.isin(block.groups, list(groups)))}

    # -- the gate and the cut -------------------------------------------------------------
    def site(self, analysis: Analysis, block: AttentionBlock) -> GateSite:
        heads = head_of_rows(block)
        return GateSite(block.flow.sinks[0].input, block.groups[heads], block.kv_heads)

    def mark(self, roles: LabelRoles, block: AttentionBlock, removed: set[Index]) -> None:
        Head().mark_heads(roles, block, self.heads_of(block, {g for (g,) in removed}),
                          groups_too=True)

    def normalise(self, cut: BlockCut, block: AttentionBlock) -> None:
        if len(cut.removed.get(self.key, ())) == block.kv_heads:
            cut.remove_whole(block, "every KV group")

    # -- cost, importance by weights ------------------------------------------------------
    def cost(self, analysis: Analysis, block: AttentionBlock) -> float:
        return group_cost(analysis, block)

    def columns(self, block: AttentionBlock) -> np.ndarray:
        rows = []
        for g in range(block.kv_heads):
            heads = sorted(self.heads_of(block, {g}))
            first = heads[0]
            rows.append(np.concatenate([block.q_labels[heads].ravel(),
                                        block.k_labels[first], block.v_labels[first]]))
        return np.stack(rows)

    def rows(self, analysis: Analysis, block: AttentionBlock) -> tuple[str, np.ndarray]:
        return block.flow.sinks[0].node, self.site(analysis, block).index

    # -- planning -------------------------------------------------------------------------
    def gain(self, cand: Candidate, block: AttentionBlock, taken: BlockBudget,
             costs: Mapping[str, float]) -> float:
        """A kept module keeps at least one group; a group taken as heads is not retaken."""
        return group_gain(cand, block, taken)
