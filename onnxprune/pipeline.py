"""The main job: score → plan → cut → verify, in one step or progressively.

Progressive pruning (``steps`` K) follows "Less is More": step s brings the removed share of
the original prunable cost to 1 − (1 − R)^(s/K) (a fixed fraction of what remains each
step), re-scoring the shrunken model in between; a score's signed estimates are smoothed
across the steps (``--ema``, ``smoothing.py``), never across calibration batches. Each step
plans with the mask search and rearrangement (``plan.select``). The loss is always measured
against the calibration targets, or, without targets, against the *original* model's outputs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np
import onnx

from onnxprune.batches import Feeds, LossBatches
from onnxprune.data import CalibrationData
from onnxprune.errors import OnnxpruneError
from onnxprune.losses import Quality, choose_loss
from onnxprune.plan import Exclusion, Selection, exclusions, prunable_total, select
from onnxprune.progress import stage_done
from onnxprune.reconstruct import (
    ReconstructionReport,
    block_outputs,
    check_mode,
    check_updates,
    reconstruct,
)
from onnxprune.report import block_json_sizes
from onnxprune.scores import (
    ImportanceScore,
    Scores,
    check_cluster,
    check_method,
    compute_scores,
    resolve_score,
)
from onnxprune.scores.gradient import micro_batch
from onnxprune.shapes import analysis_shapes, fit_static, input_specs
from onnxprune.smoothing import StepSmoother
from onnxprune.structure.blocks import Block
from onnxprune.structure.discover import Analysis, analyse
from onnxprune.surgery import cut_verified
from onnxprune.unit_names import OriginalNames
from onnxprune.units import Plan, Unit, UnitKind, kinds_of, make_plan
from onnxprune.verify import Verification, cache_cuts, check_tolerance
from onnxprune.weightstore import model_store

Progress = Callable[[str, int, int], None]


@dataclass
class PruneOptions:
    ratio: float | None   # None with --target latency (the latency run derives it)
    method: str | ImportanceScore = "fisher"   # a registered score's name, or an instance
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
    # --- latency target (issue 14.5; onnxprune/latency.py): the budget is --speedup S or
    # --latency-ms M instead of --ratio; ``costs`` is the measured table's cost model,
    # which the latency run sets (None: parameters or FLOPs, as ``target`` says)
    speedup: float | None = None
    latency_ms: float | None = None
    latency_batch: int = 1
    latency_provider: str = "cpu"
    costs: CostModel | None = None
    reconstruct: str = "auto"   # none, scale, refit or auto (onnxprune.reconstruct)
    # pruning during fine-tuning (onnxprune.interleaved): called before each prune step
    # with the step and the current model, returns it with trained weights (same graph)
    train_between: Callable[[int, onnx.ModelProto], onnx.ModelProto] | None = None
    keep: tuple[str, ...] = ()   # blocks never cut (--keep attn0,ffn5; ignored_layers)
    rtol: float | None = None    # verification tolerance (None: the dtype's, verify.tolerance)
    atol: float | None = None
    workers: int | None = None   # gradient scoring on Ray workers (scores/distributed.py)
    ray_address: str | None = None   # join this Ray cluster (None: a local one)
    kept: set[str] = field(default_factory=set)   # their anchors (run_prune sets them)

    def check(self) -> None:
        if self.target == "latency" and self.costs is None:
            check_latency_budget(self)
        elif self.ratio is None:
            raise OnnxpruneError("--ratio R is required (or --target latency with --speedup "
                                 "S or --latency-ms M)")
        elif not 0 < self.ratio < 1:
            raise OnnxpruneError(f"--ratio {self.ratio}: must be between 0 and 1 (exclusive)")
        if self.target not in ("params", "flops", "latency"):
            raise OnnxpruneError(f"--target {self.target!r}: choose params, flops or latency")
        if self.target != "latency" and (self.speedup, self.latency_ms) != (None, None):
            raise OnnxpruneError("--speedup and --latency-ms need --target latency")
        if self.steps < 1:
            raise OnnxpruneError(f"--prune-steps {self.steps}: must be at least 1")
        if self.round_to < 1:
            raise OnnxpruneError(f"--round-to {self.round_to}: must be at least 1")
        if not 0 < self.ema <= 1:
            raise OnnxpruneError(f"--ema {self.ema}: must be in (0, 1]")
        if self.batch_size < 1:
            raise OnnxpruneError(f"--batch-size {self.batch_size}: must be at least 1")
        check_method(self.method, self.granularity)
        check_mode(self.reconstruct)
        check_tolerance(self.rtol, self.atol)
        check_cluster(self.workers, self.ray_address)
        self.keep = tuple(dict.fromkeys(str(b).strip() for b in self.keep if str(b).strip()))

    # --- the cost the budget counts (hook for --target latency) ---------------------------
    def prunable(self, analysis: Analysis) -> float:
        """The prunable total the ratio is a share of, in the target's unit."""
        if self.costs is not None:
            return self.costs.total(analysis)
        if self.target == "latency":
            raise OnnxpruneError("--target latency needs a measured latency table: run it "
                                 "through onnxprune.prune or onnxprune.latency")
        return prunable_total(analysis, self.target)

    def select(self, analysis: Analysis, scores: Scores, kinds: set[UnitKind],
               budget: float) -> Selection:
        if self.kept:   # kept blocks offer no candidates
            scores = replace(scores, values={
                (b, k): v for (b, k), v in scores.values.items()
                if analysis.structure.block(b).anchor not in self.kept})
        if self.costs is not None:
            return self.costs.select(analysis, scores, kinds, budget, self.round_to)
        return select(analysis, scores, kinds, budget, target=self.target,
                      round_to=self.round_to)


    def keep_anchors(self, analysis: Analysis) -> set[str]:
        """The anchor nodes of the kept blocks, named in ``analysis`` (the original: a cut
        renumbers blocks, their anchors stay); an unknown or non-block name is refused."""
        blocks = {b.name: b.anchor for b in analysis.structure.blocks}
        unknown = [n for n in self.keep if n not in blocks]
        if unknown:
            raise OnnxpruneError(f"--keep {','.join(unknown)}: not a block of this model "
                                 f"(blocks: {', '.join(blocks)}); --keep takes block names "
                                 "such as attn0,ffn5")
        return {blocks[n] for n in self.keep}


