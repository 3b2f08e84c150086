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
