"""The cut stage's graph surgery: rewrite the graph without the planned units, with
onnx-graphsurgeon, as a pass whose post-condition is the exactness contract (verify.py).

For sub-module units (heads, QK/VO channels, FFN channels) the label flow of the block says
exactly what to touch: projection columns and output-projection rows are sliced, every
tensor on the labelled path gets its new shape, and with it every reshape/expand target,
slice bound, split size and broadcast operand. Shape ops reading a labelled tensor are
corrected back to the original values, so anything computed from shapes (a 1/sqrt(d)
scale, say) is frozen, and dynamic dims stay dynamic. Whole modules are removed by
turning the residual add into a pass-through and deleting what no longer feeds an output.
"""

from __future__ import annotations

from math import gcd

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxprune import weightstore
from onnxprune.errors import NotPrunableError
from onnxprune.ops import require_rule
from onnxprune.ops.skip_layernorm import is_skip_layernorm, zero_summand
from onnxprune.passes import DerivePass, outputs_changed
from onnxprune.structure.axes import varies_along
from onnxprune.structure.blocks import Block
from onnxprune.structure.discover import Analysis
from onnxprune.structure.graph import fresh_name
from onnxprune.units import LabelRoles, Plan, block_roles
from onnxprune.units.removal import new_shape
from onnxprune.verify import Verification, verify
from onnxprune.weightstore import WeightStore, model_store


