"""MatMul/Gemm rules: sinks, Q·Kᵀ and A·V contractions, refusals, Gemm cuts, FLOPs (Conv
included)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from opgraphs import (
    BATCH,
    HEAD_DIM,
    SEQ,
    WIDTH,
    Builder,
    attention_model,
    feeds,
    ffn_model,
    labels_of,
    residual_out,
    run,
    zeroed,
)

import onnxprune
from onnxprune.errors import NotPrunableError
from onnxprune.structure.cost import model_flops, node_flops
from onnxprune.structure.discover import analyse
from onnxprune.structure.graph import GraphView
from onnxprune.tracing import trace


def test_projection_with_constant_weight_is_a_sink():
    flow, _ = labels_of(ffn_model("Relu"), ["up"])
    [sink] = flow.sinks
    assert (sink.node, sink.input) == ("down.mm_MatMul", "act")
    assert (sink.rows == np.arange(6)).all()
    assert not flow.contractions


def test_attention_matmuls_are_contractions():
    flow, _ = labels_of(attention_model(), ["q", "k", "v"])
    channel, mix = flow.contractions
    assert (channel.node, channel.kind, mix.node, mix.kind) == (
        "scores_MatMul", "channel", "ctx_MatMul", "mix")
    heads = np.arange(WIDTH).reshape(2, HEAD_DIM)
    # batch positions (b, h) flattened: query row of head h meets key row of head h
    assert (channel.left == np.tile(heads, (BATCH, 1))).all()
    assert (channel.right == WIDTH + channel.left).all()
    assert (mix.right == 2 * WIDTH + channel.left).all()
    tokens = [channel.token_of[tuple(row)] for row in heads]
    assert (mix.left == np.tile(tokens, BATCH)).all()
    assert (flow.labels["scores"][1, 1] == tokens[1]).all()


def test_uncontracted_labelled_axis_is_refused():
    b = Builder(3)
    a = b.op("Transpose", [b.linear("x", "a", WIDTH, 6)], "a.t", perm=[0, 2, 1])
    mixed = b.op("MatMul", [a, b.weight("mix.W", SEQ, SEQ)], "mixed")
    back = b.op("Transpose", [mixed], "back", perm=[0, 2, 1])
    model = residual_out(b, b.linear(back, "down", 6, WIDTH), 18)
    with pytest.raises(NotPrunableError, match="does not contract"):
        labels_of(model, ["a"])


def _gemm_ffn(seed: int = 4) -> onnx.ModelProto:
    """A 2-D FFN of Gemm projections (weights stored transposed, transB=1)."""
    b = Builder(seed)
    up = b.op("Gemm", ["x", b.weight("up.W", 6, WIDTH), b.weight("up.b", 6)], "up", transB=1)
    act = b.op("Relu", [up], "act")
    down = b.op("Gemm", [act, b.weight("down.W", WIDTH, 6), b.weight("down.b", WIDTH)],
                "down", transB=1)
    y = b.op("Add", ["x", down], "y")
    b.op("MatMul", [y, b.weight("head.W", WIDTH, 3)], "out")
    return b.model({"x": (BATCH * SEQ, WIDTH)}, {"out": (BATCH * SEQ, 3)})


def test_gemm_ffn_channel_cut_is_exact():
    model = _gemm_ffn()
    analysis = analyse(model)
    assert [b.kind for b in analysis.structure.blocks] == ["ffn"]
    result = onnxprune.cut(model, ["ffn0.ch0", "ffn0.ch5"], analysis=analysis)
    x = feeds(model, 5)
    want = run(zeroed(model, {"down.W": (1, [0, 5])}), x)[0]
    np.testing.assert_allclose(run(result.model, x)[0], want, rtol=1e-4, atol=1e-5)
    dims = {i.name: list(i.dims) for i in result.model.graph.initializer}
    assert sorted(d for n, d in dims.items() if n.startswith(("up.W", "down.W"))) == [
        [4, WIDTH], [WIDTH, 4]]


def _flops(model: onnx.ModelProto) -> tuple[GraphView, dict]:
    return GraphView(gs.import_onnx(model)), trace(model, feeds(model))


def test_matmul_and_gemm_flops():
    view, values = _flops(_gemm_ffn())
    up, down = view.node["up_Gemm"], view.node["down_Gemm"]
    assert node_flops(view, up, values) == 2 * BATCH * SEQ * 6 * WIDTH
    assert node_flops(view, down, values) == 2 * BATCH * SEQ * WIDTH * 6
    head = view.node["out_MatMul"]
    assert node_flops(view, head, values) == 2 * BATCH * SEQ * 3 * WIDTH
    assert node_flops(view, view.node["act_Relu"], values) == 0


def test_attention_model_flops_are_its_matmuls():
    view, values = _flops(attention_model())
    projections = 4 * 2 * BATCH * SEQ * WIDTH * WIDTH
    scores = 2 * BATCH * 2 * SEQ * SEQ * HEAD_DIM  # Q·Kᵀ and A·V alike
    head = 2 * BATCH * SEQ * 3 * WIDTH
    assert model_flops(view, values) == projections + 2 * scores + head


def test_conv_flops_and_refusal_on_a_prunable_path():
    b = Builder(5)
    a = b.linear("x", "a", WIDTH, 6)
    img = b.op("Unsqueeze", [a, b.ints("ax", [1])], "img")  # [B, 1, T, 6]
    conv = b.op("Conv", [img, b.weight("conv.W", 2, 1, 1, 3)], "conv")  # [B, 2, T, 4]
    flat = b.op("Reshape", [conv, b.ints("shape", [BATCH, SEQ, WIDTH])], "flat")
    model = residual_out(b, flat, 18)
    view, values = _flops(model)
    assert node_flops(view, view.node["conv_Conv"], values) == 2 * (BATCH * 2 * SEQ * 4) * 3
    with pytest.raises(NotPrunableError, match="Conv node conv_Conv on a prunable path is "
                                               "not supported"):
        labels_of(model, ["a"])

