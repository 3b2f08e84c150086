"""The main job as users run it: `onnxprune IN OUT --ratio R`, the report, the quality gate,
repeatability, `onnxprune score`, the Python API, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxprune
from onnxprune.cli import main
from onnxprune.runtime import make_session, run


@pytest.fixture(scope="module")
def small(export_cache) -> dict:
    return export_cache("hf_bias", False, True)


@pytest.fixture()
def calib(small, tmp_path) -> Path:
    x = small["make_input"](24)
    y = run(make_session(onnx.load(small["path"])), {"x": x})
    (name, value), = y.items()
    path = tmp_path / "calib.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x=x, **{name: value + 0.1 * rng.standard_normal(value.shape)
                           .astype(np.float32)})
    return path


def test_main_job_data_free(small, tmp_path, capsys):
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    code = main([small["path"], str(out), "--ratio", "0.4", "--report", str(report)])
    text = capsys.readouterr().out
    assert code == 0 and out.exists()
    assert "data-free" in text and "verified exact" in text
    data = json.loads(report.read_text())
    assert data["data"]["data_free"] is True
    assert data["params"]["after"] < data["params"]["before"]
    assert data["removed"] and data["method"] == "fisher" and data["gate"] is None
    assert set(data["metric"]) >= {"name", "before", "after", "relative_drop"}
    assert data["scores"] and data["seconds"] > 0
    pruned = onnxprune.inspect(str(out))
    assert pruned.structure.params == data["params"]["after"]


@pytest.mark.parametrize("method,granularity", [
    ("fisher", "head"), ("taylor", "channel"), ("send", "module"), ("ablation", "auto"),
    ("stat", "ffn"), ("magnitude", "auto"), ("random", "head")])
def test_methods_and_granularities(small, calib, tmp_path, method, granularity):
    out = tmp_path / "out.onnx"
    ratio = "0.45" if granularity == "auto" else "0.15"
    code = main([small["path"], str(out), "--ratio", ratio, "--calib", str(calib),
                 "--method", method, "--granularity", granularity, "--quiet"])
    assert code == 0 and out.exists()


def test_progressive_steps_and_flops_target(small, calib, tmp_path):
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    code = main(["prune", small["path"], str(out), "--ratio", "0.5", "--calib", str(calib),
                 "--steps", "3", "--target", "flops", "--report", str(report)])
    data = json.loads(report.read_text())
    assert code == 0 and len(data["steps"]) >= 2
    assert data["flops"]["after"] < 0.75 * data["flops"]["before"]
    fractions = [s["removed_fraction"] for s in data["steps"]]
    assert fractions == sorted(fractions)


def test_quality_gate_exits_3_and_keeps_the_model_unwritten(small, calib, tmp_path):
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    code = main([small["path"], str(out), "--ratio", "0.6", "--calib", str(calib),
                 "--max-drop", "0.0001", "--report", str(report)])
    assert code == 3 and not out.exists()
    data = json.loads(report.read_text())
    assert data["gate"]["passed"] is False and data["output"] is None
    assert data["gate"]["data"]["kind"] == "calibration" and data["gate"]["max_drop"] == 0.0001
    assert data["metric"]["relative_drop"] == data["gate"]["drop"] > 0.0001


def test_same_seed_same_bytes(small, calib, tmp_path):
    outs = []
    for i in range(2):
        out = tmp_path / f"out{i}.onnx"
        assert main([small["path"], str(out), "--ratio", "0.3", "--calib", str(calib),
                     "--samples", "16", "--seed", "7", "--method", "random"]) == 0
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


def test_score_json(small, calib, capsys):
    assert main(["score", small["path"], "--calib", str(calib), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["method"] == "fisher"
    assert "attn0.head0" in data["units"] and "ffn0.ch0" in data["units"]


def test_api_prune_returns_model_and_report(small, calib):
    model, report = onnxprune.prune(small["path"], 0.3, calib=str(calib), method="taylor")
    assert isinstance(model, onnx.ModelProto)
    assert report.params_after < report.params_before and report.method == "taylor"


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1] if err else ""


@pytest.mark.parametrize("extra,message", [
    (["--ratio", "0"], "between 0 and 1"),
    (["--ratio", "1.2"], "between 0 and 1"),
    (["--ratio", "0.99", "--granularity", "module"], "budget cannot be met"),
    (["--ratio", "0.3", "--method", "send", "--granularity", "head"], "does not score"),
    (["--ratio", "0.3", "--steps", "0"], "--prune-steps"),
])
def test_bad_options(small, tmp_path, capsys, extra, message):
    out = tmp_path / "out.onnx"
    assert main([small["path"], str(out), *extra]) == 2
    assert message in _error(capsys) and not out.exists()


def test_unknown_method_is_rejected(small, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([small["path"], str(tmp_path / "o.onnx"), "--ratio", "0.3", "--method", "nope"])
    assert exc.value.code == 2


@pytest.mark.parametrize("arrays,message", [
    ({"y": np.zeros((4, 3), np.float32)}, "x"),
    ({"x": np.zeros((4, 5, 5), np.float32)}, "x"),
    ({"x": np.full((4, 7, 12), np.nan, np.float32)}, "NaN"),
])
def test_bad_calibration(small, tmp_path, capsys, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    out = tmp_path / "out.onnx"
    assert main([small["path"], str(out), "--ratio", "0.3", "--calib", str(path)]) == 2
    assert message in _error(capsys) and not out.exists()


def test_output_equal_to_input_is_refused(small, capsys):
    assert main([small["path"], small["path"], "--ratio", "0.3"]) == 2
    assert "input" in _error(capsys)


def test_hf_encoder_at_opset_17_prunes_data_free(tmp_path):
    """Loss subgraphs must follow the model's opset (ReduceMean took axes as an input only
    from opset 18)."""
    from hf_forms import export_hf

    info = export_hf("bert_eager", str(tmp_path / "bert17.onnx"), dynamo=False, opset=17)
    shape = info["input"].shape
    model, report = onnxprune.prune(info["path"], 0.4, samples=8, batch_size=4,
                                    shapes={"x": (1, *shape[1:])})
    assert report.params_after < report.params_before
    onnx.checker.check_model(model)
