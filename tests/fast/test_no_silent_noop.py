"""Never a silent no-op: a run that could remove nothing is refused with the reason, a kind
a block refuses is left out of that block and named, and the rest prunes."""

from __future__ import annotations

import json
import subprocess
import sys

import onnx
import pytest
from onnx import TensorProto, helper
from opgraphs import BATCH, SEQ, WIDTH, Builder, attention_model, feeds

import onnxprune
from onnxprune.batches import LossBatches
from onnxprune.data import CalibrationData
from onnxprune.errors import OnnxpruneError
from onnxprune.losses import choose_loss
from onnxprune.report import prune_summary
from onnxprune.scores import compute_scores
from onnxprune.structure.discover import analyse
from onnxprune.units import unit_kind


def _attention_output_also_returned() -> onnx.ModelProto:
    """The attention module's output is a graph output too: it cannot be removed whole."""
    model = attention_model()
    model.graph.output.append(helper.make_tensor_value_info("o", TensorProto.FLOAT,
                                                            (BATCH, SEQ, WIDTH)))
    return model


def test_a_run_that_can_cut_nothing_is_refused_with_the_reason():
    with pytest.raises(OnnxpruneError, match=r"nothing to prune.*attn0 attention modules: "
                                             r"not removable whole: its output has several "
                                             r"users"):
        onnxprune.prune(_attention_output_also_returned(), 0.3, granularity="module",
                        method="magnitude", samples=4)


def test_the_cli_exits_2_and_writes_nothing(tmp_path):
    src, out, report = tmp_path / "m.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(_attention_output_also_returned(), src)
    run = subprocess.run([sys.executable, "-m", "onnxprune.cli", str(src), str(out),
                          "--ratio", "0.3", "--granularity", "module", "--method",
                          "magnitude", "--report", str(report), "--quiet"],
                         capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and "nothing to prune" in run.stderr
    assert not out.exists() and not report.exists()


def test_a_refused_kind_is_named_and_the_rest_prunes():
    _, report = onnxprune.prune(_attention_output_also_returned(), 0.3, granularity="auto",
                                method="magnitude", samples=4)
    assert report.removed and all(name.startswith("attn0.head") for name in report.removed)
    (entry,) = report.to_json()["excluded"]
    assert entry["block"] == "attn0" and entry["kind"] == "attention modules"
    assert "several users" in entry["reason"]
    assert "not cut: attention modules of attn0" in prune_summary(report)
    json.dumps(report.to_json())


def test_stat_scores_a_block_without_residual_add():
    """x -> up -> relu -> down -> head: no residual add, and no module output to norm by."""
    b = Builder(0)
    act = b.op("Relu", [b.linear("x", "up", WIDTH, 6)], "act")
    down = b.linear(act, "down", 6, WIDTH)
    b.op("MatMul", [down, b.weight("head.W", WIDTH, 3)], "out")
    model = b.model({"x": (BATCH, SEQ, WIDTH)}, {"out": (BATCH, SEQ, 3)})
    analysis = analyse(model)
    (block,) = analysis.structure.blocks
    assert not block.removable and block.module_output is None
    calib = CalibrationData(feeds(model), {}, "test", True)
    spec = choose_loss(model, {})
    batches = LossBatches(model, calib, spec, BATCH, 0)
    kinds = {unit_kind("ch"), unit_kind("ffn")}
    scores = compute_scores(analysis, batches, spec, "stat", kinds)
    channels = scores.array(block.name, "ch")
    assert channels.shape == (6,) and ((channels >= 0) & (channels <= 1)).all()
    assert scores.array(block.name, "ffn") is None          # not removable: not scored


def test_stat_scores_a_block_whose_residual_is_a_graph_input():
    _, report = onnxprune.prune(attention_model(), 0.3, method="stat", samples=4)
    assert report.removed
