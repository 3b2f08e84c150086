"""The weight store (issue 16): a large model's weights held once, in one file, shared by
every copy of the model and every ONNX Runtime session; what a run writes is the same as
without it, byte for byte."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxprune import modelio, weightstore
from onnxprune.cli import main
from onnxprune.errors import OnnxpruneError
from onnxprune.reconstruct.updates import apply_updates
from onnxprune.runtime import make_session, run, run_in_parts

REFERENCE = Path(__file__).resolve().parents[2] / "models" / "patchtst_etth1.onnx"
CUT = ["--remove", "attn0.head1,attn1.head3,ffn0.ch3,ffn2.ch7"]


def _mlp(seed: int = 0, hidden: int = 160) -> onnx.ModelProto:
    """x [2, 128] -> MatMul(128x160) -> Relu -> MatMul(160x128) + bias: two weights over
    the store's 64 KiB per tensor (80 KiB each) and a small bias."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((128, hidden)).astype(np.float32)
    w2 = rng.standard_normal((hidden, 128)).astype(np.float32)
    bias = rng.standard_normal(128).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["m"]),
             helper.make_node("Add", ["m", "bias"], ["y"])]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 128])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 128])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
         numpy_helper.from_array(bias, "bias")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def share_all(monkeypatch):
    """Every model counts as large: the store's paths run on the small test models."""
    monkeypatch.setattr(weightstore, "STORE_MIN_BYTES", 0)
    monkeypatch.setattr(modelio, "STORE_MIN_BYTES", 0)


def test_offload_moves_only_large_tensors_and_reads_them_back():
    model = _mlp()
    original = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    store = weightstore.offload(model, min_total=0)
    try:
        stubs = {t.name for t in model.graph.initializer if weightstore.store_of(t)}
        assert stubs == {"w1", "w2"}                       # the bias (512 B) stays inline
        assert model.ByteSize() < 2_000
        for tensor in model.graph.initializer:
            value = weightstore.tensor_array(tensor)
            np.testing.assert_array_equal(value, original[tensor.name])
        w1 = next(t for t in model.graph.initializer if t.name == "w1")
        assert not weightstore.tensor_array(w1).flags.writeable
        assert weightstore.offload(_mlp(), min_total=10**9) is None   # a small model stays
    finally:
        store.close()
    assert not store.folder.exists()


def test_sessions_over_stubs_compute_what_the_inline_model_computes():
    inline = _mlp()
    x = {"x": np.random.default_rng(1).standard_normal((2, 128)).astype(np.float32)}
    expected = run(make_session(inline), x)["y"]
    stubbed = _mlp()
    store = weightstore.offload(stubbed, min_total=0)
    sessions = [make_session(stubbed) for _ in range(3)]
    for session in sessions:
        np.testing.assert_allclose(run(session, x)["y"], expected, rtol=1e-5, atol=1e-5)
    store.close()


def test_refitted_weights_join_the_store_and_are_written_inline_byte_for_byte(tmp_path):
    model = _mlp()
    weightstore.offload(model, min_total=0)
    refit = np.arange(128 * 160, dtype=np.float32).reshape(128, 160) / 1000
    updated = apply_updates(model, {"w1": refit})
    w1 = next(t for t in updated.graph.initializer if t.name == "w1")
    assert weightstore.store_of(w1) is not None                # a stub, not inline data
    np.testing.assert_array_equal(weightstore.tensor_array(w1), refit)
    modelio.save_model(updated, tmp_path / "out.onnx")
    plain = apply_updates(_mlp(), {"w1": refit})
    assert (tmp_path / "out.onnx").read_bytes() == plain.SerializeToString()


def test_half_precision_weights_are_fed_not_widened_per_session():
    """float16 stubs are fed at every run (no float32 copy kept by the session) and give
    what the inline float16 model gives."""
    inline = _half(_mlp(hidden=320))     # 80 KiB of float16 per weight
    x = {"x": np.random.default_rng(2).standard_normal((2, 128)).astype(np.float32)}
    expected = run(make_session(inline), x)["y"]
    stubbed = _half(_mlp(hidden=320))
    weightstore.offload(stubbed, min_total=0)
    session = make_session(stubbed)
    assert set(session.fed_weights) == {"w1", "w2"}
    assert {i.name for i in session.get_inputs()} == {"x", "w1", "w2"}
    np.testing.assert_allclose(run(session, x)["y"], expected, rtol=1e-3, atol=1e-3)


