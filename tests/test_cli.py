"""The CLI as a user runs it: inspect and cut on the reference model, and every bad input
gets a one-line error, a non-zero exit code and no output file."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxprune.cli import main
from onnxprune.runtime import make_session, run


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_json_is_the_stable_interface(capsys, reference_model):
    code, out, _ = _cli(capsys, "inspect", str(reference_model), "--json")
    assert code == 0
    data = json.loads(out)
    assert {"blocks", "params", "flops"} <= data.keys()
    keys = {"name", "kind", "heads", "qk_dim", "vo_dim", "channels", "params", "flops",
            "removable", "reason"}
    for block in data["blocks"]:
        assert keys <= block.keys()
    kinds = [b["kind"] for b in data["blocks"]]
    assert kinds == ["attention", "ffn"] * 3
    assert data["blocks"][0]["heads"] == 16 and data["blocks"][1]["channels"] == 256


def test_inspect_shape_scales_flops(capsys, reference_model):
    _, one, _ = _cli(capsys, "inspect", str(reference_model), "--json", "--shape", "x:1,336,7")
    _, four, _ = _cli(capsys, "inspect", str(reference_model), "--json", "--shape", "x:4,336,7")
    assert json.loads(four)["flops"] == 4 * json.loads(one)["flops"]


def test_cut_writes_verified_smaller_model(capsys, reference_model, tmp_path):
    out = tmp_path / "pruned.onnx"
    code, text, _ = _cli(capsys, "cut", str(reference_model), str(out),
                         "--remove", "attn0.head1,attn0.head5,ffn1.ch7,attn2")
    assert code == 0, text
    assert "verified exact" in text
    pruned = onnx.load(str(out))
    x = np.random.default_rng(0).standard_normal((2, 336, 7)).astype(np.float32)
    y = run(make_session(pruned), {"x": x})
    assert next(iter(y.values())).shape == (2, 96, 7)
    assert out.stat().st_size < reference_model.stat().st_size


def _no_attention_model(path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.eye(4, dtype=np.float32).ravel())
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [w])
    onnx.save(helper.make_model(graph), str(path))


@pytest.mark.parametrize("case", ["missing", "empty", "truncated", "not_onnx", "no_attention",
                                  "bad_unit", "unknown_block", "unequal_qk", "same_path"])
def test_bad_input_one_line_error_nothing_written(capsys, reference_model, tmp_path, case):
    src = tmp_path / "in.onnx"
    out = tmp_path / "out.onnx"
    remove = "attn0.head1"
    if case == "missing":
        src = tmp_path / "nope.onnx"
    elif case == "empty":
        src.write_bytes(b"")
    elif case == "truncated":
        src.write_bytes(reference_model.read_bytes()[:5000])
    elif case == "not_onnx":
        src.write_text("name,value\na,1\n")
    elif case == "no_attention":
        _no_attention_model(src)
    else:
        shutil.copy(reference_model, src)
    remove = {"bad_unit": "attn0.heads1", "unknown_block": "attn9.head0",
              "unequal_qk": "attn0.qk0.1,attn0.qk1.2,attn0.qk1.3"}.get(case, remove)
    if case == "same_path":
        out = src
    before = src.read_bytes() if src.exists() else None
    code, _, err = _cli(capsys, "cut", str(src), str(out), "--remove", remove)
    assert code == 2
    assert err.startswith("onnxprune: error: ") and err.count("\n") == 1, err
    if case == "same_path":
        assert src.read_bytes() == before
    else:
        assert not out.exists()
    assert not list(tmp_path.glob(".*tmp"))


def test_inspect_no_attention_fails(capsys, tmp_path):
    src = tmp_path / "mlp.onnx"
    _no_attention_model(src)
    code, _, err = _cli(capsys, "inspect", str(src))
    assert code == 2 and "no attention" in err
