"""The cut: rewrite the graph without the planned units, with onnx-graphsurgeon.

For sub-module units (heads, QK/VO channels, FFN channels) the label flow of the block says
exactly what to touch: projection columns and output-projection rows are sliced, every
tensor on the labelled path gets its new shape, and with it every reshape/expand target,
slice bound, split size and broadcast operand. Shape ops reading a labelled tensor are
corrected back to the original values, so anything computed from shapes (a 1/sqrt(d)
scale, say) is frozen, and dynamic dims stay dynamic. Whole modules are removed by
turning the residual add into a pass-through and deleting what no longer feeds an output.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import gcd

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxprune.errors import NotPrunableError
from onnxprune.structure.axes import varies_along
from onnxprune.structure.blocks import AttentionBlock, Block, FfnBlock
from onnxprune.structure.discover import Analysis
from onnxprune.units import BlockCut, Plan


@dataclass
class LabelRoles:
    """Per label id: its head and channel (-1 where none), and what the plan removes."""

    head: dict[int, int]
    channel: dict[int, int]
    removed: set[int]
    removed_heads: set[int]

    def keep(self, labels: np.ndarray) -> np.ndarray:
        return ~np.isin(labels, list(self.removed))

    def arrays(self, labels: np.ndarray) -> tuple[np.ndarray, ...]:
        """(head, channel, kept, head kept) arrays in the shape of ``labels``."""
        ids, inverse = np.unique(labels, return_inverse=True)
        inverse = inverse.reshape(labels.shape)
        head = np.array([self.head.get(int(i), -1) for i in ids])[inverse]
        chan = np.array([self.channel.get(int(i), -1) for i in ids])[inverse]
        kept = np.array([int(i) not in self.removed for i in ids])[inverse]
        head_kept = ~np.isin(head, list(self.removed_heads))
        return head, chan, kept, head_kept


def attention_roles(block: AttentionBlock, cut: BlockCut) -> LabelRoles:
    roles = LabelRoles({}, {}, set(), set(cut.heads))
    for labels, gone in ((block.q_labels, cut.qk), (block.k_labels, cut.qk),
                         (block.v_labels, cut.vo)):
        for h, row in enumerate(labels):
            for d, label in enumerate(row.tolist()):
                roles.head[label], roles.channel[label] = h, d
                if h in cut.heads or d in gone.get(h, ()):
                    roles.removed.add(label)
    for token, h in block.tokens.items():
        roles.head[token] = h
        if h in cut.heads:
            roles.removed.add(token)
    return roles


def ffn_roles(block: FfnBlock, cut: BlockCut) -> LabelRoles:
    roles = LabelRoles({}, {}, set(), set())
    for row in block.up_labels:
        for c, label in enumerate(row.tolist()):
            roles.channel[label] = c
            if c in cut.channels:
                roles.removed.add(label)
    return roles


def new_shape(labels: np.ndarray, roles: LabelRoles, tensor: str) -> tuple[int, ...]:
    """The shape a labelled tensor has after the cut.

    Along an axis that carries heads only, a fibre keeps the positions of kept heads; along
    one that carries channels, each fibre through a kept head keeps its kept channels. All
    fibres must agree, or the cut tensor would not be rectangular.
    """
    head, chan, kept, head_kept = roles.arrays(labels)
    shape = []
    for axis, size in enumerate(labels.shape):
        hv, cv = varies_along(head, axis), varies_along(chan, axis)
        if not hv and not cv:
            shape.append(size)
            continue
        counts = (kept if cv else head_kept).sum(axis=axis)
        values = np.unique(counts[counts > 0] if cv else counts)
        if len(values) != 1:
            raise NotPrunableError(f"the cut would leave tensor {tensor!r} ragged along axis "
                                   f"{axis} (here the Q, K and V widths are coupled)")
        shape.append(int(values[0]))
    return tuple(shape)


class BlockSurgeon:
    """Applies one block's cut to a fresh graph, using the analysis of the original."""

    def __init__(self, graph: gs.Graph, analysis: Analysis, block: Block, roles: LabelRoles):
        self.graph = graph
        self.nodes = {n.name: n for n in graph.nodes}
        self.tensors = graph.tensors()
        self.view = analysis.view
        self.trace = analysis.trace
        self.block = block
        self.flow = block.flow
        self.roles = roles
        self.names = set(self.tensors)
        self.old: dict[str, tuple[int, ...]] = {}
        self.new: dict[str, tuple[int, ...]] = {}

    def _const(self, name: str, value: np.ndarray) -> gs.Constant:
        return _constant(fresh_name(self.names, name), value)

    def _var(self, name: str) -> gs.Variable:
        return gs.Variable(fresh_name(self.names, name), dtype=np.int64)

    def apply(self) -> None:
        for name, labels in self.flow.labels.items():
            self.old[name] = labels.shape
            self.new[name] = new_shape(labels, self.roles, name)
        for seed in self.block.seeds:
            self._slice_projection(seed)
        for sink in self.flow.sinks:
            self._slice_rows(sink.node, self.roles.keep(sink.rows))
        for operand in self.flow.operands:
            self._slice_operand(operand.node, operand.index)
        for name in self.flow.nodes:
            node = self.nodes[name]
            fix = getattr(self, f"_fix_{node.op.lower()}", None)
            if fix is not None:
                fix(node)
        for name in self.flow.shape_reads:
            self._restore_shape_read(self.nodes[name])
        for name in self.flow.labels:
            tensor = self.tensors.get(name)
            if isinstance(tensor, gs.Variable) and tensor not in self.graph.inputs:
                tensor.shape = None

    # -- weights --------------------------------------------------------------------------
    def _slice_projection(self, name: str) -> None:
        node = self.nodes[name]
        out = node.outputs[0].name
        keep = self.roles.keep(self.flow.labels[out].reshape(-1, self.old[out][-1])[0])
        weight = self.view.const(node.inputs[1])
        transposed = node.op == "Gemm" and node.attrs.get("transB", 0)
        sliced = weight[keep, :] if transposed else weight[:, keep]
        node.inputs[1] = self._const(f"{node.inputs[1].name}_pruned", sliced)
        if node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2].name:
            bias = self.view.const(node.inputs[2])
            if bias is not None and bias.size > 1:
                node.inputs[2] = self._const(f"{node.inputs[2].name}_pruned",
                                           bias.reshape(-1)[keep].reshape(
                                               (*bias.shape[:-1], int(keep.sum()))))

    def _slice_rows(self, name: str, keep: np.ndarray) -> None:
        node = self.nodes[name]
        weight = self.view.const(node.inputs[1])
        transposed = node.op == "Gemm" and node.attrs.get("transB", 0)
        sliced = weight[:, keep] if transposed else weight[keep, :]
        node.inputs[1] = self._const(f"{node.inputs[1].name}_pruned", sliced)

    def _slice_operand(self, name: str, index: int) -> None:
        node = self.nodes[name]
        tensor = node.inputs[index]
        out = node.outputs[0].name
        labels = self.flow.labels[out]
        keep = self.roles.keep(labels)
        value = self.view.const(tensor)
        shape = np.shape(value) if value is not None else np.shape(self.trace[tensor.name])
        offset = labels.ndim - len(shape)
        for i, dim in enumerate(shape):
            axis = offset + i
            if dim == 1 or not varies_along(labels, axis):
                continue
            positions = np.flatnonzero(np.any(np.moveaxis(keep, axis, 0).reshape(dim, -1), 1))
            if len(positions) != self.new[out][axis]:
                raise NotPrunableError(f"operand {tensor.name!r} of {name} cannot be sliced "
                                       "for this cut")
            if value is not None:
                value = np.take(value, positions, axis=i)
            else:
                tensor = self._gather(tensor, positions, i)
        node.inputs[index] = self._const(f"{tensor.name}_pruned", value) if value is not None \
            else tensor

    def _gather(self, tensor: gs.Tensor, positions: np.ndarray, axis: int) -> gs.Variable:
        out = gs.Variable(fresh_name(self.names, f"{tensor.name}_kept{axis}"), dtype=tensor.dtype)
        index = self._const(f"{out.name}_index", positions.astype(np.int64))
        self.graph.nodes.append(gs.Node("Gather", f"{out.name}_gather", {"axis": axis},
                                        [tensor, index], [out]))
        return out

    # -- shape-carrying ops on the labelled path ------------------------------------------
    def _ratio(self, tensor: str) -> tuple[np.ndarray, np.ndarray]:
        old, new = np.array(self.old[tensor]), np.array(self.new[tensor])
        div = np.array([gcd(int(a), int(b)) or 1 for a, b in zip(old, new)])
        return new // div, old // div

    def _retarget(self, node: gs.Node, index: int, out: str) -> None:
        """Make a shape input (Reshape, Expand) produce the cut output shape."""
        if self.old[out] == self.new[out]:
            return
        shape_in = node.inputs[index]
        traced = np.asarray(self.trace[shape_in.name] if shape_in.name in self.trace
                            else self.view.const(shape_in)).astype(np.int64)
        special = (traced <= 0) | (traced != np.array(self.old[out]))
        const = self.view.const(shape_in)
        if const is not None:
            target = np.where(special, const, np.array(self.new[out])).astype(np.int64)
            node.inputs[index] = self._const(f"{node.name}_shape_pruned", target)
            return
        num, den = self._ratio(out)
        num, den = np.where(special, 1, num), np.where(special, 1, den)
        node.inputs[index] = self._scale_shape(shape_in, num, den, f"{node.name}_target")

    def _scale_shape(self, shape: gs.Tensor, num: np.ndarray, den: np.ndarray,
                     prefix: str) -> gs.Variable:
        mul, out = self._var(f"{prefix}_mul"), self._var(f"{prefix}_div")
        self.graph.nodes.append(gs.Node("Mul", f"{prefix}_Mul", inputs=[
            shape, self._const(f"{prefix}_num", num.astype(np.int64))], outputs=[mul]))
        self.graph.nodes.append(gs.Node("Div", f"{prefix}_Div", inputs=[
            mul, self._const(f"{prefix}_den", den.astype(np.int64))], outputs=[out]))
        return out

    def _fix_reshape(self, node: gs.Node) -> None:
        self._retarget(node, 1, node.outputs[0].name)

    def _fix_attention(self, node: gs.Node) -> None:
        """Freeze the default 1/sqrt(d) scale and update head counts of the 3-D form."""
        q = node.inputs[0].name
        if not node.attrs.get("scale"):
            width = self.old[q][-1]
            if len(self.old[q]) == 3:
                width //= node.attrs["q_num_heads"]
            node.attrs["scale"] = float(1.0 / np.sqrt(width))
        for key in ("q_num_heads", "kv_num_heads"):
            if node.attrs.get(key):
                kept = len(self.block.q_labels) - len(self.roles.removed_heads)
                node.attrs[key] = kept if key == "q_num_heads" else \
                    node.attrs[key] * kept // len(self.block.q_labels)

    def _fix_expand(self, node: gs.Node) -> None:
        self._retarget(node, 1, node.outputs[0].name)

    def _fix_slice(self, node: gs.Node) -> None:
        data = node.inputs[0].name
        if self.old[data] == self.new[data]:
            return
        ndim = len(self.old[data])
        starts, ends = self._traced(node.inputs[1]), self._traced(node.inputs[2])
        axes = self._traced(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3].name \
            else np.arange(len(starts))
        axes = axes.astype(np.int64) % ndim
        changed = [self.old[data][a] != self.new[data][a] for a in axes]
        computed = any(self.view.const(t) is None for t in node.inputs[1:4] if t.name)
        if computed and not all(changed):
            raise NotPrunableError(f"Slice node {node.name}: computed bounds on a pruned axis "
                                   "and another axis")
        for i, axis in enumerate(axes):
            if changed[i]:
                kept = self._kept_positions(data, int(axis))
                lo, hi, _ = slice(int(starts[i]), int(ends[i])).indices(self.old[data][axis])
                starts[i], ends[i] = kept[:lo].sum(), kept[:hi].sum()
        # bounds on a feature axis are static even when computed from shapes: freeze them
        node.inputs[1] = self._const(f"{node.name}_starts_pruned", starts)
        node.inputs[2] = self._const(f"{node.name}_ends_pruned", ends)
        if len(node.inputs) > 3 and node.inputs[3].name:
            node.inputs[3] = self._const(f"{node.name}_axes_pruned", axes)

    def _traced(self, tensor: gs.Tensor) -> np.ndarray:
        value = self.view.const(tensor)
        if value is None:
            value = self.trace[tensor.name]
        return np.array(value, np.int64).reshape(-1).copy()

    def _fix_split(self, node: gs.Node) -> None:
        data = node.inputs[0].name
        axis = node.attrs.get("axis", 0) % len(self.old[data])
        if self.old[data][axis] == self.new[data][axis]:
            return
        sizes = np.array([self.new[o.name][axis] for o in node.outputs], np.int64)
        node.attrs.pop("num_outputs", None)
        if "split" in node.attrs:
            node.attrs["split"] = sizes.tolist()
        else:
            split = self._const(f"{node.name}_split_pruned", sizes)
            node.inputs = [node.inputs[0], split]

    def _fix_gather(self, node: gs.Node) -> None:
        data = node.inputs[0].name
        axis = node.attrs.get("axis", 0) % len(self.old[data])
        if self.old[data][axis] == self.new[data][axis]:
            return
        index = self.view.const(node.inputs[1])
        kept = self._kept_positions(data, axis)
        if index is None or not kept[np.asarray(index)].all():
            raise NotPrunableError(f"Gather node {node.name} selects pruned positions")
        remap = np.cumsum(kept) - 1
        node.inputs[1] = self._const(f"{node.name}_index_pruned",
                                   remap[np.asarray(index)].astype(np.int64))

    def _kept_positions(self, tensor: str, axis: int) -> np.ndarray:
        keep = self.roles.keep(self.flow.labels[tensor])
        return np.any(np.moveaxis(keep, axis, 0).reshape(keep.shape[axis], -1), axis=1)

    def _restore_shape_read(self, node: gs.Node) -> None:
        """Shape(x') corrected back to Shape(x): shape-derived values stay as exported."""
        data = node.inputs[0].name
        if self.old[data] == self.new[data]:
            return
        num, den = self._ratio(data)
        start, end = node.attrs.get("start", 0), node.attrs.get("end", None)
        num, den = num[start:end], den[start:end]
        if np.all(num == den):
            return
        out = node.outputs[0]
        raw = self._var(f"{out.name}_cut")
        node.outputs = [raw]
        restored = self._scale_shape(raw, den, num, f"{out.name}_restore")
        self.graph.nodes.append(gs.Node("Identity", f"{out.name}_restored", inputs=[restored],
                                        outputs=[out]))