class CostModel(Protocol):
    """A measured cost in place of parameters or FLOPs (``onnxprune.latency``)."""

    def total(self, analysis: Analysis) -> float: ...

    def select(self, analysis: Analysis, scores: Scores, kinds: set[UnitKind],
               budget: float, round_to: int = 1) -> Selection: ...


def check_latency_budget(opts: PruneOptions) -> None:
    """``--target latency`` takes exactly one of --speedup S (> 1) and --latency-ms M."""
    if opts.ratio is not None:
        raise OnnxpruneError("--ratio does not apply with --target latency: give --speedup S "
                             "or --latency-ms M")
    if (opts.speedup is None) == (opts.latency_ms is None):
        raise OnnxpruneError("--target latency needs exactly one of --speedup S and "
                             "--latency-ms M")
    if opts.speedup is not None and not opts.speedup > 1:
        raise OnnxpruneError(f"--speedup {opts.speedup}: must be greater than 1")
    if opts.latency_ms is not None and not opts.latency_ms > 0:
        raise OnnxpruneError(f"--latency-ms {opts.latency_ms}: must be positive")
    if opts.latency_batch < 1:
        raise OnnxpruneError(f"--latency-batch {opts.latency_batch}: must be at least 1")
# --- end of the latency target hook ------------------------------------------------------


