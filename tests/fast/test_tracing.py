"""The traced run (onnxprune.tracing): large float tensors held as shapes, and a large
model traced segment by segment giving the same trace as one run."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxprune import tracing, weightstore
from onnxprune.tracing import shapes_only, trace, values_of

F = onnx.TensorProto.FLOAT


def _encoder(layers: int = 3, d: int = 128, rows: int = 256) -> onnx.ModelProto:
    """x [B, rows, d] through ``layers`` residual MLPs, then a Reshape whose shape is
    computed from Shape(x) (a shape tensor: its values must be traced). Each hidden tensor
    is [B, rows, 2d] floats, 256 KiB at batch 1 (over the shape-only size), each weight
    128 KiB (over the weight store's tensor size)."""
    rng = np.random.default_rng(0)
    nodes, inits, h = [], [], "x"
    for i in range(layers):
        scale = 1 / np.sqrt(d)
        inits += [numpy_helper.from_array((scale * rng.standard_normal((d, 2 * d)))
                                          .astype(np.float32), f"up{i}"),
                  numpy_helper.from_array((scale * rng.standard_normal((2 * d, d)))
                                          .astype(np.float32), f"down{i}")]
        nodes += [helper.make_node("MatMul", [h, f"up{i}"], [f"u{i}"]),
                  helper.make_node("Relu", [f"u{i}"], [f"r{i}"]),
                  helper.make_node("MatMul", [f"r{i}", f"down{i}"], [f"m{i}"]),
                  helper.make_node("Add", [h, f"m{i}"], [f"h{i}"])]
        h = f"h{i}"
    inits.append(numpy_helper.from_array(np.array([-1], np.int64), "rest"))
    nodes += [helper.make_node("Shape", ["x"], ["shape"], start=0, end=1),
              helper.make_node("Concat", ["shape", "rest"], ["flat"], axis=0),
              helper.make_node("Reshape", [h, "flat"], ["y"])]
    graph = helper.make_graph(nodes, "encoder",
                              [helper.make_tensor_value_info("x", F, ["batch", rows, d])],
                              [helper.make_tensor_value_info("y", F, ["batch", None])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _feeds(batch: int = 1, rows: int = 256, d: int = 128) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).standard_normal((batch, rows, d)).astype(np.float32)}


def _assert_same_trace(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for name, value in want.items():
        assert np.shape(got[name]) == np.shape(value), name
        assert np.asarray(got[name]).dtype == np.asarray(value).dtype, name
        if np.asarray(value).strides != () or np.ndim(value) == 0:   # held as a value
            np.testing.assert_allclose(got[name], value, rtol=1e-6, atol=1e-6, err_msg=name)


def test_large_float_tensors_are_shapes_and_shape_tensors_values():
    values = trace(_encoder(), _feeds())
    assert values["u0"].shape == (1, 256, 256) and values["u0"].strides == (0, 0, 0)
    np.testing.assert_array_equal(values["flat"], [1, -1])
    np.testing.assert_array_equal(values["x"], _feeds()["x"])       # the feeds, as fed
    assert values["up0"].shape == (128, 256) and values["up0"].any()  # initializers too


@pytest.mark.parametrize("part_bytes", [1, 300_000, 1 << 30])
def test_a_trace_in_segments_is_the_trace_in_one_run(part_bytes):
    model, feeds = _encoder(), _feeds(batch=2)
    _assert_same_trace(trace(model, feeds, part_bytes=part_bytes), trace(model, feeds))


def test_segments_follow_the_planned_output_bytes():
    model = _encoder()
    segments, _ = tracing._segments(model, _feeds(), 300_000)
    assert len(segments) > 3
    assert [n.name or n.output[0] for s in segments for n in s] == \
        [n.name or n.output[0] for n in model.graph.node]
    # each segment passes its budget by at most one node's output (a 256 KiB tensor)
    sizes = tracing._planned_bytes(model, _feeds())
    for nodes in segments:
        held = sum(sizes.get(o, max(sizes.values())) for n in nodes for o in n.output)
        assert held <= 300_000 + 256 * 256 * 4


def test_kept_tensors_hold_their_values():
    model, feeds = _encoder(), _feeds(batch=2)
    full = values_of(model, ["u1", "h2"], feeds)
    kept = trace(model, feeds, part_bytes=1, keep=["u1", "h2"])
    for name in ("u1", "h2"):
        assert kept[name].strides != (0, 0, 0)
        np.testing.assert_allclose(kept[name], full[name], rtol=1e-6)


def test_a_graph_with_a_subgraph_is_traced_in_one_run():
    model = _encoder(layers=1)
    branch = helper.make_graph([helper.make_node("Identity", ["h0"], ["picked"])], "branch",
                               [], [helper.make_tensor_value_info("picked", F, None)])
    model.graph.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
    model.graph.node.append(helper.make_node("If", ["cond"], ["z"], then_branch=branch,
                                             else_branch=branch))
    model.graph.output.append(helper.make_tensor_value_info("z", F, None))
    assert tracing._segments(model, _feeds(), 1) is None
    _assert_same_trace(trace(model, _feeds(), part_bytes=1), trace(model, _feeds()))


def test_a_stored_model_is_traced_in_segments_with_the_same_result(monkeypatch):
    model, feeds = _encoder(), _feeds(batch=2)
    want = trace(model, feeds)
    want_values = values_of(model, ["r0", "m2"], feeds)
    segmented = []
    run_segments = tracing._run_segments
    monkeypatch.setattr(tracing, "_run_segments",
                        lambda *a: segmented.append(1) or run_segments(*a))
    monkeypatch.setattr(tracing, "TRACE_PART_BYTES", 300_000)
    store = weightstore.offload(model, min_total=0)
    try:
        _assert_same_trace(trace(model, feeds), want)
        got = values_of(model, ["r0", "m2"], feeds)
        for name, value in want_values.items():
            np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-5)
        assert len(segmented) == 2
    finally:
        store.close()


def test_shapes_only_leaves_small_and_integer_values():
    values = {"big": np.ones((128, 128), np.float32), "small": np.ones(4, np.float32),
              "ids": np.arange(1 << 15, dtype=np.int64), "kept": np.ones((128, 128))}
    out = shapes_only(values, keep={"kept"})
    assert out["big"].shape == (128, 128) and out["big"].strides == (0, 0)
    assert out["small"] is values["small"] and out["ids"] is values["ids"]
    assert out["kept"] is values["kept"]
