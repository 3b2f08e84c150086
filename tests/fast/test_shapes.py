"""Concrete input shapes (onnxprune.shapes): the one place that sizes dynamic dims."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from onnxprune.errors import OnnxpruneError
from onnxprune.shapes import (
    InputSpec,
    analysis_shapes,
    batch_shapes,
    check_synthesisable,
    concrete_shapes,
    doubled_batch_feeds,
    input_specs,
    partial_dims,
    verification_shapes,
)

X = InputSpec("x", np.float32, ("batch", "seq", 7))
FIXED = InputSpec("m", np.int64, (4, 16))


def test_input_specs_skip_initializers_and_name_dynamic_dims():
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", None, 3]),
         helper.make_tensor_value_info("w", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [helper.make_tensor("w", TensorProto.FLOAT, [3], [1, 2, 3])])
    (spec,) = input_specs(helper.make_model(graph))
    assert spec == InputSpec("x", np.float32, ("batch", "x_dim1", 3))
    assert spec.dynamic_batch and spec.is_dynamic


def test_concrete_takes_overrides_checked_against_static_dims():
    assert concrete_shapes([X, FIXED]) == {"x": (1, 1, 7), "m": (4, 16)}
    assert X.concrete({"x": (2, 9, 7)}) == (2, 9, 7)
    with pytest.raises(OnnxpruneError, match="conflicts with the static shape"):
        X.concrete({"x": (2, 9, 8)})
    with pytest.raises(OnnxpruneError, match="2 dims given"):
        X.concrete({"x": (2, 9)})


def test_partial_dims_leave_unknown_dims_open_and_allow_another_sample_count():
    assert partial_dims("f.csv: x", X.dims, None) == [None, None, 7]
    assert partial_dims("f.csv: x", FIXED.dims, (1, 16)) == [4, 16]
    with pytest.raises(OnnxpruneError, match=r"f\.csv: x conflicts with its static shape"):
        partial_dims("f.csv: x", FIXED.dims, (4, 8))


def test_synthesis_needs_every_non_batch_dim():
    check_synthesisable([FIXED, InputSpec("x", np.float32, ("batch", 7))])
    with pytest.raises(OnnxpruneError, match=r"--shape x:1,128"):
        check_synthesisable([X])
    check_synthesisable([X], {"x": (1, 5, 7)})


def test_analysis_verification_and_benchmark_shapes():
    data = {"x": np.zeros((32, 96, 7), np.float32), "m": np.zeros((8, 16), np.int64)}
    analysed = analysis_shapes([X, FIXED], data)
    assert analysed == {"x": (1, 96, 7), "m": (4, 16)}  # a static batch stays
    assert analysis_shapes([X], data, {"x": (3, 5, 7)}) == {"x": (3, 5, 7)}
    assert verification_shapes([X, FIXED], analysed) == {"x": (2, 96, 7), "m": (4, 16)}
    assert verification_shapes([X], {"x": (2, 96, 7)}) == {"x": (3, 96, 7)}
    assert batch_shapes([X], 8, {"x": (1, 96, 7)}, "m.onnx") == {"x": (8, 96, 7)}
    with pytest.raises(OnnxpruneError, match=r"m\.onnx: input m has a static batch of 4"):
        batch_shapes([FIXED], 8, None, "m.onnx")


def test_doubled_batch_feeds_put_the_analysis_input_first():
    first = {"x": np.ones((1, 2, 7), np.float32), "m": np.zeros((4, 16), np.int64)}
    extra = {"x": np.zeros((1, 2, 7), np.float32), "m": np.ones((4, 16), np.int64)}
    feeds = doubled_batch_feeds([X, FIXED], first, extra)
    assert feeds["x"].shape == (2, 2, 7) and feeds["x"][0].all() and not feeds["x"][1].any()
    assert feeds["m"] is first["m"] or np.array_equal(feeds["m"], first["m"])


def test_a_named_dim_given_once_settles_every_input_that_uses_it():
    from onnxprune.shapes import complete_shapes

    ids = InputSpec("input_ids", np.int64, ("batch", "seq"))
    mask = InputSpec("attention_mask", np.int64, ("batch", "seq"))
    other = InputSpec("pixels", np.float32, ("batch", 3, "height"))
    got = complete_shapes([ids, mask, other], {"input_ids": (2, 128)})
    assert got == {"input_ids": (2, 128), "attention_mask": (2, 128)}
    assert complete_shapes([ids, mask], None) is None
