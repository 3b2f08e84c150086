"""Elementwise ops (with broadcasting) and the softmax family.

Labels meeting at one position are merged (union-find): a gate column times an up column
couples the two. A non-labelled input that broadcasts along a labelled axis is recorded as an
operand the cut must slice (a bias, a per-channel scale)."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxprune.errors import NotPrunableError
from onnxprune.ops.layout import PASS_THROUGH
from onnxprune.ops.registry import LabelEngine, OpRule, Surgeon, register
from onnxprune.structure.graph import ELEMENTWISE
from onnxprune.structure.labels import Flow, Operand, varies_along

# ONNX Runtime's contrib activations and bias ops: elementwise with broadcast operands
# (BiasGelu's and FastGelu's bias, BiasAdd's bias and skip are per-channel/per-element)
MICROSOFT_ELEMENTWISE = frozenset({"Gelu", "FastGelu", "BiasGelu", "BiasAdd", "QuickGelu"})


@register
class Elementwise(OpRule):
    # the pass-through ops of ELEMENTWISE (Cast, Identity, ...) have their own rule
    ops = ELEMENTWISE - PASS_THROUGH - {"FastGelu"}

    def propagate(self, engine: LabelEngine, node: gs.Node, flow: Flow) -> None:
        out = node.outputs[0].name
        shape = engine.shape(out)
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
            if t.name and t.name not in flow.labels and _broadcasts_along_labels(
                    engine, t, merged):
                flow.operands.append(Operand(node.name, i))
        flow.labels[out] = merged

    def fix(self, surgeon: Surgeon, node: gs.Node) -> None:
        """Shapes follow from the inputs; broadcast operands are sliced as flow operands."""


@register
class MicrosoftElementwise(Elementwise):
    """ONNX Runtime's contrib activations and bias ops (the bias input of BiasGelu, FastGelu
    and BiasAdd broadcasts along the channel axis: a flow operand the cut slices)."""

    ops = MICROSOFT_ELEMENTWISE
    domain = "com.microsoft"


def _broadcasts_along_labels(engine: LabelEngine, tensor: gs.Tensor,
                             merged: np.ndarray) -> bool:
    shape = np.shape(engine.value(tensor))
    offset = merged.ndim - len(shape)
    return any(dim > 1 and varies_along(merged, offset + i) for i, dim in enumerate(shape))


@register
class Softmax(OpRule):
    """Softmax over one axis (opset 13 on)."""

    ops = frozenset({"Softmax", "LogSoftmax"})
    since = 13

    def normalised_axes(self, node: gs.Node, ndim: int) -> list[int]:
        return [node.attrs.get("axis", -1) % ndim]

    def propagate(self, engine: LabelEngine, node: gs.Node, flow: Flow) -> None:
        data = flow.labels[node.inputs[0].name]
        if any(varies_along(data, a) for a in self.normalised_axes(node, data.ndim)):
            raise NotPrunableError(f"{node.op} node {node.name} normalises over a prunable "
                                   "axis")
        flow.labels[node.outputs[0].name] = data

    def fix(self, surgeon: Surgeon, node: gs.Node) -> None:
        """The normalised axis is not a pruned one: nothing to change."""


@register
class SoftmaxFlattened(Softmax):
    """Softmax before opset 13: the input is flattened to 2-D at ``axis`` (default 1) and
    normalised over all axes from ``axis`` on."""

    since, until = 1, 12

    def normalised_axes(self, node: gs.Node, ndim: int) -> list[int]:
        return list(range(node.attrs.get("axis", 1) % ndim, ndim))
