"""Elementwise and softmax rules: merged labels, broadcast operands, softmax axes by opset, and
exact FFN channel cuts through each activation form."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from opgraphs import WIDTH, Builder, assert_cut_matches, ffn_model, labels_of, residual_out, zeroed

import onnxprune
from onnxprune.errors import NotPrunableError
from onnxprune.ops import elementwise, rule_for
from onnxprune.structure.discover import analyse


def test_gated_product_pairs_gate_and_up_channels():
    flow, _ = labels_of(ffn_model("Sigmoid", gated=True), ["up", "up2"])
    assert all(flow.uf.find(c) == flow.uf.find(6 + c) for c in range(6))
    assert flow.uf.find(0) != flow.uf.find(1)
    assert (flow.labels["gated"][0, 0] == np.arange(6)).all()
    assert (flow.sinks[0].rows == np.arange(6)).all()


def test_bias_broadcasting_along_labels_is_an_operand():
    flow, _ = labels_of(ffn_model("Relu"), ["up.mm"])
    assert [(o.node, o.index) for o in flow.operands] == [("up_Add", 1)]
    assert (flow.labels["act"][1, 2] == np.arange(6)).all()


def _softmax_model(axis: int | None, opset: int) -> onnx.ModelProto:
    b = Builder(2)
    attrs = {} if axis is None else {"axis": axis}
    s = b.op("Softmax", [b.linear("x", "up", WIDTH, 6)], "soft", **attrs)
    return residual_out(b, b.linear(s, "down", 6, WIDTH), opset)


@pytest.mark.parametrize(("axis", "opset", "ok"), [
    (-1, 18, False),   # over the labelled columns
    (1, 18, True),     # over tokens only
    (1, 12, False),    # before opset 13: flattened from axis 1 on, columns included
    (None, 18, False),  # default -1 from opset 13
])
def test_softmax_refuses_normalising_over_labels(axis, opset, ok):
    model = _softmax_model(axis, opset)
    if ok:
        flow, _ = labels_of(model, ["up"])
        assert (flow.labels["soft"][0, 1] == np.arange(6)).all()
    else:
        with pytest.raises(NotPrunableError, match="normalises over a prunable axis"):
            labels_of(model, ["up"])


def test_softmax_rules_split_at_opset_13():
    node = gs.Node("Softmax", "s")
    assert isinstance(rule_for(node, {"": 12}), elementwise.SoftmaxFlattened)
    assert type(rule_for(node, {"": 13})) is elementwise.Softmax


FORMS = [("Relu", False, 18), ("Sigmoid", True, 18), ("Gelu", False, 20), ("Tanh", True, 18),
         ("FastGelu", False, 18)]


@pytest.mark.parametrize(("activation", "gated", "opset"), FORMS)
def test_ffn_channel_cut_is_exact(activation, gated, opset):
    model = ffn_model(activation, gated, opset=opset)
    analysis = analyse(model)
    [block] = analysis.structure.blocks
    assert block.kind == "ffn" and block.prunable and block.gated == gated
    result = onnxprune.cut(model, ["ffn0.ch1", "ffn0.ch4"], analysis=analysis)
    assert result.verification.max_abs_diff < 1e-5
    assert_cut_matches(result, zeroed(model, {"down.W": (0, [1, 4])}))
    down = next(i for i in result.model.graph.initializer if i.name.startswith("down.W"))
    assert list(down.dims) == [4, WIDTH]


def test_microsoft_fast_gelu_is_keyed_by_its_domain():
    assert isinstance(rule_for(gs.Node("FastGelu", "f", domain="com.microsoft"), {}),
                      elementwise.MicrosoftElementwise)
    assert rule_for(gs.Node("FastGelu", "f"), {"": 18}) is None


def test_elementwise_fix_is_a_no_op():
    node = gs.Node("Add", "a", inputs=[gs.Variable("x"), gs.Constant("b", np.ones(3))])
    elementwise.Elementwise().fix(None, node)
    assert node.inputs[1].values.tolist() == [1, 1, 1]

