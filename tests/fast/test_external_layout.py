"""The input's layout is kept: a model with external data is written with external data
(``OUT.data`` beside ``OUT``), an inline model inline; a model too large for one protobuf
message always goes to a side file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxprune import modelio
from onnxprune.cli import main

CUT = ["--remove", "attn0.head1,ffn0.ch3"]
REFERENCE = Path(__file__).resolve().parents[2] / "models" / "patchtst_etth1.onnx"


def _save(tmp_path: Path, external: bool) -> Path:
    path = tmp_path / "model.onnx"
    onnx.save_model(onnx.load(str(REFERENCE)), str(path), save_as_external_data=external,
                    location="model.onnx.data", size_threshold=0)
    return path


def _outputs(path: Path, x: dict) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, x)


def test_external_data_in_external_data_out(tmp_path):
    source = _save(tmp_path, external=True)
    out = tmp_path / "out.onnx"
    assert main(["cut", str(source), str(out), *CUT]) == 0
    assert (tmp_path / "out.onnx.data").exists()
    assert modelio.uses_external_data(out)
    (tmp_path / "i").mkdir()
    inline = tmp_path / "inline.onnx"
    assert main(["cut", str(_save(tmp_path / "i", external=False)), str(inline), *CUT]) == 0
    assert not modelio.uses_external_data(inline)
    assert not list(tmp_path.glob("inline.onnx.*")) and not list(tmp_path.glob(".*tmp"))
    x = {"x": np.random.default_rng(0).standard_normal((2, 336, 7)).astype(np.float32)}
    for a, b in zip(_outputs(out, x), _outputs(inline, x)):
        np.testing.assert_array_equal(a, b)


def test_a_model_over_the_protobuf_limit_gets_a_side_file(tmp_path, monkeypatch):
    monkeypatch.setattr(modelio, "_EXTERNAL_DATA_LIMIT", 0)
    out = tmp_path / "big.onnx"
    assert main(["cut", str(_save(tmp_path, external=False)), str(out), *CUT]) == 0
    assert modelio.uses_external_data(out) and (tmp_path / "big.onnx.data").exists()
    assert onnx.load(str(out)).graph.initializer