@dataclass
class StepRecord:
    step: int
    units: list[Unit]
    removed_fraction: float
    scores_seconds: float
    fallbacks: list[str]
    max_abs_diff: float
    # what the mask search chose: block -> unit kind key -> units removed (the whole module
    # as its kind with 1), and the units mask rearrangement exchanged
    search: dict[str, dict[str, int]] = field(default_factory=dict)
    swaps: int = 0


REPORT_SCHEMA_VERSION = 1   # onnxprune/schemas/prune_report.schema.json; bump on a change


def versions() -> dict[str, str]:
    """onnxprune's, onnx's and onnxruntime's versions (what a report was made with)."""
    import onnxruntime

    from onnxprune import __version__

    return {"onnxprune": __version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


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
    calibration: LossBatches | None = field(default=None, repr=False)   # to re-measure
    excluded: list[dict] = field(default_factory=list)   # kinds a block cannot be cut by
    # key/value caches (past inputs, present outputs) -> their declared shape in the pruned
    # model, so that a runtime can allocate them; empty for models without a cache
    cache_shapes: dict[str, list] = field(default_factory=dict)
    latency: dict | None = None   # --target latency: requested and measured speed-up
    reconstruction: ReconstructionReport | None = None   # the kept weights re-fitted
    # what the budget counts (params or FLOPs of the prunable units), before and after
    prunable_before: float = 0.0
    prunable_after: float = 0.0
    blocks: list[BlockChange] = field(default_factory=list)
    keep: list[str] = field(default_factory=list)   # blocks protected from pruning (--keep)
    verified: dict | None = None   # tolerance, max abs/rel diff, inputs (Verification)
    gate: dict | None = None       # the quality gate (--max-drop); None: no gate set

    @property
    def drop(self) -> float:
        return self.quality_after.drop_from(self.quality_before)

    def to_json(self) -> dict:
        """The report (onnxprune/schemas/prune_report.schema.json)."""
        return {
            "schema_version": REPORT_SCHEMA_VERSION, "versions": versions(),
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
            "steps": [{**vars(s), "units": [u.name for u in s.units]} for s in self.steps],
            "keep": self.keep, "verified": self.verified, "gate": self.gate,
            "excluded": self.excluded,
            "scores": self.scores,
            **({"cache_shapes": self.cache_shapes} if self.cache_shapes else {}),
            **({"latency": self.latency} if self.latency else {}),
            "reconstruction": self.reconstruction.to_json() if self.reconstruction else None,
            "prunable": {"counts": {"latency": "estimated ms"}.get(self.target, self.target),
                         "before": self.prunable_before, "after": self.prunable_after},
            "blocks": [vars(b) for b in self.blocks],
        }


SIZE_FIELDS = ("heads", "kv_heads", "qk_dim", "vo_dim", "channels")


@dataclass
class BlockChange:
    """One block of the original model: its sizes before and after (``after`` None: the
    block was removed whole)."""

    block: str
    kind: str
    before: dict[str, int]
    after: dict[str, int] | None

    @property
    def changed(self) -> bool:
        return self.after != self.before


def block_sizes(block: Block) -> dict[str, int]:
    described = block_json_sizes(block)
    return {k: int(described[k]) for k in SIZE_FIELDS
            if isinstance(described.get(k), int | np.integer)}


def block_changes(first: Analysis, last: Analysis) -> list[BlockChange]:
    """Every block of ``first`` with its sizes in ``last`` (blocks matched by anchor)."""
    after = {b.anchor: b for b in last.structure.blocks}
    return [BlockChange(b.name, b.kind, block_sizes(b),
                        block_sizes(after[b.anchor]) if b.anchor in after else None)
            for b in first.structure.blocks]


def run_prune(model: onnx.ModelProto, calib: CalibrationData, opts: PruneOptions,
              progress: Progress | None = None) -> tuple[onnx.ModelProto, Report]:
    opts.check()
    start = time.perf_counter()
    opts.shapes = analysis_shapes(input_specs(model), calib.inputs, opts.shapes)
    kinds = check_method(opts.method, opts.granularity)
    method = resolve_score(opts.method).name
    first = analyse(model, opts.shapes)
    since = stage_done(progress, "discover", start)
    if not first.structure.attention:
        raise OnnxpruneError("no attention blocks found: onnxprune prunes transformer "
                             "attention and feed-forward blocks")
    opts.kept = opts.keep_anchors(first)
    names, checks = OriginalNames(first), []   # removed units in the original's numbering
    excluded = exclusions(first, kinds)
    check_something_to_prune(first, kinds, excluded, opts.target)
    caches = {out for b in first.structure.attention for out in b.cache.values()}
    spec = choose_loss(model, calib.targets, opts.loss, skip=caches)
    refits = opts.reconstruct != "none" and opts.train_between is None
    data = LossBatches(model, calib, spec, opts.batch_size, opts.threads, opts.seed,
                       probes=dict(block_outputs(first).values())
                       if refits and calib.n_samples > opts.batch_size else None,
                       part=micro_batch(first) if model_store(model) is not None else None,
                       progress=progress)
    loss_before, quality_before = data.evaluate_original()
    since = stage_done(progress, "baseline", since)
    total = opts.prunable(first)
    current, analysis = model, first
    records: list[StepRecord] = []
    units: list[str] = []
    first_scores: dict[str, float] = {}
    smoother = StepSmoother(opts.ema)
    for step in range(1, opts.steps + 1):
        goal = total * (1 - (1 - opts.ratio) ** (step / opts.steps))
        budget = goal - (total - opts.prunable(analysis))
        if budget <= 0:
            continue
        if opts.train_between is not None:
            current = opts.train_between(step, current)
            analysis = analyse(current, fit_static(input_specs(current), opts.shapes))

        def tick(done: int, count: int, step: int = step) -> None:
            if progress:
                progress(f"step {step}/{opts.steps} {method}", done, count)

        scores = compute_scores(analysis, data, spec, opts.method, kinds, ema=opts.ema,
                                seed=opts.seed + step - 1, threads=opts.threads,
                                progress=tick, workers=opts.workers,
                                ray_address=opts.ray_address)
        since = stage_done(progress, "score", since)
        first_scores = first_scores or scores.units()
        scores = smoother.smooth(analysis, scores)
        chosen = opts.select(analysis, scores, kinds, budget)
        plan = make_plan(chosen.units, analysis.structure)
        since = stage_done(progress, "plan", since)
        current, check = cut_verified(analysis, plan, opts.rtol, opts.atol)
        checks.append(check)
        since = stage_done(progress, "cut+verify", since)
        data.adapt = cache_adapter(analysis, plan, data.adapt)
        before, analysis = analysis, analyse(current, fit_static(input_specs(current),
                                                                 opts.shapes))
        smoother.carry(before, plan, analysis)
        units += [names.name(before, u) or f"step{step}:{u.name}" for u in chosen.units]
        names.carry(before, plan, analysis)
        records.append(StepRecord(step, chosen.units,
                                  1 - opts.prunable(analysis) / total,
                                  round(scores.seconds, 3), scores.fallbacks,
                                  check.max_abs_diff, chosen.counts, chosen.swaps))
    check_removed_something(units, opts)
    first.trace = {}   # the original's traced run: what follows reads only its structure
    # -- reconstruction of the kept weights (onnxprune.reconstruct): once, after the last
    # verified cut, against the original; the result is proven to be that cut plus the
    # named weight updates
    verified = current
    current, reconstruction = reconstruct(first, analysis, verified, data,
                                          opts.reconstruct if refits else "none",
                                          opts.threads, progress)
    data.probed = []                     # the original's block outputs: no longer needed
    since = stage_done(progress, "reconstruct", since)
    if opts.train_between is not None:   # fitting to the original would undo the training
        reconstruction.note = "weights were trained between the prune steps"
    check_updates(verified, current, reconstruction.updates)
    # -- end of reconstruction
    loss_after, quality_after = data.evaluate(current, opts.threads, progress)
    stage_done(progress, "evaluate", since)
    report = Report(method, opts.granularity, opts.target, opts.ratio, spec.describe,
                    {"source": calib.source, "samples": calib.n_samples,
                     "data_free": calib.data_free, "synthesised": calib.synthesised},
                    first.structure.params, analysis.structure.params, first.structure.flops,
                    analysis.structure.flops, loss_before, loss_after, quality_before,
                    quality_after, time.perf_counter() - start, units, records, first_scores,
                    opts.seed, data, [e.to_json() for e in excluded],
                    cache_shapes(current, first), reconstruction=reconstruction,
                    prunable_before=total, prunable_after=opts.prunable(analysis),
                    blocks=block_changes(first, analysis), keep=list(opts.keep),
                    verified=verified_json(checks))
    return current, report


def verified_json(checks: list[Verification]) -> dict | None:
    """The report's ``verified``: every step's cut against its gated original, worst case."""
    if not checks:
        return None
    out = checks[-1].to_json()
    out["max_abs_diff"] = max(c.max_abs_diff for c in checks)
    out["max_rel_diff"] = max(c.max_rel_diff for c in checks)
    out["steps"] = len(checks)
    return out


def cache_shapes(model: onnx.ModelProto, analysis: Analysis) -> dict[str, list]:
    """The declared shape (ints, and names for dynamic dims) of every key/value cache input
    and output of ``model``, by name, for the caches ``analysis`` (of the original) found."""
    names = {n for b in analysis.structure.attention for item in b.cache.items() for n in item}
    return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*model.graph.input, *model.graph.output] if v.name in names}


