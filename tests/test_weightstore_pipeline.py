"""The main job on a model whose weights sit in a weight store (as every model of
``STORE_MIN_BYTES`` or more does) removes what it removes in memory, proves the same cut
exact and writes the same graph; the Ray workers get the weights themselves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxprune import batches, modelio, weightstore
from onnxprune.cli import main

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "patchtst_etth1.onnx"
ETTH1 = ROOT.parent / "shared" / "data" / "ETTh1.csv"
ARGS = ["--ratio", "0.5", "--calib", str(ETTH1), "--samples", "64", "--batch-size", "16",
        "--quiet"]


def _prune(tmp_path: Path, name: str) -> tuple[dict, Path]:
    out = tmp_path / f"{name}.onnx"
    report = tmp_path / f"{name}.json"
    assert main([str(MODEL), str(out), *ARGS, "--report", str(report)]) == 0
    return json.loads(report.read_text()), out


def test_the_main_job_through_the_store_matches_the_one_in_memory(tmp_path, monkeypatch):
    plain, plain_out = _prune(tmp_path, "plain")
    class Counted(batches.SpilledFeeds):
        made = 0

        def __init__(self, *args):
            super().__init__(*args)
            Counted.made += 1

    monkeypatch.setattr(batches, "SpilledFeeds", Counted)
    monkeypatch.setattr(modelio, "STORE_MIN_BYTES", 0)
    monkeypatch.setattr(weightstore, "TENSOR_MIN_BYTES", 4096)   # the cut's weights too
    stored, stored_out = _prune(tmp_path, "stored")
    assert Counted.made == 4, "the calibration pass's block outputs were not spilled"
    assert stored["removed"] == plain["removed"]
    assert stored["verified"]["max_abs_diff"] < 1e-5
    fits = [[(b["block"], b["applied"]) for b in r["reconstruction"]["blocks"]]
            for r in (plain, stored)]
    assert fits[0] == fits[1]                      # the same blocks re-fitted, the same way
    assert any(applied not in ("none", "skipped") for _, applied in fits[1])
    assert stored["calibration_loss"]["after"] == pytest.approx(
        plain["calibration_loss"]["after"], rel=1e-4)
    a, b = (onnx.load(str(p)) for p in (plain_out, stored_out))
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    x = {"x": np.random.default_rng(0).standard_normal((2, 336, 7)).astype(np.float32)}
    ya, yb = (ort.InferenceSession(str(p)).run(None, x)[0] for p in (plain_out, stored_out))
    np.testing.assert_allclose(yb, ya, rtol=1e-3, atol=1e-4)
    assert not list(tmp_path.glob("**/weights-*"))          # nothing left beside the outputs
