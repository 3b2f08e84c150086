"""Rewrites as passes (onnxprune.passes): conditions checked around every rewrite, on small
hand-built graphs (no torch)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.autodiff import (
    FROZEN_SUFFIX,
    DeclareStaticShapes,
    DropDeadNodes,
    FreezeShapeOperands,
    declare_static_shapes,
)
from onnxprune.passes import (
    Pass,
    PassConditionError,
    checker_broken,
    dead_nodes,
    node_outputs_lost,
    outputs_changed,
    unsorted_nodes,
)
from onnxprune.seed_axis import SpeedUpSeedAxis
from onnxprune.tracing import trace


def _model(nodes, inputs, outputs, inits=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _ints(name: str, values) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(values, np.int64), name)


def _run(model: onnx.ModelProto, feeds: dict) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def _x(dims) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)


def _y(dims=None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)


def relu_with_dead_branch() -> onnx.ModelProto:
    """y = relu(x); a dead Neg branch and an unused initializer."""
    return _model([helper.make_node("Relu", ["x"], ["y"], name="relu"),
                   helper.make_node("Neg", ["x"], ["unused"], name="neg"),
                   helper.make_node("Add", ["unused", "w"], ["unused2"], name="add")],
                  [_x(["b", 4])], [_y(["b", 4])],
                  [numpy_helper.from_array(np.ones(4, np.float32), "w")])


def sliced_by_its_own_shape() -> onnx.ModelProto:
    """y = x[:, :n] with n = Shape(x)[1] // 2, computed in the graph."""
    nodes = [helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Gather", ["shape", "one"], ["width"], axis=0),
             helper.make_node("Div", ["width", "two"], ["half"]),
             helper.make_node("Slice", ["x", "zero", "half", "one"], ["y"], name="slice")]
    return _model(nodes, [_x(["b", 6])], [_y()],
                  [_ints("one", [1]), _ints("two", [2]), _ints("zero", [0])])


def traces(model: onnx.ModelProto, batches=(1, 2)) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [trace(model, {"x": rng.standard_normal((b, 6)).astype(np.float32)})
            for b in batches]


# --- the base ------------------------------------------------------------------------------


class _RenameOutput(Pass):
    name = "rename output"

    def apply(self, model):
        model.graph.output[0].name = "z"
        model.graph.node[0].output[0] = "z"


class _NeedsNodes(Pass):
    name = "needs nodes"

    def pre(self, model):
        return [] if model.graph.node else ["the graph has no nodes"]

    def apply(self, model):
        return "applied"


def test_run_checks_pre_and_post_conditions_and_names_the_pass():
    model = relu_with_dead_branch()
    assert _NeedsNodes().run(model) == "applied"
    with pytest.raises(PassConditionError, match=r"pass 'needs nodes': pre-condition failed: "
                                                 r"the graph has no nodes"):
        _NeedsNodes().run(_model([], [_x([1])], [_x([1])]))
    with pytest.raises(PassConditionError, match=r"pass 'rename output': post-condition "
                                                 r"failed: graph outputs changed"):
        _RenameOutput().run(model)
    assert issubclass(PassConditionError, RuntimeError)  # an internal error: exit 1


def test_conditions_on_hand_made_graphs():
    good = relu_with_dead_branch()
    assert dead_nodes(good) == ["node 'add' feeds nothing"]
    assert unsorted_nodes(good) == [] and checker_broken(good, good) == []
    reordered = onnx.ModelProto()
    reordered.CopyFrom(good)
    nodes = list(reordered.graph.node)
    del reordered.graph.node[:]
    reordered.graph.node.extend([nodes[2], nodes[0], nodes[1]])
    assert unsorted_nodes(reordered) == ["node 'add' reads 'unused' before it is made"]
    assert node_outputs_lost(good, reordered) == []
    del reordered.graph.node[2]
    assert node_outputs_lost(good, reordered) == ["tensor 'unused' is no longer computed"]
    assert outputs_changed(good, reordered) == []
    broken = onnx.ModelProto()
    broken.CopyFrom(good)
    broken.graph.node[0].op_type = "NoSuchOp"
    assert checker_broken(good, broken) and not checker_broken(broken, broken)


# --- the rewrites --------------------------------------------------------------------------


def test_drop_dead_nodes_leaves_only_live_nodes():
    model = relu_with_dead_branch()
    DropDeadNodes().run(model)
    assert [n.name for n in model.graph.node] == ["relu"]
    assert not model.graph.initializer and dead_nodes(model) == []


def test_freeze_shape_operands_holds_the_traced_values():
    model = sliced_by_its_own_shape()
    one, two = traces(model)
    x = np.arange(12, dtype=np.float32).reshape(2, 6)
    want = _run(model, {"x": x})["y"]
    freeze = FreezeShapeOperands([one, two])
    assert freeze.run(model) == 1
    assert list(freeze.frozen) == ["half"]
    slice_node = next(n for n in model.graph.node if n.op_type == "Slice")
    assert slice_node.input[2] == "half" + FROZEN_SUFFIX
    frozen = next(t for t in model.graph.initializer if t.name == "half" + FROZEN_SUFFIX)
    assert numpy_helper.to_array(frozen).tolist() == [3]
    np.testing.assert_array_equal(_run(model, {"x": x})["y"], want)