def _half(model: onnx.ModelProto) -> onnx.ModelProto:
    """The MLP with float16 weights and a Cast in front (float32 input and output)."""
    for tensor in model.graph.initializer:
        value = numpy_helper.to_array(tensor).astype(np.float16)
        tensor.CopyFrom(numpy_helper.from_array(value, tensor.name))
    graph = model.graph
    graph.node[0].input[0] = "x16"
    graph.node[-1].output[0] = "y16"
    graph.node.insert(0, helper.make_node("Cast", ["x"], ["x16"], to=onnx.TensorProto.FLOAT16))
    graph.node.append(helper.make_node("Cast", ["y16"], ["y"], to=onnx.TensorProto.FLOAT))
    return model


def test_released_pages_read_back_the_same():
    model = _mlp()
    store = weightstore.offload(model, min_total=0)
    w2 = next(t for t in model.graph.initializer if t.name == "w2")
    view = weightstore.tensor_array(w2)
    before = view.copy()
    weightstore.release_pages()
    np.testing.assert_array_equal(view, before)
    store.close()


def test_external_output_of_a_stubbed_model(tmp_path):
    model = _mlp()
    weightstore.offload(model, min_total=0)
    modelio.save_model(model, tmp_path / "out.onnx", external=True)
    assert (tmp_path / "out.onnx.data").exists()
    written = onnx.load(str(tmp_path / "out.onnx"))
    for a, b in zip(written.graph.initializer, _mlp().graph.initializer, strict=True):
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))


def test_the_checker_reads_stubs_from_their_store():
    model = _mlp()
    weightstore.offload(model, min_total=0)
    weightstore.check_model(model, full_check=True)        # no error: the stubs resolve


def test_load_into_store_checks_every_weight(tmp_path, share_all):
    good = tmp_path / "good.onnx"
    onnx.save_model(_mlp(), str(good))
    loaded = modelio.load_model(good, share=True)
    assert {t.name for t in loaded.graph.initializer if weightstore.store_of(t)} == \
        {"w1", "w2"}
    bad = _mlp()
    values = numpy_helper.to_array(bad.graph.initializer[0]).copy()
    values[3, 4] = np.nan
    bad.graph.initializer[0].CopyFrom(numpy_helper.from_array(values, "w1"))
    onnx.save_model(bad, str(tmp_path / "nan.onnx"))
    with pytest.raises(OnnxpruneError, match=r"'w1'.*NaN"):
        modelio.load_model(tmp_path / "nan.onnx", share=True)
    values[3, 4] = np.inf
    bad.graph.initializer[0].CopyFrom(numpy_helper.from_array(values, "w1"))
    onnx.save_model(bad, str(tmp_path / "inf.onnx"))
    with pytest.raises(OnnxpruneError, match=r"'w1'.*inf"):
        modelio.load_model(tmp_path / "inf.onnx", share=True)


def test_load_into_store_from_external_data(tmp_path, share_all):
    onnx.save_model(_mlp(), str(tmp_path / "m.onnx"), save_as_external_data=True,
                    location="m.onnx.data", size_threshold=0)
    loaded = modelio.load_model(tmp_path / "m.onnx", share=True)
    for a, b in zip(loaded.graph.initializer, _mlp().graph.initializer, strict=True):
        np.testing.assert_array_equal(weightstore.tensor_array(a), numpy_helper.to_array(b))


@pytest.mark.parametrize("external", [False, True])
def test_a_cut_writes_the_same_model_with_the_store(tmp_path, monkeypatch, external):
    """The exactness contract does not depend on where the weights live: the cut of the
    reference model written through the store is byte for byte the cut written without."""
    source = tmp_path / "model.onnx"
    onnx.save_model(onnx.load(str(REFERENCE)), str(source), save_as_external_data=external,
                    location="model.onnx.data", size_threshold=1024)
    assert main(["cut", str(source), str(tmp_path / "plain.onnx"), *CUT]) == 0
    monkeypatch.setattr(modelio, "STORE_MIN_BYTES", 0)
    assert main(["cut", str(source), str(tmp_path / "stored.onnx"), *CUT]) == 0
    stored, plain = ((tmp_path / f"{name}.onnx").read_bytes() for name in ("stored", "plain"))
    if external:   # the side files are named after their models
        assert (tmp_path / "stored.onnx.data").read_bytes() == \
            (tmp_path / "plain.onnx.data").read_bytes()
        stored, plain = (_renamed(tmp_path / f"{name}.onnx") for name in ("stored", "plain"))
    assert stored == plain


