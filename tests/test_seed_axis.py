"""The seed-axis rewrites change how adjoint nodes compute, never what they compute."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.seed_axis import speed_up_seed_axis


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _graph(opset: int) -> onnx.ModelProto:
    """x [2,3,4,5,1] (a seed axis at the end) through the three patterns."""
    axes = [numpy_helper.from_array(np.array([-2], np.int64), "axes")]
    reduce_attr = {} if opset >= 18 else {"axes": [-2]}
    reduce_inputs = ["x", "axes"] if opset >= 18 else ["x"]
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1, 4, 3]),
        helper.make_node("Transpose", ["x"], ["u"], perm=[4, 0, 1, 2, 3]),
        helper.make_node("ReduceSum", ["x", "axes"], ["s"], keepdims=1),
        helper.make_node("ReduceMean", reduce_inputs, ["m"], keepdims=0, **reduce_attr),
        helper.make_node("Mul", ["x", "scale"], ["y"]),
        helper.make_node("Sub", ["x", "s"], ["d"]),
        helper.make_node("Add", ["x", "bias"], ["b"]),
    ]
    graph = helper.make_graph(
        nodes, "seed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4, 5, 1]),
                        helper.make_tensor_value_info("bias", TensorProto.FLOAT, [5, 1])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
         for n in ("t", "u", "s", "m", "y", "d", "b")],
        [*axes, numpy_helper.from_array(np.array([0.5], np.float32), "scale")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("opset", [17, 18])
def test_rewrites_keep_every_output(opset):
    model = _graph(opset)
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((2, 3, 4, 5, 1)).astype(np.float32),
             "bias": rng.standard_normal((5, 1)).astype(np.float32)}
    before = _run(model, feeds)
    counts = speed_up_seed_axis(model)
    assert counts == {"transpose": 2, "reduce": 2, "broadcast": 2}
    after = _run(model, feeds)
    for a, b in zip(before, after):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)  # summation order may differ


def test_graph_without_unit_axes_is_untouched():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("Transpose", ["x"], ["y"], perm=[1, 0])],
                              "plain", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert speed_up_seed_axis(model) == {"transpose": 0, "reduce": 0, "broadcast": 0}
    assert [n.op_type for n in model.graph.node] == ["Transpose"]
