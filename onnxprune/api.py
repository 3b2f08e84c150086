"""The public Python API; the CLI is a thin layer over it.

    import onnxprune
    analysis = onnxprune.inspect("model.onnx")
    result = onnxprune.cut("model.onnx", ["attn0.head1", "ffn1.ch7"])
    pruned, report = onnxprune.prune("model.onnx", ratio=0.5, calib="calib.npz")
    scores = onnxprune.score("model.onnx", calib="calib.npz", method="fisher")
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import onnx
import onnx_graphsurgeon as gs

from onnxprune.cut import apply_plan
from onnxprune.data import CalibrationData, load_calibration
from onnxprune.errors import OnnxpruneError
from onnxprune.finetune import FinetuneOptions, FinetuneResult
from onnxprune.finetune import finetune as run_finetune
from onnxprune.gates import KINDS, GatedModel, gate_model
from onnxprune.losses import choose_loss
from onnxprune.modelio import load_model
from onnxprune.pipeline import Calibrated, PruneOptions, Report, analysis_shapes, run_prune
from onnxprune.runtime import input_specs, synthetic_feeds, trace
from onnxprune.scores import Scores, check_method, compute_scores
from onnxprune.structure.cost import model_flops, model_params
from onnxprune.structure.discover import Analysis, analyse
from onnxprune.structure.graph import GraphView
from onnxprune.units import Plan, parse_units
from onnxprune.verify import Verification, verify

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


def _as_model(model: ModelLike) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else load_model(model)


def inspect(model: ModelLike, shapes: Shapes = None) -> Analysis:
    """Find the attention and feed-forward blocks; raise if the model has no attention."""
    analysis = analyse(_as_model(model), shapes)
    if not analysis.structure.attention:
        raise OnnxpruneError("no attention blocks found: onnxprune prunes transformer "
                             "attention and feed-forward blocks")
    return analysis


def measure(model: onnx.ModelProto, shapes: Shapes = None) -> tuple[int, int]:
    """(parameters, FLOPs) of a model at the given input shapes."""
    feeds = synthetic_feeds(input_specs(model), shapes)
    values = trace(model, feeds)
    view = GraphView(gs.import_onnx(model))
    return model_params(view), model_flops(view, values)


def cut(model: ModelLike, units: Iterable[str], shapes: Shapes = None,
        analysis: Analysis | None = None) -> CutResult:
    """Remove the named units; the result is verified exact against the gated original."""
    analysis = analysis or inspect(model, shapes)
    plan = parse_units(units, analysis.structure)
    if not plan.units:
        raise OnnxpruneError("no units to remove")
    pruned = apply_plan(analysis, plan)
    check = verify(analysis, plan, pruned)
    params, flops = measure(pruned, analysis.structure.input_shapes)
    s = analysis.structure
    return CutResult(pruned, plan, check, s.params, params, s.flops, flops)


def gate(model: ModelLike, kinds: Iterable[str] = KINDS, shapes: Shapes = None) -> GatedModel:
    """The model with ablation gate inputs (all 1 reproduces the original outputs)."""
    return gate_model(inspect(model, shapes), kinds)


def calibration(model: onnx.ModelProto, calib: str | os.PathLike | CalibrationData | None,
                samples: int | None = None, seed: int = 0, shapes: Shapes = None
                ) -> CalibrationData:
    """Calibration data from a file (.npz/.npy/.csv), as given, or synthesised (data-free)."""
    if isinstance(calib, CalibrationData):
        return calib.take(samples) if samples and samples < calib.n_samples else calib
    if calib is None:
        for spec in input_specs(model):
            loose = [d for d in spec.dims[1:] if not isinstance(d, int)]
            if loose and spec.name not in (shapes or {}):
                raise OnnxpruneError(
                    f"input {spec.name!r} has dynamic dims {loose} besides the batch: without "
                    f"--calib give its shape for the synthetic inputs, e.g. --shape "
                    f"{spec.name}:1,{','.join('128' for _ in loose)}")
    return load_calibration(calib, model, samples=samples, seed=seed,
                            shapes=dict(shapes) if shapes else None)


def prune(model: ModelLike, ratio: float, calib: str | os.PathLike | CalibrationData | None
          = None, *, method: str = "fisher", granularity: str = "auto", samples: int | None
          = None, progress=None, **options) -> tuple[onnx.ModelProto, Report]:
    """Score, plan, cut and verify: remove ``ratio`` of the prunable parameters (or FLOPs
    with ``target="flops"``). Other options: see :class:`onnxprune.pipeline.PruneOptions`."""
    model = _as_model(model)
    opts = PruneOptions(ratio, method, granularity, **options)
    opts.check()
    data = calibration(model, calib, samples, opts.seed, opts.shapes)
    return run_prune(model, data, opts, progress)


def score(model: ModelLike, calib: str | os.PathLike | CalibrationData | None = None, *,
          method: str = "fisher", granularity: str = "auto", samples: int | None = None,
          batch_size: int = 32, loss: str | None = None, ema: float = 0.5, seed: int = 0,
          shapes: Shapes = None, threads: int = 0, progress=None) -> Scores:
    """Every prunable unit's score (higher = more important), without cutting anything."""
    model = _as_model(model)
    kinds = check_method(method, granularity)
    data = calibration(model, calib, samples, seed, shapes)
    analysis = inspect(model, analysis_shapes(model, data, dict(shapes) if shapes else None))
    spec = choose_loss(model, data.targets, loss)
    batches = Calibrated(model, data, spec, batch_size, threads, seed)
    tick = (lambda done, total: progress(method, done, total)) if progress else None
    return compute_scores(analysis, batches, spec, method, kinds, ema=ema, seed=seed,
                          threads=threads, progress=tick)


