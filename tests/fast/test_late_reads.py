"""Half-precision weights fed to ONNX Runtime are read only once their node's other input
is computed (onnxprune.late_reads): the same outputs, each read ordered after its input."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from onnxprune.late_reads import read_late
from onnxprune.runtime import initializers_to_inputs

H = onnx.TensorProto.FLOAT16


def _model() -> onnx.ModelProto:
    """x [2, 64] fp16 -> MatMul(w1) -> Relu -> MatMul(w2) -> y; w2 also through a Cast to
    float32 read by a MatMul of the float32 x; w3 is read by a node with no other computed
    input (Transpose)."""
    rng = np.random.default_rng(0)
    w = {n: numpy_helper.from_array((rng.standard_normal((64, 64)) / 8).astype(np.float16), n)
         for n in ("w1", "w2", "w3")}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"]),
             helper.make_node("Cast", ["x"], ["x32"], to=onnx.TensorProto.FLOAT),
             helper.make_node("Cast", ["w2"], ["w2_32"], to=onnx.TensorProto.FLOAT),
             helper.make_node("MatMul", ["x32", "w2_32"], ["z"]),
             helper.make_node("Transpose", ["w3"], ["t"])]
    graph = helper.make_graph(
        nodes, "half", [helper.make_tensor_value_info("x", H, [2, 64])],
        [helper.make_tensor_value_info("y", H, [2, 64]),
         helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [2, 64]),
         helper.make_tensor_value_info("t", H, [64, 64])], list(w.values()))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _fed(rewrite: bool) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    model = _model()
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    taken = initializers_to_inputs(model, set(weights))
    if rewrite:
        assert read_late(model, taken) == 3      # w1, w2 and w2's Cast; not w3
    return model, weights


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString()).run(None, feeds)


def test_late_reads_compute_the_same_outputs():
    x = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float16)
    plain, weights = _fed(False)
    late, _ = _fed(True)
    onnx.checker.check_model(late)
    for want, got in zip(_run(plain, {"x": x, **weights}), _run(late, {"x": x, **weights})):
        np.testing.assert_array_equal(got, want)


def test_each_read_waits_for_the_readers_other_input():
    model, _ = _fed(True)
    made = {o: n for n in model.graph.node for o in n.output}

    def ancestors(name: str) -> set[str]:
        found, todo = set(), [name]
        while todo:
            node = made.get(todo.pop())
            if node is not None:
                new = [i for i in node.input if i not in found]
                found.update(new)
                todo += new
        return found

    readers = {n.op_type + ":" + n.output[0]: n for n in model.graph.node}
    w1 = readers["MatMul:h"].input[1]
    assert w1 != "w1" and {"w1", "x"} <= ancestors(w1)
    w2 = readers["MatMul:y"].input[1]
    assert w2 != "w2" and {"w2", "r"} <= ancestors(w2)
    cast = readers["Cast:w2_32"].input[0]                 # the Cast waits for x32's input
    assert cast != "w2" and {"w2", "x32"} <= ancestors(cast)
    assert readers["Transpose:t"].input[0] == "w3"       # nothing else to wait for
