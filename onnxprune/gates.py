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
from dataclasses import dataclass, replace

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxprune.input_roles import input_roles
from onnxprune.passes import DerivePass, inputs_lost, outputs_changed, unread_inputs
from onnxprune.runtime import synthetic_feeds
from onnxprune.shapes import doubled_batch_feeds, input_specs
from onnxprune.structure.blocks import Block
from onnxprune.structure.discover import Analysis
from onnxprune.structure.graph import fresh_name
from onnxprune.tracing import trace, values_of
from onnxprune.units import BlockCut, GateSite, Plan, UnitKind, kinds_of, unit_kinds


@dataclass(frozen=True)
class Gate:
    """One gate input: the block, the kind of unit it gates, its length (0 = scalar) and,
    for QK/VO channel gates, the channels per head (entry h·width + c is channel c of head h).

    ``shape`` is the input's shape at batch 1; for a per-sample gate ``batch_dim`` is the
    entry of it that grows with the batch (it holds the rows per sample)."""

    input: str
    block: str
    kind: str                    # module, head, qk, vo, ch, or send (score connections)
    size: int
    width: int = 0
    shape: tuple[int, ...] = ()
    batch_dim: int | None = None
    batch_inner: bool = False    # rows of one sample are strided by the batch ([T*B, ...])
    unit: UnitKind | None = None  # the unit kind it gates (None for send)
    dtype: type = np.float32     # the gated tensor's element type (float16 in fp16 models)

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

    def feeds(self, plan: Plan | None = None, dtype: type | None = None,
              batch: int = 1) -> dict[str, np.ndarray]:
        """Gate values: 1 everywhere, 0 for the units the plan removes; each in its gate's
        dtype (the gated tensor's) unless ``dtype`` overrides it."""
        values = {g.input: np.ones(g.shape_at(batch), dtype or g.dtype) for g in self.gates}
        for gate in self.gates:
            cut = plan.cuts.get(gate.block) if plan else None
            if cut is not None:
                _zero_removed(values[gate.input], gate, cut)
        return values


def gate_name(block: str, kind: str) -> str:
    return f"gate.{block}" if kind == "module" else f"gate.{block}.{kind}"


def _zero_removed(value: np.ndarray, gate: Gate, cut: BlockCut) -> None:
    if cut.whole:
        value[...] = 0
    elif gate.unit is not None:
        gate.unit.zero_gate(value, gate.width, cut)


class Gater:
    def __init__(self, analysis: Analysis, per_sample: bool = False):
        self.analysis = analysis
        self.graph = gs.import_onnx(analysis.model)
        self.nodes = {n.name: n for n in self.graph.nodes}
        self.tensors = self.graph.tensors()
        self.names = set(self.tensors)
        self.gates: list[Gate] = []
        self.aliases: dict[str, str] = {}
        self.batch_feeds = batch_feeds(analysis) if per_sample else None
        self.batch_trace = (trace(analysis.model, self.batch_feeds) if per_sample
                            else None)
        self.row_orders: dict[int, tuple[str, int]] = {}   # gate index -> (tensor, axis)

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

    def settle_row_orders(self) -> None:
        """Set ``batch_inner`` of the per-sample gates: sample 0's rows are every other row
        (batch innermost, as in [T*B, D]) rather than the first half when the batch run's
        gated tensor repeats the analysis run's that way. One run of each reads every gated
        tensor."""
        if not self.row_orders:
            return
        names = sorted({tensor for tensor, _ in self.row_orders.values()})
        single = values_of(self.analysis.model, names, analysis_feeds(self.analysis))
        double = values_of(self.analysis.model, names, self.batch_feeds)
        for index, (tensor, axis) in self.row_orders.items():
            one = np.moveaxis(single[tensor], axis, 0)
            two = np.moveaxis(double[tensor], axis, 0)
            inner = (not np.allclose(two[:len(one)], one, rtol=1e-4, atol=1e-6)
                     and bool(np.allclose(two[0::2], one, rtol=1e-4, atol=1e-6)))
            self.gates[index] = replace(self.gates[index], batch_inner=inner)

    def add_input(self, block: str, kind: str, size: int, dtype: type, width: int = 0,
                  tensor: str | None = None, unit: UnitKind | None = None
                  ) -> tuple[gs.Variable, int | None]:
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
        if batch_dim is not None:
            declared[batch_dim] = f"{name}_rows"
            self.row_orders[len(self.gates)] = (tensor, axis)
        var = gs.Variable(name, dtype=dtype, shape=declared)
        self.graph.inputs.append(var)
        self.gates.append(Gate(name, block, kind, size, width, shape, batch_dim, False, unit,
                               np.dtype(dtype).type))
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

    def unit(self, block: Block, kind: UnitKind) -> None:
        """The gate of ``kind`` in ``block``: a scalar on the module output for a whole-module
        kind, else a vector over the kind's site."""
        if kind.whole:
            tensor = block.module_output
            gate, _ = self.add_input(block.name, kind.gate, 0, self.dtype_of(tensor),
                                     tensor=tensor, unit=kind)
            self.multiply(tensor, gate, "gated")
            return
        site = kind.site(self.analysis, block)
        if site.weights:
            self.weights(block, kind, site)
            return
        gate, axis = self.add_input(block.name, kind.gate, site.size,
                                    self.dtype_of(site.tensor), site.width, site.tensor, kind)
        rank = len(np.shape(self.analysis.trace[site.tensor]))
        self.multiply(site.tensor, self.expand(gate, site.index, kind.gate, axis, rank),
                      f"{kind.gate}_gated")

    def weights(self, block: Block, kind: UnitKind, site: GateSite) -> None:
        """A gate on the columns of a fused op's constant weight and bias (one for the whole
        batch: the op's inside has no per-sample axis to gate)."""
        dtype = self.analysis.view.const(site.weights[0]).dtype.type
        gate, _ = self.add_input(block.name, kind.gate, site.size, dtype, site.width,
                                 unit=kind)
        factor = self.expand(gate, site.index, kind.gate)
        for name in site.weights:
            self.multiply(name, factor, f"{kind.gate}_gated")

    def send(self, block: Block) -> None:
        """A whole-tensor gate on the softmax output (SEND's score connections)."""
        anchor = self.analysis.view.node[block.anchor]
        if anchor.op != "Softmax":
            return
        tensor = anchor.outputs[0].name
        if self.batch_axis(tensor) is not None:
            gate, _ = self.add_input(block.name, "send", 0, self.dtype_of(tensor),
                                     tensor=tensor)
            self.multiply(tensor, gate, "send_gated")


