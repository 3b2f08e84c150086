"""ONNX Runtime contrib ops around the FFN and in decomposed attention: BiasGelu, FastGelu and
BiasAdd (elementwise, bias a per-channel operand), FusedMatMul (MatMul with transposes and a
scale), and an FFN whose residual add is a SkipLayerNormalization."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from opgraphs import (
    BATCH,
    HEAD_DIM,
    HEADS,
    SEQ,
    WIDTH,
    Builder,
    assert_cut_matches,
    feeds,
    heads_split,
    labels_of,
    zeroed,
)

import onnxprune
from onnxprune.ops import contrib, elementwise, rule_for
from onnxprune.structure.cost import node_flops
from onnxprune.structure.discover import analyse
from onnxprune.structure.graph import GraphView
from onnxprune.tracing import trace

MS = "com.microsoft"
HIDDEN = 6


def contrib_ffn_model(activation: str = "BiasGelu", seed: int = 0) -> onnx.ModelProto:
    """SkipLayerNormalization(down(act(up(x), up.b)), x, gamma, beta, down.b) -> head, the
    optimizer's form of a BERT FFN; ``activation`` BiasGelu or FastGelu."""
    b = Builder(seed)
    h = b.op("MatMul", ["x", b.weight("up.W", WIDTH, HIDDEN)], "up")
    a = b.op(activation, [h, b.weight("up.b", HIDDEN)], "act", domain=MS)
    d = b.op("MatMul", [a, b.weight("down.W", HIDDEN, WIDTH)], "down")
    y = b.op("SkipLayerNormalization", [d, "x", b.weight("ln.g", WIDTH), b.weight("ln.b", WIDTH),
                                        b.weight("down.b", WIDTH)], "y", domain=MS,
             epsilon=1e-5)
    b.op("MatMul", [y, b.weight("head.W", WIDTH, 3)], "out")
    return b.model({"x": (BATCH, SEQ, WIDTH)}, {"out": (BATCH, SEQ, 3)}, domains={MS: 1})


def test_keyed_in_the_microsoft_domain():
    for op in ("BiasGelu", "FastGelu", "BiasAdd", "Gelu", "QuickGelu"):
        node = gs.Node(op, "n", domain=MS)
        assert isinstance(rule_for(node, {MS: 1}), elementwise.MicrosoftElementwise)
    fused = gs.Node("FusedMatMul", "f", domain=MS)
    assert isinstance(rule_for(fused, {MS: 1}), contrib.FusedMatMul)


@pytest.mark.parametrize("activation", ["BiasGelu", "FastGelu"])
def test_ffn_found_through_the_fused_activation(activation):
    model = contrib_ffn_model(activation)
    [block] = analyse(model).structure.blocks
    assert (block.kind, block.channels, block.removable) == ("ffn", HIDDEN, True)
    assert block.activation == "gelu"
    assert block.residual_add == "y_SkipLayerNormalization"
    assert [(o.node, o.index) for o in block.flow.operands] == [(f"act_{activation}", 1)]
    assert block.params == 2 * WIDTH * HIDDEN + HIDDEN + WIDTH


def test_bias_add_labels_like_an_add():
    """BiasAdd(X, bias, skip) (CUDA-only in ONNX Runtime, so labelled on given values): the
    labels of X flow through; the bias and a skip that varies along the channels are
    operands the cut slices."""
    b = Builder()
    h = b.op("MatMul", ["x", b.weight("up.W", WIDTH, HIDDEN)], "up")
    b.op("BiasAdd", [h, b.weight("up.b", HIDDEN), "skip"], "biased", domain=MS)
    b.op("MatMul", ["biased", b.weight("down.W", HIDDEN, WIDTH)], "down")
    model = b.model({"x": (BATCH, SEQ, WIDTH), "skip": (BATCH, SEQ, HIDDEN)},
                    {"down": (BATCH, SEQ, WIDTH)}, domains={MS: 1})
    shaped = {"up": (BATCH, SEQ, HIDDEN), "biased": (BATCH, SEQ, HIDDEN),
              "skip": (BATCH, SEQ, HIDDEN), "down": (BATCH, SEQ, WIDTH)}
    values = {k: np.zeros(v, np.float32) for k, v in shaped.items()}
    flow, _ = labels_of(model, ["up"], values)
    assert (flow.labels["biased"] == flow.labels["up"]).all()
    assert [(o.node, o.index) for o in flow.operands] == [("biased_BiasAdd", 1),
                                                          ("biased_BiasAdd", 2)]
    assert (flow.sinks[0].rows == np.arange(HIDDEN)).all()


