"""The command line as a CI pipeline sees it: --version, python -m onnxprune, and one
machine-readable convention for every command (--json [FILE|-])."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest

import onnxprune
from onnxprune.cli import main
from onnxprune.runtime import make_session, run


def test_version_is_the_package_version(capsys):
    try:
        main(["--version"])
    except SystemExit as exc:
        assert exc.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"onnxprune {onnxprune.__version__} ")
    assert onnx.__version__ in out and onnxruntime.__version__ in out


def test_python_dash_m_runs_the_cli():
    run = subprocess.run([sys.executable, "-m", "onnxprune", "--version"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.startswith(f"onnxprune {onnxprune.__version__}")


def test_the_installed_metadata_reads_the_same_version():
    from importlib.metadata import version

    assert version("onnxprune") == onnxprune.__version__


# --- machine-readable output ---------------------------------------------------------------
MODEL = str(Path(__file__).resolve().parents[2] / "models" / "patchtst_etth1.onnx")
FAST_PRUNE = ["--samples", "8", "--method", "magnitude", "--reconstruct", "none", "--quiet"]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> str:
    """24 windows with targets: the model's own outputs plus noise (so metrics are finite
    and the original is not perfect)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((24, 336, 7)).astype(np.float32)
    y = run(make_session(onnx.load(MODEL)), {"x": x})["y"]
    y = y + 0.1 * rng.standard_normal(y.shape).astype(np.float32)
    path = tmp_path_factory.mktemp("data") / "labelled.npz"
    np.savez(path, x=x, y=y)
    return str(path)


def schema_validator():
    jsonschema = pytest.importorskip("jsonschema")
    from onnxprune import schemas

    return jsonschema.Draft202012Validator(schemas.load("prune_report"))


def json_out(capsys, argv: list[str], code: int = 0) -> dict:
    """Run the CLI with its JSON on stdout: stdout must be exactly one JSON document."""
    assert main(argv) == code
    out = capsys.readouterr().out
    return json.loads(out)


def test_inspect_json_on_stdout_and_to_a_file(capsys, tmp_path):
    data = json_out(capsys, ["inspect", MODEL, "--json"])
    assert [b["name"] for b in data["blocks"]][:2] == ["attn0", "ffn0"]
    assert json_out(capsys, ["inspect", MODEL, "--json", "-"]) == data
    target = tmp_path / "structure.json"
    assert main(["inspect", MODEL, "--json", str(target)]) == 0
    out = capsys.readouterr().out
    assert "attn0" in out and json.loads(target.read_text()) == data   # table + file


def test_score_and_eval_json(capsys, labelled):
    scores = json_out(capsys, ["score", MODEL, "--json", "--samples", "4", "--method",
                               "magnitude", "--quiet"])
    assert scores["method"] == "magnitude" and "attn0.head0" in scores["units"]
    result = json_out(capsys, ["eval", MODEL, "--data", labelled, "--json", "-"])
    assert set(result["metrics"]) == {"mse", "mae"} and result["samples"] == 24


def test_cut_json_goes_to_stdout_and_the_text_to_stderr(capsys, tmp_path):
    out = tmp_path / "cut.onnx"
    assert main(["cut", MODEL, str(out), "--remove", "attn0.head1,ffn1.ch7", "--json"]) == 0
    stdout, stderr = capsys.readouterr()
    data = json.loads(stdout)
    assert data["removed"] == ["attn0.head1", "ffn1.ch7"] and data["output"] == str(out)
    assert data["params"]["after"] < data["params"]["before"]
    assert data["verified"]["max_abs_diff"] <= data["verified"]["atol"] + 1e-3
    assert "verified exact" in stderr and f"wrote {out}" in stderr


def test_finetune_json(capsys, tmp_path, labelled):
    out = tmp_path / "tuned.onnx"
    data = json_out(capsys, ["finetune", MODEL, str(out), "--train", labelled, "--steps", "2",
                             "--batch-size", "8", "--quiet", "--json"])
    assert data["steps"] == 2 and data["output"] == str(out) and out.exists()


def test_bench_json_to_stdout_and_to_a_file(capsys, tmp_path):
    argv = ["bench", MODEL, "--runs", "2", "--warmup", "1", "--no-memory", "--quiet"]
    rows = json_out(capsys, [*argv, "--json"])
    assert rows and json.dumps(rows)
    target = tmp_path / "bench.json"
    assert main([*argv, "--json", str(target)]) == 0
    assert "p50 ms" in capsys.readouterr().out and json.loads(target.read_text())


