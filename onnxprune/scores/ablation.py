"""``ablation``: the exact loss increase when one unit's gate goes to 0 (leave-one-out), for
whole modules and heads; one forward pass over the calibration data per unit."""

from __future__ import annotations

import numpy as np

from onnxprune.gates import gate_model
from onnxprune.losses import SAMPLE_LOSS, with_loss
from onnxprune.runtime import make_session, run
from onnxprune.scores.base import ImportanceScore, ScoreArrays, ScoreContext, register_score
from onnxprune.units import module_kind


@register_score
class Ablation(ImportanceScore):
    name = "ablation"
    kinds = frozenset({"attn", "ffn", "head"})
    needs_data = True

    def compute(self, context: ScoreContext) -> ScoreArrays:
        scores, _ = ablation(context)
        return scores


def ablation(context: ScoreContext) -> tuple[ScoreArrays, float]:
    """Scores for the kinds asked for, and the base loss."""
    analysis = context.analysis
    gated = gate_model(analysis, context.kinds)
    session = make_session(with_loss(gated.model, context.spec), threads=context.threads)
    data = context.batches()

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
    blocks = {b.name: b for b in analysis.structure.blocks}
    scores: ScoreArrays = {}
    for n, (gate, i) in enumerate(units):
        feeds = {k: v.copy() for k, v in ones.items()}
        feeds[gate.input][... if gate.size == 0 else i] = 0
        value = mean_loss(feeds) - base
        key = (gate.block, gate.unit or module_kind(blocks[gate.block]))
        if gate.size == 0:
            scores[key] = np.float64(value)
        else:
            scores.setdefault(key, np.zeros(gate.size))[i] = value
        if context.progress:
            context.progress(n + 1, len(units))
    return scores, base