def remove_module(graph: gs.Graph, block: Block) -> None:
    """The residual add becomes its residual input; the module's subgraph dies."""
    add = next(n for n in graph.nodes if n.name == block.residual_add)
    residual = next(t for t in add.inputs if t.name != block.module_output)
    add.op, add.inputs, add.attrs = "Identity", [residual], {}


def apply_plan(analysis: Analysis, plan: Plan) -> onnx.ModelProto:
    """The cut model (not yet verified; see verify.py)."""
    graph = gs.import_onnx(analysis.model)
    for name, cut in plan.cuts.items():
        if cut.empty:
            continue
        block = analysis.structure.block(name)
        if cut.whole:
            remove_module(graph, block)
            continue
        roles = attention_roles(block, cut) if isinstance(block, AttentionBlock) \
            else ffn_roles(block, cut)
        BlockSurgeon(graph, analysis, block, roles).apply()
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    model = gs.export_onnx(graph)
    _keep_model_metadata(model, analysis.model)
    return model


def _keep_model_metadata(model: onnx.ModelProto, original: onnx.ModelProto) -> None:
    model.ir_version = original.ir_version
    del model.opset_import[:]
    model.opset_import.extend(original.opset_import)
    model.producer_name = original.producer_name
    model.producer_version = original.producer_version
    del model.metadata_props[:]
    model.metadata_props.extend(original.metadata_props)
    del model.graph.value_info[:]


def _constant(name: str, value: np.ndarray) -> gs.Constant:
    return gs.Constant(name, np.ascontiguousarray(value))


def fresh_name(taken: set[str], name: str) -> str:
    """``name``, or ``name_<n>`` when taken; the result is added to ``taken``."""
    candidate, n = name, 1
    while candidate in taken:
        candidate, n = f"{name}_{n}", n + 1
    taken.add(candidate)
    return candidate
