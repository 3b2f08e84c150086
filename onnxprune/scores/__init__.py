"""The score stage: a sensitivity per prunable unit, higher = more important to keep.

Scores are classes in a registry (``base.py``): ``fisher``, ``taylor`` and ``send`` from
gate gradients (``gradient.py``), ``ablation`` (``ablation.py``), ``stat`` (``activations.py``),
``magnitude`` and ``random`` (``weights.py``). Each fills one array per (block, unit kind)
in the kind's shape; ``compute_scores`` runs one and keeps the kinds asked for.
"""

from __future__ import annotations

import time

from onnxprune.scores import ablation, activations, gradient, weights  # noqa: F401  (registers)
from onnxprune.scores.base import (
    GradientSketch,
    ImportanceScore,
    ScoreArrays,
    ScoreContext,
    Scores,
    check_method,
    granularities,
    register_score,
    resolve_score,
    score_names,
)
from onnxprune.scores.distributed import MISSING_RAY, RayCluster, check_cluster
from onnxprune.structure.discover import Analysis
from onnxprune.units import UnitKind

__all__ = ["MISSING_RAY", "GradientSketch", "ImportanceScore", "RayCluster", "ScoreContext",
           "Scores", "check_cluster", "check_method", "compute_scores", "granularities",
           "register_score", "resolve_score", "score_names"]


def compute_scores(analysis: Analysis, batches, spec, method: str | ImportanceScore,
                   kinds: set[UnitKind], *, ema: float = 0.5, seed: int = 0, threads: int = 0,
                   progress=None, workers: int | None = None,
                   ray_address: str | None = None) -> Scores:
    """Scores of ``method`` (a registered name or an instance) for ``kinds`` over the
    calibration batches; with ``workers``/``ray_address`` gradient scores run their batches
    on Ray workers (``distributed.py``), with results identical to this process's."""
    start = time.perf_counter()
    score = resolve_score(method)
    context = ScoreContext(analysis, batches, spec, set(kinds), seed, threads, ema, progress,
                           cluster=check_cluster(workers, ray_address))
    values = _restrict(analysis, score.compute(context), context.kinds)
    if context.samples_seen is not None:
        samples = context.samples_seen
    else:
        samples = context.samples if score.needs_data else 0
    keep = values.keys()
    return Scores(score.name, values, samples, time.perf_counter() - start, context.fallbacks,
                  {k: v for k, v in context.signed.items() if k in keep},
                  {k: v for k, v in context.gradients.items() if k in keep})


def _restrict(analysis: Analysis, values: ScoreArrays, kinds: set[UnitKind]) -> ScoreArrays:
    """Only the kinds asked for, and only where the kind can be cut."""
    return {(block, kind): value for (block, kind), value in values.items()
            if kind in kinds and kind.refusal(analysis.structure.block(block)) is None}
