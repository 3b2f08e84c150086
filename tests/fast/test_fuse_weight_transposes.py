"""The weight adjoints of the gradient graph (``MatMul(g, Transpose(W))``) read W itself
through ``FusedMatMul(transB=1)``: no transposed copy of each weight in the session."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxprune.autodiff import FuseWeightTransposes
from onnxprune.runtime import make_session, run


def _graph(weight_as_input: bool) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 4)).astype(np.float32)
    v = rng.standard_normal((6, 4)).astype(np.float32)
    nodes = [helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
             helper.make_node("MatMul", ["g", "wt"], ["dx"]),
             helper.make_node("Transpose", ["v"], ["vt"], perm=[1, 0]),   # a 2nd reader:
             helper.make_node("Relu", ["vt"], ["vr"]),                    # stays as it is
             helper.make_node("MatMul", ["dx", "v"], ["y"]),
             helper.make_node("MatMul", ["y", "vr"], ["z"])]
    inputs = [helper.make_tensor_value_info("g", onnx.TensorProto.FLOAT, [2, 3, 4])]
    inits = [numpy_helper.from_array(v, "v")]
    if weight_as_input:   # as lifted while onnx-ad builds the graph
        inputs.append(helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, [6, 4]))
    else:
        inits.append(numpy_helper.from_array(w, "w"))
    graph = helper.make_graph(nodes, "adjoint", inputs,
                              [helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT,
                                                             [2, 3, 6])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_weight_transpose_feeding_a_matmul_becomes_fused_matmul():
    for as_input in (False, True):
        model = _graph(as_input)
        assert FuseWeightTransposes().run(model) == 1
        ops = [(n.op_type, n.domain) for n in model.graph.node]
        assert ("FusedMatMul", "com.microsoft") in ops
        assert ops.count(("Transpose", "")) == 1            # the one the Relu reads stays
        fused = next(n for n in model.graph.node if n.op_type == "FusedMatMul")
        assert list(fused.input) == ["g", "w"]
        assert {a.name: a.i for a in fused.attribute if a.name == "transB"} == {"transB": 1}


def test_the_fused_graph_computes_the_same():
    g = np.random.default_rng(1).standard_normal((2, 3, 4)).astype(np.float32)
    expected = run(make_session(_graph(False)), {"g": g})["z"]
    model = _graph(False)
    FuseWeightTransposes().run(model)
    np.testing.assert_allclose(run(make_session(model), {"g": g})["z"], expected,
                               rtol=1e-6, atol=1e-6)


def test_other_transposes_are_left_alone():
    model = _graph(False)
    model.graph.node[0].attribute[0].ints[:] = [0, 1]          # not a transpose of W
    assert FuseWeightTransposes().run(model) == 0


def test_a_half_weight_is_widened_by_casts_of_its_own():
    """float16: the fused node computes in float32 between its own Casts, so that ONNX
    Runtime does not share one float32 copy of W between the forward and backward pass."""
    model = _graph(True)
    for value_info in (*model.graph.input, *model.graph.output):
        value_info.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    v = model.graph.initializer[0]
    v.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(v).astype(np.float16), "v"))
    g = np.random.default_rng(3).standard_normal((2, 3, 4)).astype(np.float16)
    w = np.random.default_rng(4).standard_normal((6, 4)).astype(np.float16)
    expected = run(make_session(model), {"g": g, "w": w})["z"]
    assert FuseWeightTransposes().run(model) == 1
    fused = next(n for n in model.graph.node if n.op_type == "FusedMatMul")
    producers = {o: n for n in model.graph.node for o in n.output}
    assert [producers[i].op_type for i in fused.input] == ["Cast", "Cast"]
    assert producers[fused.input[1]].input[0] == "w"
    np.testing.assert_allclose(run(make_session(model), {"g": g, "w": w})["z"].astype(
        np.float32), expected.astype(np.float32), rtol=1e-2, atol=1e-2)
