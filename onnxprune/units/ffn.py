"""Unit kinds of a feed-forward block: the whole module and one intermediate channel (the
up column, and the gate column for SwiGLU, with the down-projection row)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from onnxprune.structure.blocks import FfnBlock
from onnxprune.units.base import (
    BlockBudget,
    Candidate,
    GateSite,
    Index,
    LabelRoles,
    ModuleKind,
    UnitKind,
    projection_cols,
    projection_rows,
    register_kind,
)

if TYPE_CHECKING:
    from onnxprune.structure.discover import Analysis
    from onnxprune.units.removal import BlockCut


@register_kind
class FfnModule(ModuleKind):
    key, plural = "ffn", "FFN modules"
    block_type = FfnBlock
    granularities = ("auto",)

    def describe(self, block: FfnBlock) -> dict:
        return {"activation": block.activation, "gated": block.gated}

    def projections(self, block: FfnBlock) -> dict[str, str]:
        """The block's projection nodes by role."""
        if not block.prunable:
            return {}
        return {**{f"up{i}": u for i, u in enumerate(block.up_projs)}, "down": block.down_proj}

    def base_roles(self, block: FfnBlock) -> LabelRoles:
        roles = LabelRoles()
        for row in block.up_labels:
            for c, label in enumerate(row.tolist()):
                roles.channel[label] = c
        return roles

    def columns(self, block: FfnBlock) -> np.ndarray:
        return block.up_labels.ravel()


@register_kind
class FfnChannel(UnitKind):
    key, gate, plural, template = "ch", "ch", "FFN channels", "{block}.ch<c>"
    block_type = FfnBlock
    granularities = ("ffn", "auto")
    pattern = r"ch(\d+)"
    axes = ("channel",)

    def format(self, block: str, index: Index) -> str:
        return f"{block}.ch{index[0]}"

    def shape(self, block: FfnBlock) -> tuple[int, ...]:
        return (block.channels,)

    def describe(self, block: FfnBlock) -> dict:
        return {"channels": block.channels or None}

    def width(self, block: FfnBlock) -> int:
        return block.channels

    def site(self, analysis: Analysis, block: FfnBlock) -> GateSite:
        """The down projection's input and, per column, its FFN channel."""
        sink = block.flow.sinks[0]
        channel = {int(label): c for row in block.up_labels for c, label in enumerate(row)}
        uf = block.flow.uf
        by_root = {uf.find(k): c for k, c in channel.items()}
        return GateSite(sink.input, np.array([by_root[uf.find(int(r))] for r in sink.rows]),
                        block.channels)

    def mark(self, roles: LabelRoles, block: FfnBlock, removed: set[Index]) -> None:
        for (c,) in removed:
            roles.removed.update(block.up_labels[:, c].tolist())

    def normalise(self, cut: BlockCut, block: FfnBlock) -> None:
        if len(cut.removed.get(self.key, ())) == block.channels:
            cut.remove_whole(block, "every channel")

    def cost(self, analysis: Analysis, block: FfnBlock) -> float:
        columns = len(block.up_labels) * projection_rows(analysis, block.up_projs[0])
        return float(columns + projection_cols(analysis, block.flow.sinks[0].node))

    def columns(self, block: FfnBlock) -> np.ndarray:
        return block.up_labels.T

    def rows(self, analysis: Analysis, block: FfnBlock) -> tuple[str, np.ndarray]:
        return block.flow.sinks[0].node, self.site(analysis, block).index

    def gain(self, cand: Candidate, block: FfnBlock, taken: BlockBudget,
             costs: Mapping[str, float]) -> float:
        return 0.0 if taken.count(self.key) + 1 >= block.channels else cand.cost
