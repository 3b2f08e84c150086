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
| gate.attn{i}.send     | like A       | softmax output A (score connections, SEND)       |

Per-sample gates (``per_sample=True``, what the gradient scores use) carry the batch: a vector
gate becomes [N, size] and a module gate [.., N, ..] where N is the gated tensor's batch axis
(rows per sample × batch), so one backward pass gives every sample's gradient.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxprune.cut import fresh_name
from onnxprune.runtime import input_specs, synthetic_feeds, trace
from onnxprune.structure.blocks import AttentionBlock, Block, FfnBlock
from onnxprune.structure.discover import Analysis
from onnxprune.structure.graph import ELEMENTWISE
from onnxprune.units import Plan

KINDS = ("module", "head", "qk", "vo", "ch")


@dataclass(frozen=True)
class Gate:
    """One gate input: the block, the kind of unit it gates, its length (0 = scalar) and,
    for QK/VO channel gates, the channels per head (entry h·width + c is channel c of head h).

    ``shape`` is the input's shape at batch 1; for a per-sample gate ``batch_dim`` is the
    entry of it that grows with the batch (it holds the rows per sample)."""

    input: str
    block: str
    kind: str
    size: int
    width: int = 0
    shape: tuple[int, ...] = ()
    batch_dim: int | None = None
    batch_inner: bool = False    # rows of one sample are strided by the batch ([T*B, ...])

    def shape_at(self, batch: int) -> tuple[int, ...]:
        shape = list(self.shape)
        if self.batch_dim is not None:
            shape[self.batch_dim] *= batch
        return tuple(shape)

    def per_sample(self, value: np.ndarray, batch: int) -> np.ndarray:
        """A value shaped like this gate at ``batch`` as [batch, size] (or [batch, ...] for
        whole-tensor gates), summing the rows that belong to one sample."""
        if self.batch_dim is None:
            return value.reshape(1, *value.shape[-1:] if self.size else ())
        moved = np.moveaxis(value, self.batch_dim, 0)
        if self.batch_inner:
            rows = moved.reshape(-1, batch, *moved.shape[1:]).sum(axis=0)
        else:
            rows = moved.reshape(batch, -1, *moved.shape[1:]).sum(axis=1)
        if self.kind == "module":
            return rows.reshape(batch)
        return rows


