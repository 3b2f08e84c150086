"""A read-mostly view over an onnx-graphsurgeon graph with the lookups the analysis needs."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxprune.weightstore import store_of, tensor_array

# Ops that map each element to one element at the same position (broadcasting allowed).
ELEMENTWISE = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Where", "Neg", "Abs", "Sqrt", "Exp",
    "Erf", "Tanh", "Sigmoid", "Relu", "LeakyRelu", "Elu", "Selu", "Gelu", "FastGelu",
    "HardSigmoid", "HardSwish", "Softplus", "Mish", "Clip", "Cast", "Identity", "Dropout",
    "Reciprocal", "Sin", "Cos", "Equal", "Not", "IsNaN", "CastLike",
})
NONLINEAR = frozenset({
    "Erf", "Tanh", "Sigmoid", "Relu", "LeakyRelu", "Elu", "Selu", "Gelu", "FastGelu",
    "HardSigmoid", "HardSwish", "Softplus", "Mish", "Clip", "Max",
})
# Ops that only move elements around; the label engine executes them on label arrays.
LAYOUT = frozenset({
    "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Slice", "Split", "Gather",
    "Expand", "Concat",
})


def unique_node_names(model: onnx.ModelProto) -> None:
    """Give every node a unique name in place: units and plans refer to nodes by name."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        name = node.name or f"{node.op_type}_{i}"
        while name in seen:
            name = f"{name}_{i}"
        node.name = name
        seen.add(name)


def canonical_domain(domain: str | None) -> str:
    """An op domain as the op rules key it: "" for the default ONNX domain."""
    return "" if domain in (None, "", "ai.onnx") else domain


def node_domain(node: gs.Node) -> str:
    return canonical_domain(getattr(node, "domain", None))


def graph_opsets(graph: gs.Graph) -> dict[str, int]:
    """Opset version per domain, from the model's opset_import (as graphsurgeon keeps it)."""
    opsets = {canonical_domain(d.domain): int(d.version)
              for d in (graph.import_domains or [])}
    opsets.setdefault("", int(graph.opset))
    return opsets


def constant_values(constant: gs.Constant) -> np.ndarray:
    """A graphsurgeon constant's values; a weight stub's read from its store (graphsurgeon
    would look for the stub's file beside the working directory)."""
    lazy = getattr(constant, "_values", None)
    if isinstance(lazy, LazyValues) and store_of(lazy.tensor) is not None:
        return tensor_array(lazy.tensor)
    return np.asarray(constant.values)


