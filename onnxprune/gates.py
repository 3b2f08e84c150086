"""Ablation hooks: one float graph input per gate group, multiplied into the graph.

With every gate at 1 the gated model computes exactly what the original computes (x·1 = x).
A gate at 0 removes its unit's contribution, which is what the cut of that unit does; the
exactness contract compares the two. Gate inputs are what ablation and gradient scores read.

| gate input            | shape        | multiplied into                                 |
|-----------------------|--------------|-------------------------------------------------|
| gate.attn{i}          | []           | module output, before the residual add           |
| gate.attn{i}.head     | [H]          | output-projection input rows of each head        |
| gate.attn{i}.qk       | [H*dqk]      | query projection output columns                  |
| gate.attn{i}.vo       | [H*dvo]      | output-projection input rows (value channels)    |
| gate.ffn{i}           | []           | module output, before the residual add           |
| gate.ffn{i}.ch        | [F]          | down-projection input (activation output)        |
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxprune.cut import fresh_name
from onnxprune.structure.blocks import AttentionBlock, Block, FfnBlock
from onnxprune.structure.discover import Analysis
from onnxprune.structure.graph import ELEMENTWISE
from onnxprune.units import Plan

KINDS = ("module", "head", "qk", "vo", "ch")


@dataclass(frozen=True)
class Gate:
    """One gate input: the block, the kind of unit it gates, its length (0 = scalar) and,
    for QK/VO channel gates, the channels per head (entry h·width + c is channel c of head h)."""

    input: str
    block: str
    kind: str
    size: int
    width: int = 0


@dataclass
class GatedModel:
    model: onnx.ModelProto
    gates: list[Gate]

    def feeds(self, plan: Plan | None = None, dtype: type = np.float32) -> dict[str, np.ndarray]:
        """Gate values: 1 everywhere, 0 for the units the plan removes."""
        values = {g.input: (np.ones((), dtype) if g.size == 0 else np.ones(g.size, dtype))
                  for g in self.gates}
        for gate in self.gates:
            cut = plan.cuts.get(gate.block) if plan else None
            if cut is not None:
                _zero_removed(values[gate.input], gate, cut)
        return values


def gate_name(block: str, kind: str) -> str:
    return f"gate.{block}" if kind == "module" else f"gate.{block}.{kind}"


def _zero_removed(value: np.ndarray, gate: Gate, cut) -> None:
    if cut.whole:
        value[...] = 0
    elif gate.kind == "head":
        value[sorted(cut.heads)] = 0
    elif gate.kind in ("qk", "vo"):
        for h in cut.heads:
            value[h * gate.width:(h + 1) * gate.width] = 0
        for h, channels in getattr(cut, gate.kind).items():
            value[[h * gate.width + c for c in channels]] = 0
    elif gate.kind == "ch":
        value[sorted(cut.channels)] = 0


class Gater:
    def __init__(self, analysis: Analysis):
        self.analysis = analysis
        self.graph = gs.import_onnx(analysis.model)
        self.nodes = {n.name: n for n in self.graph.nodes}
        self.tensors = self.graph.tensors()
        self.names = set(self.tensors)
        self.gates: list[Gate] = []

    def dtype_of(self, tensor: str) -> type:
        return np.asarray(self.analysis.trace[tensor]).dtype.type

    def add_input(self, block: str, kind: str, size: int, dtype: type,
                  width: int = 0) -> gs.Variable:
        name = fresh_name(self.names, gate_name(block, kind))
        var = gs.Variable(name, dtype=dtype, shape=[] if size == 0 else [size])
        self.graph.inputs.append(var)
        self.gates.append(Gate(name, block, kind, size, width))
        return var

    def multiply(self, tensor: str, factor: gs.Tensor, label: str) -> None:
        """Every consumer of ``tensor`` (Shape ops aside) reads tensor·factor instead."""
        source = self.tensors[tensor]
        product = gs.Variable(fresh_name(self.names, f"{tensor}_{label}"), dtype=source.dtype)
        users = [n for n in list(source.outputs) if n.op != "Shape"]
        self.graph.nodes.append(gs.Node("Mul", product.name, inputs=[source, factor],
                                        outputs=[product]))
        for user in users:
            user.inputs = [product if t is source else t for t in user.inputs]
        if source in self.graph.outputs:
            self.graph.outputs = [product if t is source else t for t in self.graph.outputs]

    def expand(self, gate: gs.Variable, index: np.ndarray, label: str) -> gs.Variable:
        """A vector over a tensor's last axis: gate[index], with 1 where index is -1."""
        one = gs.Constant(fresh_name(self.names, f"{gate.name}_one"),
                          np.ones(1, dtype=gate.dtype))
        padded = gs.Variable(fresh_name(self.names, f"{gate.name}_padded"), dtype=gate.dtype)
        self.graph.nodes.append(gs.Node("Concat", padded.name, {"axis": 0},
                                        [gate, one], [padded]))
        size = gate.shape[0]
        idx = gs.Constant(fresh_name(self.names, f"{gate.name}_{label}_index"),
                          np.where(index < 0, size, index).astype(np.int64))
        out = gs.Variable(fresh_name(self.names, f"{gate.name}_{label}"), dtype=gate.dtype)
        self.graph.nodes.append(gs.Node("Gather", out.name, {"axis": 0}, [padded, idx], [out]))
        return out

    def module(self, block: Block) -> None:
        gate = self.add_input(block.name, "module", 0, self.dtype_of(block.module_output))
        self.multiply(block.module_output, gate, "gated")

    def attention(self, block: AttentionBlock, kinds: set[str]) -> None:
        sink = block.flow.sinks[0]
        row_labels = sink.rows
        v_pos = {int(v): (h, d) for h, row in enumerate(block.v_labels) for d, v in enumerate(row)}
        dtype = self.dtype_of(sink.input)
        if "head" in kinds:
            gate = self.add_input(block.name, "head", block.heads, dtype)
            index = np.array([v_pos[int(r)][0] for r in row_labels])
            self.multiply(sink.input, self.expand(gate, index, "rows"), "head_gated")
        if "vo" in kinds and block.channel_prunable:
            gate = self.add_input(block.name, "vo", block.heads * block.vo_dim, dtype,
                                  block.vo_dim)
            index = np.array([v_pos[int(r)][0] * block.vo_dim + v_pos[int(r)][1]
                              for r in row_labels])
            self.multiply(sink.input, self.expand(gate, index, "rows"), "vo_gated")
        if "qk" in kinds and block.channel_prunable:
            tensor = self._after_elementwise(block.q_proj, block)
            cols = block.flow.labels[tensor].reshape(-1, np.shape(block.flow.labels[tensor])[-1])[0]
            q_pos = {int(q): h * block.qk_dim + d for h, row in enumerate(block.q_labels)
                     for d, q in enumerate(row)}
            gate = self.add_input(block.name, "qk", block.heads * block.qk_dim, dtype,
                                  block.qk_dim)
            index = np.array([q_pos.get(int(c), -1) for c in cols])
            self.multiply(tensor, self.expand(gate, index, "cols"), "qk_gated")

    def ffn(self, block: FfnBlock) -> None:
        sink = block.flow.sinks[0]
        channel = {int(label): c for row in block.up_labels for c, label in enumerate(row)}
        uf = block.flow.uf
        by_root = {uf.find(k): c for k, c in channel.items()}
        index = np.array([by_root[uf.find(int(r))] for r in sink.rows])
        gate = self.add_input(block.name, "ch", block.channels, self.dtype_of(sink.input))
        self.multiply(sink.input, self.expand(gate, index, "rows"), "ch_gated")

    def _after_elementwise(self, projection: str, block: AttentionBlock) -> str:
        """The projection output after its bias (and other elementwise ops with constants)."""
        view = self.analysis.view
        tensor = view.node[projection].outputs[0].name
        while True:
            users = [u for u in view.consumers.get(tensor, []) if u.op != "Shape"]
            if len(users) != 1 or users[0].op not in ELEMENTWISE:
                return tensor
            if any(t.name in block.flow.labels for t in view.data_inputs(users[0])
                   if t.name != tensor):
                return tensor
            tensor = users[0].outputs[0].name


def gate_model(analysis: Analysis, kinds: Iterable[str] = KINDS,
               blocks: Iterable[str] | None = None) -> GatedModel:
    """The model with gate inputs for the given unit kinds of the given (default: all) blocks."""
    kinds = set(kinds)
    wanted = set(blocks) if blocks is not None else None
    gater = Gater(analysis)
    for block in analysis.structure.blocks:
        if wanted is not None and block.name not in wanted:
            continue
        if "module" in kinds and block.removable:
            gater.module(block)
        if not block.prunable or block.flow is None:
            continue
        if isinstance(block, AttentionBlock):
            gater.attention(block, kinds)
        elif isinstance(block, FfnBlock) and "ch" in kinds:
            gater.ffn(block)
    gater.graph.cleanup(remove_unused_graph_inputs=False).toposort()
    model = gs.export_onnx(gater.graph)
    model.ir_version = analysis.model.ir_version
    del model.opset_import[:]
    model.opset_import.extend(analysis.model.opset_import)
    return GatedModel(model, gater.gates)