def check_something_to_prune(analysis: Analysis, kinds: set[UnitKind],
                             excluded: list[Exclusion], target: str) -> None:
    """Refuse a run that could only remove nothing, naming why each block is refused."""
    cuttable = [(b, k) for b in analysis.structure.blocks for k in kinds_of(b)
                if k in kinds and k.refusal(b) is None]
    if cuttable and prunable_total(analysis, target) > 0:
        return
    reasons = "; ".join(f"{e.block} {e.kind.plural}: {e.reason}" for e in excluded[:4])
    more = f" (and {len(excluded) - 4} more)" if len(excluded) > 4 else ""
    raise OnnxpruneError(f"nothing to prune: no block can be cut at this granularity "
                         f"({reasons or 'no prunable blocks'}{more})")


def check_removed_something(units: list[str], opts: PruneOptions) -> None:
    """Never report success having removed nothing. (Each step's planner already refuses a
    budget it cannot meet; this guards the run as a whole.)"""
    if not units:
        raise OnnxpruneError(f"removed nothing for --ratio {opts.ratio}: no step found units "
                             "to remove; nothing written")


def cache_adapter(analysis: Analysis, plan: Plan,
                  before: Callable[[Feeds], Feeds] | None) -> Callable[[Feeds], Feeds] | None:
    """The map from calibration inputs to the cut model's inputs: ``before`` (the earlier
    steps' map), then the removed heads' entries deleted from every key/value cache input
    this plan shrinks; ``before`` itself when the plan shrinks none."""
    pasts = {past for name in plan.cuts
             for past in getattr(analysis.structure.block(name), "cache", {})}
    cuts = {k: f for k, f in cache_cuts(analysis, plan).items() if k in pasts}
    if not cuts:
        return before

    def adapt(feeds: Feeds) -> Feeds:
        feeds = before(feeds) if before is not None else feeds
        return {k: cuts[k](v) if k in cuts else v for k, v in feeds.items()}
    return adapt


def cut_units(analysis: Analysis, units: list[Unit]) -> tuple[onnx.ModelProto, Verification]:
    return cut_verified(analysis, make_plan(units, analysis.structure))
