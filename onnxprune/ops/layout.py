"""Layout ops: they only move elements, so the engine runs them on the label arrays with the
traced shapes and index values; the cut rewrites their shape, bound, size and index inputs."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.errors import NotPrunableError
from onnxprune.ops.registry import LabelEngine, OpRule, Surgeon, register
from onnxprune.structure.labels import Flow, varies_along

PASS_THROUGH = frozenset({"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Dropout",
                          "Cast", "CastLike"})


def _optional_input(node: gs.Node, index: int) -> gs.Tensor | None:
    return node.inputs[index] if len(node.inputs) > index and node.inputs[index].name else None


@register
class PassThrough(OpRule):
    """Ops whose output holds the input's elements in order, in the traced output shape."""

    ops = PASS_THROUGH - {"Reshape"}

    def propagate(self, engine: LabelEngine, node: gs.Node, flow: Flow) -> None:
        labels, data = flow.labels, node.inputs[0]
        if data.name not in labels or any(t.name in labels for t in node.inputs[1:]):
            raise NotPrunableError(f"{node.op} node {node.name}: labelled shape input")
        out = node.outputs[0].name
        labels[out] = labels[data.name].reshape(engine.shape(out))

    def fix(self, surgeon: Surgeon, node: gs.Node) -> None:
        """Axes and casts name no sizes: nothing to change."""


@register
class Reshape(PassThrough):
    ops = frozenset({"Reshape"})

    def fix(self, surgeon: Surgeon, node: gs.Node) -> None:
        surgeon.retarget(node, 1, node.outputs[0].name)


@register
class Transpose(OpRule):
    ops = frozenset({"Transpose"})

    def propagate(self, engine: LabelEngine, node: gs.Node, flow: Flow) -> None:
        perm = node.attrs.get("perm")
        flow.labels[node.outputs[0].name] = np.transpose(flow.labels[node.inputs[0].name], perm)

    def fix(self, surgeon: Surgeon, node: gs.Node) -> None:
        """A permutation names no sizes."""


COPY_SHIFT = 32   # copy r of label x (grouped-query repeats) is x + (r + 1) << COPY_SHIFT


@register
class Expand(OpRule):
    """Broadcast. When the engine asks for copies (``engine.copy_of``, a dict, set for
    grouped-query blocks), a repeat of heads, as ``repeat_kv`` exports it ([B, G, 1, T, d]
    expanded to [B, G, n, T, d]: a size-1 axis right after an axis the labels vary along),
    gives each copy its own labels and records copy -> original, so that query heads
    sharing a key/value head can be told apart after the repeat. Without copies, a
    broadcast keeps the labels."""

    ops = frozenset({"Expand"})
    since = 8

    def propagate(self, engine: LabelEngine, node: gs.Node, flow: Flow) -> None:
        out = node.outputs[0].name
        data = flow.labels[node.inputs[0].name]
        shape = engine.shape(out)
        labels = np.broadcast_to(data, shape).copy()
        copies = getattr(engine, "copy_of", None)
        if copies is not None:
            axis = _repeat_axis(data, shape)
            if axis is not None:
                offsets = (np.arange(shape[axis], dtype=np.int64) + 1) << COPY_SHIFT
                view = [1] * len(shape)
                view[axis] = shape[axis]
                fresh = labels + offsets.reshape(view)
                copies.update(zip(fresh.ravel().tolist(), labels.ravel().tolist()))
                labels = fresh
        flow.labels[out] = labels

    def fix(self, surgeon: Surgeon, node: gs.Node) -> None:
        surgeon.retarget(node, 1, node.outputs[0].name)


def _repeat_axis(data: np.ndarray, shape: tuple[int, ...]) -> int | None:
    """The axis a head repeat expands: size 1 in ``data`` (at the output's rank), larger in
    ``shape``, right after the axis of the key/value heads (the labels vary along it, or it
    holds one head: multi-query attention); None when there is none."""
    if data.ndim != len(shape) or np.any(data < 0) or np.any(data >= 1 << COPY_SHIFT):
        return None
    for axis in range(2, data.ndim):
        if data.shape[axis] == 1 < shape[axis] and (varies_along(data, axis - 1)
                                                    or data.shape[axis - 1] == 1):
            return axis
    return None


@register
class Slice(OpRule):
    """Slice with bounds as inputs (opset 10 on; before that they were attributes)."""

    ops = frozenset({"Slice"})
    since = 10

    def propagate(self, engine: LabelEngine, node: gs.Node, flow: Flow) -> None:
        labels = flow.labels
        data = labels[node.inputs[0].name]
        if any(t.name in labels for t in node.inputs[1:]):
            raise NotPrunableError(f"Slice node {node.name}: labelled slice parameters")
        starts = engine.value(node.inputs[1])
        ends = engine.value(node.inputs[2])
        axes_in, steps_in = _optional_input(node, 3), _optional_input(node, 4)
        axes = engine.value(axes_in) if axes_in is not None else np.arange(len(starts))
        steps = engine.value(steps_in) if steps_in is not None \
            else np.ones(len(starts), np.int64)
        index = [slice(None)] * data.ndim
        for s, e, a, st in zip(starts, ends, axes, steps):
            index[int(a) % data.ndim] = slice(int(s), int(e), int(st))
        labels[node.outputs[0].name] = data[tuple(index)]

    def fix(self, surgeon: Surgeon, node: gs.Node) -> None:
        data = node.inputs[0].name
        old, new = surgeon.old[data], surgeon.new[data]
        if old == new:
            return
        starts, ends = surgeon.traced(node.inputs[1]), surgeon.traced(node.inputs[2])
        axes_in = _optional_input(node, 3)
        axes = surgeon.traced(axes_in) if axes_in is not None else np.arange(len(starts))
        axes = axes.astype(np.int64) % len(old)
        changed = [old[a] != new[a] for a in axes]
        computed = any(surgeon.view.const(t) is None for t in node.inputs[1:4] if t.name)
        if computed and not any(changed):
            # bounds computed from shapes on axes the cut keeps (rotate_half slicing the
            # head_dim of RoPE while heads are cut): shape reads are restored, so they hold
            return
        if computed and not all(changed):
            raise NotPrunableError(f"Slice node {node.name}: computed bounds on a pruned axis "
                                   "and another axis")
        for i, axis in enumerate(axes):
            if changed[i]:
                kept = surgeon.kept_positions(data, int(axis))
                lo, hi, _ = slice(int(starts[i]), int(ends[i])).indices(old[axis])
                starts[i], ends[i] = kept[:lo].sum(), kept[:hi].sum()
        # bounds on a feature axis are static even when computed from shapes: freeze them
        node.inputs[1] = surgeon.const(f"{node.name}_starts_pruned", starts)
        node.inputs[2] = surgeon.const(f"{node.name}_ends_pruned", ends)
        if axes_in is not None:
            node.inputs[3] = surgeon.const(f"{node.name}_axes_pruned", axes)


