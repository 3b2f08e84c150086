"""``stat``: forward statistics of the calibration activations ("Less is More", Prune_stat).

- FFN channel: P(activation > 0) over calibration tokens (a channel that never fires is free).
- head: mean over tokens of ‖head output · W_o,h‖ over the mean ‖residual input‖.
- VO channel: the same for one value channel (|v_c|·‖W_o row c‖); QK channel: mean |q_c|.
- module: mean ‖module output‖ over the mean ‖residual input‖.

The statistic is the score's own definition per unit kind (the table below); each reads the
kind's gate site, so a new kind is scored here by adding its statistic.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import numpy as np

from onnxprune.errors import OnnxpruneError
from onnxprune.runtime import make_session, probe_model, run
from onnxprune.scores.base import ImportanceScore, ScoreArrays, ScoreContext, register_score
from onnxprune.structure.blocks import Block
from onnxprune.structure.discover import Analysis
from onnxprune.structure.graph import effective_weight
from onnxprune.units import GateSite, UnitKind, kinds_of

Values = dict[str, np.ndarray]


def _rows(x: np.ndarray) -> np.ndarray:
    return x.reshape(-1, x.shape[-1]).astype(np.float64)


def _residual_input(analysis: Analysis, block: Block) -> str | None:
    if not block.residual_add:
        return None
    node = analysis.view.node[block.residual_add]
    others = [t.name for t in node.inputs if t.name != block.module_output]
    return others[0] if others else None


def _reference(analysis: Analysis, block: Block) -> str:
    """What a block's statistics are relative to: the residual input, else the module's
    own output, else (no residual add at all) the output projection's output."""
    found = _residual_input(analysis, block) or block.module_output
    return found or analysis.view.node[block.flow.sinks[0].node].outputs[0].name


class StatAccumulator:
    """Sums of each kind's statistic over calibration batches, per block."""

    def __init__(self, analysis: Analysis, kinds: set[UnitKind]):
        self.analysis = analysis
        self.sums: dict[tuple[str, UnitKind], np.ndarray] = defaultdict(float)
        self.norms: dict[str, float] = defaultdict(float)   # block -> sum of residual norms
        self.tokens: dict[str, int] = defaultdict(int)
        self.rows: dict[str, int] = defaultdict(int)        # rows behind per-row statistics
        self.work: list[tuple[Block, UnitKind]] = []
        self.tensors: set[str] = set()
        for block in analysis.structure.blocks:
            if block.flow is None:
                continue
            self.tensors.add(_reference(analysis, block))
            if block.module_output:
                self.tensors.add(block.module_output)
            for kind in kinds_of(block):
                if kind in kinds and kind.refusal(block) is None and kind.key in _STATISTICS:
                    self.work.append((block, kind))
                    tensor = block.module_output if kind.whole else \
                        kind.site(analysis, block).tensor
                    if not tensor:   # a form whose statistic has no activation to read
                        raise OnnxpruneError(
                            f"--method stat cannot score the {kind.plural} of {block.name}: "
                            f"no activation to measure in this graph form; use another "
                            f"--method (fisher, ablation)")
                    self.tensors.add(tensor)

    def update(self, values: Values) -> None:
        seen = set()
        for block, kind in self.work:
            if block.name not in seen:
                seen.add(block.name)
                self._residual(block, values)
            statistic, _ = _STATISTICS[kind.key]
            self.sums[(block.name, kind)] += statistic(self, block, kind, values)

    def _residual(self, block: Block, values: Values) -> None:
        ref_rows = _rows(values[_reference(self.analysis, block)])
        self.norms[block.name] += float(np.linalg.norm(ref_rows, axis=1).sum())
        self.tokens[block.name] += len(ref_rows)

    def result(self) -> ScoreArrays:
        out: ScoreArrays = {}
        for (block, kind), total in self.sums.items():
            _, per = _STATISTICS[kind.key]
            if per == "row":
                out[(block, kind)] = total / max(self.rows[block], 1)
            else:
                out[(block, kind)] = total / max(self.norms[block], 1e-30)
        return out


