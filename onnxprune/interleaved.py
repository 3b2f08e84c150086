"""Pruning during fine-tuning, as "Less is More"'s code does it: prune steps interleaved
with training steps, instead of pruning first and fine-tuning after.

With T fine-tuning steps and K prune steps (``--steps``), the run trains T // (K + 1)
steps, prunes (step k brings the removed share to 1 − (1 − R)^(k/K), scored on the
training data with the current, trained weights; the signed estimates smoothed across the
prune steps by ``--ema``), trains again, ..., and after the K-th prune step trains the rest
of the T steps with validation and early stopping. Every cut is verified exact against the
trained model it cuts. Reconstruction is off: it fits the original's outputs, which the
training has moved away from.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import onnx

from onnxprune.data import CalibrationData
from onnxprune.errors import OnnxpruneError
from onnxprune.finetune import FinetuneOptions, FinetuneResult, fit
from onnxprune.pipeline import Progress, PruneOptions, Report, run_prune


@dataclass
class InterleavedRun:
    """What the run trained between the prune steps and after the last one."""

    segments: list[int]            # training steps before each prune step
    final: FinetuneResult          # the training after the last prune step

    def to_json(self) -> dict:
        return {"schedule": "during", "steps_between_prunes": self.segments,
                "final_steps": self.final.steps, "best_step": self.final.best_step,
                "val_loss": self.final.val_loss, "stopped": self.final.stopped}


def segment_steps(total: int, prune_steps: int) -> int:
    """Training steps before each prune step: the T steps split in K + 1 equal parts."""
    if total < prune_steps + 1:
        raise OnnxpruneError(f"--finetune-steps {total}: pruning during fine-tuning in "
                             f"{prune_steps} step(s) needs at least {prune_steps + 1} "
                             "training steps")
    return total // (prune_steps + 1)


def prune_during_finetune(model: onnx.ModelProto, calib: CalibrationData,
                          train: CalibrationData, val: CalibrationData | None,
                          prune: PruneOptions, tune: FinetuneOptions,
                          progress: Progress | None = None
                          ) -> tuple[onnx.ModelProto, Report, InterleavedRun]:
    """Train, prune, train, ..., train: ``prune.steps`` prune steps within ``tune.steps``;
    each prune step scores on ``calib`` (e.g. a subset of ``train``)."""
    if tune.steps is None:
        raise OnnxpruneError("pruning during fine-tuning needs --finetune-steps (not epochs)")
    if not train.targets or not calib.targets:
        raise OnnxpruneError("pruning during fine-tuning needs targets: the training data "
                             "has none")
    segment = segment_steps(tune.steps, prune.steps)
    segments: list[int] = []

    def train_between(step: int, current: onnx.ModelProto) -> onnx.ModelProto:
        segments.append(segment)
        opts = replace(tune, steps=segment, seed=tune.seed + step)
        return fit(current, train, None, opts, _labelled(progress, step)).model

    opts = replace(prune, train_between=train_between, reconstruct="none")
    pruned, report = run_prune(model, calib, opts, progress)
    rest = tune.steps - segment * len(segments)
    final = fit(pruned, train, val, replace(tune, steps=rest), progress)
    return final.model, report, InterleavedRun(segments, final)


def _labelled(progress: Progress | None, step: int) -> Progress | None:
    if progress is None:
        return None
    return lambda what, done, total: progress(f"before prune step {step}: {what}", done, total)
