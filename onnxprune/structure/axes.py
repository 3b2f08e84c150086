"""Coupled-axis tracking: follow weight columns through the graph by executing the layout ops
on integer label arrays.

A label is an integer id for one column of a projection weight (or a head token, see
below); -1 marks an element no tracked column reaches. Starting from the outputs of the
seed projections, every op downstream is executed on the labels with the shapes and index
values of a real ONNX Runtime trace: reshapes, transposes, splits, gathers and slices need
no pattern matching because numpy does exactly what the op does. The walk records what a
cut must touch: matmuls that contract a labelled axis (weights to slice, or the Q·Kᵀ and
A·V contractions of attention), constant and computed operands that broadcast along a
labelled axis, and Shape ops that read a labelled tensor. Anything it cannot prove raises
``NotPrunableError`` with the op named.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.errors import NotPrunableError
from onnxprune.structure.graph import ELEMENTWISE, GraphView

_PASS_THROUGH = frozenset({"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Dropout",
                           "Cast", "CastLike"})


TOKEN_BASE = 1 << 40  # head tokens (attention-weight labels) count up from here


class UnionFind:
    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, a: int) -> int:
        root = a
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while a != root:
            self.parent[a], a = root, self.parent.get(a, a)
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


@dataclass
class Sink:
    """A matmul with a constant weight that contracts a labelled axis: ``rows[r]`` is the
    label of weight row r (of the effective [K, N] matrix)."""

    node: str
    input: str
    rows: np.ndarray


@dataclass
class Contraction:
    """A matmul of two labelled tensors, flattened over its batch positions.

    kind "channel": Q·Kᵀ, ``left[p]`` and ``right[p]`` are the contracted labels at batch
    position p, paired index by index. kind "mix": A·V, ``left[p]`` is the head token of the
    attention weights at p and ``right[p]`` the labels of V's last axis.
    """

    node: str
    kind: str
    left: np.ndarray
    right: np.ndarray
    token_of: dict[tuple[int, ...], int] = field(default_factory=dict)


@dataclass
class Operand:
    """A non-labelled input that broadcasts along a labelled axis; a cut must slice it."""

    node: str
    index: int


@dataclass
class Flow:
    labels: dict[str, np.ndarray]
    sinks: list[Sink]
    contractions: list[Contraction]
    operands: list[Operand]
    shape_reads: list[str]
    nodes: list[str]
    uf: UnionFind


def column_labels(shape: tuple[int, ...], base: int) -> np.ndarray:
    """Labels of a projection output: column c of the weight gets id base + c."""
    cols = np.arange(base, base + shape[-1], dtype=np.int64)
    return np.broadcast_to(cols, shape).copy()


def varies_along(labels: np.ndarray, axis: int) -> bool:
    if labels.shape[axis] < 2:
        return False
    return bool(np.any(np.diff(labels, axis=axis) != 0))


class LabelPropagator:
    def __init__(self, view: GraphView, trace: dict[str, np.ndarray]):
        self.view = view
        self.trace = trace
        self._next_token = TOKEN_BASE

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.trace:
            raise NotPrunableError(f"tensor {name!r} has no traced value")
        return tuple(np.shape(self.trace[name]))

    def value(self, tensor: gs.Tensor) -> np.ndarray:
        const = self.view.const(tensor)
        if const is not None:
            return const
        if tensor.name not in self.trace:
            raise NotPrunableError(f"tensor {tensor.name!r} has no traced value")
        return np.asarray(self.trace[tensor.name])

    def propagate(self, seeds: dict[str, np.ndarray]) -> Flow:
        flow = Flow(dict(seeds), [], [], [], [], [], UnionFind())
        first = min(self.view.order[self.view.producer[s].name] for s in seeds)
        for node in self.view.nodes[first:]:
            if not any(t.name in flow.labels for t in node.inputs):
                continue
            if node.op == "Shape":
                flow.shape_reads.append(node.name)
                continue
            if node.op == "Size":
                raise NotPrunableError(f"Size node {node.name} reads a prunable tensor")
            self._step(node, flow)
            flow.nodes.append(node.name)
        leaked = self.view.output_names & flow.labels.keys()
        if leaked:
            raise NotPrunableError(f"prunable axis reaches graph output {sorted(leaked)[0]!r}")
        return flow

    def _step(self, node: gs.Node, flow: Flow) -> None:
        op = node.op
        labels = flow.labels
        data = node.inputs[0]
        if op in ("MatMul", "Gemm"):
            self._matmul(node, flow)
        elif op == "Attention":
            self._attention_op(node, flow)
        elif op in _PASS_THROUGH:
            if data.name not in labels or any(t.name in labels for t in node.inputs[1:]):
                raise NotPrunableError(f"{op} node {node.name}: labelled shape input")
            out = node.outputs[0].name
            labels[out] = labels[data.name].reshape(self.shape(out))
        elif op == "Transpose":
            perm = node.attrs.get("perm")
            labels[node.outputs[0].name] = np.transpose(labels[data.name], perm)
        elif op == "Expand":
            out = node.outputs[0].name
            labels[out] = np.broadcast_to(labels[data.name], self.shape(out)).copy()
        elif op == "Slice":
            self._slice(node, labels)
        elif op == "Split":
            self._split(node, labels)
        elif op == "Gather":
            if data.name not in labels:
                raise NotPrunableError(f"Gather node {node.name}: labelled indices")
            idx = self.value(node.inputs[1]).astype(np.int64)
            axis = node.attrs.get("axis", 0)
            labels[node.outputs[0].name] = np.take(labels[data.name], idx, axis=axis)
        elif op == "Concat":
            parts = [labels[t.name] if t.name in labels
                     else np.full(self.shape(t.name), -1, np.int64) for t in node.inputs]
            labels[node.outputs[0].name] = np.concatenate(parts, axis=node.attrs["axis"])
        elif op in ("Softmax", "LogSoftmax"):
            axis = node.attrs.get("axis", -1)
            if varies_along(labels[data.name], axis):
                raise NotPrunableError(f"{op} node {node.name} normalises over a prunable axis")
            labels[node.outputs[0].name] = labels[data.name]
        elif op in ELEMENTWISE:
            self._elementwise(node, flow)
        else:
            raise NotPrunableError(f"{op} node {node.name} on a prunable path is not supported")

    def _elementwise(self, node: gs.Node, flow: Flow) -> None:
        out = node.outputs[0].name
        shape = self.shape(out)
        merged = np.full(shape, -1, np.int64)
        for t in node.inputs:
            if t.name in flow.labels:
                arr = np.broadcast_to(flow.labels[t.name], shape)
                both = (merged >= 0) & (arr >= 0) & (merged != arr)
                if both.any():
                    for a, b in np.unique(np.stack([merged[both], arr[both]], 1), axis=0):
                        flow.uf.union(int(a), int(b))
                merged = np.where(merged >= 0, merged, arr)
        for i, t in enumerate(node.inputs):
            if t.name and t.name not in flow.labels and self._broadcasts_along_labels(
                    t, merged):
                flow.operands.append(Operand(node.name, i))
        flow.labels[out] = merged

    def _broadcasts_along_labels(self, tensor: gs.Tensor, merged: np.ndarray) -> bool:
        shape = np.shape(self.value(tensor))
        offset = merged.ndim - len(shape)
        return any(dim > 1 and varies_along(merged, offset + i) for i, dim in enumerate(shape))

    def _slice(self, node: gs.Node, labels: dict[str, np.ndarray]) -> None:
        data = labels[node.inputs[0].name]
        if any(t.name in labels for t in node.inputs[1:]):
            raise NotPrunableError(f"Slice node {node.name}: labelled slice parameters")
        starts = self.value(node.inputs[1])
        ends = self.value(node.inputs[2])
        ndim = data.ndim
        axes = self.value(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3].name \
            else np.arange(len(starts))
        steps = self.value(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4].name \
            else np.ones(len(starts), np.int64)
        index = [slice(None)] * ndim
        for s, e, a, st in zip(starts, ends, axes, steps):
            index[int(a) % ndim] = slice(int(s), int(e), int(st))
        labels[node.outputs[0].name] = data[tuple(index)]

    def _split(self, node: gs.Node, labels: dict[str, np.ndarray]) -> None:
        data = labels[node.inputs[0].name]
        axis = node.attrs.get("axis", 0) % data.ndim
        sizes = [self.shape(o.name)[axis] for o in node.outputs]
        bounds = np.cumsum(sizes)[:-1]
        for out, part in zip(node.outputs, np.split(data, bounds, axis=axis)):
            labels[out.name] = part

    def _matmul(self, node: gs.Node, flow: Flow) -> None:
        a, b = node.inputs[0], node.inputs[1]
        la, lb = flow.labels.get(a.name), flow.labels.get(b.name)
        weight = self.view.weight_of(node)
        if la is not None and lb is None and weight is not None:
            flow.sinks.append(self._sink(node, la))
            return
        if node.op != "MatMul" or la is None or lb is None:
            raise NotPrunableError(f"{node.op} node {node.name}: unsupported use of a prunable "
                                   "tensor (one side computed, the other not tracked)")
        self._contract(node, flow, la, lb)

    def _sink(self, node: gs.Node, la: np.ndarray) -> Sink:
        if not varies_along(la, -1) and la.shape[-1] > 1:
            raise NotPrunableError(f"{node.op} node {node.name} multiplies a prunable axis "
                                   "that it does not contract")
        rows = la.reshape(-1, la.shape[-1])
        if np.any(rows != rows[0]):
            raise NotPrunableError(f"{node.op} node {node.name}: contracted labels differ "
                                   "across positions")
        return Sink(node.name, node.inputs[0].name, rows[0].copy())

    def _contract(self, node: gs.Node, flow: Flow, la: np.ndarray, lb: np.ndarray) -> None:
        out_shape = self.shape(node.outputs[0].name)
        batch = out_shape[:-2]
        m, k = la.shape[-2:]
        n = lb.shape[-1]
        a3 = np.broadcast_to(la, (*batch, m, k)).reshape(-1, m, k)
        b3 = np.broadcast_to(lb, (*batch, k, n)).reshape(-1, k, n)
        if np.all(a3 >= TOKEN_BASE):
            # A·V: attention weights (head tokens) times values (columns along the last axis)
            if varies_along(a3, 1) or varies_along(a3, 2) or varies_along(b3, 1):
                raise NotPrunableError(f"MatMul node {node.name}: attention weights and "
                                       "values combine in an unsupported way")
            left = a3[:, 0, 0].copy()
            right = b3[:, 0, :].copy()
            flow.contractions.append(Contraction(node.name, "mix", left, right))
            flow.labels[node.outputs[0].name] = np.broadcast_to(
                right[:, None, :], (len(right), m, n)).reshape(out_shape).copy()
        elif np.all(a3 >= 0) and np.all(a3 < TOKEN_BASE) and np.all(b3 >= 0):
            self._contract_channels(node, flow, a3, b3, out_shape)
        else:
            raise NotPrunableError(f"MatMul node {node.name}: prunable axes combine in an "
                                   "unsupported way")

    def _attention_op(self, node: gs.Node, flow: Flow) -> None:
        """The fused ONNX Attention op (opset 23): Q·Kᵀ, softmax and A·V in one node."""
        labels = [flow.labels.get(t.name) for t in node.inputs[:3]]
        if any(lab is None for lab in labels):
            raise NotPrunableError(f"Attention node {node.name}: Q, K and V must all come "
                                   "from tracked projections")
        extra = [t.name for t in node.inputs[4:] if t.name]
        if extra or any(t.name in flow.labels for t in node.inputs[3:4]):
            raise NotPrunableError(f"Attention node {node.name}: past key/value inputs are "
                                   "not supported")
        used = [o.name for o in node.outputs[1:] if self.view.consumers.get(o.name)
                or o.name in self.view.output_names]
        if used:
            raise NotPrunableError(f"Attention node {node.name}: extra outputs are used")
        q, k, v = (self._heads_first(lab, node, key) for lab, key in
                   zip(labels, ("q_num_heads", "kv_num_heads", "kv_num_heads")))
        batch, heads, seq, _ = q.shape
        group = heads // k.shape[1]
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
        mask = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3].name else None
        if mask is not None:
            mshape = np.shape(self.value(mask))
            if len(mshape) == 4 and mshape[1] > 1:
                raise NotPrunableError(f"Attention node {node.name}: per-head mask")
        a3 = q.reshape(-1, seq, q.shape[-1])
        b3 = np.swapaxes(k, -1, -2).reshape(-1, k.shape[-1], k.shape[-2])
        scores = (*q.shape[:3], k.shape[2])
        self._contract_channels(node, flow, a3, b3, scores)
        tokens = flow.labels.pop(node.outputs[0].name).reshape(-1, seq, k.shape[2])[:, 0, 0]
        right = v.reshape(-1, v.shape[2], v.shape[3])[:, 0, :]
        flow.contractions.append(Contraction(node.name, "mix", tokens.copy(), right.copy()))
        out = np.broadcast_to(right.reshape(batch, heads, 1, -1), (batch, heads, seq,
                                                                    right.shape[-1]))
        if labels[0].ndim == 3:
            out = out.transpose(0, 2, 1, 3).reshape(batch, seq, -1)
        flow.labels[node.outputs[0].name] = out.copy()

    @staticmethod
    def _heads_first(labels: np.ndarray, node: gs.Node, attr: str) -> np.ndarray:
        if labels.ndim == 4:
            return labels
        heads = node.attrs.get(attr) or node.attrs.get("q_num_heads")
        if labels.ndim != 3 or not heads:
            raise NotPrunableError(f"Attention node {node.name}: unsupported input rank")
        b, s, width = labels.shape
        return labels.reshape(b, s, heads, width // heads).transpose(0, 2, 1, 3)

    def _contract_channels(self, node: gs.Node, flow: Flow, a3: np.ndarray, b3: np.ndarray,
                           out_shape: tuple[int, ...]) -> None:
        if varies_along(a3, 1) or varies_along(b3, 2):
            raise NotPrunableError(f"MatMul node {node.name}: labels vary along rows")
        left, right = a3[:, 0, :].copy(), b3[:, :, 0].copy()
        contraction = Contraction(node.name, "channel", left, right)
        tokens = np.empty(len(left), np.int64)
        for p, row in enumerate(map(tuple, left)):
            if row not in contraction.token_of:
                contraction.token_of[row] = self._next_token
                self._next_token += 1
            tokens[p] = contraction.token_of[row]
        flow.contractions.append(contraction)
        m, n = a3.shape[1], b3.shape[2]
        flow.labels[node.outputs[0].name] = np.broadcast_to(
            tokens[:, None, None], (len(tokens), m, n)).reshape(out_shape).copy()
