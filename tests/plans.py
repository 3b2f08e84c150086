"""Random plans of every unit kind for a discovered structure (seeded)."""

from __future__ import annotations

import numpy as np

from onnxprune.structure.blocks import AttentionBlock, FfnBlock, Structure

KINDS = ("module", "head", "qk", "vo", "qkvo", "ffn_ch", "ffn_module", "mixed")


def random_plan(structure: Structure, kind: str, seed: int = 0) -> list[str]:
    """Unit names of one plan of the given kind; [] when the model has no such unit."""
    rng = np.random.default_rng(seed)
    attn = [b for b in structure.attention if b.prunable]
    ffn = [b for b in structure.ffn if b.prunable]
    if kind == "module":
        return [b.name for b in attn if b.removable][:1]
    if kind == "ffn_module":
        return [b.name for b in ffn if b.removable][:1]
    if kind == "ffn_ch":
        return [u for b in ffn for u in _ffn_channels(b, rng)]
    if kind == "mixed":
        units = []
        for i, b in enumerate(attn):
            units += _heads(b, rng) if i % 2 == 0 else _channels(b, rng, ("qk", "vo"))
        return units + [u for b in ffn for u in _ffn_channels(b, rng)]
    spaces = {"head": None, "qk": ("qk",), "vo": ("vo",), "qkvo": ("qk", "vo")}[kind]
    units = []
    for b in attn:
        units += _heads(b, rng) if spaces is None else _channels(b, rng, spaces)
    return units


def _heads(block: AttentionBlock, rng: np.random.Generator) -> list[str]:
    if block.heads < 2:
        return []
    count = int(rng.integers(1, block.heads))
    return [f"{block.name}.head{h}" for h in rng.choice(block.heads, count, replace=False)]


def _channels(block: AttentionBlock, rng: np.random.Generator,
              spaces: tuple[str, ...]) -> list[str]:
    if not block.channel_prunable:
        return []
    units = []
    # one count for both spaces, so fused Q/K/V layouts stay rectangular in "qkvo" plans
    count = int(rng.integers(1, min(block.qk_dim, block.vo_dim)))
    for space in spaces:
        width = block.qk_dim if space == "qk" else block.vo_dim
        for h in range(block.heads):
            for c in rng.choice(width, count, replace=False):
                units.append(f"{block.name}.{space}{h}.{c}")
    return units


def _ffn_channels(block: FfnBlock, rng: np.random.Generator) -> list[str]:
    count = int(rng.integers(1, block.channels))
    return [f"{block.name}.ch{c}" for c in rng.choice(block.channels, count, replace=False)]
