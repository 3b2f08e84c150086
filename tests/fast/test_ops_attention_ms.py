"""ONNX Runtime's fused com.microsoft Attention (packed QKV weight inside the op) and the
SkipLayerNormalization residual: form, label flow, cut fix, module removal, FLOPs, and the
trace of contrib-op outputs the model does not type."""

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
    head_columns,
    run,
    zeroed,
)

import onnxprune
import onnxprune.gates
from onnxprune.errors import OnnxpruneError
from onnxprune.ops import attention_ms, form_for, rule_for, skip_layernorm
from onnxprune.structure.cost import node_flops
from onnxprune.structure.discover import analyse
from onnxprune.structure.graph import GraphView
from onnxprune.tracing import trace
from onnxprune.units import unit_kind

MS = "com.microsoft"


def ms_attention_model(sln: bool = False, sizes: tuple[int, int, int] | None = None,
                       seed: int = 0) -> onnx.ModelProto:
    """x -> com.microsoft.Attention(x, W[D, Nq+Nk+Nv], b) -> o projection (bias folded into
    the residual op) -> residual: an Add, or a SkipLayerNormalization as the optimizer
    makes it; then a constant head."""
    b = Builder(seed)
    nq, nk, nv = sizes or (WIDTH, WIDTH, WIDTH)
    attrs = {"num_heads": HEADS}
    if sizes:
        attrs["qkv_hidden_sizes"] = list(sizes)
    att = b.op("Attention", ["x", b.weight("qkv.W", WIDTH, nq + nk + nv),
                             b.weight("qkv.b", nq + nk + nv)], "att", domain=MS, **attrs)
    o = b.op("MatMul", [att, b.weight("o.W", nv, WIDTH)], "o")
    if sln:
        y = b.op("SkipLayerNormalization", [o, "x", b.weight("ln.g", WIDTH),
                                            b.weight("ln.b", WIDTH), b.weight("o.b", WIDTH)],
                 "y", domain=MS, epsilon=1e-5)
    else:
        y = b.op("Add", ["x", b.op("Add", [o, b.weight("o.b", WIDTH)], "o.biased")], "y")
    b.op("MatMul", [y, b.weight("head.W", WIDTH, 3)], "out")
    return b.model({"x": (BATCH, SEQ, WIDTH)}, {"out": (BATCH, SEQ, 3)}, domains={MS: 1})


def _node(model: onnx.ModelProto, op: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.op_type == op)


def _attrs(model: onnx.ModelProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in _node(model, "Attention").attribute}


def test_keyed_in_the_microsoft_domain():
    ms = gs.Node("Attention", "a", domain=MS)
    assert isinstance(rule_for(ms, {"": 17, MS: 1}), attention_ms.MicrosoftAttention)
    assert isinstance(form_for(ms, {"": 17, MS: 1}), attention_ms.MicrosoftAttentionForm)
    sln = gs.Node("SkipLayerNormalization", "s", domain=MS)
    assert isinstance(rule_for(sln, {MS: 1}), skip_layernorm.SkipLayerNormalization)


@pytest.mark.parametrize("sln", [False, True])
def test_block_seeded_by_the_packed_weight(sln):
    model = ms_attention_model(sln)
    [block] = analyse(model).structure.blocks
    att = _node(model, "Attention").name
    assert block.anchor == att
    assert (block.heads, block.qk_dim, block.vo_dim) == (HEADS, HEAD_DIM, HEAD_DIM)
    assert block.q_proj == block.k_proj == block.v_proj == att
    assert block.o_proj == _node(model, "MatMul").name
    assert block.seeds == {att: 0}
    base = np.arange(WIDTH).reshape(HEADS, HEAD_DIM)
    assert (block.q_labels == base).all() and (block.k_labels == WIDTH + base).all()
    assert (block.v_labels == 2 * WIDTH + base).all()
    assert block.removable
    assert block.residual_add == ("y_SkipLayerNormalization" if sln else "y_Add")
    # packed weight + bias, output weight, output bias (in the Add or in the fused op)
    assert block.params == WIDTH * 3 * WIDTH + 3 * WIDTH + WIDTH * WIDTH + WIDTH


