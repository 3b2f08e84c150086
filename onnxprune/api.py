"""The public Python API; the CLI is a thin layer over it.

    import onnxprune
    analysis = onnxprune.inspect("model.onnx")
    result = onnxprune.cut("model.onnx", ["attn0.head1", "ffn1.ch7"])
    pruned, report = onnxprune.prune("model.onnx", ratio=0.5, calib="calib.npz")
    scores = onnxprune.score("model.onnx", calib="calib.npz", method="fisher")
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import onnx

from onnxprune.batches import LossBatches
from onnxprune.bench import bench, measure
from onnxprune.data import CalibrationData, load_or_synthesise
from onnxprune.errors import OnnxpruneError
from onnxprune.evaluate import evaluate
from onnxprune.finetune import FinetuneOptions, finetune
from onnxprune.gates import GatedModel, gate_model
from onnxprune.interleaved import InterleavedRun, prune_during_finetune
from onnxprune.latency import prune_for_latency
from onnxprune.losses import Quality, choose_loss
from onnxprune.modelio import load_model
from onnxprune.pipeline import PruneOptions, Report, check_something_to_prune, run_prune
from onnxprune.plan import exclusions
from onnxprune.progress import stage_done
from onnxprune.scores import (
    ImportanceScore,
    Scores,
    check_cluster,
    check_method,
    compute_scores,
    resolve_score,
)
from onnxprune.shapes import analysis_shapes, complete_shapes, fit_static, input_specs
from onnxprune.structure.discover import Analysis, analyse
from onnxprune.surgery import cut_verified
from onnxprune.units import Plan, Unit, make_plan, parse_units, unit_kind
from onnxprune.verify import Verification, check_tolerance
from onnxprune.weightstore import materialised, stores_closed_after

# bench, evaluate, finetune and measure live in their stage modules; the CLI reaches them here
__all__ = ["CutResult", "bench", "changed_weights", "cut", "evaluate", "finetune", "gate",
           "inspect", "measure", "prune", "score"]

ModelLike = onnx.ModelProto | str | os.PathLike
Shapes = Mapping[str, tuple[int, ...]] | None


@dataclass
class CutResult:
    model: onnx.ModelProto
    plan: Plan
    verification: Verification
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int


def _as_model(model: ModelLike, share: bool = True) -> onnx.ModelProto:
    """The model itself, or the file loaded; a large file's weights go to a weight store
    (``weightstore``) unless ``share`` is False."""
    return model if isinstance(model, onnx.ModelProto) else load_model(model, share=share)


def inspect(model: ModelLike, shapes: Shapes = None) -> Analysis:
    """Find the attention and feed-forward blocks; raise if the model has no attention."""
    model = _as_model(model)
    analysis = analyse(model, complete_shapes(input_specs(model), shapes))
    if not analysis.structure.attention:
        raise OnnxpruneError("no attention blocks found: onnxprune prunes transformer "
                             "attention and feed-forward blocks")
    return analysis


def cut(model: ModelLike, units: Iterable[str | Unit], shapes: Shapes = None,
        analysis: Analysis | None = None, *, rtol: float | None = None,
        atol: float | None = None, stored: bool = False) -> CutResult:
    """Remove the units (names such as "attn0.head1", or typed units); the result is
    verified exact against the gated original, to ``rtol``/``atol`` (default: the
    tolerance of the model's dtype, :func:`onnxprune.verify.tolerance`). ``stored``: see
    :func:`prune`."""
    check_tolerance(rtol, atol)
    with stores_closed_after(keep=stored):   # the store of a file this call loads
        return _cut(model, units, shapes, analysis, rtol, atol, stored)


def _cut(model: ModelLike, units: Iterable[str | Unit], shapes: Shapes,
         analysis: Analysis | None, rtol: float | None, atol: float | None, stored: bool
         ) -> CutResult:
    analysis = analysis or inspect(model, shapes)
    chosen = list(units)
    if all(isinstance(u, Unit) for u in chosen):
        plan = make_plan(chosen, analysis.structure)
    else:
        plan = parse_units([str(u) for u in chosen], analysis.structure)
    if not plan.units:
        raise OnnxpruneError("no units to remove")
    pruned, check = cut_verified(analysis, plan, rtol, atol)
    params, flops = measure(pruned, fit_static(input_specs(pruned),
                                               analysis.structure.input_shapes))
    s = analysis.structure
    return CutResult(_returned(pruned, stored), plan, check, s.params, params, s.flops, flops)


def _returned(model: onnx.ModelProto, stored: bool) -> onnx.ModelProto:
    """A run's result as the caller gets it: self-contained (a weight store's stubs filled
    in) unless ``stored``."""
    return model if stored else materialised(model)


def gate(model: ModelLike, kinds: Iterable[str] | None = None, shapes: Shapes = None
         ) -> GatedModel:
    """The model with ablation gate inputs for the given unit kinds (keys such as "head",
    "ch"; default all); all gates 1 reproduces the original outputs."""
    chosen = None if kinds is None else [unit_kind(k) for k in kinds]
    return gate_model(inspect(model, shapes), chosen)


def prune(model: ModelLike, ratio: float | None = None,
          calib: str | os.PathLike | CalibrationData | None = None, *,
          method: str | ImportanceScore = "fisher", granularity: str = "auto",
          samples: int | None = None, progress=None, keep: Iterable[str] = (),
          rtol: float | None = None, atol: float | None = None,
          stored: bool = False, **options) -> tuple[onnx.ModelProto, Report]:
    """Score, plan, cut and verify: remove ``ratio`` of the prunable parameters (or FLOPs
    with ``target="flops"``); with ``target="latency"`` give ``speedup=S`` or
    ``latency_ms=M`` instead of ``ratio`` (measured in ONNX Runtime, see
    :mod:`onnxprune.latency`). ``keep``: blocks ("attn0", "ffn5") never cut; ``rtol``,
    ``atol``: the verification tolerance (default: the model dtype's). Other options: see
    :class:`onnxprune.pipeline.PruneOptions`. ``stored``: a large model's result may keep
    referring to the run's weight store (write it with :func:`onnxprune.modelio.save_model`
    before the process ends) instead of being returned whole."""
    opts = PruneOptions(ratio, method, granularity, keep=tuple(keep), rtol=rtol, atol=atol,
                        **options)
    opts.check()
    since = time.perf_counter()
    with stores_closed_after(keep=stored):   # the store of a file this call loads
        model = _as_model(model)
        stage_done(progress, "load", since)
        opts.shapes = complete_shapes(input_specs(model), opts.shapes)
        data = load_or_synthesise(model, calib, samples, opts.seed, opts.shapes)
        if opts.target == "latency":   # --- latency target hook (issue 14.5) ---
            pruned, report = prune_for_latency(model, data, opts, progress)
        else:
            pruned, report = run_prune(model, data, opts, progress)
        return _returned(pruned, stored), report


def prune_while_finetuning(model: ModelLike, ratio: float,
                           train: str | os.PathLike | CalibrationData,
                           val: str | os.PathLike | CalibrationData | None = None, *,
                           finetune_steps: int, method: str | ImportanceScore = "fisher",
                           granularity: str = "auto", samples: int | None = None,
                           finetune_options: Mapping | None = None, progress=None,
                           **options
                           ) -> tuple[onnx.ModelProto, Report, InterleavedRun]:
    """Prune ``ratio`` in ``steps`` prune steps interleaved with ``finetune_steps`` training
    steps on ``train`` ("Less is More"; :mod:`onnxprune.interleaved`); scoring uses
    ``samples`` of the training data. ``finetune_options`` holds other
    :class:`~onnxprune.finetune.FinetuneOptions` fields (``lr``, ``batch_size``, ...)."""
    model = _as_model(model, share=False)
    opts = PruneOptions(ratio, method, granularity, **options)
    opts.check()
    opts.shapes = complete_shapes(input_specs(model), opts.shapes)
    tune = FinetuneOptions(steps=finetune_steps, seed=opts.seed, threads=opts.threads,
                           **dict(finetune_options or {}))
    tune.check()
    train_data = load_or_synthesise(model, train, None, opts.seed, opts.shapes, split="train")
    calib = load_or_synthesise(model, train, samples, opts.seed, opts.shapes, split="train")
    val_data = None if val is None else load_or_synthesise(model, val, seed=opts.seed,
                                                           split="val")
    return prune_during_finetune(model, calib, train_data, val_data, opts, tune, progress)


def score(model: ModelLike, calib: str | os.PathLike | CalibrationData | None = None, *,
          method: str | ImportanceScore = "fisher", granularity: str = "auto",
          samples: int | None = None, batch_size: int = 32, loss: str | None = None,
          ema: float = 0.5, seed: int = 0, shapes: Shapes = None, threads: int = 0,
          progress=None, workers: int | None = None, ray_address: str | None = None
          ) -> Scores:
    """Every prunable unit's score (higher = more important), without cutting anything.
    ``method`` is a registered score's name or an :class:`ImportanceScore` instance.
    ``workers``/``ray_address``: gradient scores run their batches on Ray workers (a local
    cluster, or the one at the address), with results identical to one process."""
    model = _as_model(model)
    kinds = check_method(method, granularity)
    check_cluster(workers, ray_address)
    shapes = complete_shapes(input_specs(model), shapes)
    data = load_or_synthesise(model, calib, samples, seed, shapes)
    analysis = inspect(model, analysis_shapes(input_specs(model), data.inputs, shapes))
    check_something_to_prune(analysis, kinds, exclusions(analysis, kinds), "params")
    spec = choose_loss(model, data.targets, loss)
    batches = LossBatches(model, data, spec, batch_size, threads, seed)
    name = resolve_score(method).name
    tick = (lambda done, total: progress(name, done, total)) if progress else None
    return compute_scores(analysis, batches, spec, method, kinds, ema=ema, seed=seed,
                          threads=threads, progress=tick, workers=workers,
                          ray_address=ray_address)


def quality_gate(original: ModelLike, pruned: onnx.ModelProto, report: Report,
                 max_drop: float | None, val: str | os.PathLike | CalibrationData | None = None,
                 *, batch_size: int = 32, seed: int = 0, shapes: Shapes = None,
                 threads: int = 0) -> dict | None:
    """The quality gate (``--max-drop``), set as ``report.gate`` and returned: None without
    ``max_drop``; else the relative drop of the metric from ``original`` to ``pruned`` on
    held-out ``val`` data when given (both models evaluated there, :func:`evaluate`; a
    ``.csv`` is read at its val split), else on the calibration data the run measured."""
    if max_drop is None:
        report.gate = None
        return None
    if not max_drop >= 0:   # also NaN
        raise OnnxpruneError(f"--max-drop {max_drop}: must be a number >= 0")
    if val is None:
        before, after = report.quality_before, report.quality_after
        data = {"kind": "calibration", "source": report.data["source"],
                "samples": report.data["samples"]}
    else:
        original = _as_model(original)
        held = load_or_synthesise(original, val, None, seed, shapes, split="val")
        first = evaluate(original, held, batch_size=batch_size, threads=threads)
        name = (report.quality_before.name if report.quality_before.name in first["metrics"]
                else next(iter(first["metrics"])))
        last = evaluate(pruned, held, batch_size=batch_size, threads=threads)
        better = name.split("/")[0] == "acc"
        before = Quality(name, first["metrics"][name], better)
        after = Quality(name, last["metrics"][name], better)
        data = {"kind": "val", "source": held.source, "samples": first["samples"]}
    drop = after.drop_from(before)
    report.gate = {"max_drop": max_drop, "metric": before.name,
                   "higher_is_better": before.higher_is_better, "before": before.value,
                   "after": after.value, "drop": drop, "passed": bool(drop <= max_drop),
                   "data": data}
    return report.gate


def changed_weights(original: onnx.ModelProto, pruned: onnx.ModelProto) -> list[str]:
    """Initializers the cut resized (new or reshaped float arrays): the weights and biases of
    the pruned blocks."""
    before = {t.name: tuple(t.dims) for t in original.graph.initializer}
    return [t.name for t in pruned.graph.initializer
            if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
            and before.get(t.name) != tuple(t.dims)]
