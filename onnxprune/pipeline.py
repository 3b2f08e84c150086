"""The main job: score → plan → cut → verify, in one step or progressively.

Progressive pruning (``steps`` K) follows "Less is More": step s brings the removed share of
the original prunable cost to 1 − (1 − R)^(s/K) (a fixed fraction of what remains each
step), re-scoring the shrunken model in between. The loss is always measured against the
calibration targets, or, without targets, against the *original* model's outputs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxprune.cut import apply_plan
from onnxprune.data import CalibrationData
from onnxprune.errors import OnnxpruneError
from onnxprune.losses import (
    LossSpec,
    Quality,
    choose_loss,
    numpy_sample_loss,
    quality,
    softmax,
    target_feeds,
    target_name,
)
from onnxprune.plan import prunable_total, select
from onnxprune.runtime import input_specs, make_session, run
from onnxprune.scores import check_method, compute_scores
from onnxprune.structure.discover import Analysis, analyse
from onnxprune.units import parse_units
from onnxprune.verify import Verification, verify

Progress = Callable[[str, int, int], None]


@dataclass
class PruneOptions:
    ratio: float
    method: str = "fisher"
    granularity: str = "auto"
    target: str = "params"
    steps: int = 1
    round_to: int = 1
    ema: float = 0.5
    seed: int = 0
    loss: str | None = None
    batch_size: int = 32
    threads: int = 0
    shapes: dict[str, tuple[int, ...]] | None = None

    def check(self) -> None:
        if not 0 < self.ratio < 1:
            raise OnnxpruneError(f"--ratio {self.ratio}: must be between 0 and 1 (exclusive)")
        if self.target not in ("params", "flops"):
            raise OnnxpruneError(f"--target {self.target!r}: choose params or flops")
        if self.steps < 1:
            raise OnnxpruneError(f"--steps {self.steps}: must be at least 1")
        if self.round_to < 1:
            raise OnnxpruneError(f"--round-to {self.round_to}: must be at least 1")
        if not 0 < self.ema <= 1:
            raise OnnxpruneError(f"--ema {self.ema}: must be in (0, 1]")
        if self.batch_size < 1:
            raise OnnxpruneError(f"--batch-size {self.batch_size}: must be at least 1")
        check_method(self.method, self.granularity)


@dataclass
class StepRecord:
    step: int
    units: list[str]
    removed_fraction: float
    scores_seconds: float
    fallbacks: list[str]
    max_abs_diff: float


@dataclass
class Report:
    """What a prune run did; ``to_json()`` is the --report file."""

    method: str
    granularity: str
    target: str
    ratio: float
    loss: str
    data: dict
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    loss_before: float
    loss_after: float
    quality_before: Quality
    quality_after: Quality
    seconds: float
    removed: list[str]
    steps: list[StepRecord]
    scores: dict[str, float] = field(default_factory=dict)
    seed: int = 0
    calibration: Calibrated | None = field(default=None, repr=False)   # to re-measure

    @property
    def drop(self) -> float:
        return self.quality_after.drop_from(self.quality_before)

    def to_json(self) -> dict:
        return {
            "method": self.method, "granularity": self.granularity, "target": self.target,
            "ratio": self.ratio, "seed": self.seed, "loss": self.loss, "data": self.data,
            "params": {"before": self.params_before, "after": self.params_after},
            "flops": {"before": self.flops_before, "after": self.flops_after},
            "calibration_loss": {"before": self.loss_before, "after": self.loss_after},
            "metric": {"name": self.quality_before.name,
                       "higher_is_better": self.quality_before.higher_is_better,
                       "before": self.quality_before.value,
                       "after": self.quality_after.value,
                       "relative_drop": self.drop},
            "seconds": round(self.seconds, 3),
            "removed": self.removed,
            "steps": [vars(s) for s in self.steps],
            "scores": self.scores,
        }


class Calibrated:
    """Calibration batches with loss-target feeds, and the original model's outputs.

    Self-distillation has its minimum at the original model, so its gradient there is zero
    and says nothing. Gradient scores then use targets *sampled* from the model's own
    predictive distribution (output + Gaussian noise of the output's spread; a class drawn
    from the softmax): the mean squared per-sample gradient is then the true Fisher
    information, i.e. the curvature of the distillation loss (``gradient_batches``)."""

    def __init__(self, model: onnx.ModelProto, calib: CalibrationData, spec: LossSpec,
                 batch_size: int, threads: int, seed: int = 0):
        self.spec = spec
        self.seed = seed
        session = make_session(model, threads=threads)
        self.batches: list[tuple[dict, dict]] = []
        self.raw_targets: list[dict] = []
        self.reference: list[dict] = []
        for inputs, targets in calib.batches(batch_size):
            outputs = run(session, inputs)
            for name, value in outputs.items():
                if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
                    raise OnnxpruneError(f"the model's output {name!r} has NaN or inf on the "
                                         "calibration data")
            self.batches.append((inputs, target_feeds(spec, targets, outputs)))
            self.raw_targets.append(targets)
            self.reference.append(outputs)

    def __call__(self) -> list[tuple[dict, dict]]:
        return self.batches

    def gradient_batches(self) -> list[tuple[dict, dict]]:
        if not self.spec.distill:
            return self.batches
        rng = np.random.default_rng(self.seed)
        out = []
        for (inputs, _), reference in zip(self.batches, self.reference):
            out.append((inputs, sampled_targets(self.spec, reference, rng)))
        return out

    def evaluate(self, model: onnx.ModelProto, threads: int = 0) -> tuple[float, Quality]:
        """Mean calibration loss and the quality figure of ``model``."""
        session = make_session(model, threads=threads)
        losses, outputs = [], []
        for inputs, feeds in self.batches:
            out = run(session, inputs)
            losses.append(numpy_sample_loss(self.spec, out, feeds))
            outputs.append(out)
        joined = {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}
        targets = {k: np.concatenate([t[k] for t in self.raw_targets])
                   for k in (self.raw_targets[0] if self.raw_targets else {})}
        reference = {k: np.concatenate([o[k] for o in self.reference]) for k in joined}
        return float(np.concatenate(losses).mean()), quality(self.spec, joined, targets,
                                                             reference)


def sampled_targets(spec: LossSpec, outputs: dict[str, np.ndarray],
                    rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Targets drawn from the model's predictive distribution at these outputs."""
    feeds = {}
    for name in spec.outputs:
        y = np.asarray(outputs[name], dtype=np.float32)
        if spec.kind == "ce":
            p = softmax(y).reshape(-1, y.shape[-1]).astype(np.float64)
            draws = [rng.choice(p.shape[1], p=row / row.sum()) for row in p]
            value = np.eye(y.shape[-1], dtype=np.float32)[draws].reshape(y.shape)
        else:
            spread = float(y.std()) or 1.0
            value = y + spread * rng.standard_normal(y.shape).astype(np.float32)
        feeds[target_name(name)] = value
    return feeds


