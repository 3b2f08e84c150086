"""Torch exports converted to float16 (onnxruntime's converter, with and without
``keep_io_types``): inspect, an exact mixed cut, the main job data-free, the CLI, and the
written models run in ONNX Runtime with the dtypes they had."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from hf_forms import export_hf
from onnx import TensorProto
from onnxruntime.transformers.float16 import convert_float_to_float16
from plans import random_plan

import onnxprune
from onnxprune.cli import main
from onnxprune.gates import gate_model
from onnxprune.runtime import make_session, run
from onnxprune.units import parse_units
from onnxprune.verify import tolerance

# a float input (the form zoo's HF-style encoder) and token ids (a transformers BERT)
MODELS = ["hf_bias", "bert_sdpa"]
KEEP = [False, True]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, export_cache) -> dict:
    folder = tmp_path_factory.mktemp("fp16")
    out = {"hf_bias": export_cache("hf_bias", False, True)}
    out["bert_sdpa"] = export_hf("bert_sdpa", str(folder / "bert.onnx"), dynamo=False,
                                 perturbed=True)
    for name, info in list(out.items()):
        for keep in KEEP:
            half = convert_float_to_float16(onnx.load(info["path"]), keep_io_types=keep)
            path = folder / f"{name}_{'keep' if keep else 'half'}.onnx"
            onnx.save(half, str(path))
            out[name, keep] = {"path": str(path), "model": half, "make_input": info["make_input"]}
    return out


def io_types(model: onnx.ModelProto) -> dict[str, int]:
    return {vi.name: vi.type.tensor_type.elem_type
            for vi in [*model.graph.input, *model.graph.output]}


def float_weight_types(model: onnx.ModelProto) -> set[int]:
    return {t.data_type for t in model.graph.initializer
            if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)}


def inputs_for(info: dict, model: onnx.ModelProto, n: int) -> dict[str, np.ndarray]:
    x = info["make_input"](n)
    want = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}
    (spec,) = model.graph.input
    elem = spec.type.tensor_type.elem_type
    return {spec.name: x.astype(want[elem]) if elem in want else x}


def assert_same_dtypes(before: onnx.ModelProto, after: onnx.ModelProto) -> None:
    assert io_types(after) == io_types(before)
    assert float_weight_types(after) == float_weight_types(before) == {TensorProto.FLOAT16}


@pytest.mark.parametrize("keep", KEEP, ids=["fp16-io", "fp32-io"])
@pytest.mark.parametrize("name", MODELS)
def test_inspect_and_mixed_cut_are_exact(exported, name, keep):
    info = exported[name, keep]
    model = info["model"]
    analysis = onnxprune.inspect(model)
    assert len(analysis.structure.attention) == 2
    assert all(b.prunable for b in analysis.structure.attention)
    assert len(analysis.structure.ffn) == 2
    rtol, atol = tolerance(model)
    assert rtol > 1e-3     # float16 weights: the half-precision tolerance
    for kind in ("mixed", "module", "qkvo"):
        units = random_plan(analysis.structure, kind, seed=1)
        result = onnxprune.cut(model, units, analysis=analysis)
        assert_same_dtypes(model, result.model)
        # independently of the cut's own verification: gated original vs cut, another batch
        plan = parse_units(units, analysis.structure)
        gated = gate_model(analysis, blocks=list(plan.cuts))
        x = inputs_for(info, model, 3)
        want = run(make_session(gated.model), {**x, **gated.feeds(plan)})
        got = run(make_session(result.model), x)
        for key, ref in want.items():
            assert got[key].dtype == ref.dtype
            ref64 = ref.astype(np.float64)
            diff = float(np.abs(got[key].astype(np.float64) - ref64).max())
            assert diff <= atol + rtol * float(np.abs(ref64).max()), (kind, key, diff)


@pytest.mark.parametrize("keep", KEEP, ids=["fp16-io", "fp32-io"])
@pytest.mark.parametrize("name", MODELS)
def test_main_job_data_free(exported, name, keep):
    info = exported[name, keep]
    model = info["model"]
    pruned, report = onnxprune.prune(model, ratio=0.5)
    assert report.removed and all(not s.fallbacks for s in report.steps)
    assert report.params_after < report.params_before
    assert np.isfinite(report.loss_after) and all(np.isfinite(list(report.scores.values())))
    assert_same_dtypes(model, pruned)
    out = run(make_session(pruned), inputs_for(info, model, 4))
    assert all(np.isfinite(v).all() for v in out.values())


@pytest.mark.parametrize("keep", KEEP, ids=["fp16-io", "fp32-io"])
def test_cli_on_a_half_model(exported, tmp_path, capsys, keep):
    info = exported["hf_bias", keep]
    model = info["model"]
    cut, pruned, report = tmp_path / "cut.onnx", tmp_path / "pruned.onnx", tmp_path / "r.json"
    assert main(["inspect", info["path"]]) == 0
    assert main(["cut", info["path"], str(cut), "--remove", "attn0.head1,attn1,ffn0.ch3"]) == 0
    assert "verified exact" in capsys.readouterr().out
    assert main([info["path"], str(pruned), "--ratio", "0.5", "--report", str(report)]) == 0
    assert json.loads(report.read_text())["data"]["data_free"] is True
    assert main(["score", info["path"], "--method", "taylor"]) == 0
    for path in (cut, pruned):
        written = onnx.load(str(path))
        assert_same_dtypes(model, written)
        out = run(make_session(written), inputs_for(info, model, 2))
        assert all(v.dtype == np.dtype(np.float32 if keep else np.float16) for v in out.values())


def test_eval_finetune_and_bench_on_a_half_model(exported, tmp_path, capsys):
    info = exported["hf_bias", False]
    model = info["model"]
    x = info["make_input"](16)                       # float32 data for a float16 model
    y = run(make_session(onnx.load(exported["hf_bias"]["path"])), {"x": x})
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=x, **{k: v + 0.1 for k, v in y.items()})
    pruned, tuned = tmp_path / "pruned.onnx", tmp_path / "tuned.onnx"
    assert main([info["path"], str(pruned), "--ratio", "0.3", "--calib", str(calib)]) == 0
    assert main(["eval", str(pruned), "--data", str(calib)]) == 0
    assert main(["finetune", str(pruned), str(tuned), "--train", str(calib), "--val",
                 str(calib), "--steps", "5", "--lr", "1e-3"]) == 0
    assert_same_dtypes(model, onnx.load(str(tuned)))
    assert main(["bench", info["path"], str(tuned), "--quiet", "--runs", "3",
                 "--warmup", "1"]) == 0
    capsys.readouterr()