# --- the prune report ----------------------------------------------------------------------
def test_the_prune_report_follows_the_schema(capsys, tmp_path):
    validator = schema_validator()
    out = tmp_path / "pruned.onnx"
    report = json_out(capsys, [MODEL, str(out), "--ratio", "0.3", *FAST_PRUNE, "--json"])
    validator.validate(report)
    assert report["schema_version"] == 1 and report["gate"] is None
    assert report["versions"] == {"onnxprune": onnxprune.__version__,
                                  "onnx": onnx.__version__,
                                  "onnxruntime": onnxruntime.__version__}
    assert report["files"]["output"]["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert report["files"]["input"]["sha256"] == hashlib.sha256(
        Path(MODEL).read_bytes()).hexdigest()
    verified = report["verified"]
    assert verified["rtol"] == 1e-4 and verified["atol"] == 1e-5
    assert verified["max_abs_diff"] < 1e-4 and verified["inputs"]["shapes"]["x"][1:] == [336, 7]
    # --report FILE is --json FILE
    path = tmp_path / "report.json"
    assert main([MODEL, str(tmp_path / "b.onnx"), "--ratio", "0.3", *FAST_PRUNE, "--report",
                 str(path)]) == 0
    again = json.loads(path.read_text())
    validator.validate(again)
    assert again["removed"] == report["removed"]


def test_progressive_runs_name_removed_units_in_the_original(capsys, tmp_path):
    """``removed`` holds plain names of the original's units: cutting them from the
    original in one go gives the progressive run's model."""
    out = tmp_path / "pruned.onnx"
    report = json_out(capsys, [MODEL, str(out), "--ratio", "0.5", *FAST_PRUNE,
                               "--prune-steps", "3", "--json"])
    schema_validator().validate(report)
    assert len(report["steps"]) == 3
    assert len(set(report["removed"])) == sum(len(s["units"]) for s in report["steps"])
    again = onnxprune.cut(MODEL, report["removed"]).model
    x = {"x": np.random.default_rng(1).standard_normal((2, 336, 7)).astype(np.float32)}
    got, want = (run(make_session(m), x)["y"] for m in (onnx.load(str(out)), again))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_steps_is_a_hidden_alias_of_prune_steps(capsys, tmp_path):
    report = json_out(capsys, [MODEL, str(tmp_path / "p.onnx"), "--ratio", "0.3", *FAST_PRUNE,
                               "--steps", "2", "--json"])
    assert len(report["steps"]) == 2
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    text = capsys.readouterr().out
    assert "--prune-steps" in text and "--steps " not in text.replace("--finetune-steps", "")


def test_keep_protects_whole_blocks(capsys, tmp_path):
    report = json_out(capsys, [MODEL, str(tmp_path / "p.onnx"), "--ratio", "0.4", *FAST_PRUNE,
                               "--keep", "ffn0,attn1", "--keep", "ffn2", "--json"])
    assert report["keep"] == ["ffn0", "attn1", "ffn2"]
    blocks = {u.split(".")[0] for u in report["removed"]}
    assert blocks and not blocks & {"ffn0", "attn1", "ffn2"}
    assert not any(u.split(".")[0] in {"ffn0", "attn1", "ffn2"} for s in report["steps"]
                   for u in s["units"])


def test_keep_names_must_be_blocks(capsys, tmp_path):
    assert main([MODEL, str(tmp_path / "p.onnx"), "--ratio", "0.3", *FAST_PRUNE,
                 "--keep", "attn0.head1"]) == 2
    err = capsys.readouterr().err
    assert "--keep attn0.head1: not a block" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "p.onnx").exists()