@pytest.mark.parametrize("sln", [False, True])
def test_head_cut_slices_the_packed_weight(sln):
    model = ms_attention_model(sln)
    result = onnxprune.cut(model, ["attn0.head1"])
    assert_cut_matches(result, zeroed(model, {"o.W": (0, head_columns(1))}))
    attrs = _attrs(result.model)
    assert attrs["num_heads"] == HEADS - 1
    assert attrs["scale"] == pytest.approx(HEAD_DIM ** -0.5)
    weight = {i.name: i for i in result.model.graph.initializer}
    packed = onnx.numpy_helper.to_array(weight[_node(result.model, "Attention").input[1]])
    assert packed.shape == (WIDTH, 3 * (WIDTH - HEAD_DIM))


def test_vo_channel_cut_sets_qkv_hidden_sizes():
    model = ms_attention_model(True)
    result = onnxprune.cut(model, ["attn0.vo0.1", "attn0.vo1.3"])
    assert_cut_matches(result, zeroed(model, {"o.W": (0, [1, HEAD_DIM + 3])}))
    attrs = _attrs(result.model)
    assert attrs["qkv_hidden_sizes"] == [WIDTH, WIDTH, WIDTH - 2]
    assert attrs["num_heads"] == HEADS


def test_unequal_qkv_hidden_sizes_are_read_and_kept():
    model = ms_attention_model(True, sizes=(WIDTH, WIDTH, 2 * WIDTH))
    [block] = analyse(model).structure.blocks
    assert (block.qk_dim, block.vo_dim) == (HEAD_DIM, 2 * HEAD_DIM)
    result = onnxprune.cut(model, ["attn0.head0"])
    assert_cut_matches(result, zeroed(model, {"o.W": (0, list(range(2 * HEAD_DIM)))}))
    assert _attrs(result.model)["qkv_hidden_sizes"] == [HEAD_DIM, HEAD_DIM, 2 * HEAD_DIM]


@pytest.mark.parametrize("sln", [False, True])
def test_qk_channel_cut_inside_the_packed_weight(sln):
    """The QK gate scales the packed weight's and bias's query columns (there is no query
    tensor outside the op); the cut shrinks Q and K in qkv_hidden_sizes and freezes the
    1/sqrt(d) scale. Oracle: the query columns (weight and bias) zeroed."""
    model = ms_attention_model(sln)
    result = onnxprune.cut(model, ["attn0.qk0.1", "attn0.qk1.3"])
    columns = [1, HEAD_DIM + 3]
    assert_cut_matches(result, zeroed(model, {"qkv.W": (1, columns), "qkv.b": (0, columns)}))
    attrs = _attrs(result.model)
    assert attrs["qkv_hidden_sizes"] == [WIDTH - 2, WIDTH - 2, WIDTH]
    assert attrs["scale"] == pytest.approx(HEAD_DIM ** -0.5)


def test_qk_gate_on_the_packed_weight_is_one_vector():
    [gate] = onnxprune.gates.gate_model(analyse(ms_attention_model()),
                                        [unit_kind("qk")]).gates
    assert (gate.size, gate.width, gate.batch_dim) == (WIDTH, HEAD_DIM, None)


@pytest.mark.parametrize("sln", [False, True])
def test_module_removal_keeps_the_fused_residual(sln):
    model = ms_attention_model(sln)
    result = onnxprune.cut(model, ["attn0"])
    ops = [n.op_type for n in result.model.graph.node]
    assert "Attention" not in ops
    assert ("SkipLayerNormalization" in ops) == sln
    # the module gate at 0: the output projection's product is zero; its bias goes with the
    # module before an Add, and stays inside the fused op (as the gate leaves it there)
    entries = {"o.W": (0, list(range(WIDTH)))}
    if not sln:
        entries["o.b"] = (0, list(range(WIDTH)))
    assert_cut_matches(result, zeroed(model, entries))


def test_flops_count_the_packed_projection_and_both_products():
    model = ms_attention_model()
    view = GraphView(gs.import_onnx(model))
    node = view.node[_node(model, "Attention").name]
    flops = node_flops(view, node, trace(model, feeds(model)))
    assert flops == (2 * BATCH * SEQ * WIDTH * 3 * WIDTH
                     + 2 * BATCH * SEQ * SEQ * (WIDTH + WIDTH))