@pytest.mark.parametrize("activation", ["BiasGelu", "FastGelu"])
def test_channel_cut_slices_the_bias_operand(activation):
    model = contrib_ffn_model(activation)
    result = onnxprune.cut(model, ["ffn0.ch1", "ffn0.ch4"], analysis=analyse(model))
    assert_cut_matches(result, zeroed(model, {"down.W": (0, [1, 4])}))
    ops = {n.op_type for n in result.model.graph.node}
    assert {"SkipLayerNormalization", activation} <= ops
    sizes = {i.name: tuple(i.dims) for i in result.model.graph.initializer}
    assert sizes["up.b_pruned"] == (HIDDEN - 2,)


def test_ffn_module_removal_feeds_the_skip_op_zeros():
    model = contrib_ffn_model()
    result = onnxprune.cut(model, ["ffn0"], analysis=analyse(model))
    ops = [n.op_type for n in result.model.graph.node]
    assert "SkipLayerNormalization" in ops and "BiasGelu" not in ops
    assert_cut_matches(result, zeroed(model, {"down.W": (0, list(range(HIDDEN)))}))


def fused_matmul_attention(seed: int = 0) -> onnx.ModelProto:
    """Decomposed attention whose score product is FusedMatMul(q, k, transB=1, alpha)."""
    b = Builder(seed)
    q, k, v = (b.linear("x", n, WIDTH, WIDTH) for n in ("q", "k", "v"))
    qh, kh, vh = (heads_split(b, t, n, [0, 2, 1, 3]) for t, n in ((q, "q"), (k, "k"), (v, "v")))
    b.op("FusedMatMul", [qh, kh], "scores", domain=MS, transB=1, alpha=HEAD_DIM ** -0.5)
    b.op("Softmax", ["scores"], "probs", axis=-1)
    b.op("MatMul", ["probs", vh], "ctx")
    merged = b.op("Transpose", ["ctx"], "ctx.t", perm=[0, 2, 1, 3])
    flat = b.op("Reshape", [merged, b.ints("ctx.shape", [-1, SEQ, WIDTH])], "ctx.flat")
    b.op("MatMul", [flat, b.weight("o.W", WIDTH, WIDTH)], "o")
    return b.model({"x": (BATCH, SEQ, WIDTH)}, {"o": (BATCH, SEQ, WIDTH)}, domains={MS: 1})


def test_fused_matmul_pairs_query_and_key_channels():
    model = fused_matmul_attention()
    values = trace(model, feeds(model))
    flow, _ = labels_of(model, ["q", "k", "v"], values)
    channel, mix = flow.contractions
    assert mix.kind == "mix" and mix.node == "ctx_MatMul"
    heads = np.arange(WIDTH).reshape(HEADS, HEAD_DIM)
    assert channel.node == "scores_FusedMatMul" and channel.kind == "channel"
    assert (channel.left == np.tile(heads, (BATCH, 1))).all()
    assert (channel.right == WIDTH + channel.left).all()


def test_fused_matmul_flops():
    model = fused_matmul_attention()
    view = GraphView(gs.import_onnx(model))
    flops = node_flops(view, view.node["scores_FusedMatMul"], trace(model, feeds(model)))
    assert flops == 2 * BATCH * HEADS * SEQ * SEQ * HEAD_DIM