def _renamed(path: Path) -> bytes:
    """The file's model with its side file's name taken out."""
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "side"
    return model.SerializeToString()


def test_a_batch_run_in_parts_gives_the_whole_batch_run():
    model = _mlp()
    for value_info in (*model.graph.input, *model.graph.output):
        value_info.type.tensor_type.shape.dim[0].dim_param = "batch"
    session = make_session(model)
    x = {"x": np.random.default_rng(5).standard_normal((2, 128)).astype(np.float32)}
    whole = run(session, x)["y"]
    np.testing.assert_allclose(run_in_parts(session, x, 1)["y"], whole, rtol=1e-6,
                               atol=1e-6)
    assert run_in_parts(session, x, None)["y"].shape == (2, 128)


def test_a_truncated_large_file_is_one_line_and_leaves_no_store(tmp_path, share_all):
    whole = _mlp().SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(whole[: len(whole) // 2])
    before = set(weightstore._STORES)
    with pytest.raises(OnnxpruneError, match=r"cut\.onnx") as caught:
        modelio.load_model(path, share=True)
    assert "\n" not in str(caught.value)
    assert set(weightstore._STORES) == before          # the half-filled store is removed


def test_a_scalar_feed_keeps_its_rank_beside_fed_half_weights():
    """Fed half-precision weights make ``run`` pass every input as an OrtValue; a rank-0
    input (a frontier value in reconstruction's segments: a Gather of a shape) stays rank 0
    (it became rank 1 and broke a Concat in a float16 Electra)."""
    model = _half(_mlp(hidden=320))
    graph = model.graph
    # rank left open, as reconstruction's segments declare their inputs (a declared rank
    # would let ONNX Runtime fold Shape(k) to a constant)
    graph.input.append(helper.make_tensor_value_info("k", onnx.TensorProto.FLOAT, None))
    graph.node[-1].output[0] = "unscaled"
    graph.node.append(helper.make_node("Mul", ["unscaled", "k"], ["y"]))
    graph.node.append(helper.make_node("Shape", ["k"], ["k_shape"]))
    graph.output.append(helper.make_tensor_value_info("k_shape", onnx.TensorProto.INT64,
                                                      None))
    weightstore.offload(model, min_total=0)
    session = make_session(model)
    assert session.fed_weights
    x = np.ones((2, 128), np.float32)
    one, two = (run(session, {"x": x, "k": np.array(k, np.float32)}) for k in (1, 2))
    assert list(one["k_shape"]) == []                   # rank 0, as fed
    np.testing.assert_allclose(two["y"], 2 * one["y"], rtol=1e-6)


def test_an_array_put_as_a_stub_reads_back_and_is_saved_like_a_put_tensor(tmp_path):
    value = np.random.default_rng(3).standard_normal((96, 200)).astype(np.float16)
    store = weightstore.WeightStore(tmp_path)
    try:
        stub = store.put_array("w", value)
        put = numpy_helper.from_array(value, "w")
        store.put(put)
        assert weightstore.store_of(stub) is store and stub.dims == put.dims
        assert stub.data_type == put.data_type == onnx.TensorProto.FLOAT16
        np.testing.assert_array_equal(weightstore.tensor_array(stub), value)
        assert weightstore.filled(stub).raw_data == weightstore.filled(put).raw_data
    finally:
        store.close()


def test_a_command_or_call_closes_the_store_it_made(tmp_path, monkeypatch):
    """A long-lived process (a notebook, this test session) keeps no store, and no file in
    $TMPDIR, from a command or an API call that loaded a large model, unless the call
    returns a model that still refers to it (``stored=True``)."""
    import onnxprune

    monkeypatch.setattr(modelio, "STORE_MIN_BYTES", 0)
    before = set(weightstore.live_stores())
    assert main(["cut", str(REFERENCE), str(tmp_path / "cut.onnx"), *CUT]) == 0
    assert set(weightstore.live_stores()) == before
    whole = onnxprune.cut(REFERENCE, CUT[1].split(",")).model
    assert set(weightstore.live_stores()) == before
    assert not any(weightstore.store_of(t) for t in whole.graph.initializer)
    kept = onnxprune.cut(REFERENCE, CUT[1].split(","), stored=True).model
    (store,) = set(weightstore.live_stores()) - before
    assert weightstore.model_store(kept) is store
    store.close()