def _module(acc: StatAccumulator, block: Block, kind: UnitKind, values: Values) -> np.ndarray:
    return np.linalg.norm(_rows(values[block.module_output]), axis=1).sum()


def _fired(acc: StatAccumulator, block: Block, kind: UnitKind, values: Values) -> np.ndarray:
    """How often each FFN channel's activation is positive (a share once divided by rows)."""
    site = kind.site(acc.analysis, block)
    rows = _rows(values[site.tensor])
    fired = (rows > 0).sum(axis=0).astype(np.float64)
    acc.rows[block.name] += len(rows)
    per_channel = np.zeros(site.size)
    np.add.at(per_channel, site.index, fired)
    count = np.bincount(site.index, minlength=site.size)
    return per_channel / np.maximum(count, 1)


def _output_rows(acc: StatAccumulator, block: Block, kind: UnitKind, values: Values
                 ) -> tuple[GateSite, np.ndarray, np.ndarray]:
    """The kind's site, the rows of its activations, and the output projection."""
    site = kind.site(acc.analysis, block)
    w = effective_weight(acc.analysis.view, block.flow.sinks[0].node)
    return site, _rows(values[site.tensor]), w


def _head_output(acc: StatAccumulator, block: Block, kind: UnitKind,
                 values: Values) -> np.ndarray:
    site, x, w = _output_rows(acc, block, kind, values)
    per_head = np.zeros(site.size)
    for h in range(site.size):
        rows = site.index == h
        per_head[h] = np.linalg.norm(x[:, rows] @ w[rows], axis=1).sum()
    return per_head


def _value_output(acc: StatAccumulator, block: Block, kind: UnitKind,
                  values: Values) -> np.ndarray:
    site, x, w = _output_rows(acc, block, kind, values)
    vo = np.zeros(site.size)
    np.add.at(vo, site.index, np.abs(x).sum(axis=0) * np.linalg.norm(w, axis=1))
    return vo.reshape(kind.shape(block))


def _query_size(acc: StatAccumulator, block: Block, kind: UnitKind,
                values: Values) -> np.ndarray:
    site = kind.site(acc.analysis, block)
    q = _rows(values[site.tensor])
    if site.weights:   # the query is inside a fused op: project its input here
        view = acc.analysis.view
        q = q @ view.const(site.weights[0]).astype(np.float64)
        if len(site.weights) > 1:
            q += view.const(site.weights[1]).astype(np.float64)
    q = np.abs(q).sum(axis=0)
    qk = np.zeros(site.size + 1)
    np.add.at(qk, np.where(site.index < 0, site.size, site.index), q)
    return qk[:site.size].reshape(kind.shape(block))


Statistic = Callable[[StatAccumulator, Block, UnitKind, Values], np.ndarray]
# unit kind -> (statistic, what its sum is divided by: residual norm or rows seen)
_STATISTICS: dict[str, tuple[Statistic, str]] = {
    "attn": (_module, "residual"), "ffn": (_module, "residual"),
    "head": (_head_output, "residual"), "vo": (_value_output, "residual"),
    "qk": (_query_size, "residual"), "ch": (_fired, "row"),
}


@register_score
class Stat(ImportanceScore):
    name = "stat"
    kinds = frozenset(_STATISTICS)
    needs_data = True

    def compute(self, context: ScoreContext) -> ScoreArrays:
        acc = StatAccumulator(context.analysis, context.kinds)
        if not acc.work:
            return {}
        model = probe_model(context.analysis.model, sorted(acc.tensors))
        session = make_session(model, threads=context.threads)
        for inputs, _ in context.batches():
            acc.update({**inputs, **run(session, inputs)})   # a residual may be an input
        return acc.result()
