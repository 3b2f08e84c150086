"""``stat``: forward statistics of the calibration activations ("Less is More", Prune_stat).

- FFN channel: P(activation > 0) over calibration tokens (a channel that never fires is free).
- head: mean over tokens of ‖head output · W_o,h‖ over the mean ‖residual input‖.
- VO channel: the same for one value channel (|v_c|·‖W_o row c‖); QK channel: mean |q_c|.
- module: mean ‖module output‖ over the mean ‖residual input‖.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from onnxprune.gates import attention_site, ffn_site
from onnxprune.runtime import make_session, probe_model, run
from onnxprune.scores.weights import effective_weight
from onnxprune.structure.blocks import AttentionBlock, Block, FfnBlock
from onnxprune.structure.discover import Analysis

UnitArrays = dict[tuple[str, str], np.ndarray]


def _rows(x: np.ndarray) -> np.ndarray:
    return x.reshape(-1, x.shape[-1]).astype(np.float64)


def _residual_input(analysis: Analysis, block: Block) -> str | None:
    if not block.residual_add:
        return None
    node = analysis.view.node[block.residual_add]
    others = [t.name for t in node.inputs if t.name != block.module_output]
    return others[0] if others else None


class StatAccumulator:
    def __init__(self, analysis: Analysis, kinds: set[str]):
        self.analysis = analysis
        self.kinds = kinds
        self.sums: dict[tuple[str, str], np.ndarray] = defaultdict(float)
        self.norms: dict[str, float] = defaultdict(float)   # block -> sum of residual norms
        self.tokens: dict[str, int] = defaultdict(int)
        self.ffn_rows: dict[str, int] = defaultdict(int)
        self.tensors: set[str] = set()
        for block in self._blocks():
            self.tensors.update(t for t in self._block_tensors(block) if t)

    def _blocks(self) -> list[Block]:
        return [b for b in self.analysis.structure.blocks if b.flow is not None]

    def _block_tensors(self, block: Block) -> list[str | None]:
        if isinstance(block, FfnBlock):
            return [ffn_site(block)[0], block.module_output, _residual_input(self.analysis, block)]
        return [attention_site(self.analysis, block, "head")[0],
                attention_site(self.analysis, block, "qk")[0] if block.channel_prunable else None,
                block.module_output, _residual_input(self.analysis, block)]

    def update(self, values: dict[str, np.ndarray]) -> None:
        for block in self._blocks():
            residual = _residual_input(self.analysis, block)
            ref = values[residual] if residual else values[block.module_output]
            ref_rows = _rows(ref)
            self.norms[block.name] += float(np.linalg.norm(ref_rows, axis=1).sum())
            self.tokens[block.name] += len(ref_rows)
            out_rows = _rows(values[block.module_output])
            self.sums[(block.name, "module")] += np.linalg.norm(out_rows, axis=1).sum()
            if isinstance(block, FfnBlock):
                self._ffn(block, values)
            elif isinstance(block, AttentionBlock):
                self._attention(block, values)

    def _ffn(self, block: FfnBlock, values: dict[str, np.ndarray]) -> None:
        tensor, index = ffn_site(block)
        rows = _rows(values[tensor])
        fired = (rows > 0).sum(axis=0).astype(np.float64)
        self.ffn_rows[block.name] += len(rows)
        per_channel = np.zeros(block.channels)
        np.add.at(per_channel, index, fired)
        count = np.bincount(index, minlength=block.channels)
        self.sums[(block.name, "ch")] += per_channel / np.maximum(count, 1)

    def _attention(self, block: AttentionBlock, values: dict[str, np.ndarray]) -> None:
        tensor, heads, _, _ = attention_site(self.analysis, block, "head")
        x = _rows(values[tensor])
        w = effective_weight(self.analysis.view, block.flow.sinks[0].node)
        per_head = np.zeros(block.heads)
        for h in range(block.heads):
            rows = heads == h
            per_head[h] = np.linalg.norm(x[:, rows] @ w[rows], axis=1).sum()
        self.sums[(block.name, "head")] += per_head
        if not block.channel_prunable:
            return
        _, vo_index, size, _ = attention_site(self.analysis, block, "vo")
        vo = np.zeros(size)
        np.add.at(vo, vo_index, np.abs(x).sum(axis=0) * np.linalg.norm(w, axis=1))
        self.sums[(block.name, "vo")] += vo.reshape(block.heads, block.vo_dim)
        q_tensor, q_index, size, _ = attention_site(self.analysis, block, "qk")
        q = np.abs(_rows(values[q_tensor])).sum(axis=0)
        qk = np.zeros(size + 1)
        np.add.at(qk, np.where(q_index < 0, size, q_index), q)
        self.sums[(block.name, "qk")] += qk[:size].reshape(block.heads, block.qk_dim)

    def result(self) -> UnitArrays:
        out: UnitArrays = {}
        for (block, kind), total in self.sums.items():
            if kind == "ch":
                out[(block, kind)] = total / max(self.ffn_rows[block], 1)
            else:
                out[(block, kind)] = total / max(self.norms[block], 1e-30)
        return out


def stat(analysis: Analysis, batches, kinds: set[str], threads: int = 0) -> UnitArrays:
    acc = StatAccumulator(analysis, kinds)
    session = make_session(probe_model(analysis.model, sorted(acc.tensors)), threads=threads)
    for inputs, _ in batches():
        acc.update(run(session, inputs))
    return acc.result()
