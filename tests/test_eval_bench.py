"""`onnxprune eval` and `onnxprune bench` as a user runs them: metrics equal a direct numpy
computation on the ONNX Runtime outputs, bad data is one line and exit 2, and the benchmark
JSON has every field for every row."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import onnxprune
from onnxprune.bench import BenchRow
from onnxprune.cli import main
from onnxprune.datasets import load_windows

ROOT = Path(__file__).resolve().parent.parent
ETTH1 = ROOT.parent / "shared" / "data" / "ETTh1.csv"
AST = ROOT / "models" / "ast_fsdd.onnx"


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    try:
        code = main(list(args))
    except SystemExit as exc:   # argument errors exit through argparse
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def _outputs(model: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.fixture(scope="module")
def etth1_npz(tmp_path_factory) -> Path:
    """64 test windows of ETTh1 (inputs x, targets y), built from the shared data."""
    if not ETTH1.exists():
        pytest.skip(f"{ETTH1} not present")
    x, y = load_windows(ETTH1, 336, 96).windows("test")
    path = tmp_path_factory.mktemp("eval") / "etth1_64.npz"
    np.savez(path, x=np.ascontiguousarray(x[:64], dtype=np.float32),
             y=np.ascontiguousarray(y[:64], dtype=np.float32))
    return path


def test_eval_mse_matches_numpy(capsys, reference_model, etth1_npz):
    code, out, err = _cli(capsys, "eval", str(reference_model), "--data", str(etth1_npz),
                          "--json", "--batch-size", "20")
    assert code == 0, err
    result = json.loads(out)
    assert set(result) == {"model", "data", "samples", "metrics", "seconds"}
    assert result["samples"] == 64
    data = np.load(etth1_npz)
    error = _outputs(reference_model, data["x"]).astype(np.float64) - data["y"]
    assert result["metrics"]["mse"] == pytest.approx(float(np.mean(error**2)), rel=1e-5)
    assert result["metrics"]["mae"] == pytest.approx(float(np.mean(np.abs(error))), rel=1e-5)

    code, out, _ = _cli(capsys, "eval", str(reference_model), "--data", str(etth1_npz),
                        "--metric", "mae")
    assert code == 0
    assert "mae" in out and "mse" not in out and "64 samples" in out


def test_eval_classifier_accuracy(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 1, 64, 96)).astype(np.float32)
    labels = rng.integers(0, 10, 8)
    np.savez(tmp_path / "fsdd8.npz", x=x, logits=labels)
    result = onnxprune.evaluate(str(AST), tmp_path / "fsdd8.npz", batch_size=3)
    logits = _outputs(AST, x).astype(np.float64)
    assert 0.0 <= result["metrics"]["acc"] <= 1.0
    assert result["metrics"]["acc"] == pytest.approx(float(np.mean(logits.argmax(1) == labels)))
    log_p = logits - logits.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
    assert result["metrics"]["cross_entropy"] == pytest.approx(
        float(-log_p[np.arange(8), labels].mean()), rel=1e-5)


def _nan_model(path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    graph = helper.make_graph([helper.make_node("Log", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_eval_bad_input_is_one_line_exit_2(capsys, reference_model, tmp_path):
    x = np.zeros((4, 336, 7), np.float32)
    np.savez(tmp_path / "no_targets.npz", x=x)
    np.savez(tmp_path / "wrong_shape.npz", x=np.zeros((4, 100, 7), np.float32),
             y=np.zeros((4, 96, 7), np.float32))
    np.savez(tmp_path / "ids.npz", x=x, y=np.zeros((4, 96), np.int64))
    _nan_model(tmp_path / "log.onnx")
    np.savez(tmp_path / "neg.npz", x=-np.ones((3, 4), np.float32), y=np.ones((3, 4), np.float32))
    cases = [
        (reference_model, "no_targets.npz", [], "no targets"),
        (reference_model, "wrong_shape.npz", [], "dim 1 expected 336"),
        (reference_model, "wrong_shape.npz", ["--metric", "acc"], "dim 1 expected 336"),
        (reference_model, "ids.npz", ["--metric", "mse"], "needs float targets"),
        (tmp_path / "log.onnx", "neg.npz", [], "NaN"),
        (reference_model, "no_such.npz", [], "no such"),
    ]
    for model, data, extra, message in cases:
        code, out, err = _cli(capsys, "eval", str(model), "--data", str(tmp_path / data), *extra)
        assert code == 2, (data, err)
        assert message in err and out == ""
        assert len(err.strip().splitlines()) == 1 and err.startswith("onnxprune: error:")


@pytest.fixture(scope="module")
def pruned_copy(tmp_path_factory, reference_model) -> Path:
    path = tmp_path_factory.mktemp("bench") / "no_attn2.onnx"
    onnx.save(onnxprune.cut(str(reference_model), ["attn2"]).model, path)
    return path


def test_bench_json_has_every_field(capsys, reference_model, pruned_copy, tmp_path):
    report = tmp_path / "bench.json"
    code, out, err = _cli(capsys, "bench", str(reference_model), str(pruned_copy), "--runs",
                          "5", "--warmup", "1", "--batch", "1,2", "--json", str(report))
    assert code == 0, err
    assert "speed-up" in out and "no_attn2.onnx" in out
    data = json.loads(report.read_text())
    names = {f.name for f in fields(BenchRow)}
    assert set(data["fields"]) == names
    rows = data["rows"]
    assert len(rows) == 4  # 2 batches x 2 models, threads 1
    for row in rows:
        assert set(row) == names
        assert row["runs"] == 5 and row["threads"] == 1
        assert 0 < row["latency_min_ms"] <= row["latency_p50_ms"] <= row["latency_p90_ms"]
        assert row["latency_p90_ms"] <= row["latency_p99_ms"]
        assert row["throughput"] == pytest.approx(row["batch"] * 1e3 / row["latency_mean_ms"])
        assert row["file_bytes"] > 0 and row["params"] > 0 and row["flops"] > 0
        assert row["peak_rss_mb"] > row["model_rss_mb"] > 0
        assert row["speedup"] > 0
    for first, second in (rows[0:2], rows[2:4]):
        assert first["model"] == str(reference_model) and second["model"] == str(pruned_copy)
        for key in ("speedup", "speedup_mean", "size_ratio", "params_ratio", "flops_ratio",
                    "ideal_speedup", "efficiency"):
            assert first[key] == 1.0
        assert second["speedup"] == pytest.approx(first["latency_p50_ms"]
                                                  / second["latency_p50_ms"])
        assert second["flops_ratio"] < 1 and second["size_ratio"] < 1
    assert rows[2]["flops"] == 2 * rows[0]["flops"]  # FLOPs at the row's batch


def test_bench_from_python(reference_model, pruned_copy):
    """The documented call: ``onnxprune.bench(models, ...)`` → ``onnxprune.bench.BenchRow``s."""
    rows = onnxprune.bench([reference_model, pruned_copy], (1,), (1,), "cpu", 0, 2,
                           memory=False)
    assert [type(r) for r in rows] == [onnxprune.bench.BenchRow] * 2 and BenchRow is \
        onnxprune.bench.BenchRow
    assert rows[1].flops_ratio < 1 and rows[0].peak_rss_mb == 0


def test_bench_plot(capsys, reference_model, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "bench.png"
    code, _, err = _cli(capsys, "bench", str(reference_model), "--runs", "2", "--warmup",
                        "0", "--no-memory", "--plot", str(png), "--quiet")
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_bad_input_exit_2(capsys, reference_model, tmp_path):
    cases = [
        (["--runs", "0"], "argument --runs: 0: must be at least 1"),
        ([str(tmp_path / "missing.onnx")], "no such file"),
        (["--shape", "x:1,100,7"], "conflicts with the static shape"),
    ]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        cases.append((["--provider", "cuda"], "CUDAExecutionProvider"))
    for extra, message in cases:
        models = [str(reference_model), *(e for e in extra if e.endswith(".onnx"))]
        options = [e for e in extra if not e.endswith(".onnx")]
        code, _, err = _cli(capsys, "bench", *models, "--runs", "1", "--no-memory",
                            "--quiet", *options)
        assert code == 2, (extra, err)
        assert message in err and len(err.strip().splitlines()) == 1
