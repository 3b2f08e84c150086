"""Decomposed attention: the Softmax-anchored form finds Q·Kᵀ, A·V and q/k/v; the block it
anchors has the right heads; head and channel cuts are exact."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from opgraphs import (
    HEAD_DIM,
    WIDTH,
    Builder,
    assert_cut_matches,
    attention_model,
    head_columns,
    residual_out,
    zeroed,
)

import onnxprune
from onnxprune.ops import attention_decomposed, form_for
from onnxprune.structure.discover import analyse
from onnxprune.structure.graph import GraphView


def _softmax(view: GraphView) -> gs.Node:
    return next(n for n in view.nodes if n.op == "Softmax")


@pytest.mark.parametrize("mask", [False, True])
def test_form_finds_both_matmuls_through_scale_and_mask(mask):
    view = GraphView(gs.import_onnx(attention_model(mask=mask)))
    node = _softmax(view)
    form = form_for(node, view.opset)
    assert isinstance(form, attention_decomposed.SoftmaxAttentionForm)
    found = form.anchors(view, node)
    assert (found.qk.name, found.av.name) == ("scores_MatMul", "ctx_MatMul")
    assert (found.q.name, found.k.name, found.v.name) == ("q.heads", "k.heads", "v.heads")


def test_softmax_without_matmuls_anchors_nothing():
    b = Builder(6)
    s = b.op("Softmax", [b.linear("x", "a", WIDTH, WIDTH)], "s", axis=1)
    view = GraphView(gs.import_onnx(residual_out(b, s, 18)))
    node = _softmax(view)
    assert form_for(node, view.opset).anchors(view, node) is None
    assert form_for(gs.Node("Softmax", "s", domain="com.example"), {}) is None


def test_block_heads_and_labels():
    [block] = analyse(attention_model(mask=True)).structure.blocks
    assert (block.name, block.anchor) == ("attn0", "probs_Softmax")
    assert (block.heads, block.qk_dim, block.vo_dim) == (2, HEAD_DIM, HEAD_DIM)
    assert (block.q_labels == np.arange(WIDTH).reshape(2, HEAD_DIM)).all()
    assert (block.k_labels == WIDTH + block.q_labels).all()
    assert (block.v_labels == 2 * WIDTH + block.q_labels).all()
    assert sorted(block.tokens.values()) == [0, 1]
    assert block.removable and block.residual_add == "y_Add"


@pytest.mark.parametrize(("units", "oracle"), [
    (["attn0.head0"], {"o.W": (0, head_columns(0))}),
    (["attn0.vo0.0", "attn0.vo1.2"], {"o.W": (0, [0, HEAD_DIM + 2])}),
    (["attn0.qk0.3", "attn0.qk1.1"],
     {f"{n}.{p}": (axis, [3, HEAD_DIM + 1]) for n in ("q", "k")
      for p, axis in (("W", 1), ("b", 0))}),
])
def test_cut_is_exact(units, oracle):
    model = attention_model(mask=True)
    result = onnxprune.cut(model, units)
    assert result.verification.max_abs_diff < 1e-5
    assert_cut_matches(result, zeroed(model, oracle))
    assert result.params_after < result.params_before