def test_trace_types_untyped_contrib_outputs():
    model = ms_attention_model(True)
    del model.graph.value_info[:]   # as the optimizer writes them: contrib outputs untyped
    values = trace(model, feeds(model))
    att, sln = _node(model, "Attention"), _node(model, "SkipLayerNormalization")
    assert values[att.output[0]].shape == (BATCH, SEQ, WIDTH)
    assert values[sln.output[0]].shape == (BATCH, SEQ, WIDTH)
    assert values["o"].shape == (BATCH, SEQ, WIDTH)  # a standard op after a contrib one
    np.testing.assert_allclose(values["out"], run(model, feeds(model))[0], rtol=1e-6)


def mha_model(qk_bias: bool = True, seed: int = 0) -> onnx.ModelProto:
    """q/k/v MatMul projections -> com.microsoft.MultiHeadAttention(q, k, v, bias[3D]) -> o
    -> SkipLayerNormalization residual, as the optimizer writes it with
    ``use_multi_head_attention``; without ``qk_bias`` the Q/K part of the bias is zero."""
    b = Builder(seed)
    q, k, v = (b.op("MatMul", ["x", b.weight(f"{n}.W", WIDTH, WIDTH)], n) for n in "qkv")
    bias = b.rng.standard_normal(3 * WIDTH).astype(np.float32)
    if not qk_bias:
        bias[:2 * WIDTH] = 0
    att = b.op("MultiHeadAttention", [q, k, v, b.const("qkv.b", bias)], "att", domain=MS,
               num_heads=HEADS)
    o = b.op("MatMul", [att, b.weight("o.W", WIDTH, WIDTH)], "o")
    y = b.op("SkipLayerNormalization", [o, "x", b.weight("ln.g", WIDTH), b.weight("ln.b", WIDTH),
                                        b.weight("o.b", WIDTH)], "y", domain=MS, epsilon=1e-5)
    b.op("MatMul", [y, b.weight("head.W", WIDTH, 3)], "out")
    return b.model({"x": (BATCH, SEQ, WIDTH)}, {"out": (BATCH, SEQ, 3)}, domains={MS: 1})


def _mha_attrs(model: onnx.ModelProto) -> dict:
    node = _node(model, "MultiHeadAttention")
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def test_multi_head_attention_block():
    model = mha_model()
    [block] = analyse(model).structure.blocks
    assert block.anchor == "att_MultiHeadAttention"
    assert (block.q_proj, block.k_proj, block.v_proj, block.o_proj) == (
        "q_MatMul", "k_MatMul", "v_MatMul", "o_MatMul")
    assert (block.heads, block.qk_dim, block.vo_dim, block.removable) == (
        HEADS, HEAD_DIM, HEAD_DIM, True)
    assert block.params == 4 * WIDTH * WIDTH + 3 * WIDTH + WIDTH
    view = GraphView(gs.import_onnx(model))
    flops = node_flops(view, view.node["att_MultiHeadAttention"], trace(model, feeds(model)))
    assert flops == 2 * BATCH * SEQ * SEQ * (WIDTH + WIDTH)


def test_multi_head_attention_head_and_vo_cut():
    model = mha_model()
    result = onnxprune.cut(model, ["attn0.head0", "attn0.vo1.2"])
    assert_cut_matches(result, zeroed(model, {"o.W": (0, [*head_columns(0), HEAD_DIM + 2])}))
    assert _mha_attrs(result.model)["num_heads"] == HEADS - 1
    sizes = {i.name: tuple(i.dims) for i in result.model.graph.initializer}
    assert sizes["qkv.b_pruned"] == (3 * WIDTH - 3 * HEAD_DIM - 1,)


def test_multi_head_attention_qk_cut_needs_a_zero_qk_bias():
    with pytest.raises(OnnxpruneError, match="QK channel cuts with a query/key bias"):
        onnxprune.cut(mha_model(), ["attn0.qk0.1", "attn0.qk1.1"])
    model = mha_model(qk_bias=False)
    result = onnxprune.cut(model, ["attn0.qk0.1", "attn0.qk1.1"])
    cols = [1, HEAD_DIM + 1]
    assert_cut_matches(result, zeroed(model, {"q.W": (1, cols), "k.W": (1, cols)}))
    assert _mha_attrs(result.model)["scale"] == pytest.approx(HEAD_DIM ** -0.5)


def test_multi_head_attention_module_removal():
    model = mha_model()
    result = onnxprune.cut(model, ["attn0"])
    assert "MultiHeadAttention" not in [n.op_type for n in result.model.graph.node]
    assert_cut_matches(result, zeroed(model, {"o.W": (0, list(range(WIDTH)))}))
