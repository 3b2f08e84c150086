"""Reverse-mode gradient graphs with onnx-ad, trimmed to what the requested outputs need.

onnx-ad emits the adjoint of every operand of a differentiated node and leaves the unused
ones (a weight's gradient when only activations are differentiated) in the graph; ONNX
Runtime would still run them, so nodes that feed no output are deleted here. That alone
halves the cost of a gate-gradient pass on the reference models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import onnx
import onnx_ad

from onnxprune.errors import OnnxpruneError

SEED_PREFIX = "adj_"


class NoGradientError(OnnxpruneError):
    """onnx-ad has no derivative for an op on the path (the message names it)."""


@dataclass
class GradientGraph:
    """A model computing its primal outputs and d(seeded output)/d(each input in ``wrt``).

    Feed the primal inputs plus ``seed`` (a [1] array of ones); the gradient of input
    ``x`` is output ``gradients[x]``."""

    model: onnx.ModelProto
    seed: str
    gradients: dict[str, str]


def gradient_graph(model: onnx.ModelProto, wrt: Sequence[str], output: str) -> GradientGraph:
    """d``output``/d``wrt`` for a scalar ``output``; raise naming the op onnx-ad lacks."""
    try:
        model = onnx.shape_inference.infer_shapes(model)
        adjoint = onnx_ad.reverse(model, inputs=list(wrt), outputs=[output], layout="onnx",
                                  prefix=SEED_PREFIX)
    except onnx_ad.UnsupportedOperator as exc:
        raise NoGradientError(f"no gradient through this model: {exc}") from exc
    seed = SEED_PREFIX + output
    for vi in adjoint.graph.input:
        if vi.name == seed:
            for dim in vi.type.tensor_type.shape.dim:
                dim.Clear()
                dim.dim_value = 1
    keep = {o.name for o in model.graph.output} | {SEED_PREFIX + x for x in wrt}
    outputs = [o for o in adjoint.graph.output if o.name in keep]
    del adjoint.graph.output[:]
    adjoint.graph.output.extend(outputs)
    drop_dead_nodes(adjoint)
    return GradientGraph(adjoint, seed, {x: SEED_PREFIX + x for x in wrt})


def drop_dead_nodes(model: onnx.ModelProto) -> None:
    """Delete nodes and initializers no graph output depends on (in place)."""
    graph = model.graph
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(name in needed for name in node.output):
            kept.append(node)
            needed.update(name for name in node.input if name)
            for attr in node.attribute:  # subgraphs read outer names too
                for sub in [attr.g, *attr.graphs]:
                    needed.update(n for sn in sub.node for n in sn.input)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    inits = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