@register
class Split(OpRule):
    ops = frozenset({"Split"})

    def propagate(self, engine: LabelEngine, node: gs.Node, flow: Flow) -> None:
        data = flow.labels[node.inputs[0].name]
        axis = node.attrs.get("axis", 0) % data.ndim
        sizes = [engine.shape(o.name)[axis] for o in node.outputs]
        bounds = np.cumsum(sizes)[:-1]
        for out, part in zip(node.outputs, np.split(data, bounds, axis=axis)):
            flow.labels[out.name] = part

    def fix(self, surgeon: Surgeon, node: gs.Node) -> None:
        data = node.inputs[0].name
        axis = node.attrs.get("axis", 0) % len(surgeon.old[data])
        if surgeon.old[data][axis] == surgeon.new[data][axis]:
            return
        sizes = np.array([surgeon.new[o.name][axis] for o in node.outputs], np.int64)
        node.attrs.pop("num_outputs", None)
        if "split" in node.attrs:
            node.attrs["split"] = sizes.tolist()
        else:
            split = surgeon.const(f"{node.name}_split_pruned", sizes)
            node.inputs = [node.inputs[0], split]


@register
class Gather(OpRule):
    ops = frozenset({"Gather"})

    def propagate(self, engine: LabelEngine, node: gs.Node, flow: Flow) -> None:
        data = node.inputs[0]
        if data.name not in flow.labels:
            raise NotPrunableError(f"Gather node {node.name}: labelled indices")
        idx = engine.value(node.inputs[1]).astype(np.int64)
        axis = node.attrs.get("axis", 0)
        flow.labels[node.outputs[0].name] = np.take(flow.labels[data.name], idx, axis=axis)

    def fix(self, surgeon: Surgeon, node: gs.Node) -> None:
        data = node.inputs[0].name
        axis = node.attrs.get("axis", 0) % len(surgeon.old[data])
        if surgeon.old[data][axis] == surgeon.new[data][axis]:
            return
        index = surgeon.view.const(node.inputs[1])
        kept = surgeon.kept_positions(data, axis)
        if index is None or not kept[np.asarray(index)].all():
            raise NotPrunableError(f"Gather node {node.name} selects pruned positions")
        remap = np.cumsum(kept) - 1
        node.inputs[1] = surgeon.const(f"{node.name}_index_pruned",
                                       remap[np.asarray(index)].astype(np.int64))


@register
class Concat(OpRule):
    ops = frozenset({"Concat"})

    def propagate(self, engine: LabelEngine, node: gs.Node, flow: Flow) -> None:
        axis = node.attrs["axis"]
        cache = past_cache_input(engine.view, node, flow)
        parts = []
        for t in node.inputs:
            if t.name in flow.labels:
                parts.append(flow.labels[t.name])
            elif cache is not None and t.name == cache[0][-1]:
                # a key/value cache (past input) continues the new keys/values along the
                # sequence axis: its entries belong to the same heads and channels; the
                # past input itself and its copies on the way get the same labels
                labels = np.take(flow.labels[cache[1]], [0], axis=axis)
                labels = np.repeat(labels, engine.shape(t.name)[axis], axis=axis)
                for name in cache[0]:
                    flow.labels[name] = labels
                parts.append(labels)
            else:
                parts.append(np.full(engine.shape(t.name), -1, np.int64))
        flow.labels[node.outputs[0].name] = np.concatenate(parts, axis=axis)

    def fix(self, surgeon: Surgeon, node: gs.Node) -> None:
        """The output size follows from the (already cut) inputs."""


def past_cache_input(view, node: gs.Node, flow: Flow) -> tuple[list[str], str] | None:
    """([past input, its copies...], new keys/values) when ``node`` is the Concat of a
    key/value cache: two inputs, the first a graph input (or an Identity / one-input Concat
    copy of one) without labels (the past), the second labelled (the new keys or values)
    with labels that do not vary along the concat axis (the sequence)."""
    if node.op != "Concat" or len(node.inputs) != 2:
        return None
    past, new = node.inputs
    chain = view.graph_input_behind(past.name)
    if chain is None or any(n in flow.labels for n in chain) or new.name not in flow.labels:
        return None
    labels = flow.labels[new.name]
    axis = node.attrs["axis"] % labels.ndim
    if varies_along(labels, axis) or not np.any(labels >= 0):
        return None
    return chain, new.name
