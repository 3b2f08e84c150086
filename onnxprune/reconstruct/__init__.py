"""The reconstruct stage (between the verified cut and the write): layer-wise least squares
on the kept weights of the pruned blocks' output projections, kept only where they help,
and the check that the written model is the verified cut with exactly those updates."""

from onnxprune.reconstruct.outcome import MODES, BlockReconstruction, ReconstructionReport
from onnxprune.reconstruct.sites import block_outputs
from onnxprune.reconstruct.stage import check_mode, reconstruct
from onnxprune.reconstruct.updates import apply_updates, check_updates

__all__ = ["MODES", "BlockReconstruction", "ReconstructionReport", "apply_updates", "block_outputs",
           "check_mode", "check_updates", "reconstruct"]