class BlockSurgeon:
    """Applies one block's cut to a fresh graph, using the analysis of the original.

    Every node on the labelled path is fixed by its op rule (``onnxprune.ops``), which sees
    this object through the ``registry.Surgeon`` protocol: ``old``/``new`` shapes and the
    public helpers ``const``, ``retarget``, ``kept_positions`` and ``traced``.
    """

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
        self.node_names = set(self.nodes)   # a second cut of a cut model meets its names
        self.old: dict[str, tuple[int, ...]] = {}
        self.new: dict[str, tuple[int, ...]] = {}

    def const(self, name: str, value: np.ndarray) -> gs.Constant:
        """A new constant under a fresh name based on ``name``."""
        return _constant(fresh_name(self.names, name), value)

    def _node(self, op: str, name: str, **kwargs) -> gs.Node:
        """A new node under a fresh name based on ``name``, appended to the graph."""
        node = gs.Node(op, fresh_name(self.node_names, name), **kwargs)
        self.graph.nodes.append(node)
        return node

    def _var(self, name: str) -> gs.Variable:
        return gs.Variable(fresh_name(self.names, name), dtype=np.int64)

    def apply(self) -> None:
        for name, labels in self.flow.labels.items():
            self.old[name] = labels.shape
            self.new[name] = new_shape(labels, self.roles, name)
        for past, present in getattr(self.block, "cache", {}).items():
            # a past cache shrinks as its present does (except along the sequence, where
            # the two differ); read off the present, as a past of length 0 shows nothing
            self.new[past] = tuple(p if po == pn else n for p, po, pn, n in zip(
                self.old[past], self.old[present], self.new[present], self.new[present]))
        for seed in self.block.seeds:
            if self.view.is_projection(self.view.node[seed]):
                self._slice_projection(seed)
            # else a fused op holding its own projection (com.microsoft Attention's packed
            # QKV weight): its op rule's ``fix`` slices it
        for sink in self.flow.sinks:
            self._slice_rows(sink.node, self.roles.keep(sink.rows))
        for operand in self.flow.operands:
            self._slice_operand(operand.node, operand.index)
        for name in self.flow.nodes:
            node = self.nodes[name]
            require_rule(node, self.view.opset).fix(self, node)
        for name in self.flow.shape_reads:
            self._restore_shape_read(self.nodes[name])
        outputs = {t.name for t in self.graph.outputs}
        for name in self.flow.labels:
            tensor = self.tensors.get(name)
            if not isinstance(tensor, gs.Variable):
                continue
            if tensor in self.graph.inputs or name in outputs:
                # a key/value cache (past input, present output): its declared shape
                # follows the cut, dynamic dims stay dynamic
                tensor.shape = declared_shape(tensor.shape, self.old[name], self.new[name])
            else:
                tensor.shape = None

    # -- weights --------------------------------------------------------------------------
    def _slice_projection(self, name: str) -> None:
        node = self.nodes[name]
        out = node.outputs[0].name
        keep = self.roles.keep(self.flow.labels[out].reshape(-1, self.old[out][-1])[0])
        weight = self.view.const(node.inputs[1])
        transposed = node.op == "Gemm" and node.attrs.get("transB", 0)
        sliced = weight[keep, :] if transposed else weight[:, keep]
        node.inputs[1] = self.const(f"{node.inputs[1].name}_pruned", sliced)
        if node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2].name:
            bias = self.view.const(node.inputs[2])
            if bias is not None and bias.size > 1:
                node.inputs[2] = self.const(f"{node.inputs[2].name}_pruned",
                                            bias.reshape(-1)[keep].reshape(
                                                (*bias.shape[:-1], int(keep.sum()))))

    def _slice_rows(self, name: str, keep: np.ndarray) -> None:
        node = self.nodes[name]
        weight = self.view.const(node.inputs[1])
        transposed = node.op == "Gemm" and node.attrs.get("transB", 0)
        sliced = weight[:, keep] if transposed else weight[keep, :]
        node.inputs[1] = self.const(f"{node.inputs[1].name}_pruned", sliced)

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
        node.inputs[index] = self.const(f"{tensor.name}_pruned", value) if value is not None \
            else tensor

    def _gather(self, tensor: gs.Tensor, positions: np.ndarray, axis: int) -> gs.Variable:
        out = gs.Variable(fresh_name(self.names, f"{tensor.name}_kept{axis}"), dtype=tensor.dtype)
        index = self.const(f"{out.name}_index", positions.astype(np.int64))
        self._node("Gather", f"{out.name}_gather", attrs={"axis": axis},
                   inputs=[tensor, index], outputs=[out])
        return out

    # -- shape-carrying ops on the labelled path ------------------------------------------
    def _ratio(self, tensor: str) -> tuple[np.ndarray, np.ndarray]:
        old, new = np.array(self.old[tensor]), np.array(self.new[tensor])
        div = np.array([gcd(int(a), int(b)) or 1 for a, b in zip(old, new)])
        return new // div, old // div

    def retarget(self, node: gs.Node, index: int, out: str) -> None:
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
            node.inputs[index] = self.const(f"{node.name}_shape_pruned", target)
            return
        num, den = self._ratio(out)
        num, den = np.where(special, 1, num), np.where(special, 1, den)
        node.inputs[index] = self._scale_shape(shape_in, num, den, f"{node.name}_target")

    def _scale_shape(self, shape: gs.Tensor, num: np.ndarray, den: np.ndarray,
                     prefix: str) -> gs.Variable:
        mul, out = self._var(f"{prefix}_mul"), self._var(f"{prefix}_div")
        self._node("Mul", f"{prefix}_Mul", inputs=[
            shape, self.const(f"{prefix}_num", num.astype(np.int64))], outputs=[mul])
        self._node("Div", f"{prefix}_Div", inputs=[
            mul, self.const(f"{prefix}_den", den.astype(np.int64))], outputs=[out])
        return out

    def traced(self, tensor: gs.Tensor) -> np.ndarray:
        """The constant or traced value of ``tensor`` as a flat int64 array (a copy)."""
        value = self.view.const(tensor)
        if value is None:
            value = self.trace[tensor.name]
        return np.array(value, np.int64).reshape(-1).copy()

    def kept_positions(self, tensor: str, axis: int) -> np.ndarray:
        """Per position along ``axis`` of labelled ``tensor``: whether anything there is
        kept."""
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
        self._node("Identity", f"{out.name}_restored", inputs=[restored], outputs=[out])