def test_the_gate_measures_on_val_data_when_given(capsys, tmp_path, labelled):
    validator = schema_validator()
    out = tmp_path / "p.onnx"
    report = json_out(capsys, [MODEL, str(out), "--ratio", "0.3", *FAST_PRUNE,
                               "--max-drop", "10", "--val", labelled, "--json"])
    validator.validate(report)
    gate = report["gate"]
    assert gate["data"] == {"kind": "val", "source": labelled, "samples": 24}
    assert gate["metric"] == "mse" and gate["passed"] and out.exists()
    expected = onnxprune.evaluate(str(out), labelled)["metrics"]["mse"]
    assert gate["after"] == pytest.approx(expected, rel=1e-6)
    # the calibration data without --val; a failed gate: exit 3, no model, report says why
    report = json_out(capsys, [MODEL, str(tmp_path / "q.onnx"), "--ratio", "0.3",
                               *FAST_PRUNE, "--max-drop", "0", "--val", labelled, "--json"],
                      code=3)
    validator.validate(report)
    assert report["gate"]["passed"] is False and report["output"] is None
    assert report["files"]["output"] is None and not (tmp_path / "q.onnx").exists()
    report = json_out(capsys, [MODEL, str(tmp_path / "r.onnx"), "--ratio", "0.3",
                               *FAST_PRUNE, "--max-drop", "10", "--json"])
    assert report["gate"]["data"]["kind"] == "calibration"


def test_tolerances_reach_the_verification(capsys, tmp_path):
    report = json_out(capsys, [MODEL, str(tmp_path / "p.onnx"), "--ratio", "0.3", *FAST_PRUNE,
                               "--atol", "1e-3", "--rtol", "0", "--json"])
    assert (report["verified"]["atol"], report["verified"]["rtol"]) == (1e-3, 0)
    # no tolerance at all: float rounding fails the check (exit 4, nothing written)
    assert main(["cut", MODEL, str(tmp_path / "c.onnx"), "--remove", "ffn0.ch1",
                 "--atol", "0", "--rtol", "0"]) == 4
    assert not (tmp_path / "c.onnx").exists()
    try:
        code = main(["cut", MODEL, str(tmp_path / "c.onnx"), "--remove", "ffn0.ch1",
                     "--atol", "-1"])
    except SystemExit as exc:   # refused while parsing the arguments
        code = exc.code
    assert code == 2 and "--atol" in capsys.readouterr().err
    with pytest.raises(onnxprune.OnnxpruneError, match="--rtol nan: must be"):
        onnxprune.cut(MODEL, ["ffn0.ch1"], rtol=float("nan"))


def test_json_on_stdout_and_report_to_a_file_together(capsys, tmp_path):
    path = tmp_path / "report.json"
    report = json_out(capsys, [MODEL, str(tmp_path / "p.onnx"), "--ratio", "0.3", *FAST_PRUNE,
                               "--json", "--report", str(path)])
    assert json.loads(path.read_text()) == report


def test_eval_json_to_a_file_keeps_the_table(capsys, tmp_path, labelled):
    target = tmp_path / "eval.json"
    assert main(["eval", MODEL, "--data", labelled, "--json", str(target)]) == 0
    out = capsys.readouterr().out
    assert out.index("mse") < out.index(f"wrote {target}")
    assert set(json.loads(target.read_text())["metrics"]) == {"mse", "mae"}


def test_json_as_a_flag_before_the_model_still_means_stdout(capsys):
    data = json_out(capsys, ["inspect", "--json", MODEL])
    assert data["blocks"][0]["name"] == "attn0"


def test_non_finite_numbers_are_written_as_null(tmp_path):
    """JSON has no NaN or inf: a diverged loss is written as null, so strict readers work."""
    import argparse

    from onnxprune.cli import emit_json

    target = tmp_path / "x.json"
    emit_json(argparse.Namespace(json=str(target)),
              {"loss": [1.0, float("nan")], "best": float("inf"), "n": 3}, say=False)
    text = target.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"loss": [1.0, None], "best": None, "n": 3}


@pytest.mark.parametrize("granularity, ratio", [("channel", 0.15), ("head", 0.25),
                                                ("ffn", 0.3)])
def test_progressive_names_follow_every_renumbering(granularity, ratio):
    """Per-head QK/VO channels (rows shrink with the heads), heads and FFN channels: the
    original-numbered ``removed`` cut in one go equals the three-step run."""
    pruned, report = onnxprune.prune(MODEL, ratio, None, method="magnitude",
                                     granularity=granularity, samples=8, steps=3,
                                     reconstruct="none")
    assert len(report.steps) == 3 and not any(u.startswith("step") for u in report.removed)
    again = onnxprune.cut(MODEL, report.removed).model
    x = {"x": np.random.default_rng(2).standard_normal((2, 336, 7)).astype(np.float32)}
    np.testing.assert_allclose(run(make_session(pruned), x)["y"],
                               run(make_session(again), x)["y"], rtol=0, atol=1e-5)
