"""Pruning during fine-tuning ("Less is More" as coded): train, prune, train, ..., train on a
hand-built graph; every cut verified, the removed share reached, the weights trained."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper
from opgraphs import run
from test_search import attention_then_ffn

import onnxprune
from onnxprune.data import CalibrationData
from onnxprune.errors import OnnxpruneError
from onnxprune.interleaved import segment_steps


def _data(model, n: int = 32, seed: int = 0) -> CalibrationData:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 3, 8)).astype(np.float32)
    y = np.concatenate([run(model, {"x": x[i:i + 2]})[0] for i in range(0, n, 2)])
    y += 0.1 * rng.standard_normal(y.shape).astype(np.float32)
    return CalibrationData({"x": x}, {"out": y}, fixed_batch=2)


def test_train_prune_train_reaches_the_ratio_with_verified_cuts():
    model = attention_then_ffn(16)
    data = _data(model)
    pruned, report, run_ = onnxprune.prune_while_finetuning(
        model, 0.4, data, data, finetune_steps=9, steps=2, method="magnitude",
        finetune_options={"lr": 1e-3})
    assert run_.segments == [3, 3] and run_.final.steps <= 3
    assert report.steps[-1].removed_fraction >= 0.4
    assert all(s.max_abs_diff < 1e-4 for s in report.steps)
    assert report.reconstruction.updated == []
    plain, _ = onnxprune.prune(model, 0.4, data, steps=2, method="magnitude",
                               reconstruct="none")
    shared = {t.name: numpy_helper.to_array(t) for t in plain.graph.initializer}
    trained = [t.name for t in pruned.graph.initializer if t.name in shared
               and t.dims == list(shared[t.name].shape)
               and not np.array_equal(numpy_helper.to_array(t), shared[t.name])]
    assert trained                                  # the weights were fine-tuned


def test_too_few_training_steps_and_no_targets_are_refused():
    with pytest.raises(OnnxpruneError, match="at least 3 training steps"):
        segment_steps(2, 2)
    model = attention_then_ffn()
    inputs = _data(model)
    with pytest.raises(OnnxpruneError, match="needs targets"):
        onnxprune.prune_while_finetuning(model, 0.4, CalibrationData(inputs.inputs,
                                                                     fixed_batch=2),
                                         finetune_steps=6, steps=2, method="magnitude")


@pytest.mark.parametrize("extra, message", [
    ([], "needs --finetune-steps"),
    (["--finetune-steps", "6"], "needs --train"),
    (["--finetune-steps", "6", "--train", "T", "--finetune-only", "norms"], "trains every weight"),
    (["--finetune-steps", "6", "--train", "T", "--calib", "T"], "drop --calib"),
])
def test_the_cli_refuses_incomplete_requests_and_writes_nothing(tmp_path, capsys, extra,
                                                                message):
    import onnx

    from onnxprune.cli import main

    model = attention_then_ffn()
    src, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)
    data = _data(model)
    np.savez(tmp_path / "t.npz", x=data.inputs["x"], out=data.targets["out"])
    extra = [str(tmp_path / "t.npz") if a == "T" else a for a in extra]
    code = main([str(src), str(out), "--ratio", "0.4", "--finetune-schedule", "during",
                 "--quiet", *extra])
    assert code == 2 and not out.exists()
    assert message in capsys.readouterr().err