class GraphView:
    """Producers, consumers and constant values of a graphsurgeon graph."""

    def __init__(self, graph: gs.Graph):
        self.graph = graph
        graph.toposort()
        self.nodes: list[gs.Node] = list(graph.nodes)
        self.node = {n.name: n for n in self.nodes}
        self.order = {n.name: i for i, n in enumerate(self.nodes)}
        self.tensors: dict[str, gs.Tensor] = graph.tensors()
        self.consumers: dict[str, list[gs.Node]] = defaultdict(list)
        self.producer: dict[str, gs.Node] = {}
        for n in self.nodes:
            for t in n.inputs:
                self.consumers[t.name].append(n)
            for t in n.outputs:
                self.producer[t.name] = n
        self.output_names = {t.name for t in graph.outputs}
        self.opsets = graph_opsets(graph)

    def graph_input_behind(self, name: str) -> list[str] | None:
        """The graph input a tensor holds unchanged (through Identity and one-input Concat
        nodes, as exporters copy a past key/value cache), with the copies on the way:
        [input, copy, ..., name]; None when ``name`` is not such a copy of a graph input."""
        chain = [name]
        for _ in range(8):
            if chain[0] in {t.name for t in self.graph.inputs}:
                return chain
            node = self.producer.get(chain[0])
            if node is None or node.op not in ("Identity", "Concat") or len(node.inputs) != 1:
                return None
            chain.insert(0, node.inputs[0].name)
        return None

    def opset(self, domain: str | None) -> int | None:
        """The opset version the model imports for ``domain`` (None, "" and "ai.onnx" are
        the default domain); None when the model does not import it."""
        return self.opsets.get(canonical_domain(domain))

    def const(self, tensor: gs.Tensor | str) -> np.ndarray | None:
        """The value of a tensor fixed at export time: initializer or Constant node output."""
        t = self.tensors[tensor] if isinstance(tensor, str) else tensor
        if isinstance(t, gs.Constant):
            return constant_values(t)
        prod = self.producer.get(t.name)
        if prod is None:
            return None
        if prod.op == "Constant":
            value = prod.attrs.get("value")
            if isinstance(value, gs.Constant):
                return np.asarray(value.values)
            for key in ("value_float", "value_int"):
                if key in prod.attrs:
                    return np.asarray(prod.attrs[key])
            for key in ("value_floats", "value_ints"):
                if key in prod.attrs:
                    return np.asarray(prod.attrs[key])
            return None
        if prod.op in ("Identity", "Cast") and prod.inputs:
            inner = self.const(prod.inputs[0])
            if inner is not None and prod.op == "Cast":
                to = onnx.helper.tensor_dtype_to_np_dtype(prod.attrs["to"])
                return inner.astype(to)
            return inner
        return None

    def is_const(self, tensor: gs.Tensor) -> bool:
        return self.const(tensor) is not None

    def weight_of(self, node: gs.Node) -> tuple[int, np.ndarray] | None:
        """For MatMul/Gemm with a 2-D constant right operand: (input index, value)."""
        if node.op not in ("MatMul", "Gemm") or len(node.inputs) < 2:
            return None
        value = self.const(node.inputs[1])
        if value is None or value.ndim != 2 or self.const(node.inputs[0]) is not None:
            return None
        if node.op == "Gemm" and node.attrs.get("transA", 0):
            return None
        return 1, value

    def is_read(self, name: str) -> bool:
        """Whether tensor ``name`` is used: read by a node or a graph output."""
        return bool(name) and (bool(self.consumers.get(name)) or name in self.output_names)

    def is_projection(self, node: gs.Node) -> bool:
        return self.weight_of(node) is not None

    def data_inputs(self, node: gs.Node) -> list[gs.Tensor]:
        return [t for t in node.inputs if t.name and self.const(t) is None]

    def walk_up(self, tensor: str, follow: Callable[[gs.Node], list[str]],
                limit: int) -> Iterator[gs.Node | None]:
        """Producers upstream of ``tensor``, depth first, each visited once; ``follow(node)``
        names the tensors to continue through. None marks a graph input or initializer."""
        stack, seen = [tensor], set()
        while stack and len(seen) < limit:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            node = self.producer.get(name)
            yield node
            if node is not None:
                stack.extend(follow(node))

    def ancestors(self, tensor: str, limit: int = 400) -> set[str]:
        """Tensor names upstream of ``tensor`` (bounded walk), including itself."""
        seen = {tensor}
        stack = [tensor]
        while stack and len(seen) < limit:
            prod = self.producer.get(stack.pop())
            if prod is None:
                continue
            for t in prod.inputs:
                if t.name and t.name not in seen:
                    seen.add(t.name)
                    stack.append(t.name)
        return seen


def fresh_name(taken: set[str], name: str) -> str:
    """``name``, or ``name_<n>`` when taken; the result is added to ``taken``."""
    candidate, n = name, 1
    while candidate in taken:
        candidate, n = f"{name}_{n}", n + 1
    taken.add(candidate)
    return candidate


def effective_weight(view: GraphView, node: str) -> np.ndarray:
    """The [K, N] matrix a MatMul/Gemm projection (or a fused op's packed weight, its
    second input) multiplies by."""
    return _stored_weight(view, node).astype(np.float64)


def weight_shape(view: GraphView, node: str) -> tuple[int, int]:
    """(K, N) of ``effective_weight``, without converting the weight."""
    return tuple(_stored_weight(view, node).shape)


def _stored_weight(view: GraphView, node: str) -> np.ndarray:
    n = view.node[node]
    found = view.weight_of(n)
    _, value = found if found is not None else (1, view.const(n.inputs[1]))
    return value.T if n.op == "Gemm" and n.attrs.get("transB", 0) else value
