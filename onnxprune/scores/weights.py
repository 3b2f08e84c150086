"""Scores that read only the weights: ``magnitude`` (squared L2 norm of a unit's weight
slices -- squared so that it adds up from channels to heads to modules --
Q+K columns for a QK channel, V column + W_o row for a VO channel, all four for a head,
up column(s) + down row for an FFN channel) and ``random`` (seeded; the baseline)."""

from __future__ import annotations

import numpy as np

from onnxprune.gates import attention_site, ffn_site
from onnxprune.structure.blocks import AttentionBlock, Block, FfnBlock
from onnxprune.structure.discover import Analysis
from onnxprune.structure.graph import GraphView

UnitArrays = dict[tuple[str, str], np.ndarray]


def effective_weight(view: GraphView, node: str) -> np.ndarray:
    """The [K, N] matrix a MatMul/Gemm projection multiplies by."""
    n = view.node[node]
    _, value = view.weight_of(n)
    if n.op == "Gemm" and n.attrs.get("transB", 0):
        value = value.T
    return value.astype(np.float64)


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
    """Squared norms of the down/output projection rows, summed per gate entry."""
    rows = (effective_weight(view, node) ** 2).sum(axis=1)
    out = np.zeros(size)
    keep = index >= 0
    np.add.at(out, index[keep], rows[keep])
    return out


def magnitude(analysis: Analysis) -> UnitArrays:
    scores: UnitArrays = {}
    for block in analysis.structure.blocks:
        if not block.prunable or block.flow is None:
            continue
        columns = ColumnNorms(analysis.view, block)
        sink = block.flow.sinks[0].node
        if isinstance(block, AttentionBlock):
            qk = columns(block.q_labels) + columns(block.k_labels)
            _, index, size, _ = attention_site(analysis, block, "vo")
            vo = columns(block.v_labels) + row_norms(analysis.view, sink, index, size).reshape(
                block.heads, block.vo_dim)
            scores[(block.name, "qk")] = qk
            scores[(block.name, "vo")] = vo
            scores[(block.name, "head")] = qk.sum(axis=1) + vo.sum(axis=1)
            scores[(block.name, "module")] = qk.sum() + vo.sum()
        elif isinstance(block, FfnBlock):
            _, index = ffn_site(block)
            ch = columns(block.up_labels).sum(axis=0) + row_norms(analysis.view, sink, index,
                                                                   block.channels)
            scores[(block.name, "ch")] = ch
            scores[(block.name, "module")] = ch.sum()
    return scores


def random_scores(analysis: Analysis, seed: int) -> UnitArrays:
    rng = np.random.default_rng(seed)
    scores: UnitArrays = {}
    for block in analysis.structure.blocks:
        scores[(block.name, "module")] = rng.random()
        if not block.prunable or block.flow is None:
            continue
        if isinstance(block, AttentionBlock):
            scores[(block.name, "head")] = rng.random(block.heads)
            scores[(block.name, "qk")] = rng.random((block.heads, block.qk_dim))
            scores[(block.name, "vo")] = rng.random((block.heads, block.vo_dim))
        elif isinstance(block, FfnBlock):
            scores[(block.name, "ch")] = rng.random(block.channels)
    return scores
