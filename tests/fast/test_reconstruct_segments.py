"""Segments: a graph cut before chosen nodes runs, segment after segment from the values
crossing each cut, to exactly the outputs of the whole graph, with weights fed per run."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.errors import OnnxpruneError
from onnxprune.reconstruct.segments import Segments

F = TensorProto.FLOAT


def _model() -> onnx.ModelProto:
    """x -> mm1 (fed w1) -> relu -> mm2 (fed w2) -> + x (skip across both cuts) -> y, with a
    mask input read only after the second cut and an early graph output ``h``."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["a"], name="mm1"),
        helper.make_node("Relu", ["a"], ["h"], name="relu"),
        helper.make_node("MatMul", ["h", "w2"], ["b"], name="mm2"),
        helper.make_node("Add", ["b", "x"], ["c"], name="skip"),
        helper.make_node("Mul", ["c", "mask"], ["d"], name="mask"),
        helper.make_node("Add", ["d", "bias"], ["y"], name="bias"),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(n, F, s) for n, s in
         [("x", ["N", 4]), ("mask", ["N", 4]), ("w1", [4, 4]), ("w2", [4, 4])]],
        [helper.make_tensor_value_info("y", F, None), helper.make_tensor_value_info("h", F, None)],
        [numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "bias")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _feeds(seed: int) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    data = {"x": rng.standard_normal((3, 4)).astype(np.float32),
            "mask": (rng.random((3, 4)) > 0.3).astype(np.float32)}
    weights = {n: rng.standard_normal((4, 4)).astype(np.float32) for n in ("w1", "w2")}
    return data, weights


def test_segments_chained_equal_the_whole_graph():
    model = _model()
    segments = Segments(model, ["mm1", "mm2"], {"w1", "w2"})
    whole = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for seed in range(3):
        data, weights = _feeds(seed)
        want = dict(zip(["y", "h"], whole.run(["y", "h"], {**data, **weights})))
        at_mm1 = segments.advance(0, dict(data), weights)
        at_mm2 = segments.advance(1, at_mm1, weights)
        got = segments.finish(2, at_mm2, weights)
        np.testing.assert_array_equal(got["y"], want["y"])
        np.testing.assert_array_equal(got["h"], want["h"])
        np.testing.assert_array_equal(segments.finish(0, dict(data), weights)["y"], want["y"])
        np.testing.assert_array_equal(at_mm2["h"], want["h"])   # the projection's input


def test_the_frontier_carries_only_what_later_nodes_read():
    segments = Segments(_model(), ["mm1", "mm2"], {"w1", "w2"})
    assert segments.frontier[0] == ["mask", "x"]
    assert segments.frontier[1] == ["mask", "x"]            # nothing made before mm1 yet
    assert segments.frontier[2] == ["h", "mask", "x"]       # h: mm2's input, and an output
    assert segments.frontier[3] == ["y", "h"]


def test_a_weight_change_reaches_only_the_segments_after_it():
    model = _model()
    segments = Segments(model, ["mm1", "mm2"], {"w1", "w2"})
    data, weights = _feeds(0)
    at_mm2 = segments.advance(1, segments.advance(0, dict(data), weights), weights)
    changed = {**weights, "w2": weights["w2"] * 2}
    whole = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = whole.run(["y"], {**data, **changed})[0]
    np.testing.assert_array_equal(segments.finish(2, at_mm2, changed)["y"], want)


def test_stops_out_of_order_or_unknown_are_refused():
    with pytest.raises(OnnxpruneError, match="out of order"):
        Segments(_model(), ["mm2", "mm1"], {"w1", "w2"})
    with pytest.raises(OnnxpruneError, match="not in the model"):
        Segments(_model(), ["nope"], {"w1", "w2"})