def finetune(model: ModelLike, train: str | os.PathLike | CalibrationData,
             val: str | os.PathLike | CalibrationData | None = None, *,
             trainable: str = "all", names: tuple[str, ...] = (), progress=None,
             **options) -> FinetuneResult:
    """Recovery fine-tuning in ONNX Runtime; options: :class:`FinetuneOptions` fields."""
    model = _as_model(model)
    opts = FinetuneOptions(trainable=trainable, names=tuple(names), **options)
    opts.check()
    train_data = train if isinstance(train, CalibrationData) else load_calibration(
        train, model, seed=opts.seed, split="train")
    val_data = val if val is None or isinstance(val, CalibrationData) else load_calibration(
        val, model, seed=opts.seed, split="val")
    return run_finetune(model, train_data, val_data, opts, progress)


def changed_weights(original: onnx.ModelProto, pruned: onnx.ModelProto) -> list[str]:
    """Initializers the cut resized (new or reshaped float arrays): the weights and biases of
    the pruned blocks."""
    before = {t.name: tuple(t.dims) for t in original.graph.initializer}
    return [t.name for t in pruned.graph.initializer
            if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
            and before.get(t.name) != tuple(t.dims)]


def evaluate(model: ModelLike, data: str | os.PathLike | CalibrationData,
             metric: str | None = None, batch_size: int = 256, **options) -> dict:
    """Metrics of ``model`` on labelled ``data`` (a ``.csv`` is read at its test split):
    ``{"model", "data", "samples", "metrics", "seconds"}``. Options: ``samples``, ``seed``,
    ``shapes``, ``threads``; see :func:`onnxprune.evaluate.evaluate`."""
    from onnxprune.evaluate import evaluate as run_evaluate

    return run_evaluate(model, data, metric, batch_size, **options)


def bench(models: Iterable[str | os.PathLike], batches: Iterable[int] = (1,),
          threads: Iterable[int] = (1,), provider: str = "cpu", warmup: int = 10,
          runs: int = 100, **options) -> list:
    """Latency, throughput, size, params, FLOPs and peak memory of each model file at each
    batch × thread count, runs interleaved across the models, ratios against the first:
    a list of :class:`onnxprune.bench.BenchRow`. Options: ``shapes``, ``memory``,
    ``progress``; see :func:`onnxprune.bench.bench`."""
    from onnxprune.bench import bench as run_bench

    return run_bench(list(models), batches, threads, provider, warmup, runs, **options)
