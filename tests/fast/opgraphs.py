"""Small hand-built ONNX graphs for the op-rule tests: no torch, fixed seeds.

``Builder`` collects nodes and random constant weights; ``attention_model`` and ``ffn_model``
build one residual block (with a constant output head) in the layouts the tests need;
``labels_of`` runs the label engine from chosen seed projections; ``zeroed`` is the oracle
for a cut: the original model with the removed units' weight entries set to zero.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnxprune.structure.axes import Flow, LabelPropagator, column_labels
from onnxprune.structure.graph import GraphView
from onnxprune.tracing import trace

OPSET = 18
BATCH, SEQ, HEADS, HEAD_DIM = 2, 3, 2, 4
WIDTH = HEADS * HEAD_DIM


class Builder:
    """Nodes and initializers of one graph under construction."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.functions: list[onnx.FunctionProto] = []

    def const(self, name: str, value: np.ndarray | list) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def ints(self, name: str, values: list[int]) -> str:
        return self.const(name, np.array(values, np.int64))

    def weight(self, name: str, *shape: int) -> str:
        return self.const(name, self.rng.standard_normal(shape).astype(np.float32) * 0.5)

    def op(self, op: str, inputs: list[str], out: str | list[str], domain: str = "",
           **attrs) -> str | list[str]:
        outs = [out] if isinstance(out, str) else out
        name = f"{outs[0]}_{op}"
        self.nodes.append(helper.make_node(op, inputs, outs, name, domain=domain or None,
                                           **attrs))
        return out

    def linear(self, x: str, name: str, k: int, n: int, bias: bool = True) -> str:
        """x @ W (+ b): a projection with a constant weight."""
        y = self.op("MatMul", [x, self.weight(f"{name}.W", k, n)], f"{name}.mm" if bias
                    else name)
        return self.op("Add", [y, self.weight(f"{name}.b", n)], name) if bias else y

    def model(self, inputs: dict[str, tuple[int, ...]], outputs: dict[str, tuple[int, ...]],
              opset: int = OPSET, domains: dict[str, int] | None = None) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, "opgraph",
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs.items()],
            self.inits)
        # shape inference does not type the outputs of contrib or custom ops: declare them
        graph.value_info.extend(helper.make_tensor_value_info(o, TensorProto.FLOAT, None)
                                for n in self.nodes if n.domain for o in n.output
                                if o not in outputs)
        imports = [helper.make_opsetid("", opset)]
        imports += [helper.make_opsetid(d, v) for d, v in (domains or {}).items()]
        model = helper.make_model(graph, opset_imports=imports, functions=self.functions)
        model.ir_version = 10
        return model


def heads_split(b: Builder, t: str, name: str, perm: list[int]) -> str:
    """[B, T, H*dh] -> [B, H, T, dh] (or [B, H, dh, T] with perm 0,2,3,1)."""
    r = b.op("Reshape", [t, b.ints(f"{name}.shape", [-1, SEQ, HEADS, HEAD_DIM])], f"{name}.4d")
    return b.op("Transpose", [r], f"{name}.heads", perm=perm)


def qkv_inputs(b: Builder, x: str, fused: str) -> tuple[str, str, str]:
    """The query, key and value projections of ``x``: separate, or one fused projection
    split by ``Split``, ``Slice`` or ``Gather``."""
    if fused == "separate":
        return tuple(b.linear(x, n, WIDTH, WIDTH) for n in ("q", "k", "v"))
    qkv = b.linear(x, "qkv", WIDTH, 3 * WIDTH)
    if fused == "split":
        return tuple(b.op("Split", [qkv, b.ints("qkv.sizes", [WIDTH] * 3)],
                          ["q", "k", "v"], axis=-1))
    if fused == "slice":
        return tuple(b.op("Slice", [qkv, b.ints(f"{n}.lo", [i * WIDTH]),
                                    b.ints(f"{n}.hi", [(i + 1) * WIDTH]),
                                    b.ints(f"{n}.ax", [-1])], n)
                     for i, n in enumerate(("q", "k", "v")))
    assert fused == "gather"
    five = b.op("Reshape", [qkv, b.ints("qkv.shape", [-1, SEQ, 3, WIDTH])], "qkv.5d")
    return tuple(b.op("Gather", [five, b.const(f"{n}.idx", np.array(i, np.int64))], n,
                      axis=2) for i, n in enumerate(("q", "k", "v")))


def attention_model(fused: str = "separate", expand: bool = False, mask: bool = False,
                    custom: str | None = None, seed: int = 0) -> onnx.ModelProto:
    """x + o_proj(softmax(q kᵀ * s [+ mask]) v) -> out head; q/k/v as ``qkv_inputs`` makes
    them. ``custom`` names a ``com.example`` op (a model-local function computing x + x)
    placed between the merged heads and the output projection."""
    b = Builder(seed)
    q, k, v = qkv_inputs(b, "x", fused)
    qh = heads_split(b, q, "q", [0, 2, 1, 3])
    kh = heads_split(b, k, "k", [0, 2, 3, 1])
    vh = heads_split(b, v, "v", [0, 2, 1, 3])
    if expand:  # a no-op broadcast with a full target shape, as expand_as exports
        vh = b.op("Expand", [vh, b.ints("v.full", [BATCH, HEADS, SEQ, HEAD_DIM])], "v.exp")
    scores = b.op("MatMul", [qh, kh], "scores")
    scaled = b.op("Mul", [scores, b.const("scale", np.float32(HEAD_DIM ** -0.5))], "scaled")
    if mask:
        causal = np.triu(np.full((SEQ, SEQ), -1e4, np.float32), 1)[None, None]
        scaled = b.op("Add", [scaled, b.const("mask", causal)], "masked")
    probs = b.op("Softmax", [scaled], "probs", axis=-1)
    ctx = b.op("MatMul", [probs, vh], "ctx")
    merged = b.op("Transpose", [ctx], "ctx.t", perm=[0, 2, 1, 3])
    flat = b.op("Reshape", [merged, b.ints("ctx.shape", [-1, SEQ, WIDTH])], "ctx.flat")
    domains = {}
    if custom:
        flat = b.op(custom, [flat], "ctx.custom", domain=CUSTOM_DOMAIN)
        b.functions.append(twice_function(custom))
        domains[CUSTOM_DOMAIN] = 1
    return residual_out(b, b.linear(flat, "o", WIDTH, WIDTH), OPSET, domains)


