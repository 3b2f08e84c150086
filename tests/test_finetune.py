"""Recovery fine-tuning in ONNX Runtime: weight gradients against finite differences, the
loss goes down, divergence keeps the last good weights, partial training, bad input."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxprune.data import CalibrationData
from onnxprune.errors import OnnxpruneError
from onnxprune.finetune import FinetuneOptions, Trainer, fit, trainable_weights
from onnxprune.losses import choose_loss, target_feeds
from onnxprune.runtime import make_session, run


@pytest.fixture(scope="module")
def task(export_cache):
    """A small regression task the model can learn: its own outputs, scaled and shifted."""
    info = export_cache("hf_bias", False, True)
    model = onnx.load(info["path"])
    x = info["make_input"](64)
    (name, y), = run(make_session(model), {"x": x}).items()
    data = CalibrationData({"x": x}, {name: 1.5 * y + 0.3}, "task", False)
    return model, data


def _weights(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_weight_gradients_match_finite_differences(task):
    model, data = task
    spec = choose_loss(model, data.targets)
    names = trainable_weights(model, FinetuneOptions(steps=1))
    inputs = {k: v[:8] for k, v in data.inputs.items()}
    targets = target_feeds(spec, {k: v[:8] for k, v in data.targets.items()})
    trainer = Trainer(model, spec, names, 0, inputs, 8)
    _, grads = trainer.step(inputs, targets)
    rng = np.random.default_rng(0)
    for name in rng.choice(names, 4, replace=False):
        index = tuple(rng.integers(0, s) for s in trainer.weights[name].shape)
        original = trainer.weights[name][index]
        losses = []
        for delta in (1e-2, -1e-2):
            trainer.weights[name][index] = original + delta
            losses.append(trainer.loss([(inputs, targets)]))
        trainer.weights[name][index] = original
        fd = (losses[0] - losses[1]) / 2e-2
        assert grads[name][index] == pytest.approx(fd, rel=5e-2, abs=2e-4), name


def test_finetuning_lowers_the_training_loss(task):
    model, data = task
    result = fit(model, data, data, FinetuneOptions(steps=40, lr=3e-3, batch_size=16,
                                                    eval_every=10, patience=10))
    assert result.steps == 40 and not result.stopped
    assert np.mean(result.train_loss[-5:]) < 0.5 * np.mean(result.train_loss[:5])
    assert result.val_loss[-1][1] < result.val_loss[0][1]
    before = run(make_session(model), data.inputs)
    after = run(make_session(result.model), data.inputs)
    (name, target), = data.targets.items()
    assert ((after[name] - target) ** 2).mean() < ((before[name] - target) ** 2).mean()


def test_a_diverging_learning_rate_keeps_the_last_good_weights(task):
    model, data = task
    result = fit(model, data, None, FinetuneOptions(steps=30, lr=1e6, batch_size=16,
                                                    clip=0))
    assert "stopped" in result.stopped and "--lr" in result.stopped
    for value in _weights(result.model).values():
        if np.issubdtype(value.dtype, np.floating):
            assert np.isfinite(value).all()


def test_norms_only_changes_only_one_dimensional_weights(task):
    model, data = task
    result = fit(model, data, None, FinetuneOptions(steps=5, lr=1e-2, batch_size=16,
                                                    trainable="norms"))
    old, new = _weights(model), _weights(result.model)
    changed = {k for k in old if not np.array_equal(old[k], new[k])}
    assert changed and all(old[k].ndim == 1 for k in changed)


def test_bad_input(task):
    model, data = task
    with pytest.raises(OnnxpruneError, match="targets"):
        fit(model, CalibrationData(data.inputs, {}, "x", False), None,
            FinetuneOptions(steps=1))
    with pytest.raises(OnnxpruneError, match="exactly one"):
        fit(model, data, None, FinetuneOptions(steps=1, epochs=1))
    with pytest.raises(OnnxpruneError, match="--lr"):
        fit(model, data, None, FinetuneOptions(steps=1, lr=-1.0))


def _npz(path, data):
    np.savez(path, **data.inputs, **data.targets)
    return str(path)


def test_finetune_command(task, tmp_path, capsys):
    from onnxprune.cli import main

    model, data = task
    src = tmp_path / "in.onnx"
    onnx.save(model, str(src))
    train = _npz(tmp_path / "train.npz", data)
    out = tmp_path / "out.onnx"
    assert main(["finetune", str(src), str(out), "--train", train, "--val", train,
                 "--steps", "6", "--lr", "3e-3", "--batch-size", "16", "--quiet"]) == 0
    assert out.exists() and "fine-tuned" in capsys.readouterr().out


def test_main_job_with_recovery_fine_tuning(task, tmp_path, capsys):
    import json

    from onnxprune.cli import main

    model, data = task
    src = tmp_path / "in.onnx"
    onnx.save(model, str(src))
    train = _npz(tmp_path / "train.npz", data)
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    assert main([str(src), str(out), "--ratio", "0.4", "--calib", train, "--report",
                 str(report), "--finetune-steps", "5", "--finetune-lr", "1e-3", "--train",
                 train, "--finetune-only", "pruned", "--quiet"]) == 0
    result = json.loads(report.read_text())
    assert result["finetune"]["steps"] == 5 and result["finetune"]["trainable"] > 0
    assert out.exists()


@pytest.mark.parametrize("extra,message", [
    (["--finetune-steps", "2"], "--train"),
])
def test_main_job_fine_tuning_bad_input(task, tmp_path, capsys, extra, message):
    from onnxprune.cli import main

    model, _ = task
    src = tmp_path / "in.onnx"
    onnx.save(model, str(src))
    out = tmp_path / "out.onnx"
    assert main([str(src), str(out), "--ratio", "0.3", *extra]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_finetune_rejects_mismatched_data(task, tmp_path, capsys):
    from onnxprune.cli import main

    model, _ = task
    src = tmp_path / "in.onnx"
    onnx.save(model, str(src))
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((8, 3, 3), np.float32), y=np.zeros((8, 2), np.float32))
    assert main(["finetune", str(src), str(tmp_path / "o.onnx"), "--train", str(bad),
                 "--steps", "2"]) == 2
    assert "x" in capsys.readouterr().err


def _matmul_then(op: str, batch: int, **attrs) -> onnx.ModelProto:
    """x [batch, 2, 8, 8] -> MatMul(w) -> ``op`` -> y: a static-batch model with one weight."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32), "w")]
    operands = ["h"]
    if op == "GridSample":
        grid = rng.uniform(-1, 1, size=(batch, 8, 8, 2)).astype(np.float32)
        inits.append(numpy_helper.from_array(grid, "grid"))
        operands.append("grid")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node(op, operands, ["y"], **attrs)]
    shape = [batch, 2, 8, 8]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, shape)], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def _static_batch_data(batch: int) -> CalibrationData:
    x = np.random.default_rng(1).normal(size=(4 * batch, 2, 8, 8)).astype(np.float32)
    return CalibrationData({"x": x}, {"y": 0.5 * x}, "task", False, batch)


def test_a_static_batch_model_fine_tunes_at_its_batch():
    data = _static_batch_data(4)
    result = fit(_matmul_then("Relu", 4), data, data,
                 FinetuneOptions(steps=40, lr=5e-2, warmup=0, eval_every=10))
    assert result.steps == 40
    assert result.val_loss[-1][1] < 0.5 * result.val_loss[0][1]


def test_an_op_without_a_gradient_is_named(tmp_path, capsys):
    from onnxprune.cli import main

    model = _matmul_then("GridSample", 1, mode="cubic")
    src = tmp_path / "in.onnx"
    onnx.save(model, str(src))
    train = _npz(tmp_path / "train.npz", _static_batch_data(1))
    out = tmp_path / "out.onnx"
    assert main(["finetune", str(src), str(out), "--train", train, "--steps", "2",
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "GridSample" in err
    assert not out.exists()