def analysis_feeds(analysis: Analysis) -> dict[str, np.ndarray]:
    """The inputs the analysis traced the model at (the trace holds them)."""
    return {spec.name: np.asarray(analysis.trace[spec.name])
            for spec in input_specs(analysis.model)}


def batch_feeds(analysis: Analysis) -> dict[str, np.ndarray]:
    """Inputs with every dynamic leading dim doubled (the analysis input first, then a
    different one): a trace at these, compared with the analysis trace, shows which axis of
    each tensor carries the batch, and how its rows are ordered."""
    specs = input_specs(analysis.model)
    extra = synthetic_feeds(specs, analysis.structure.input_shapes, seed=1,
                            roles=input_roles(analysis.model))
    return doubled_batch_feeds(specs, analysis_feeds(analysis), extra)


class GatePass(DerivePass):
    """Gating as a pass. Pre: the model is the analysed one and the blocks asked for exist.
    Post: graph inputs and outputs as before (gates come after the inputs), and every gate
    input is declared and read."""

    name = "gate"

    def __init__(self, analysis: Analysis, kinds: Iterable[UnitKind] | None = None,
                 blocks: Iterable[str] | None = None, per_sample: bool = False,
                 send: bool = False):
        self.analysis = analysis
        self.kinds = set(unit_kinds() if kinds is None else kinds)
        self.blocks = None if blocks is None else set(blocks)
        self.per_sample = per_sample
        self.send = send

    def pre(self, model: onnx.ModelProto) -> list[str]:
        broken = [] if model is self.analysis.model else ["the model is not the analysed one"]
        known = {b.name for b in self.analysis.structure.blocks}
        return broken + [f"no block {b}" for b in sorted((self.blocks or set()) - known)]

    def apply(self, model: onnx.ModelProto) -> GatedModel:
        gater = Gater(self.analysis, self.per_sample)
        for block in self.analysis.structure.blocks:
            if self.blocks is not None and block.name not in self.blocks:
                continue
            for kind in kinds_of(block):
                if kind in self.kinds and kind.refusal(block) is None:
                    gater.unit(block, kind)
            if self.send and block.flow is not None:
                gater.send(block)
        gater.settle_row_orders()
        gater.graph.cleanup(remove_unused_graph_inputs=False).toposort()
        gated = gs.export_onnx(gater.graph)
        gated.ir_version = model.ir_version
        del gated.opset_import[:]
        gated.opset_import.extend(model.opset_import)
        self.made = [g.input for g in gater.gates]
        return GatedModel(gated, gater.gates, gater.batch_trace, gater.aliases)

    def model_of(self, result: GatedModel) -> onnx.ModelProto:
        return result.model

    def post(self, before: onnx.ModelProto, after: onnx.ModelProto) -> list[str]:
        return outputs_changed(before, after) + inputs_lost(before, after) + \
            unread_inputs(after, self.made)


def gate_model(analysis: Analysis, kinds: Iterable[UnitKind] | None = None,
               blocks: Iterable[str] | None = None, per_sample: bool = False,
               send: bool = False) -> GatedModel:
    """The model with gate inputs for the given unit kinds (default: all) of the given
    (default: all) blocks; ``send`` adds a whole-tensor gate on each softmax output
    (per-sample mode only)."""
    return GatePass(analysis, kinds, blocks, per_sample, send).run(analysis.model)
