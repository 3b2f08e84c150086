"""The EMA of progressive pruning ("Less is More"): a score's signed estimates smoothed across
steps, s̃ ← α·s + (1−α)·s̃, never across calibration batches.

Each cut renumbers the units, so the smoothed values are carried through it: blocks are
matched by their anchor node (which the cut keeps), and within a block the units a cut keeps
are, in order, the units of the smaller block. A removed unit drops out; a (block, kind)
whose kept units do not line up with the new block's starts afresh.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from onnxprune.scores import Scores
from onnxprune.structure.discover import Analysis
from onnxprune.units import Plan, kinds_of

Key = tuple[str, str]            # (block anchor, unit kind key)


@dataclass
class StepSmoother:
    """Smoothed signed scores of the previous steps, in the current model's unit indices."""

    alpha: float
    history: dict[Key, np.ndarray] = field(default_factory=dict)
    smoothed: dict[Key, np.ndarray] = field(default_factory=dict)

    def smooth(self, analysis: Analysis, scores: Scores) -> Scores:
        """``scores`` with their signed estimates blended into the history (the values become
        the absolute smoothed estimates); scores without signed estimates pass unchanged."""
        self.smoothed = {}
        for (name, kind), signed in scores.signed.items():
            key = (analysis.structure.block(name).anchor, kind.key)
            value = np.asarray(signed, np.float64)
            before = self.history.get(key)
            if before is not None and before.shape == value.shape:
                value = self.alpha * value + (1 - self.alpha) * before
                scores.signed[(name, kind)] = value
                scores.values[(name, kind)] = np.abs(value)
            self.smoothed[key] = value
        return scores

    def carry(self, before: Analysis, plan: Plan, after: Analysis) -> None:
        """Move the smoothed values through the cut ``plan`` of ``before`` into the unit
        indices of ``after``."""
        blocks = {b.anchor: b for b in after.structure.blocks}
        self.history = {}
        for (anchor, key), value in self.smoothed.items():
            old = next(b for b in before.structure.blocks if b.anchor == anchor)
            new = blocks.get(anchor)
            cut = plan.cuts.get(old.name)
            if new is None or (cut is not None and cut.whole):
                continue
            kind = next(k for k in kinds_of(old) if k.key == key)
            kept = np.ones(value.size)
            if cut is not None and value.shape:
                kind.zero_gate(kept, kind.width(old) if kind.slotted else 0, cut)
            shape = kind.shape(new)
            survivors = value.ravel()[kept.astype(bool)] if value.shape else value
            if survivors.size == int(np.prod(shape)):
                self.history[(anchor, key)] = survivors.reshape(shape)

