"""Data loaders: CSV windows, WAV → log-mel, synthetic series; calibration .npz files
(onnxprune.data), with the same validator as the model-aware loader."""

from __future__ import annotations

import io
import struct
import tarfile
import wave
from pathlib import Path

import numpy as np
import pytest

from onnxprune.data import CalibrationData, model_io_names, read_calibration, write_calibration
from onnxprune.datasets import (
    ETT_SPLITS,
    LogMelConfig,
    Splits,
    load_clips,
    load_fsdd,
    load_windows,
    log_mel,
    read_csv,
    read_wav,
)
from onnxprune.datasets.audio import mel_filterbank, parse_fsdd_name
from onnxprune.datasets.synthetic import generate
from onnxprune.errors import OnnxpruneError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


# --- CSV time series -------------------------------------------------------------------


def write_csv(
    path: Path, rows: int, cols: tuple[str, ...] = ("a", "b", "c"), bad: tuple = ()
) -> Path:
    rng = np.random.default_rng(0)
    lines = ["date," + ",".join(cols)]
    for i in range(rows):
        values = [f"{v:.6f}" for v in rng.normal(i * 0.1, 1.0 + np.arange(len(cols)))]
        lines.append(f"2020-01-01 {i:05d}," + ",".join(values))
    for line_no, col, text in bad:  # line_no counts the header as line 1
        cells = lines[line_no - 1].split(",")
        cells[1 + cols.index(col)] = text
        lines[line_no - 1] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")
    return path


SMALL = Splits(train_end=30, val_end=45, test_end=60)


