"""Half-precision models: the hand-built graphs converted with onnxruntime's own float16
converter (with and without ``keep_io_types``) are inspected, gated, scored, cut and verified
in their own dtypes, and the cut changes no dtype. bfloat16 models get one clear error
(ONNX Runtime's CPU provider has no bfloat16 MatMul)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper
from onnxruntime.transformers.float16 import convert_float_to_float16
from opgraphs import (
    WIDTH,
    attention_model,
    ffn_model,
    head_columns,
    zeroed,
)

import onnxprune
from onnxprune.autodiff import UpcastHalfKernels
from onnxprune.data import CalibrationData
from onnxprune.errors import OnnxpruneError
from onnxprune.losses import choose_loss, with_loss
from onnxprune.structure.discover import analyse
from onnxprune.verify import tolerance

HALF_RTOL, HALF_ATOL = tolerance(convert_float_to_float16(attention_model()))


def half(model: onnx.ModelProto, keep_io: bool) -> onnx.ModelProto:
    return convert_float_to_float16(model, keep_io_types=keep_io)


def dtypes(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every initializer and graph input/output, by name."""
    graph = model.graph
    out = {f"init:{t.name}": t.data_type for t in graph.initializer}
    out.update({f"io:{vi.name}": vi.type.tensor_type.elem_type
                for vi in [*graph.input, *graph.output]})
    return out


def assert_dtypes_kept(before: onnx.ModelProto, after: onnx.ModelProto) -> None:
    was, now = dtypes(before), dtypes(after)
    assert {k for k in now if k.startswith("io:")} == {k for k in was if k.startswith("io:")}
    changed = {k: (was[k], t) for k, t in now.items() if k in was and was[k] != t}
    assert not changed
    # new initializers (resized weights) are half precision like the originals they replace
    floats = {t for t in now.values() if t in (TensorProto.FLOAT, TensorProto.FLOAT16)}
    weights = {t for k, t in was.items() if k.startswith("init:")
               and t in (TensorProto.FLOAT, TensorProto.FLOAT16)}
    assert weights == {TensorProto.FLOAT16}
    assert floats <= {TensorProto.FLOAT16} | {t for k, t in was.items() if k.startswith("io:")}


def feeds_for(model: onnx.ModelProto, seed: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    types = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}
    return {i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim])
            .astype(types[i.type.tensor_type.elem_type]) for i in model.graph.input}


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def assert_half_matches(result, oracle: onnx.ModelProto) -> None:
    """The cut equals the zeroed-weights oracle to the float16 tolerance."""
    x = feeds_for(oracle)
    for got, want in zip(run(result.model, x), run(oracle, x)):
        assert got.shape == want.shape and got.dtype == want.dtype
        scale = float(np.abs(want.astype(np.float64)).max())
        diff = float(np.abs(got.astype(np.float64) - want).max())
        assert diff <= HALF_ATOL + HALF_RTOL * scale, (diff, scale)


KEEP = pytest.mark.parametrize("keep_io", [False, True], ids=["fp16-io", "fp32-io"])


def test_tolerance_follows_the_compute_type():
    assert tolerance(attention_model()) == (1e-4, 1e-5)
    eps = float(np.finfo(np.float16).eps)
    for keep_io in (False, True):   # float16 weights inside a float32-io model count too
        rtol, atol = tolerance(half(attention_model(), keep_io))
        assert rtol == pytest.approx(16 * eps) and atol == pytest.approx(4 * eps)


@KEEP
def test_inspect_and_gates_carry_the_model_dtype(keep_io):
    model = half(attention_model(), keep_io)
    analysis = onnxprune.inspect(model)
    assert [b.name for b in analysis.structure.blocks] == ["attn0"]
    assert analysis.structure.attention[0].heads == 2
    gated = onnxprune.gate(model)
    values = gated.feeds()
    assert {g.dtype for g in gated.gates} == {np.float16}
    assert {v.dtype for v in values.values()} == {np.dtype(np.float16)}
    # all gates 1 reproduce the original outputs exactly, in the original output dtype
    x = feeds_for(model)
    (want,), (got,) = run(model, x), run(gated.model, {**x, **values})
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


@KEEP
@pytest.mark.parametrize("units", [["attn0.head1"], ["attn0"],
                                   ["attn0.qk0.1", "attn0.qk1.2"],
                                   ["attn0.vo0.3", "attn0.vo1.0"]])
def test_cut_is_exact_and_keeps_dtypes(keep_io, units):
    model = half(attention_model(), keep_io)
    result = onnxprune.cut(model, units)
    assert result.params_after < result.params_before
    assert result.verification.max_abs_diff <= HALF_ATOL
    assert_dtypes_kept(model, result.model)
    onnx.checker.check_model(result.model, full_check=True)


@KEEP
def test_head_cut_equals_the_zeroed_oracle(keep_io):
    f32 = attention_model()
    model = half(f32, keep_io)
    oracle = half(zeroed(f32, {"o.W": (0, head_columns(1))}), keep_io)
    assert_half_matches(onnxprune.cut(model, ["attn0.head1"]), oracle)


@KEEP
def test_ffn_channel_cut_equals_the_zeroed_oracle(keep_io):
    f32 = ffn_model("Relu")
    model = half(f32, keep_io)
    oracle = half(zeroed(f32, {"down.W": (0, [1, 4])}), keep_io)
    result = onnxprune.cut(model, ["ffn0.ch1", "ffn0.ch4"], analysis=analyse(model))
    assert_half_matches(result, oracle)
    assert result.params_before - result.params_after == 2 * (WIDTH + WIDTH + 1)
    assert_dtypes_kept(model, result.model)


