"""A graph cut into consecutive segments at chosen nodes, so that a pass can stop at each
cut and go on from there later.

Reconstruction fits one block after another; each fit needs the pruned model's tensors
right before the block's output projection, with the earlier blocks' updates applied.
Rather than running the graph from its inputs once per block, the values that cross each
cut (the *frontier*: what the nodes before the cut produced and the nodes after it read,
typically the residual stream and a mask) are kept per batch and the next segment starts
from them. A whole pass costs one run of the graph however many blocks there are.

Segment ``k`` holds the nodes from cut ``k-1`` (inclusive) to cut ``k`` (exclusive); the
last one runs to the end and returns the graph outputs. Weights that change between runs
are graph inputs of the model (``fed``) and are fed to every segment that reads them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import onnx
from onnx import helper

from onnxprune.errors import OnnxpruneError
from onnxprune.passes import read_names
from onnxprune.runtime import make_session, probe_model, run

Values = dict[str, np.ndarray]


def _reads(node: onnx.NodeProto) -> set[str]:
    return read_names([node]) - {""}


class _Segment:
    def __init__(self, fed: onnx.ModelProto, nodes: list[onnx.NodeProto], inputs: list[str],
                 outputs: list[str], weights: set[str], elem_types: Mapping[str, int],
                 threads: int):
        graph_inputs = {i.name: i for i in fed.graph.input}
        reads = set().union(*(_reads(n) for n in nodes)) if nodes else set()
        self.inputs = inputs
        self.outputs = outputs
        self.fed_names = sorted(n for n in weights if n in reads)
        model = helper.make_model(
            helper.make_graph(
                nodes, "segment",
                [*(helper.make_tensor_value_info(n, elem_types[n], None) for n in inputs),
                 *(graph_inputs[n] for n in self.fed_names)],
                [helper.make_tensor_value_info(n, elem_types[n], None) for n in outputs],
                [t for t in fed.graph.initializer if t.name in reads]),
            opset_imports=fed.opset_import, ir_version=fed.ir_version)
        model.functions.extend(fed.functions)
        self.session = make_session(model, threads=threads) if outputs else None

    def advance(self, values: Values, fed: Mapping[str, np.ndarray], keep: Iterable[str]
                ) -> Values:
        """The frontier after this segment: the kept names of ``values`` and what it adds."""
        out = {n: values[n] for n in keep if n in values}
        if self.session is not None:
            feeds = {**{n: values[n] for n in self.inputs},
                     **{n: fed[n] for n in self.fed_names}}
            out.update(run(self.session, feeds, self.outputs))
        return out


class Segments:
    """``fed`` cut before each node of ``stops`` (node names, in graph order); ``weights``
    are the graph inputs fed to every run rather than carried between segments."""

    def __init__(self, fed: onnx.ModelProto, stops: list[str], weights: set[str],
                 threads: int = 0):
        nodes = list(fed.graph.node)
        position = {n.name: i for i, n in enumerate(nodes)}
        missing = [s for s in stops if s not in position]
        if missing:
            raise OnnxpruneError(f"reconstruction: node {missing[0]!r} is not in the model")
        cuts = [position[s] for s in stops]
        if cuts != sorted(cuts):
            raise OnnxpruneError("reconstruction: the blocks' projections are out of order")
        self.graph_outputs = [o.name for o in fed.graph.output]
        produced_at = {i.name: -1 for i in fed.graph.input}
        for i, node in enumerate(nodes):
            produced_at.update((o, i) for o in node.output if o)
        last_read = {n: len(nodes) for n in self.graph_outputs}
        for i, node in enumerate(nodes):
            for name in _reads(node):
                if name in produced_at:
                    last_read[name] = max(last_read.get(name, -1), i)
        constant = weights | {t.name for t in fed.graph.initializer}
        bounds = [0, *cuts, len(nodes)]
        # frontier[k]: the values alive at bounds[k] (produced before it, read at or after)
        self.frontier = [sorted(n for n, p in produced_at.items()
                                if n not in constant and p < b <= last_read.get(n, -1))
                         for b in bounds[:-1]] + [self.graph_outputs]
        elem_types = self._elem_types(fed, set().union(*self.frontier))
        self.segments = []
        for k in range(len(bounds) - 1):
            chunk = nodes[bounds[k]:bounds[k + 1]]
            made = {o for n in chunk for o in n.output}
            reads = set().union(*(_reads(n) for n in chunk)) if chunk else set()
            inputs = [n for n in self.frontier[k] if n in reads]
            outputs = [n for n in self.frontier[k + 1] if n in made]
            self.segments.append(_Segment(fed, chunk, inputs, outputs, weights, elem_types,
                                          threads))

    @staticmethod
    def _elem_types(fed: onnx.ModelProto, names: set[str]) -> dict[str, int]:
        types = {i.name: i.type.tensor_type.elem_type for i in fed.graph.input}
        types.update((o.name, o.type.tensor_type.elem_type) for o in fed.graph.output
                     if o.type.tensor_type.elem_type)
        wanted = [n for n in names if not types.get(n)]
        if wanted:
            probe = probe_model(fed, wanted)
            types.update((o.name, o.type.tensor_type.elem_type) for o in probe.graph.output)
        untyped = [n for n in names if not types.get(n)]
        if untyped:
            raise OnnxpruneError(f"reconstruction: the type of tensor {untyped[0]!r} is unknown")
        return types

    def advance(self, k: int, values: Values, fed: Mapping[str, np.ndarray]) -> Values:
        """Run segment ``k`` from the values at its start: the values at its end."""
        return self.segments[k].advance(values, fed, self.frontier[k + 1])

    def finish(self, k: int, values: Values, fed: Mapping[str, np.ndarray]) -> Values:
        """The graph outputs, running segments ``k`` to the last from the values at the
        start of segment ``k``."""
        for j in range(k, len(self.segments)):
            values = self.advance(j, values, fed)
        return values
