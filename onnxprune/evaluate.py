"""Metrics of a model on a labelled dataset: ``onnxprune eval``; in Python
``onnxprune.evaluate(model, data)`` (the module is callable: it runs :func:`evaluate`).

The data comes through :func:`onnxprune.data.load_calibration` (``.npz`` keyed by input and
output names, or a time-series ``.csv``, whose *test* split is read); it must carry targets.
The metric follows the targets unless one is asked for:

- integer class ids ``[N, ...]`` for float scores ``[N, ..., K]``: ``acc`` (top-1 accuracy,
  argmax over the last axis) and ``cross_entropy`` (mean of −log softmax at the true class);
- float targets of the output's shape: ``mse`` and ``mae``, over every element.

With more than one output carrying targets the figures are over all of them together, and
each output's own figure is added as ``<metric>/<output>``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

import numpy as np
import onnx

from onnxprune.callable_module import make_callable
from onnxprune.data import CalibrationData, load_or_synthesise
from onnxprune.errors import OnnxpruneError
from onnxprune.modelio import load_model
from onnxprune.runtime import make_session, run

__all__ = ["METRICS", "evaluate"]

METRICS = ("mse", "mae", "acc")
DEFAULT_BATCH_SIZE = 256


def evaluate(
    model: onnx.ModelProto | str | os.PathLike,
    data: str | os.PathLike | CalibrationData,
    metric: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    *,
    samples: int | None = None,
    seed: int = 0,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    threads: int = 0,
) -> dict:
    """Run ``model`` over ``data`` and return
    ``{"model", "data", "samples", "metrics": {name: value}, "seconds"}``.

    ``metric`` (``mse``, ``mae`` or ``acc``) restricts the figures to that one (plus
    ``cross_entropy`` for ``acc``); by default it is inferred from the targets. ``samples``
    takes a seeded subset. A ``.csv`` is read at its test split. Raises
    :class:`OnnxpruneError` (exit 2) for data without targets or not matching the model,
    a metric that does not fit the targets, and NaN/inf outputs.
    """
    start = time.perf_counter()
    if metric is not None and metric not in METRICS:
        raise OnnxpruneError(f"--metric {metric!r}: choose one of {', '.join(METRICS)}")
    if int(batch_size) < 1:
        raise OnnxpruneError(f"batch size must be positive, got {batch_size}")
    model_name = str(model) if isinstance(model, (str, os.PathLike)) else "<memory>"
    proto = model if isinstance(model, onnx.ModelProto) else load_model(model)
    calib = load_or_synthesise(proto, data, samples, seed, shapes, split="test")
    if calib.data_free or not calib.targets:
        raise OnnxpruneError(
            f"{calib.source}: no targets: eval needs the true outputs, in a .npz keyed by the "
            f"model's output names ({', '.join(o.name for o in proto.graph.output)}) or a "
            f"time-series .csv")
    kinds = {name: _kind(name, value) for name, value in calib.targets.items()}
    if len(set(kinds.values())) > 1:
        raise OnnxpruneError(f"{calib.source}: targets mix class ids and values "
                             f"({', '.join(f'{k}: {v}' for k, v in kinds.items())}); "
                             f"evaluate them separately")
    kind = next(iter(kinds.values()))
    if metric == "acc" and kind != "classes":
        raise OnnxpruneError(f"{calib.source}: --metric acc needs integer class-id targets; "
                             f"{', '.join(kinds)} hold float values (use mse or mae)")
    if metric in ("mse", "mae") and kind != "values":
        raise OnnxpruneError(f"{calib.source}: --metric {metric} needs float targets; "
                             f"{', '.join(kinds)} hold class ids (use acc)")

    session = make_session(proto, threads=threads)
    names = list(calib.targets)
    chunks: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for inputs, _ in calib.batches(batch_size):
        outputs = run(session, inputs, names)
        for name, value in outputs.items():
            if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
                raise OnnxpruneError(f"the model's output {name!r} has NaN or inf on "
                                     f"{calib.source}; no metric computed")
            chunks[name].append(value)
    predictions = {n: np.concatenate(chunks[n]) for n in names}
    count = len(next(iter(predictions.values())))
    targets = {n: calib.targets[n][:count] for n in names}  # a static batch drops the rest
    for name in names:
        _check_shapes(calib.source, name, kind, predictions[name], targets[name])
    metrics = (_class_metrics(predictions, targets) if kind == "classes"
               else _value_metrics(predictions, targets, metric))
    return {"model": model_name, "data": calib.source, "samples": int(count),
            "metrics": metrics, "seconds": round(time.perf_counter() - start, 3)}


def _kind(name: str, target: np.ndarray) -> str:
    return "classes" if target.dtype.kind in "iu" else "values"


def _check_shapes(source: str, name: str, kind: str, pred: np.ndarray,
                  target: np.ndarray) -> None:
    want = pred.shape[:-1] if kind == "classes" and not _ids(pred) else pred.shape
    if target.shape != want:
        what = "class ids" if kind == "classes" else "targets"
        raise OnnxpruneError(f"{source}: {what} {name!r} have shape {target.shape}, the model "
                             f"outputs {pred.shape}")


def _ids(pred: np.ndarray) -> bool:
    """An output that already holds class ids (integers), not scores."""
    return pred.dtype.kind in "iu"


def _value_metrics(predictions: dict[str, np.ndarray], targets: dict[str, np.ndarray],
                   metric: str | None) -> dict[str, float]:
    wanted = (metric,) if metric else ("mse", "mae")
    errors = {n: predictions[n].astype(np.float64) - targets[n].astype(np.float64)
              for n in predictions}
    reduce = {"mse": lambda e: float(np.mean(e * e)), "mae": lambda e: float(np.mean(np.abs(e)))}
    joined = np.concatenate([e.ravel() for e in errors.values()])
    out = {m: reduce[m](joined) for m in wanted}
    if len(errors) > 1:
        out.update({f"{m}/{n}": reduce[m](e) for m in wanted for n, e in errors.items()})
    return out


def _class_metrics(predictions: dict[str, np.ndarray],
                   targets: dict[str, np.ndarray]) -> dict[str, float]:
    per: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    for name, logits in predictions.items():
        if _ids(logits):  # predicted ids: accuracy only
            per[name] = (logits == targets[name]).reshape(-1).astype(np.float64), None
            continue
        scores = logits.reshape(-1, logits.shape[-1]).astype(np.float64)
        ids = targets[name].reshape(-1)
        shifted = scores - scores.max(axis=1, keepdims=True)
        log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        hits = (scores.argmax(axis=1) == ids).astype(np.float64)
        per[name] = hits, -log_p[np.arange(len(ids)), ids]
    out = {"acc": float(np.concatenate([h for h, _ in per.values()]).mean())}
    losses = [c for _, c in per.values() if c is not None]
    if losses:
        out["cross_entropy"] = float(np.concatenate(losses).mean())
    if len(per) > 1:
        for name, (hits, ce) in per.items():
            out[f"acc/{name}"] = float(hits.mean())
            if ce is not None:
                out[f"cross_entropy/{name}"] = float(ce.mean())
    return out


make_callable(__name__, evaluate)