@KEEP
@pytest.mark.parametrize("method", ["fisher", "taylor", "ablation", "magnitude"])
def test_prune_data_free(keep_io, method):
    model = half(attention_model(), keep_io)
    pruned, report = onnxprune.prune(model, ratio=0.3, method=method)
    assert report.removed and report.params_after < report.params_before
    assert all(not s.fallbacks for s in report.steps)
    assert all(np.isfinite(v) for v in report.scores.values())
    assert np.isfinite(report.loss_after)
    assert_dtypes_kept(model, pruned)
    (out,) = run(pruned, feeds_for(model))
    assert np.isfinite(out).all()


def test_half_gradient_scores_match_float32_ones():
    """fisher and taylor on the float16 model rank like (and nearly equal) the float32 ones."""
    f32 = attention_model()
    for method in ("fisher", "taylor"):
        want = onnxprune.score(f32, method=method).units()
        for keep_io in (False, True):
            got = onnxprune.score(half(f32, keep_io), method=method).units()
            assert set(got) == set(want)
            for name, value in want.items():
                assert got[name] == pytest.approx(value, rel=2e-2), (method, keep_io, name)


def test_float32_calibration_is_cast_to_a_half_input():
    model = half(attention_model(), keep_io=False)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 3, WIDTH)).astype(np.float32)
    y = rng.standard_normal((8, 3, 3)).astype(np.float32)
    data = CalibrationData({"x": x}, {"out": y}, fixed_batch=2)   # the graph's batch is 2
    pruned, report = onnxprune.prune(model, ratio=0.3, calib=data, method="taylor")
    assert report.loss.startswith("task") and np.isfinite(report.loss_before)
    assert_dtypes_kept(model, pruned)


def test_half_calibration_file(tmp_path):
    model = half(attention_model(), keep_io=True)      # float32 input, float16 data
    rng = np.random.default_rng(0)
    path = tmp_path / "calib.npz"
    np.savez(path, x=rng.standard_normal((8, 3, WIDTH)).astype(np.float16),
             out=rng.standard_normal((8, 3, 3)).astype(np.float16))
    _, report = onnxprune.prune(model, ratio=0.3, calib=str(path))
    assert not report.to_json()["data"]["data_free"] and report.removed


def test_loss_is_float32_on_a_half_output():
    model = half(attention_model(), keep_io=False)
    spec = choose_loss(model, {})
    lossy = with_loss(model, spec)
    outputs = {o.name: o.type.tensor_type.elem_type for o in lossy.graph.output}
    assert set(outputs.values()) == {TensorProto.FLOAT}
    targets = {i.name: i.type.tensor_type.elem_type for i in lossy.graph.input
               if i.name.startswith("target.")}
    assert targets == {"target.out": TensorProto.FLOAT}
    # far beyond float16's range in the loss, still finite in float32
    x = np.full((2, 3, WIDTH), 8.0, np.float16)
    big = {"target.out": np.full((2, 3, 3), 6e4, np.float32)}
    (losses,) = run(lossy, {"x": x, **big})[:1]
    assert losses.dtype == np.float32 and np.isfinite(losses).all() and losses.min() > 65504


def test_upcast_pass_rewrites_half_scatter_adds():
    data = onnx.helper.make_tensor_value_info("d", TensorProto.FLOAT16, [4])
    idx = numpy_helper.from_array(np.array([[1], [1]], np.int64), "i")
    upd = onnx.helper.make_tensor_value_info("u", TensorProto.FLOAT16, [2])
    out = onnx.helper.make_tensor_value_info("y", TensorProto.FLOAT16, [4])
    node = onnx.helper.make_node("ScatterND", ["d", "i", "u"], ["y"], reduction="add")
    graph = onnx.helper.make_graph([node], "g", [data, upd], [out], [idx])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    model.ir_version = 10
    with pytest.raises(Exception, match="ScatterND"):
        run(model, {"d": np.zeros(4, np.float16), "u": np.ones(2, np.float16)})
    assert UpcastHalfKernels().run(model) == 1
    (y,) = run(model, {"d": np.zeros(4, np.float16), "u": np.ones(2, np.float16)})
    assert y.dtype == np.float16 and y.tolist() == [0, 2, 0, 0]


def bfloat16(model: onnx.ModelProto, keep_io: bool) -> onnx.ModelProto:
    """The float16 conversion with every float16 type and weight turned bfloat16."""
    out = half(model, keep_io)
    for init in out.graph.initializer:
        if init.data_type == TensorProto.FLOAT16:
            value = numpy_helper.to_array(init).astype(ml_dtypes.bfloat16)
            init.CopyFrom(numpy_helper.from_array(value, init.name))
    for vi in [*out.graph.input, *out.graph.output, *out.graph.value_info]:
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT16:
            vi.type.tensor_type.elem_type = TensorProto.BFLOAT16
    for node in out.graph.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT16:
                attr.i = TensorProto.BFLOAT16
    return out


@KEEP
def test_bfloat16_is_one_clear_error(keep_io):
    model = bfloat16(attention_model(), keep_io)
    with pytest.raises(OnnxpruneError) as err:
        onnxprune.inspect(model)
    message = str(err.value)
    assert "\n" not in message
    assert "bfloat16" in message and "MatMul" in message