def declared_shape(declared, old: tuple[int, ...], new: tuple[int, ...]):
    """A graph input's or output's declared shape after the cut: the fixed dims that the cut
    shrinks get their new sizes; dynamic (named) dims stay as they are."""
    if declared is None or old == new:
        return declared
    return [n if isinstance(d, int) and o != n else d
            for d, o, n in zip(declared, old, new)]


def remove_module(graph: gs.Graph, block: Block) -> None:
    """The residual add becomes its residual input; the module's subgraph dies."""
    add = next(n for n in graph.nodes if n.name == block.residual_add)
    if is_skip_layernorm(add):  # the add is inside the fused op: the summand becomes zeros
        zero_summand(graph, add, block.module_output)
        return
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
        BlockSurgeon(graph, analysis, block, block_roles(block, cut)).apply()
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    _store_new_weights(graph, model_store(analysis.model))
    model = gs.export_onnx(graph)
    _keep_model_metadata(model, analysis.model)
    return model


def _store_new_weights(graph: gs.Graph, store: WeightStore | None) -> None:
    """A large model's sliced weights go to its store one by one, before the export would
    copy them all into the new model at once (the graph then holds stubs)."""
    if store is None:
        return
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant) and not isinstance(tensor._values, LazyValues) \
                and tensor.values.nbytes >= weightstore.TENSOR_MIN_BYTES:
            tensor._values = LazyValues(store.put_array(tensor.name, tensor.values))


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


class CutPass(DerivePass):
    """The cut as a pass. Pre: the model is the analysed one and the plan names blocks of
    its structure. Post: the graph outputs are as before, and the exactness contract holds:
    cut(x) == gated(x, removed gates = 0) (``verify``, which raises VerificationError)."""

    name = "cut"

    def __init__(self, analysis: Analysis, plan: Plan, rtol: float | None = None,
                 atol: float | None = None):
        self.analysis = analysis
        self.plan = plan
        self.rtol, self.atol = rtol, atol   # None: the dtype's tolerance (verify.tolerance)
        self.verification: Verification | None = None

    def pre(self, model: onnx.ModelProto) -> list[str]:
        broken = [] if model is self.analysis.model else ["the model is not the analysed one"]
        known = {b.name for b in self.analysis.structure.blocks}
        broken += [f"no block {name}" for name in self.plan.cuts if name not in known]
        return broken + [f"{c.block} is cut whole and by units" for c in self.plan.cuts.values()
                         if c.whole and any(c.removed.values())]

    def apply(self, model: onnx.ModelProto) -> onnx.ModelProto:
        return apply_plan(self.analysis, self.plan)

    def _caches(self) -> set[str]:
        """The present (key/value cache) outputs of the blocks cut into."""
        names: set[str] = set()
        for name, cut in self.plan.cuts.items():
            block = self.analysis.structure.block(name)
            if not cut.whole and not cut.empty:
                names |= set(getattr(block, "cache", {}).values())
        return names

    def post(self, before: onnx.ModelProto, after: onnx.ModelProto) -> list[str]:
        broken = outputs_changed(_without_shapes(before, self._caches()),
                                 _without_shapes(after, self._caches()))
        if not broken:
            self.verification = verify(self.analysis, self.plan, after, rtol=self.rtol,
                                       atol=self.atol)
        return broken


def _without_shapes(model: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """``model`` with the declared shapes of outputs ``names`` cleared (the key/value
    caches a cut shrinks), for comparing the graph outputs; ``model`` itself when none."""
    if not names & {o.name for o in model.graph.output}:
        return model
    copy = onnx.ModelProto()
    copy.graph.output.extend(model.graph.output)
    for out in copy.graph.output:
        if out.name in names:
            out.type.tensor_type.ClearField("shape")
    return copy


def cut_verified(analysis: Analysis, plan: Plan, rtol: float | None = None,
                 atol: float | None = None) -> tuple[onnx.ModelProto, Verification]:
    """The cut model, proven exact against the gated original (to ``rtol``/``atol``, by
    default the tolerance of the model's dtype)."""
    cut = CutPass(analysis, plan, rtol, atol)
    model = cut.run(analysis.model)
    return model, cut.verification