def test_freeze_shape_operands_refuses_to_run_without_traces_and_checks_its_values():
    with pytest.raises(PassConditionError, match="no trace"):
        FreezeShapeOperands([]).run(sliced_by_its_own_shape())

    class _WrongValue(FreezeShapeOperands):
        def apply(self, model):
            count = super().apply(model)
            model.graph.initializer[-1].CopyFrom(_ints("half" + FROZEN_SUFFIX, [2]))
            return count

    model = sliced_by_its_own_shape()
    with pytest.raises(PassConditionError, match="'half' frozen to"):
        _WrongValue(traces(model)).run(model)


def test_a_bound_that_depends_on_the_batch_is_not_frozen():
    nodes = [helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Gather", ["shape", "zero"], ["rows"], axis=0),
             helper.make_node("Slice", ["x", "zero", "rows", "zero"], ["y"])]
    model = _model(nodes, [_x(["b", 6])], [_y()], [_ints("zero", [0])])
    assert FreezeShapeOperands(traces(model)).run(model) == 0


def concat_of_computed_parts() -> onnx.ModelProto:
    """y = concat(x[:, :n], x[:, :n]) with n computed: inference loses the parts' shapes."""
    model = sliced_by_its_own_shape()
    model.graph.node[-1].output[0] = "part"
    model.graph.node.append(helper.make_node("Concat", ["part", "part"], ["y"], axis=0))
    return model


def test_declare_static_shapes_declares_the_traced_shape_at_the_batch():
    model = concat_of_computed_parts()
    one, two = traces(model)
    assert declare_static_shapes(model, one, two, None) is True  # only checks
    assert not [vi for vi in model.graph.value_info if vi.name == "part"]
    declare = DeclareStaticShapes(one, two, 4)
    assert declare.run(model) is True
    (part,) = [vi for vi in model.graph.value_info if vi.name == "part"]
    assert [d.dim_value for d in part.type.tensor_type.shape.dim] == [4, 3]


def test_declare_static_shapes_post_condition_catches_a_wrong_declaration():
    class _Doubled(DeclareStaticShapes):
        def apply(self, model):
            bound = super().apply(model)
            model.graph.value_info[-1].type.tensor_type.shape.dim[0].dim_value *= 2
            return bound

    model = concat_of_computed_parts()
    with pytest.raises(PassConditionError, match=r"'part' declared \[8, 3\], traced \[4, 3\]"):
        _Doubled(*traces(model), 4).run(model)


def test_speed_up_seed_axis_keeps_outputs_and_tensor_names():
    axes = _ints("axes", [1])
    nodes = [helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=1)]
    model = _model(nodes, [_x([2, 3, 1])], [_y([2, 1, 1])], [axes])
    x = np.random.default_rng(0).standard_normal((2, 3, 1)).astype(np.float32)
    want = _run(model, {"x": x})["y"]
    assert SpeedUpSeedAxis().run(model) == {"transpose": 0, "reduce": 1, "broadcast": 0}
    np.testing.assert_allclose(_run(model, {"x": x})["y"], want, rtol=1e-6)
    with pytest.raises(PassConditionError, match="reads 'x2' before it is made"):
        SpeedUpSeedAxis().run(_model([helper.make_node("Relu", ["x2"], ["y"]),
                                      helper.make_node("Relu", ["x"], ["x2"])],
                                     [_x([2])], [_y([2])]))


def test_the_skeleton_keeps_structure_without_weight_data():
    from opgraphs import attention_model

    from onnxprune.passes import skeleton

    model = attention_model()
    model.graph.initializer.append(numpy_helper.from_array(np.ones((32, 32), np.float32), "W"))
    copy = skeleton(model)
    assert list(copy.graph.node) == list(model.graph.node)
    assert list(copy.graph.output) == list(model.graph.output)
    assert [t.name for t in copy.graph.initializer] == [t.name for t in model.graph.initializer]
    big = {t.name: t for t in copy.graph.initializer}["W"]
    assert list(big.dims) == [32, 32] and not big.raw_data           # no weight data kept
    small = [t for t in model.graph.initializer if len(t.raw_data) < 1024]
    assert all(t in copy.graph.initializer for t in small)            # small ones in full
    assert copy.opset_import == model.opset_import and copy.ir_version == model.ir_version


def test_a_pass_that_keeps_the_checker_is_caught_breaking_it():
    from opgraphs import attention_model

    from onnxprune.passes import Pass, PassConditionError

    class Breaks(Pass):
        name = "breaks"
        keeps_checker = True

        def apply(self, model):
            model.graph.node[0].op_type = "NoSuchOp"

    with pytest.raises(PassConditionError, match=r"onnx\.checker"):
        Breaks().run(attention_model())
