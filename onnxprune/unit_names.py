"""Unit names in the original model's numbering across progressive steps.

Each cut renumbers the units (``attn0.head5`` of step 2 is some head of the original), so a
progressive run names what it removed through this map: blocks are matched by their anchor
node (which a cut keeps), and within a block the units a cut keeps are, in order, the units
of the smaller block (as ``smoothing.StepSmoother`` carries scores). Per (block, kind) it
holds the original index of every current unit.
"""

from __future__ import annotations

import numpy as np

from onnxprune.structure.discover import Analysis
from onnxprune.units import Plan, Unit, kinds_of


def _indices(shape: tuple[int, ...]) -> np.ndarray:
    out = np.empty(shape, dtype=object)
    for index in np.ndindex(*shape):
        out[index] = tuple(int(i) for i in index)
    return out


class OriginalNames:
    """The original name of every unit of the current model of a progressive run."""

    def __init__(self, analysis: Analysis):
        self.block = {b.anchor: b.name for b in analysis.structure.blocks}
        self.index: dict[tuple[str, str], np.ndarray] = {}
        for block in analysis.structure.blocks:
            for kind in kinds_of(block):
                if kind.shape(block):
                    self.index[(block.anchor, kind.key)] = _indices(kind.shape(block))

    def name(self, analysis: Analysis, unit: Unit) -> str | None:
        """``unit`` (of ``analysis``'s model) named in the original; None if unknown."""
        anchor = analysis.structure.block(unit.block).anchor
        block = self.block.get(anchor)
        if block is None:
            return None
        if not unit.index:
            return unit.kind.format(block, ())
        table = self.index.get((anchor, unit.kind.key))
        if table is None:
            return None
        return unit.kind.format(block, table[unit.index])

    def carry(self, before: Analysis, plan: Plan, after: Analysis) -> None:
        """Follow the cut ``plan`` of ``before`` into the unit numbering of ``after``."""
        blocks = {b.anchor: b for b in after.structure.blocks}
        for old in before.structure.blocks:
            cut, new = plan.cuts.get(old.name), blocks.get(old.anchor)
            if new is None or cut is None or cut.empty:
                continue
            heads = {h for (h,) in cut.indices("head")}
            groups = {g for (g,) in cut.indices("kv")}
            if groups and hasattr(old, "groups"):
                heads |= {int(h) for h in np.flatnonzero(np.isin(old.groups, list(groups)))}
            for kind in kinds_of(new):
                key = (old.anchor, kind.key)
                table = self.index.get(key)
                if table is None:
                    continue
                gone = {i[0] for i in cut.indices(kind.key)} | (heads if kind.key == "head"
                                                                 else set())
                if kind.key == "kv":
                    gone = groups
                if table.ndim == 2:         # per-head channels: rows are heads
                    rows = [r for r in range(table.shape[0]) if r not in heads]
                    chosen = cut.indices(kind.key)
                    kept = [[table[r, c] for c in range(table.shape[1])
                             if (r, c) not in chosen] for r in rows]
                    table = np.empty((len(kept), len(kept[0]) if kept else 0), dtype=object)
                    for r, row in enumerate(kept):
                        for c, value in enumerate(row):
                            table[r, c] = value
                else:
                    table = np.array([t for i, t in enumerate(table) if i not in gone] or [],
                                     dtype=object)
                    if table.ndim != 1:   # numpy unpacked the tuples: back to tuples
                        packed = np.empty(len(table), dtype=object)
                        packed[:] = [tuple(t) for t in table]
                        table = packed
                if table.shape == tuple(kind.shape(new)):
                    self.index[key] = table
                else:                         # a renumbering this map does not follow
                    self.index.pop(key, None)
