"""Scores that read only the weights: ``magnitude`` (squared L2 norm of a unit's weight
slices -- squared so that it adds up from channels to heads to modules -- Q+K columns for a
QK channel, V column + W_o row for a VO channel, all four for a head, up column(s) + down
row for an FFN channel; each kind says which columns and rows are its own) and ``random``
(seeded; the baseline)."""

from __future__ import annotations

import numpy as np

from onnxprune.scores.base import ImportanceScore, ScoreArrays, ScoreContext, register_score
from onnxprune.structure.blocks import Block
from onnxprune.structure.discover import Analysis
from onnxprune.structure.graph import GraphView, effective_weight
from onnxprune.units import UnitKind, kinds_of


class ColumnNorms:
    """Squared norms of projection columns, addressed by label id."""

    def __init__(self, view: GraphView, block: Block):
        self.ranges = []
        for node, base in block.seeds.items():
            w = effective_weight(view, node)
            self.ranges.append((base, base + w.shape[1], (w ** 2).sum(axis=0)))

    def __call__(self, labels: np.ndarray) -> np.ndarray:
        out = np.zeros(np.shape(labels))
        flat = out.reshape(-1)
        for i, label in enumerate(np.asarray(labels).reshape(-1)):
            for lo, hi, norms in self.ranges:
                if lo <= label < hi:
                    flat[i] = norms[label - lo]
        return out


def row_norms(view: GraphView, node: str, index: np.ndarray, size: int) -> np.ndarray:
    """Squared norms of the down/output projection rows, summed per unit entry."""
    rows = (effective_weight(view, node) ** 2).sum(axis=1)
    out = np.zeros(size)
    keep = index >= 0
    np.add.at(out, index[keep], rows[keep])
    return out


def weight_norm(analysis: Analysis, block: Block, kind: UnitKind,
                columns: ColumnNorms) -> np.ndarray:
    """Squared norm of every unit's own columns and rows, in the kind's shape."""
    shape = kind.shape(block)
    value = columns(kind.columns(block)).reshape(*shape, -1).sum(axis=-1)
    rows = kind.rows(analysis, block)
    if rows is not None:
        node, index = rows
        value = value + row_norms(analysis.view, node, index,
                                  int(np.prod(shape))).reshape(shape)
    return value


@register_score
class Magnitude(ImportanceScore):
    name = "magnitude"

    def compute(self, context: ScoreContext) -> ScoreArrays:
        analysis = context.analysis
        scores: ScoreArrays = {}
        for block in analysis.structure.blocks:
            if not block.prunable or block.flow is None:
                continue
            columns = ColumnNorms(analysis.view, block)
            for kind in kinds_of(block):
                if kind in context.kinds:
                    scores[(block.name, kind)] = weight_norm(analysis, block, kind, columns)
        return scores


@register_score
class Random(ImportanceScore):
    """Seeded uniform scores; every kind of every block draws, in registry order, so the
    stream does not depend on which kinds are asked for."""

    name = "random"

    def compute(self, context: ScoreContext) -> ScoreArrays:
        rng = np.random.default_rng(context.seed)
        scores: ScoreArrays = {}
        for block in context.analysis.structure.blocks:
            for kind in kinds_of(block):
                if not kind.whole and (not block.prunable or block.flow is None):
                    continue
                value = rng.random(kind.shape(block)) if kind.shape(block) else rng.random()
                scores[(block.name, kind)] = value
        return scores