def analysis_shapes(model: onnx.ModelProto, calib: CalibrationData,
                    shapes: dict[str, tuple[int, ...]] | None) -> dict[str, tuple[int, ...]]:
    """The shapes to analyse at: the given ones, else the calibration data's at batch 1 (a
    static batch stays), so dynamic sequence lengths are traced as they will be scored."""
    if shapes:
        return shapes
    out = {}
    for spec in input_specs(model):
        array = calib.inputs.get(spec.name)
        if array is None:
            continue
        dims = [d if isinstance(d, int) else int(n) for d, n in zip(spec.dims, array.shape)]
        if spec.dims and not isinstance(spec.dims[0], int):
            dims[0] = 1
        out[spec.name] = tuple(dims)
    return out


def run_prune(model: onnx.ModelProto, calib: CalibrationData, opts: PruneOptions,
              progress: Progress | None = None) -> tuple[onnx.ModelProto, Report]:
    opts.check()
    start = time.perf_counter()
    opts.shapes = analysis_shapes(model, calib, opts.shapes)
    kinds = check_method(opts.method, opts.granularity)
    first = analyse(model, opts.shapes)
    if not first.structure.attention:
        raise OnnxpruneError("no attention blocks found: onnxprune prunes transformer "
                             "attention and feed-forward blocks")
    spec = choose_loss(model, calib.targets, opts.loss)
    data = Calibrated(model, calib, spec, opts.batch_size, opts.threads, opts.seed)
    loss_before, quality_before = data.evaluate(model, opts.threads)
    total = prunable_total(first, opts.target)
    current, analysis = model, first
    records: list[StepRecord] = []
    units: list[str] = []
    first_scores: dict[str, float] = {}
    for step in range(1, opts.steps + 1):
        goal = total * (1 - (1 - opts.ratio) ** (step / opts.steps))
        budget = goal - (total - prunable_total(analysis, opts.target))
        if budget <= 0:
            continue

        def tick(done: int, count: int, step: int = step) -> None:
            if progress:
                progress(f"step {step}/{opts.steps} {opts.method}", done, count)

        scores = compute_scores(analysis, data, spec, opts.method, kinds, ema=opts.ema,
                                seed=opts.seed + step - 1, threads=opts.threads,
                                progress=tick)
        first_scores = first_scores or scores.units()
        chosen = select(analysis, scores, kinds, budget, target=opts.target,
                        round_to=opts.round_to)
        current, check = cut_verified(analysis, chosen.units)
        analysis = analyse(current, opts.shapes)
        records.append(StepRecord(step, chosen.units,
                                  1 - prunable_total(analysis, opts.target) / total,
                                  round(scores.seconds, 3), scores.fallbacks,
                                  check.max_abs_diff))
        units += [f"step{step}:{u}" if opts.steps > 1 else u for u in chosen.units]
    loss_after, quality_after = data.evaluate(current, opts.threads)
    report = Report(opts.method, opts.granularity, opts.target, opts.ratio, spec.describe,
                    {"source": calib.source, "samples": calib.n_samples,
                     "data_free": calib.data_free},
                    first.structure.params, analysis.structure.params, first.structure.flops,
                    analysis.structure.flops, loss_before, loss_after, quality_before,
                    quality_after, time.perf_counter() - start, units, records, first_scores,
                    opts.seed, data)
    return current, report


def cut_verified(analysis: Analysis, units: list[str]) -> tuple[onnx.ModelProto, Verification]:
    plan = parse_units(units, analysis.structure)
    pruned = apply_plan(analysis, plan)
    return pruned, verify(analysis, plan, pruned)
