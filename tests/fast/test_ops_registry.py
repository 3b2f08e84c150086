"""The op-rule registry: lookup by (domain, op, opset), refusal by name of ops without a rule
(contrib and custom domains), and rules registered from outside the package."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from opgraphs import (
    CUSTOM_DOMAIN,
    WIDTH,
    Builder,
    assert_cut_matches,
    attention_model,
    ffn_model,
    head_columns,
    labels_of,
    residual_out,
    zeroed,
)

import onnxprune
from onnxprune.errors import NotPrunableError
from onnxprune.ops import (
    OpRule,
    elementwise,
    layout,
    matmul,
    register,
    registry,
    rule_for,
    unregister,
)
from onnxprune.structure.discover import analyse
from onnxprune.structure.graph import GraphView
from onnxprune.structure.labels import Flow


def test_lookup_by_domain_and_opset():
    assert isinstance(rule_for(gs.Node("MatMul", "m"), {"": 18}), matmul.MatMul)
    assert isinstance(rule_for(gs.Node("MatMul", "m", domain="ai.onnx"), {"": 18}),
                      matmul.MatMul)
    assert rule_for(gs.Node("MatMul", "m", domain="com.example"), {"": 18}) is None
    assert rule_for(gs.Node("Slice", "s"), {"": 9}) is None  # bounds were attributes then
    assert isinstance(rule_for(gs.Node("Slice", "s"), lambda domain: 10), layout.Slice)
    assert rule_for(gs.Node("TopK", "t"), {"": 18}) is None


def test_builtin_rules_and_forms_do_not_overlap():
    for table in (registry._RULES, registry._FORMS):
        for key, entries in table.items():
            spans = sorted((e.since, e.until or 10**6) for e in entries)
            assert all(a[1] < b[0] for a, b in pairwise(spans)), key


def test_graph_view_knows_the_opset_of_each_domain():
    model = attention_model(custom="Twice")
    view = GraphView(gs.import_onnx(model))
    assert (view.opset(""), view.opset("ai.onnx"), view.opset(None)) == (18, 18, 18)
    assert view.opset(CUSTOM_DOMAIN) == 1 and view.opset("com.microsoft") is None


def _microsoft_attention_model():
    b = Builder(7)
    h = b.linear("x", "h", WIDTH, WIDTH)
    att = b.op("Attention", [h, b.weight("qkv.W", WIDTH, 3 * WIDTH),
                             b.weight("qkv.b", 3 * WIDTH)], "att", domain="com.microsoft",
               num_heads=2)
    return residual_out(b, b.linear(att, "o", WIDTH, WIDTH), 18, {"com.microsoft": 1})


def test_microsoft_attention_is_not_taken_for_the_onnx_op():
    """The com.microsoft op gets its own rule, which refuses labels on its input (the ONNX
    op's rule would have propagated them)."""
    model = _microsoft_attention_model()
    with pytest.raises(NotPrunableError, match=r"^com\.microsoft\.Attention node att_Attention "
                                               "reads a prunable axis"):
        labels_of(model, ["h"])


def test_unknown_custom_op_on_the_path_is_refused_by_name():
    [block] = analyse(attention_model(custom="Twice")).structure.blocks
    assert not block.prunable
    assert block.reason == (f"{CUSTOM_DOMAIN}.Twice node ctx.custom_Twice on a prunable path "
                            "has no rule")


class Twice(OpRule):
    """An outside rule: com.example.Twice keeps every element in place."""

    ops = frozenset({"Twice"})
    domain = CUSTOM_DOMAIN

    def propagate(self, engine, node: gs.Node, flow: Flow) -> None:
        flow.labels[node.outputs[0].name] = flow.labels[node.inputs[0].name]

    def fix(self, surgeon, node: gs.Node) -> None:
        """No shape inputs."""


class TwiceWithoutFix(Twice):
    fix = OpRule.fix


@pytest.fixture
def registered():
    added = []

    def add(cls):
        added.append(register(cls))

    yield add
    for cls in added:
        unregister(cls)


def test_rule_registered_from_outside_is_used(registered):
    registered(Twice)
    model = attention_model(custom="Twice")
    [block] = analyse(model).structure.blocks
    assert block.prunable and block.heads == 2
    result = onnxprune.cut(model, ["attn0.head1"])
    assert_cut_matches(result, zeroed(model, {"o.W": (0, head_columns(1))}))


def test_cut_refuses_a_rule_without_a_fix(registered):
    registered(TwiceWithoutFix)
    with pytest.raises(NotPrunableError, match=r"Twice node ctx\.custom_Twice: its op rule "
                                               "cannot fix it"):
        onnxprune.cut(attention_model(custom="Twice"), ["attn0.head1"])


def test_cut_refuses_a_node_whose_rule_is_gone(registered):
    registered(Twice)
    model = attention_model(custom="Twice")
    analysis = onnxprune.inspect(model)
    unregister(Twice)
    with pytest.raises(NotPrunableError, match=r"Twice node ctx\.custom_Twice on a prunable "
                                               "path has no rule"):
        onnxprune.cut(model, ["attn0.head1"], analysis=analysis)


class CountingRelu(elementwise.Elementwise):
    ops = frozenset({"Relu"})
    calls = 0

    def propagate(self, engine, node, flow):
        CountingRelu.calls += 1
        super().propagate(engine, node, flow)


def test_later_registration_overrides_a_builtin(registered):
    registered(CountingRelu)
    assert isinstance(rule_for(gs.Node("Relu", "r"), {"": 18}), CountingRelu)
    flow, _ = labels_of(ffn_model("Relu"), ["up"])
    assert CountingRelu.calls == 1 and (flow.sinks[0].rows == np.arange(6)).all()
    unregister(CountingRelu)
    assert type(rule_for(gs.Node("Relu", "r"), {"": 18})) is elementwise.Elementwise


def test_a_rule_must_name_its_ops():
    class Nothing(OpRule):
        pass

    with pytest.raises(ValueError, match="names no op types"):
        register(Nothing)