CUSTOM_DOMAIN = "com.example"


def twice_function(op: str) -> onnx.FunctionProto:
    """A model-local function ``com.example.<op>(X) = X + X``, so ORT can run the op."""
    return helper.make_function(CUSTOM_DOMAIN, op, ["X"], ["Y"],
                                [helper.make_node("Add", ["X", "X"], ["Y"])],
                                [helper.make_opsetid("", OPSET)])


def residual_out(b: Builder, block_out: str, opset: int, domains: dict[str, int] | None = None
                 ) -> onnx.ModelProto:
    """y = x + block_out, then a constant head: the model's one output."""
    y = b.op("Add", ["x", block_out], "y")
    b.op("MatMul", [y, b.weight("head.W", WIDTH, 3)], "out")
    return b.model({"x": (BATCH, SEQ, WIDTH)}, {"out": (BATCH, SEQ, 3)}, opset, domains)


def attention_op_model(rank: int = 3, seed: int = 0) -> onnx.ModelProto:
    """The fused ONNX Attention op (opset 23): q/k/v as [B, T, H*dh] with head-count
    attributes (rank 3) or as [B, H, T, dh] (rank 4); no scale attribute."""
    b = Builder(seed)
    q, k, v = (b.linear("x", n, WIDTH, WIDTH) for n in ("q", "k", "v"))
    if rank == 3:
        att = b.op("Attention", [q, k, v], "att", q_num_heads=HEADS, kv_num_heads=HEADS)
    else:
        heads = [heads_split(b, t, n, [0, 2, 1, 3]) for t, n in ((q, "q"), (k, "k"), (v, "v"))]
        att = b.op("Attention", heads, "att.4d")
        att = b.op("Transpose", [att], "att.t", perm=[0, 2, 1, 3])
        att = b.op("Reshape", [att, b.ints("att.shape", [-1, SEQ, WIDTH])], "att")
    return residual_out(b, b.linear(att, "o", WIDTH, WIDTH), 23)


def ffn_model(activation: str = "Relu", gated: bool = False, hidden: int = 6,
              opset: int = OPSET, seed: int = 0) -> onnx.ModelProto:
    """x + down(act(up(x)) [* up2(x)]) -> out head. ``activation`` is an op name or
    ``"FastGelu"`` (com.microsoft, with its bias input)."""
    b = Builder(seed)
    domains = {}
    if activation == "FastGelu":
        h = b.linear("x", "up", WIDTH, hidden, bias=False)
        a = b.op("FastGelu", [h, b.weight("up.b", hidden)], "act", domain="com.microsoft")
        domains["com.microsoft"] = 1
    else:
        a = b.op(activation, [b.linear("x", "up", WIDTH, hidden)], "act")
    if gated:
        a = b.op("Mul", [a, b.linear("x", "up2", WIDTH, hidden)], "gated")
    return residual_out(b, b.linear(a, "down", hidden, WIDTH), opset, domains)


def feeds(model: onnx.ModelProto, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim])
            .astype(np.float32) for i in model.graph.input}


def run(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, inputs)


def labels_of(model: onnx.ModelProto, seeds: list[str],
              values: dict[str, np.ndarray] | None = None) -> tuple[Flow, GraphView]:
    """The label flow from the output columns of the named tensors, numbered in order (the
    first seed's columns from 0, the next continuing); ``values`` replaces an ORT trace."""
    view = GraphView(gs.import_onnx(model))
    values = trace(model, feeds(model)) if values is None else values
    labels, base = {}, 0
    for name in seeds:
        shape = np.shape(values[name])
        labels[name] = column_labels(shape, base)
        base += shape[-1]
    return LabelPropagator(view, values).propagate(labels), view


def zeroed(model: onnx.ModelProto, entries: dict[str, tuple[int, list[int]]]
           ) -> onnx.ModelProto:
    """A copy with initializer ``name`` zeroed at ``indices`` along ``axis``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        if init.name in entries:
            axis, indices = entries[init.name]
            value = numpy_helper.to_array(init).copy()
            np.moveaxis(value, axis, 0)[indices] = 0
            init.CopyFrom(numpy_helper.from_array(value, init.name))
    return out


def head_columns(h: int) -> list[int]:
    return list(range(h * HEAD_DIM, (h + 1) * HEAD_DIM))


def assert_cut_matches(result, oracle: onnx.ModelProto, seed: int = 3) -> None:
    """The cut model's outputs equal the zeroed original's (an oracle independent of the
    gates the cut verified itself against)."""
    x = feeds(oracle, seed)
    for got, want in zip(run(result.model, x), run(oracle, x)):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
