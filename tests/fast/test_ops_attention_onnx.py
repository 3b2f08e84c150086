"""The fused ONNX Attention op (opset 23): its form, label flow, cut fix and FLOPs."""

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
    assert_cut_matches,
    attention_op_model,
    feeds,
    head_columns,
    labels_of,
    zeroed,
)

import onnxprune
from onnxprune.ops import attention_ms, attention_onnx, form_for, rule_for
from onnxprune.structure.cost import node_flops
from onnxprune.structure.discover import analyse
from onnxprune.structure.graph import GraphView
from onnxprune.tracing import trace


def _attention_node(model) -> gs.Node:
    return next(n for n in gs.import_onnx(model).nodes if n.op == "Attention")


@pytest.mark.parametrize("rank", [3, 4])
def test_labels_flow_through_the_fused_op(rank):
    model = attention_op_model(rank)
    flow, _ = labels_of(model, ["q", "k", "v"])
    node = _attention_node(model).name
    channel, mix = flow.contractions
    assert (channel.node, channel.kind, mix.node, mix.kind) == (node, "channel", node, "mix")
    heads = np.arange(WIDTH).reshape(2, HEAD_DIM)
    assert (channel.left == np.tile(heads, (BATCH, 1))).all()
    assert (channel.right == WIDTH + channel.left).all()
    assert (mix.right == 2 * WIDTH + channel.left).all()
    out = flow.labels[node.replace("_Attention", "")]
    expected = (BATCH, SEQ, WIDTH) if rank == 3 else (BATCH, 2, SEQ, HEAD_DIM)
    assert out.shape == expected
    assert (flow.sinks[0].rows == 2 * WIDTH + np.arange(WIDTH)).all()


@pytest.mark.parametrize("rank", [3, 4])
def test_form_anchors_the_block_at_the_node(rank):
    model = attention_op_model(rank)
    [block] = analyse(model).structure.blocks
    assert block.anchor == _attention_node(model).name
    assert (block.heads, block.qk_dim, block.vo_dim) == (2, HEAD_DIM, HEAD_DIM)
    assert (block.q_proj, block.k_proj, block.v_proj, block.o_proj) == (
        "q.mm_MatMul", "k.mm_MatMul", "v.mm_MatMul", "o.mm_MatMul")


def _attrs(result) -> dict:
    node = next(n for n in result.model.graph.node if n.op_type == "Attention")
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


@pytest.mark.parametrize("rank", [3, 4])
def test_head_cut_updates_head_counts_and_freezes_the_scale(rank):
    model = attention_op_model(rank)
    result = onnxprune.cut(model, ["attn0.head0"])
    assert_cut_matches(result, zeroed(model, {"o.W": (0, head_columns(0))}))
    attrs = _attrs(result)
    assert attrs["scale"] == pytest.approx(HEAD_DIM ** -0.5)
    if rank == 3:
        assert (attrs["q_num_heads"], attrs["kv_num_heads"]) == (1, 1)


def test_qk_channel_cut_keeps_the_original_scale():
    model = attention_op_model(3)
    result = onnxprune.cut(model, ["attn0.qk0.1", "attn0.qk1.3"])
    cols = [1, HEAD_DIM + 3]
    oracle = {f"{n}.{p}": (axis, cols) for n in ("q", "k") for p, axis in (("W", 1), ("b", 0))}
    assert_cut_matches(result, zeroed(model, oracle))
    assert _attrs(result)["scale"] == pytest.approx(HEAD_DIM ** -0.5)  # not 1/sqrt(3)


@pytest.mark.parametrize("rank", [3, 4])
def test_flops_count_both_products(rank):
    model = attention_op_model(rank)
    view = GraphView(gs.import_onnx(model))
    node = view.node[_attention_node(model).name]
    flops = node_flops(view, node, trace(model, feeds(model)))
    assert flops == 2 * BATCH * 2 * SEQ * SEQ * (HEAD_DIM + HEAD_DIM)


def test_keyed_at_opset_23_of_the_default_domain():
    node = gs.Node("Attention", "a")
    assert isinstance(rule_for(node, {"": 23}), attention_onnx.OnnxAttention)
    assert isinstance(form_for(node, {"": 24}), attention_onnx.OnnxAttentionForm)
    assert rule_for(node, {"": 22}) is None and form_for(node, {"": 22}) is None
    ms = gs.Node("Attention", "a", domain="com.microsoft")     # its own rule, never this one
    assert isinstance(rule_for(ms, {"": 23, "com.microsoft": 1}), attention_ms.MicrosoftAttention)
    assert isinstance(form_for(ms, {"": 23, "com.microsoft": 1}),
                      attention_ms.MicrosoftAttentionForm)