def test_windows_shapes_split_and_scaler(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "s.csv", 64)
    ws = load_windows(path, lookback=8, horizon=4, splits=SMALL)
    assert ws.columns == ["a", "b", "c"]
    _, raw = read_csv(path)
    assert raw.shape == (64, 3)
    np.testing.assert_allclose(ws.data[:30].mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(ws.data[:30].std(0), 1, atol=1e-5)
    np.testing.assert_allclose(ws.scaler.inverse(ws.data), raw, rtol=1e-5, atol=1e-5)
    x, y = ws.windows("train")
    assert x.shape == (30 - 12 + 1, 8, 3) and y.shape == (19, 4, 3)
    vx, vy = ws.windows("val")
    assert ws.starts("val")[0] == 30 - 8  # lookback reaches back into train
    assert vx.shape == (15 - 4 + 1, 8, 3)
    np.testing.assert_array_equal(vy[0], ws.data[30:34])  # first val forecast starts at row 30
    _, ty = ws.windows("test")
    np.testing.assert_array_equal(ty[-1], ws.data[56:60])
    bx, by = ws.batch("train", np.array([0, 5]))
    np.testing.assert_array_equal(bx[1], ws.data[5:13])
    assert bx.flags.c_contiguous and by.dtype == np.float32


def test_select_columns(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "s.csv", 64)
    ws = load_windows(path, lookback=8, horizon=4, splits=SMALL, columns=["c", "a"])
    assert ws.columns == ["c", "a"] and ws.data.shape == (64, 2)


def test_split_fractions() -> None:
    assert Splits.fractions(100, 0.7, 0.1) == Splits(70, 80, 100)
    assert ETT_SPLITS.rows("test") == (11520, 14400)
    with pytest.raises(OnnxpruneError, match="unknown split"):
        ETT_SPLITS.rows("dev")


def test_csv_missing_column(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "m.csv", 64)
    with pytest.raises(OnnxpruneError, match=r"m\.csv: missing column\(s\) 'OT'"):
        load_windows(path, 8, 4, SMALL, columns=["a", "OT"])


def test_csv_non_numeric(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "n.csv", 64, bad=((5, "b", "oops"),))
    with pytest.raises(
        OnnxpruneError, match=r"n\.csv: non-numeric value 'oops' at row 5, column 'b'"
    ):
        load_windows(path, 8, 4, SMALL)


def test_csv_empty_cell_and_short_row(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "e.csv", 64, bad=((3, "c", ""),))
    with pytest.raises(OnnxpruneError, match="row 3, column 'c'"):
        read_csv(path)


def test_csv_too_few_rows(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "short.csv", 10)
    with pytest.raises(
        OnnxpruneError, match=r"short\.csv: 10 rows, fewer than lookback \+ horizon = 12"
    ):
        load_windows(path, 8, 4, Splits(6, 8, 10))


def test_csv_shorter_than_split(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "s.csv", 500)
    with pytest.raises(OnnxpruneError, match="split needs 14400"):
        load_windows(path, 8, 4)  # ETT defaults


def test_csv_empty_and_absent(tmp_path: Path) -> None:
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(OnnxpruneError, match=r"empty\.csv: empty CSV"):
        read_csv(tmp_path / "empty.csv")
    with pytest.raises(OnnxpruneError, match=r"nope\.csv: cannot read"):
        read_csv(tmp_path / "nope.csv")


def test_real_etth1() -> None:
    path = DATA / "ETTh1.csv"
    if not path.exists():
        pytest.skip(f"shared data folder absent: {path} not found (see ../shared/data/README.md)")
    ws = load_windows(path)
    assert ws.columns == ["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"]
    assert ws.windows("train")[0].shape == (8209, 336, 7)
    assert ws.windows("val")[1].shape == (2785, 96, 7)
    assert ws.windows("test")[0].shape == (2785, 336, 7)
    np.testing.assert_allclose(ws.data[:8640].mean(0), 0, atol=1e-4)


# --- WAV / log-mel ---------------------------------------------------------------------


def wav_bytes(signal: np.ndarray, rate: int = 8000, channels: int = 1, width: int = 2) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        if width == 1:
            w.writeframes((np.clip(signal, -1, 1) * 127 + 128).astype(np.uint8).tobytes())
        else:
            w.writeframes((np.clip(signal, -1, 1) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


def float_wav_bytes(signal: np.ndarray, rate: int = 8000) -> bytes:
    data = signal.astype("<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, rate, rate * 4, 4, 32)  # format tag 3 = IEEE float
    body = (
        b"WAVE"
        + b"fmt "
        + struct.pack("<I", len(fmt))
        + fmt
        + b"data"
        + struct.pack("<I", len(data))
        + data
    )
    return b"RIFF" + struct.pack("<I", len(body)) + body


def tone(freq: float, seconds: float = 0.5, rate: int = 8000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return 0.5 * np.sin(2 * np.pi * freq * t)


def test_read_wav_and_log_mel(tmp_path: Path) -> None:
    path = tmp_path / "t.wav"
    path.write_bytes(wav_bytes(tone(1000.0)))
    rate, sig = read_wav(path)
    assert rate == 8000 and sig.dtype == np.float32 and len(sig) == 4000
    assert abs(sig.max() - 0.5) < 1e-3
    cfg = LogMelConfig()
    mel = log_mel(sig, cfg)
    assert mel.shape == (64, 96)
    # 0.5 s = 51 frames with centring; the rest is padded silence
    assert np.all(mel[:, 60:] == np.float32(np.log(cfg.log_floor)))
    fb = mel_filterbank(cfg)
    centre_bin = round(1000.0 / (cfg.sample_rate / cfg.n_fft))
    assert np.argmax(mel[:, 20]) == np.argmax(fb[:, centre_bin])
    full = log_mel(sig, LogMelConfig(n_frames=None))
    assert full.shape == (64, 1 + 4000 // 80)


def test_read_wav_8bit(tmp_path: Path) -> None:
    _, sig = read_wav(wav_bytes(tone(440.0), width=1), name="u8.wav")
    assert np.abs(sig).max() <= 1.0 and abs(sig.max() - 0.5) < 0.02


def test_wav_stereo_rejected(tmp_path: Path) -> None:
    path = tmp_path / "stereo.wav"
    path.write_bytes(wav_bytes(np.repeat(tone(440.0), 2), channels=2))
    with pytest.raises(
        OnnxpruneError, match=r"stereo\.wav: not a mono PCM WAV file \(2 channels\)"
    ):
        read_wav(path)


def test_wav_float_rejected(tmp_path: Path) -> None:
    path = tmp_path / "float.wav"
    path.write_bytes(float_wav_bytes(tone(440.0)))
    with pytest.raises(OnnxpruneError, match=r"float\.wav: not a mono PCM WAV file"):
        read_wav(path)


def test_wav_garbage_rejected(tmp_path: Path) -> None:
    path = tmp_path / "junk.wav"
    path.write_bytes(b"not a wav at all")
    with pytest.raises(OnnxpruneError, match=r"junk\.wav: not a mono PCM WAV file"):
        read_wav(path)


def make_fsdd(folder: Path) -> Path:
    folder.mkdir()
    for digit in (0, 1):
        for index in (0, 1, 7):
            freq = 300.0 + 500 * digit + 10 * index
            (folder / f"{digit}_alice_{index}.wav").write_bytes(wav_bytes(tone(freq, 0.3)))
    return folder


def test_fsdd_folder_and_tar(tmp_path: Path) -> None:
    folder = make_fsdd(tmp_path / "recordings")
    train, test = load_fsdd(folder, test_indices=range(2))
    assert train.features.shape == (2, 1, 64, 96) and test.features.shape == (4, 1, 64, 96)
    assert list(train.labels) == [0, 1] and set(test.indices) == {0, 1}
    assert train.names == ["0_alice_7.wav", "1_alice_7.wav"] and train.speakers == ["alice"] * 2
    archive = tmp_path / "rec.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="recordings")
    train2, test2 = load_fsdd(archive, test_indices=range(2))
    np.testing.assert_array_equal(train2.features, train.features)
    assert test2.names == test.names


def test_fsdd_bad_name_and_bad_rate(tmp_path: Path) -> None:
    assert parse_fsdd_name("7_jackson_32.wav") == (7, "jackson", 32)
    folder = make_fsdd(tmp_path / "rec")
    (folder / "hello.wav").write_bytes(wav_bytes(tone(440.0)))
    with pytest.raises(OnnxpruneError, match=r"hello\.wav: file name does not match"):
        load_fsdd(folder)
    (folder / "hello.wav").unlink()
    (folder / "2_bob_3.wav").write_bytes(wav_bytes(tone(440.0), rate=16000))
    with pytest.raises(OnnxpruneError, match=r"2_bob_3\.wav: sample rate 16000 Hz"):
        load_clips(folder)


def test_fsdd_stereo_in_folder(tmp_path: Path) -> None:
    folder = make_fsdd(tmp_path / "rec")
    (folder / "3_bob_1.wav").write_bytes(wav_bytes(np.repeat(tone(440.0), 2), channels=2))
    with pytest.raises(OnnxpruneError, match=r"3_bob_1\.wav: not a mono PCM WAV file"):
        load_fsdd(folder)


def test_audio_source_errors(tmp_path: Path) -> None:
    with pytest.raises(OnnxpruneError, match="no such folder or archive"):
        load_clips(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(OnnxpruneError, match=r"no \.wav files"):
        load_clips(tmp_path / "empty")
    (tmp_path / "x.tar.gz").write_bytes(b"garbage")
    with pytest.raises(OnnxpruneError, match="not a folder or a readable tar archive"):
        load_clips(tmp_path / "x.tar.gz")


# --- synthetic series ------------------------------------------------------------------


def test_synthetic_is_seeded_and_finite() -> None:
    a = generate(64, np.random.default_rng(3))
    b = generate(64, np.random.default_rng(3))
    assert a.shape == (64, 432) and a.dtype == np.float32
    assert np.isfinite(a).all() and np.array_equal(a, b)
    assert (a.std(axis=1) > 0).all()


# --- calibration files -----------------------------------------------------------------


def test_calibration_roundtrip(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(5, 336, 7)).astype(np.float32)
    y = np.zeros((5, 96, 7), np.float32)
    path = write_calibration(tmp_path / "calib.npz", {"x": x}, {"y": y})
    calib = read_calibration(path, ["x"], ["y"])
    assert isinstance(calib, CalibrationData) and calib.source == str(path)
    np.testing.assert_array_equal(calib.inputs["x"], x)
    np.testing.assert_array_equal(calib.targets["y"], y)
    assert calib.n_samples == 5
    assert read_calibration(path, ["x"], ["y", "z"]).targets.keys() == {"y"}
    assert not list(tmp_path.glob("*.tmp*"))


def test_calibration_errors(tmp_path: Path) -> None:
    path = write_calibration(tmp_path / "c.npz", {"x": np.zeros((4, 3))})
    with pytest.raises(OnnxpruneError, match=r"c\.npz: no array for model input\(s\) input_ids"):
        read_calibration(path, ["input_ids"])
    with pytest.raises(OnnxpruneError, match=r"c\.npz: array\(s\) x match no model input"):
        read_calibration(path, [], [])
    with pytest.raises(OnnxpruneError, match="share their first"):
        write_calibration(tmp_path / "d.npz", {"x": np.zeros((4, 3))}, {"y": np.zeros((5, 3))})
    with pytest.raises(OnnxpruneError, match="both an input and a target"):
        write_calibration(tmp_path / "d.npz", {"x": np.zeros(3)}, {"x": np.zeros(3)})
    with pytest.raises(OnnxpruneError, match="is a scalar"):
        write_calibration(tmp_path / "d.npz", {"x": np.zeros(())})
    with pytest.raises(OnnxpruneError, match="no calibration samples"):
        write_calibration(tmp_path / "d.npz", {"x": np.zeros((0, 3))})
    assert not (tmp_path / "d.npz").exists()
    (tmp_path / "bad.npz").write_bytes(b"nope")
    with pytest.raises(OnnxpruneError, match=r"bad\.npz: not a readable \.npz"):
        read_calibration(tmp_path / "bad.npz", ["x"])
    with pytest.raises(OnnxpruneError, match="no such calibration file"):
        read_calibration(tmp_path / "absent.npz", ["x"])


def test_model_io_names(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3])],
    )
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph), str(path))
    assert model_io_names(path) == (["x"], ["y"])
