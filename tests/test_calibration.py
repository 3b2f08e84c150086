"""Calibration data (onnxprune.data): npz / npy / csv files, synthetic default, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.data import (
    CalibrationData,
    csv_splits,
    load_calibration,
    load_or_synthesise,
    static_batch,
)
from onnxprune.datasets import ETT_SPLITS, Splits
from onnxprune.errors import OnnxpruneError

# --- tiny models ----------------------------------------------------------------------


def forecaster(batch: int | str = "batch", lookback: int | str = 4, channels: int = 3,
               horizon: int = 2) -> onnx.ModelProto:
    """y[b, h, c] = sum_l W[h, l] x[b, l, c]: input x [batch, L, C], output y [batch, H, C]."""
    w = numpy_helper.from_array(
        np.arange(horizon * 4, dtype=np.float32).reshape(horizon, 4) / 10, "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["w", "x"], ["y"])],
        "forecaster",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, lookback, channels])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, horizon, channels])],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def classifier() -> onnx.ModelProto:
    """ids [batch, 5] int64 + mask [batch, 5] float → logits [batch, 4]."""
    emb = numpy_helper.from_array(np.ones((10, 4), np.float32), "emb")
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["emb", "ids"], ["e"]),
            helper.make_node("Unsqueeze", ["mask", "axis"], ["m"]),
            helper.make_node("Mul", ["e", "m"], ["em"]),
            helper.make_node("ReduceSum", ["em", "axis1"], ["logits"], keepdims=0),
        ],
        "classifier",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 5]),
            helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", 5]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
        [emb, numpy_helper.from_array(np.array([-1], np.int64), "axis"),
         numpy_helper.from_array(np.array([1], np.int64), "axis1")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def model() -> onnx.ModelProto:
    return forecaster()


def rand(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def write_csv(path: Path, rows: int, channels: int = 3, date: bool = True) -> Path:
    rng = np.random.default_rng(0)
    head = (["date"] if date else []) + [f"c{i}" for i in range(channels)]
    lines = [",".join(head)]
    for i in range(rows):
        cells = [f"{v:.5f}" for v in rng.normal(i * 0.05, 1.0, channels)]
        lines.append(",".join(([f"2020-01-01 {i:05d}"] if date else []) + cells))
    path.write_text("\n".join(lines) + "\n")
    return path


def error(fn, *args, **kwargs) -> str:
    with pytest.raises(OnnxpruneError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- files ----------------------------------------------------------------------------


def test_npz_with_targets_runs_through_the_model(tmp_path: Path, model) -> None:
    x, y = rand(10, 4, 3), rand(10, 2, 3, seed=1)
    np.savez(tmp_path / "c.npz", x=x.astype(np.float64), y=y)  # float64 cast silently
    data = load_calibration(tmp_path / "c.npz", model)
    assert data.n_samples == 10 and not data.data_free and data.fixed_batch is None
    assert data.source == str(tmp_path / "c.npz")
    assert data.inputs["x"].dtype == np.float32 and np.array_equal(data.inputs["x"], x)
    assert np.array_equal(data.targets["y"], y)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert sess.run(None, data.inputs)[0].shape == (10, 2, 3)


def test_npz_without_targets_and_npy(tmp_path: Path, model) -> None:
    x = rand(7, 4, 3)
    np.savez(tmp_path / "c.npz", x=x)
    np.save(tmp_path / "c.npy", x)
    for name in ("c.npz", "c.npy"):
        data = load_calibration(tmp_path / name, model)
        assert data.targets == {} and np.array_equal(data.inputs["x"], x)


def test_multi_input_npz_and_class_id_targets(tmp_path: Path) -> None:
    ids = np.random.default_rng(0).integers(0, 10, (6, 5)).astype(np.int32)
    mask = np.ones((6, 5))
    np.savez(tmp_path / "c.npz", ids=ids, mask=mask, logits=np.arange(6) % 4)
    data = load_calibration(tmp_path / "c.npz", classifier())
    assert data.inputs["ids"].dtype == np.int64 and data.inputs["mask"].dtype == np.float32
    assert data.targets["logits"].dtype == np.int64 and data.targets["logits"].shape == (6,)
    np.savez(tmp_path / "one_hot.npz", ids=ids, mask=mask, logits=np.eye(4)[np.arange(6) % 4])
    assert load_calibration(tmp_path / "one_hot.npz", classifier()).targets["logits"].shape == (
        6, 4)


def test_csv_windows_and_targets(tmp_path: Path, model) -> None:
    path = write_csv(tmp_path / "series.csv", 100)
    splits = csv_splits(path, 100)
    assert splits == Splits.fractions(100) == Splits(70, 80, 100)
    assert csv_splits(tmp_path / "ETTh1.csv", 100) == ETT_SPLITS
    data = load_calibration(path, model)
    # train windows: forecasts inside rows [0, 70) → starts 0 .. 70 - 6
    assert data.n_samples == 65
    x, y = data.inputs["x"], data.targets["y"]
    assert x.shape == (65, 4, 3) and y.shape == (65, 2, 3) and x.dtype == np.float32
    # consecutive windows; targets are the 2 steps after the lookback
    np.testing.assert_array_equal(x[1, :3], x[0, 1:])
    np.testing.assert_array_equal(y[0], x[4:6, 0])
    # standardised with the scaler of the train rows
    raw = np.loadtxt(path, delimiter=",", skiprows=1, usecols=(1, 2, 3))
    mean, std = raw[:70].mean(0), raw[:70].std(0)
    np.testing.assert_allclose(x[0], (raw[:4] - mean) / std, rtol=1e-5, atol=1e-5)
    test = load_calibration(path, model, split="test")
    assert test.n_samples == 100 - 80 - 2 + 1
    np.testing.assert_allclose(test.targets["y"][-1], (raw[-2:] - mean) / std, rtol=1e-5,
                               atol=1e-5)


def test_csv_without_date_column_and_shapes_for_dynamic_dims(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "plain.csv", 60, date=False)
    dyn = forecaster(lookback="L")
    msg = error(load_calibration, path, dyn)
    assert "lookback dim" in msg and "dynamic" in msg and "plain.csv" in msg
    data = load_calibration(path, dyn, shapes={"x": (1, 4, 3)})
    assert data.inputs["x"].shape[1:] == (4, 3)


def test_seeded_subset_is_repeatable_and_in_file_order(tmp_path: Path, model) -> None:
    x = np.arange(50, dtype=np.float32)[:, None, None] * np.ones((1, 4, 3), np.float32)
    np.savez(tmp_path / "c.npz", x=x, y=x[:, :2])
    a = load_calibration(tmp_path / "c.npz", model, samples=12, seed=3)
    b = load_calibration(tmp_path / "c.npz", model, samples=12, seed=3)
    c = load_calibration(tmp_path / "c.npz", model, samples=12, seed=4)
    order = a.inputs["x"][:, 0, 0]
    assert a.n_samples == 12 and np.array_equal(order, b.inputs["x"][:, 0, 0])
    assert not np.array_equal(order, c.inputs["x"][:, 0, 0])
    assert np.all(np.diff(order) > 0) and len(set(order)) == 12
    assert np.array_equal(a.targets["y"][:, 0, 0], order)  # inputs and targets stay paired
    assert load_calibration(tmp_path / "c.npz", model, samples=500).n_samples == 50


def test_synthetic_default(model) -> None:
    data = load_calibration(None, model)
    assert data.data_free and data.source == "synthetic" and data.targets == {}
    assert data.inputs["x"].shape == (64, 4, 3) and data.inputs["x"].dtype == np.float32
    again = load_calibration(None, model, samples=5)
    assert np.array_equal(again.inputs["x"], load_calibration(None, model, samples=5).inputs["x"])
    assert not np.array_equal(again.inputs["x"],
                              load_calibration(None, model, samples=5, seed=1).inputs["x"])
    dyn = load_calibration(None, forecaster(lookback="L"), samples=3)
    assert dyn.inputs["x"].shape == (3, 1, 3)  # dynamic non-batch dims default to 1
    dyn = load_calibration(None, forecaster(lookback="L"), samples=3, shapes={"x": (1, 9, 3)})
    assert dyn.inputs["x"].shape == (3, 9, 3)
    cls = load_calibration(None, classifier(), samples=8)
    ids = cls.inputs["ids"]               # token ids drawn from the 10-row table they index
    assert ids.dtype == np.int64 and ids.min() >= 0 and ids.max() < 10 and ids.any()
    assert (cls.inputs["mask"] == 1).all()
    assert cls.synthesised == {"ids": "token ids in [0, 10)", "mask": "all ones"}


def test_batches_and_take(tmp_path: Path, model) -> None:
    x = rand(10, 4, 3)
    np.savez(tmp_path / "c.npz", x=x, y=x[:, :2])
    data = load_calibration(tmp_path / "c.npz", model)
    got = list(data.batches(4))
    assert [b[0]["x"].shape[0] for b in got] == [4, 4, 2] == [b[1]["y"].shape[0] for b in got]
    assert data.n_batches(4) == 3
    np.testing.assert_array_equal(np.concatenate([b[0]["x"] for b in got]), x)
    first = data.take(3)
    assert isinstance(first, CalibrationData) and first.n_samples == 3
    np.testing.assert_array_equal(first.targets["y"], x[:3, :2])
    assert "batch size must be positive" in error(data.batches, 0)
    assert "must be positive" in error(data.take, 0)


def test_static_batch(tmp_path: Path) -> None:
    fixed = forecaster(batch=4)
    assert static_batch(fixed) == 4 and static_batch(forecaster()) is None
    np.savez(tmp_path / "c.npz", x=rand(10, 4, 3))
    data = load_calibration(tmp_path / "c.npz", fixed)
    assert data.fixed_batch == 4
    sizes = [b[0]["x"].shape[0] for b in data.batches(3)]  # batch_size ignored, remainder dropped
    assert sizes == [4, 4] and data.n_batches(3) == 2
    sess = ort.InferenceSession(fixed.SerializeToString(), providers=["CPUExecutionProvider"])
    for inputs, _ in data.batches(4):
        sess.run(None, inputs)
    synth = load_calibration(None, fixed, samples=9)
    assert synth.inputs["x"].shape == (9, 4, 3) and synth.fixed_batch == 4
    assert load_calibration(None, forecaster(batch=128)).n_samples == 128
    msg = error(load_calibration, tmp_path / "c.npz", fixed, samples=3)
    assert "3 calibration sample(s)" in msg and "static batch size 4" in msg
    assert "static batch size 4" in error(lambda: list(data.take(2).batches(4)))


def test_load_or_synthesise(tmp_path: Path, model) -> None:
    given = CalibrationData({"x": rand(6, 4, 3)}, {"y": rand(6, 2, 3)})
    assert load_or_synthesise(model, given) is given
    assert load_or_synthesise(model, given, samples=2).n_samples == 2
    np.savez(tmp_path / "c.npz", x=rand(5, 4, 3))
    assert load_or_synthesise(model, tmp_path / "c.npz", samples=3).n_samples == 3
    assert load_or_synthesise(model, None, samples=4).data_free
    # synthetic data of a guessed lookback would score the model at a size it never runs at
    dyn = forecaster(lookback="L")
    msg = error(load_or_synthesise, dyn, None)
    assert "dynamic dims ['L'] besides the batch" in msg and "--shape x:1,128" in msg
    data = load_or_synthesise(dyn, None, samples=2, shapes={"x": (1, 9, 3)})
    assert data.inputs["x"].shape == (2, 9, 3)


# --- bad input ------------------------------------------------------------------------


def test_missing_input_array(tmp_path: Path, model) -> None:
    np.savez(tmp_path / "c.npz", y=rand(3, 2, 3))
    msg = error(load_calibration, tmp_path / "c.npz", model)
    assert "c.npz" in msg and "no array for model input(s) x" in msg


def test_wrong_rank_and_static_dim(tmp_path: Path, model) -> None:
    np.savez(tmp_path / "rank.npz", x=rand(3, 12))
    msg = error(load_calibration, tmp_path / "rank.npz", model)
    assert "rank.npz" in msg and "expected rank 3, got 2" in msg and "[batch, 4, 3]" in msg
    np.savez(tmp_path / "dim.npz", x=rand(3, 5, 3))
    msg = error(load_calibration, tmp_path / "dim.npz", model)
    assert "dim 1 expected 4, got 5" in msg
    np.savez(tmp_path / "tgt.npz", x=rand(3, 4, 3), y=rand(3, 2, 4))
    msg = error(load_calibration, tmp_path / "tgt.npz", model)
    assert "target array 'y'" in msg and "dim 2 expected 3, got 4" in msg


def test_dtype_that_cannot_be_used(tmp_path: Path, model) -> None:
    np.savez(tmp_path / "int.npz", x=np.ones((3, 4, 3), np.int64))
    msg = error(load_calibration, tmp_path / "int.npz", model)
    assert "int64" in msg and "float32" in msg and "floating-point data needed" in msg
    np.savez(tmp_path / "ids.npz", ids=np.ones((3, 5)), mask=np.ones((3, 5)))
    msg = error(load_calibration, tmp_path / "ids.npz", classifier())
    assert "'ids' has dtype float64" in msg and "integer data needed" in msg
    np.savez(tmp_path / "cls.npz", ids=np.ones((3, 5), np.int64), mask=np.ones((3, 5)),
             logits=np.zeros(3))
    msg = error(load_calibration, tmp_path / "cls.npz", classifier())
    assert "class-id targets must be integers" in msg
    np.savez(tmp_path / "range.npz", ids=np.ones((3, 5), np.int64), mask=np.ones((3, 5)),
             logits=np.array([0, 1, 4]))
    assert "allows 0..3" in error(load_calibration, tmp_path / "range.npz", classifier())


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_values(tmp_path: Path, model, bad: float) -> None:
    x = rand(5, 4, 3)
    x[2, 1, 0] = bad
    np.savez(tmp_path / "x.npz", x=x)
    msg = error(load_calibration, tmp_path / "x.npz", model)
    label = "NaN" if np.isnan(bad) else "inf"
    assert f"array 'x' contains non-finite values (1 {label}; first in sample 2)" in msg
    y = rand(5, 2, 3)
    y[4] = bad
    np.savez(tmp_path / "y.npz", x=rand(5, 4, 3), y=y)
    msg = error(load_calibration, tmp_path / "y.npz", model)
    assert "array 'y' contains non-finite values" in msg and "sample 4" in msg


def test_sample_counts_empty_and_samples(tmp_path: Path, model) -> None:
    np.savez(tmp_path / "n.npz", x=rand(5, 4, 3), y=rand(4, 2, 3))
    assert "first (sample) dimension" in error(load_calibration, tmp_path / "n.npz", model)
    np.savez(tmp_path / "zero.npz", x=np.zeros((0, 4, 3), np.float32))
    assert "no calibration samples" in error(load_calibration, tmp_path / "zero.npz", model)
    (tmp_path / "empty.npz").write_bytes(b"")
    assert "empty.npz: empty file" in error(load_calibration, tmp_path / "empty.npz", model)
    np.savez(tmp_path / "none.npz")
    assert "file has none" in error(load_calibration, tmp_path / "none.npz", model)
    np.savez(tmp_path / "ok.npz", x=rand(5, 4, 3))
    for bad in (0, -3):
        msg = error(load_calibration, tmp_path / "ok.npz", model, samples=bad)
        assert f"must be positive, got {bad}" in msg
    assert "must be positive" in error(load_calibration, None, model, samples=0)


def test_bad_files(tmp_path: Path, model) -> None:
    (tmp_path / "c.txt").write_text("1,2,3\n")
    msg = error(load_calibration, tmp_path / "c.txt", model)
    assert "c.txt: unsupported calibration file type .txt" in msg and ".npz, .npy, .csv" in msg
    assert "no such calibration file" in error(load_calibration, tmp_path / "gone.npz", model)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    assert "not a readable .npz" in error(load_calibration, tmp_path / "junk.npz", model)
    (tmp_path / "junk.npy").write_bytes(b"not an array")
    assert "not a readable .npy" in error(load_calibration, tmp_path / "junk.npy", model)
    np.save(tmp_path / "two.npy", np.ones((3, 5)))
    msg = error(load_calibration, tmp_path / "two.npy", classifier())
    assert "model has 2 inputs (ids, mask)" in msg and ".npz" in msg
    np.save(tmp_path / "big.npy", np.full((3, 4, 3), 1e300))
    msg = error(load_calibration, tmp_path / "big.npy", model)
    assert "'x' has values too large for model input x (float32)" in msg
    np.savez(tmp_path / "extra.npz", x=rand(3, 4, 3), z=rand(3))
    assert "z match no model input" in error(load_calibration, tmp_path / "extra.npz", model)


def test_bad_csv(tmp_path: Path, model) -> None:
    wide = write_csv(tmp_path / "wide.csv", 60, channels=5)
    msg = error(load_calibration, wide, model)
    assert "wide.csv: 5 data column(s)" in msg and "expects 3 channels" in msg
    short = write_csv(tmp_path / "short.csv", 5)
    assert "short.csv" in error(load_calibration, short, model)
    text = write_csv(tmp_path / "text.csv", 60)
    text.write_text(text.read_text().replace("\n2020-01-01 00007,", "\n2020-01-01 00007,abc"))
    assert "non-numeric value" in error(load_calibration, text, model)
    ok = write_csv(tmp_path / "ok.csv", 60)
    assert "unknown split 'dev'" in error(load_calibration, ok, model, split="dev")
    msg = error(load_calibration, ok, classifier())
    assert "one input [batch, lookback, channels]" in msg and "2 input(s)" in msg
