"""``ablation``: the exact loss increase when one unit's gate goes to 0 (leave-one-out), for
whole modules and heads; one forward pass over the calibration data per unit."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from onnxprune.gates import gate_model
from onnxprune.losses import SAMPLE_LOSS, LossSpec, with_loss
from onnxprune.runtime import make_session, run
from onnxprune.structure.discover import Analysis

UnitArrays = dict[tuple[str, str], np.ndarray]
Batches = Callable[[], list[tuple[dict, dict]]]


def ablation(analysis: Analysis, spec: LossSpec, batches: Batches, kinds: set[str],
             threads: int = 0, progress=None) -> tuple[UnitArrays, float]:
    """Scores for modules and heads (the kinds asked for) and the base loss."""
    gated = gate_model(analysis, kinds & {"module", "head"})
    session = make_session(with_loss(gated.model, spec), threads=threads)
    data = batches()

    def mean_loss(gates: dict[str, np.ndarray]) -> float:
        total, count = 0.0, 0
        for inputs, targets in data:
            losses = run(session, {**inputs, **targets, **gates}, [SAMPLE_LOSS])[SAMPLE_LOSS]
            total += float(losses.astype(np.float64).sum())
            count += len(losses)
        return total / max(count, 1)

    ones = gated.feeds()
    base = mean_loss(ones)
    units = [(g, i) for g in gated.gates for i in range(max(g.size, 1))]
    scores: UnitArrays = {}
    for n, (gate, i) in enumerate(units):
        feeds = {k: v.copy() for k, v in ones.items()}
        feeds[gate.input][... if gate.size == 0 else i] = 0
        value = mean_loss(feeds) - base
        key = (gate.block, gate.kind)
        if gate.size == 0:
            scores[key] = np.float64(value)
        else:
            scores.setdefault(key, np.zeros(gate.size))[i] = value
        if progress:
            progress(n + 1, len(units))
    return scores, base