@dataclass
class GatedModel:
    model: onnx.ModelProto
    gates: list[Gate]
    batch_trace: dict[str, np.ndarray] | None = None
    aliases: dict[str, str] | None = None      # gated tensor -> the original it equals at 1

    def traced(self, trace: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A trace of the original extended to the gated tensors (equal at gates 1)."""
        extra = {new: trace[old] for new, old in (self.aliases or {}).items() if old in trace}
        return {**trace, **extra}

    def feeds(self, plan: Plan | None = None, dtype: type = np.float32,
              batch: int = 1) -> dict[str, np.ndarray]:
        """Gate values: 1 everywhere, 0 for the units the plan removes."""
        values = {g.input: np.ones(g.shape_at(batch), dtype) for g in self.gates}
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
        value[..., sorted(cut.heads)] = 0
    elif gate.kind in ("qk", "vo"):
        for h in cut.heads:
            value[..., h * gate.width:(h + 1) * gate.width] = 0
        for h, channels in getattr(cut, gate.kind).items():
            value[..., [h * gate.width + c for c in channels]] = 0
    elif gate.kind == "ch":
        value[..., sorted(cut.channels)] = 0


class Gater:
    def __init__(self, analysis: Analysis, per_sample: bool = False):
        self.analysis = analysis
        self.graph = gs.import_onnx(analysis.model)
        self.nodes = {n.name: n for n in self.graph.nodes}
        self.tensors = self.graph.tensors()
        self.names = set(self.tensors)
        self.gates: list[Gate] = []
        self.aliases: dict[str, str] = {}
        self.batch_trace = batch_trace(analysis) if per_sample else None

    def dtype_of(self, tensor: str) -> type:
        return np.asarray(self.analysis.trace[tensor]).dtype.type

    def batch_axis(self, tensor: str) -> int | None:
        """The axis of ``tensor`` that grows with the batch (per-sample gates only)."""
        if self.batch_trace is None:
            return None
        one = np.shape(self.analysis.trace[tensor])
        two = np.shape(self.batch_trace[tensor])
        grown = [a for a, (x, y) in enumerate(zip(one, two)) if x != y]
        if len(one) < 2 or len(grown) != 1 or two[grown[0]] != 2 * one[grown[0]]:
            return None
        return grown[0] if grown[0] < len(one) - 1 else None

    def batch_is_inner(self, tensor: str, axis: int) -> bool:
        """Whether sample 0's rows are every other row (batch innermost, as in [T*B, D])
        rather than the first half: the batch trace repeats the analysis input first."""
        one = np.moveaxis(np.asarray(self.analysis.trace[tensor]), axis, 0)
        two = np.moveaxis(np.asarray(self.batch_trace[tensor]), axis, 0)
        if np.allclose(two[:len(one)], one, rtol=1e-4, atol=1e-6):
            return False
        return bool(np.allclose(two[0::2], one, rtol=1e-4, atol=1e-6))

    def add_input(self, block: str, kind: str, size: int, dtype: type, width: int = 0,
                  tensor: str | None = None) -> tuple[gs.Variable, int | None]:
        """A new gate input; per-sample when ``tensor`` has a batch axis (returned)."""
        name = fresh_name(self.names, gate_name(block, kind))
        axis = self.batch_axis(tensor) if tensor else None
        traced = np.shape(self.analysis.trace[tensor]) if tensor else ()
        if kind == "send":
            shape, batch_dim = tuple(traced), axis
        elif axis is None:
            shape, batch_dim = (() if size == 0 else (size,)), None
        elif size == 0:
            shape = tuple(traced[a] if a == axis else 1 for a in range(len(traced)))
            batch_dim = axis
        else:
            shape, batch_dim = (traced[axis], size), 0
        declared: list[int | str] = list(shape)
        inner = False
        if batch_dim is not None:
            declared[batch_dim] = f"{name}_rows"
            inner = self.batch_is_inner(tensor, axis)
        var = gs.Variable(name, dtype=dtype, shape=declared)
        self.graph.inputs.append(var)
        self.gates.append(Gate(name, block, kind, size, width, shape, batch_dim, inner))
        return var, axis

    def multiply(self, tensor: str, factor: gs.Tensor, label: str) -> None:
        """Every consumer of ``tensor`` (Shape ops aside) reads tensor·factor instead."""
        source = self.tensors[tensor]
        product = gs.Variable(fresh_name(self.names, f"{tensor}_{label}"), dtype=source.dtype)
        self.aliases[product.name] = tensor
        users = [n for n in list(source.outputs) if n.op != "Shape"]
        self.graph.nodes.append(gs.Node("Mul", product.name, inputs=[source, factor],
                                        outputs=[product]))
        for user in users:
            user.inputs = [product if t is source else t for t in user.inputs]
        if source in self.graph.outputs:
            self.graph.outputs = [product if t is source else t for t in self.graph.outputs]

    def node(self, op: str, inputs: list[gs.Tensor], label: str, dtype,
             attrs: dict | None = None) -> gs.Variable:
        out = gs.Variable(fresh_name(self.names, label), dtype=dtype)
        self.graph.nodes.append(gs.Node(op, out.name, attrs or {}, inputs, [out]))
        return out

    def const(self, label: str, value: np.ndarray) -> gs.Constant:
        return gs.Constant(fresh_name(self.names, label), value)

    def expand(self, gate: gs.Variable, index: np.ndarray, label: str,
               axis: int | None = None, rank: int = 0) -> gs.Variable:
        """A vector over a tensor's last axis: gate[index], with 1 where index is -1. A
        per-sample gate [N, size] becomes [.., N, .., cols] broadcast over a rank-``rank``
        tensor whose batch axis is ``axis``."""
        size = gate.shape[-1]
        idx = self.const(f"{gate.name}_{label}_index",
                         np.where(index < 0, size, index).astype(np.int64))
        if axis is None:
            one = self.const(f"{gate.name}_one", np.ones(1, dtype=gate.dtype))
            padded = self.node("Concat", [gate, one], f"{gate.name}_padded", gate.dtype,
                               {"axis": 0})
            return self.node("Gather", [padded, idx], f"{gate.name}_{label}", gate.dtype,
                             {"axis": 0})
        pads = self.const(f"{gate.name}_pads", np.array([0, 0, 0, 1], dtype=np.int64))
        one = self.const(f"{gate.name}_one", np.ones((), dtype=gate.dtype))
        padded = self.node("Pad", [gate, pads, one], f"{gate.name}_padded", gate.dtype)
        rows = self.node("Gather", [padded, idx], f"{gate.name}_{label}_rows", gate.dtype,
                         {"axis": 1})
        shape = [1] * rank
        shape[axis], shape[-1] = -1, len(index)
        target = self.const(f"{gate.name}_{label}_shape", np.array(shape, dtype=np.int64))
        return self.node("Reshape", [rows, target], f"{gate.name}_{label}", gate.dtype)

    def vector_gate(self, block: str, kind: str, size: int, width: int, tensor: str,
                    index: np.ndarray) -> None:
        """Gate ``tensor``'s last axis: column j is multiplied by gate[index[j]]."""
        gate, axis = self.add_input(block, kind, size, self.dtype_of(tensor), width, tensor)
        rank = len(np.shape(self.analysis.trace[tensor]))
        self.multiply(tensor, self.expand(gate, index, kind, axis, rank), f"{kind}_gated")

    def module(self, block: Block) -> None:
        tensor = block.module_output
        gate, _ = self.add_input(block.name, "module", 0, self.dtype_of(tensor), tensor=tensor)
        self.multiply(tensor, gate, "gated")

    def attention(self, block: AttentionBlock, kinds: set[str]) -> None:
        for kind in ("head", "vo", "qk"):
            if kind in kinds and (kind == "head" or block.channel_prunable):
                tensor, index, size, width = attention_site(self.analysis, block, kind)
                self.vector_gate(block.name, kind, size, width, tensor, index)
        if "send" in kinds and self.nodes[block.anchor].op == "Softmax":
            tensor = self.nodes[block.anchor].outputs[0].name
            if self.batch_axis(tensor) is not None:
                gate, _ = self.add_input(block.name, "send", 0, self.dtype_of(tensor),
                                         tensor=tensor)
                self.multiply(tensor, gate, "send_gated")

    def ffn(self, block: FfnBlock) -> None:
        tensor, index = ffn_site(block)
        self.vector_gate(block.name, "ch", block.channels, 0, tensor, index)


def attention_site(analysis: Analysis, block: AttentionBlock, kind: str
                   ) -> tuple[str, np.ndarray, int, int]:
    """Where a head/vo/qk gate goes: (tensor, index, gate size, channels per head); column
    j of the tensor's last axis belongs to gate entry index[j] (-1: none)."""
    if kind == "qk":
        tensor = after_elementwise(analysis, block.q_proj, block)
        labels = block.flow.labels[tensor]
        cols = labels.reshape(-1, np.shape(labels)[-1])[0]
        q_pos = {int(q): h * block.qk_dim + d for h, row in enumerate(block.q_labels)
                 for d, q in enumerate(row)}
        index = np.array([q_pos.get(int(c), -1) for c in cols])
        return tensor, index, block.heads * block.qk_dim, block.qk_dim
    sink = block.flow.sinks[0]
    v_pos = {int(v): (h, d) for h, row in enumerate(block.v_labels) for d, v in enumerate(row)}
    if kind == "head":
        return sink.input, np.array([v_pos[int(r)][0] for r in sink.rows]), block.heads, 0
    index = np.array([v_pos[int(r)][0] * block.vo_dim + v_pos[int(r)][1] for r in sink.rows])
    return sink.input, index, block.heads * block.vo_dim, block.vo_dim


def ffn_site(block: FfnBlock) -> tuple[str, np.ndarray]:
    """The down-projection input and, per column, its FFN channel."""
    sink = block.flow.sinks[0]
    channel = {int(label): c for row in block.up_labels for c, label in enumerate(row)}
    uf = block.flow.uf
    by_root = {uf.find(k): c for k, c in channel.items()}
    return sink.input, np.array([by_root[uf.find(int(r))] for r in sink.rows])


def after_elementwise(analysis: Analysis, projection: str, block: AttentionBlock) -> str:
    """The projection output after its bias (and other elementwise ops with constants)."""
    view = analysis.view
    tensor = view.node[projection].outputs[0].name
    while True:
        users = [u for u in view.consumers.get(tensor, []) if u.op != "Shape"]
        if len(users) != 1 or users[0].op not in ELEMENTWISE:
            return tensor
        if any(t.name in block.flow.labels for t in view.data_inputs(users[0])
               if t.name != tensor):
            return tensor
        tensor = users[0].outputs[0].name


def batch_trace(analysis: Analysis) -> dict[str, np.ndarray]:
    """A second trace with every dynamic leading input dim doubled (the analysis input
    first, then a different one): comparing it with the analysis trace shows which axis of
    each tensor carries the batch, and how its rows are ordered."""
    specs = input_specs(analysis.model)
    extra = synthetic_feeds(specs, analysis.structure.input_shapes, seed=1)
    feeds = {}
    for spec in specs:
        first = np.asarray(analysis.trace[spec.name])
        dynamic = spec.dims and not isinstance(spec.dims[0], int)
        feeds[spec.name] = np.concatenate([first, extra[spec.name]]) if dynamic else first
    return trace(analysis.model, feeds)


def gate_model(analysis: Analysis, kinds: Iterable[str] = KINDS,
               blocks: Iterable[str] | None = None, per_sample: bool = False) -> GatedModel:
    """The model with gate inputs for the given unit kinds of the given (default: all) blocks.

    ``kinds`` may also hold "send" (a whole-tensor gate on each softmax output, per-sample
    mode only)."""
    kinds = set(kinds)
    wanted = set(blocks) if blocks is not None else None
    gater = Gater(analysis, per_sample)
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
    return GatedModel(model, gater.gates, gater.batch_trace, gater.aliases)
