"""What reconstruction did: per block the fit applied, its damping, the held-out error of
the block output before and after, and the initializers it updated; overall, the model's
held-out calibration loss before and after."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MODES = ("none", "scale", "refit", "auto")


@dataclass
class BlockReconstruction:
    """One block. ``applied`` is none, bias, scale or refit, or skipped (``reason`` says
    why); the errors are the held-out block-output error relative to the output's variance
    (1 − R²)."""

    block: str
    projection: str
    applied: str
    damping: float | None = None
    error_before: float | None = None
    error_after: float | None = None
    updated: list[str] = field(default_factory=list)
    reason: str = ""

    def to_json(self) -> dict:
        out = {"block": self.block, "projection": self.projection, "applied": self.applied}
        if self.damping is not None:
            out["damping"] = float(f"{self.damping:.4g}")
        if self.error_before is not None:
            out["error_before"] = round(self.error_before, 6)
            out["error_after"] = round(self.error_after, 6)
        if self.updated:
            out["updated"] = self.updated
        if self.reason:
            out["reason"] = self.reason
        return out


@dataclass
class ReconstructionReport:
    """The stage's record; ``updates`` (initializer -> new value) is what
    :func:`check_updates` proves the written model holds."""

    mode: str
    blocks: list[BlockReconstruction] = field(default_factory=list)
    loss_before: float | None = None     # held-out calibration loss of the verified cut
    loss_after: float | None = None      # ... with the updates kept
    held_out: int = 0                    # calibration batches held out
    seconds: float = 0.0
    note: str = ""
    updates: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def updated(self) -> list[str]:
        return list(self.updates)

    def to_json(self) -> dict:
        out = {"mode": self.mode, "seconds": round(self.seconds, 3),
               "held_out_batches": self.held_out,
               "held_out_loss": {"before": self.loss_before, "after": self.loss_after},
               "updated": self.updated, "blocks": [b.to_json() for b in self.blocks]}
        return {**out, "note": self.note} if self.note else out

    def summary(self) -> str:
        """One line for the CLI."""
        if self.mode == "none":
            return f"reconstruction: off ({self.note or '--reconstruct none'})"
        applied: dict[str, int] = {}
        for b in self.blocks:
            applied[b.applied] = applied.get(b.applied, 0) + 1
        counts = ", ".join(f"{k} {n}" for k, n in applied.items()) or "nothing re-fitted"
        line = f"reconstruction ({self.mode}): {counts}"
        if self.loss_before is not None and self.loss_after is not None:
            change = (self.loss_after / self.loss_before - 1) if self.loss_before else 0.0
            line += (f"; held-out calib loss {self.loss_before:.4g} -> {self.loss_after:.4g} "
                     f"({change:+.1%})")
        line += f"; {len(self.updates)} weight(s) updated in {self.seconds:.1f} s"
        return line + (f" ({self.note})" if self.note else "")
