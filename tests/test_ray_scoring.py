"""Scoring on a Ray cluster (``--workers N``): on a local cluster of 2 workers the gradient
scores, their signed estimates and gradient sketches, and the main job's removed units equal
the single-process run's bit for bit; without ray the flag is a one-line error; without the
flag nothing imports ray."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import onnxprune
from onnxprune.cli import main

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "patchtst_etth1.onnx"
ETTH1 = ROOT.parent / "shared" / "data" / "ETTh1.csv"
MISSING = "onnxprune: error: --workers needs ray: pip install 'onnxprune[ray]'"


@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _calib() -> str | None:
    if not ETTH1.exists():
        pytest.skip(f"shared data folder absent: {ETTH1} not found")
    return str(ETTH1)


def _assert_same(one, two) -> None:
    assert one.samples == two.samples > 0
    assert one.values.keys() == two.values.keys()
    for key, value in one.values.items():
        np.testing.assert_array_equal(two.values[key], value, err_msg=str(key))
    assert one.signed.keys() == two.signed.keys()
    for key, value in one.signed.items():
        np.testing.assert_array_equal(two.signed[key], value, err_msg=str(key))
    assert one.gradients.keys() == two.gradients.keys()
    for key, sketch in one.gradients.items():
        other = two.gradients[key]
        assert sketch.samples == other.samples
        for name in ("mean", "square", "rows"):
            np.testing.assert_array_equal(getattr(other, name), getattr(sketch, name),
                                          err_msg=f"{key} {name}")


def test_a_bad_ray_address_is_one_line(capsys):
    ray = pytest.importorskip("ray")
    if ray.is_initialized():   # a joined cluster is used as it is, whatever the address
        pytest.skip("ray is already initialised in this process")
    argv = ["score", str(MODEL), "--samples", "4", "--ray-address", "no-such-address"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["onnxprune: error: --ray-address no-such-address: cannot join the Ray "
                   "cluster: Invalid address format: no-such-address"]


@pytest.mark.parametrize("method,data", [("fisher", "etth1"), ("taylor", "etth1"),
                                         ("fisher", "data-free")])
def test_two_workers_score_exactly_as_one_process(cluster, method, data):
    calib = _calib() if data == "etth1" else None
    # batches of 8 over 2 workers: 4 batches a shard (and an uneven last batch data-free)
    options = dict(method=method, samples=64 if calib else 20, batch_size=8, seed=3)
    one = onnxprune.score(MODEL, calib, **options)
    two = onnxprune.score(MODEL, calib, workers=2, **options)
    _assert_same(one, two)
    if method == "fisher":
        assert one.gradients, "fisher keeps gradient sketches"


def test_an_address_without_workers_uses_a_worker_per_cpu(cluster):
    # the process has joined a cluster (the fixture's, 2 CPUs): the address names it
    options = dict(method="taylor", samples=32, batch_size=8)
    one = onnxprune.score(MODEL, _calib(), **options)
    _assert_same(one, onnxprune.score(MODEL, _calib(), ray_address="auto", **options))


def test_main_job_removes_the_same_units_on_two_workers(cluster):
    options = dict(samples=32, batch_size=8, steps=2, reconstruct="none")
    _, one = onnxprune.prune(MODEL, 0.3, _calib(), **options)
    _, two = onnxprune.prune(MODEL, 0.3, _calib(), workers=2, **options)
    assert one.removed and one.removed == two.removed
    assert one.scores == two.scores


def test_score_command_on_two_workers_prints_the_same_scores(cluster, capsys):
    argv = ["score", str(MODEL), "--calib", _calib(), "--samples", "32", "--batch-size", "8",
            "--quiet", "--json", "-"]
    assert main(argv) == 0
    one = json.loads(capsys.readouterr().out)
    assert main([*argv, "--workers", "2"]) == 0
    two = json.loads(capsys.readouterr().out)
    assert one["units"] and one["units"] == two["units"]


def test_workers_without_ray_is_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)   # import ray fails
    assert main(["score", str(MODEL), "--workers", "2"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [MISSING]
    out = tmp_path / "pruned.onnx"
    assert main([str(MODEL), str(out), "--ratio", "0.3", "--workers", "2"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [MISSING]
    assert not out.exists()
    with pytest.raises(onnxprune.errors.OnnxpruneError, match="needs ray"):
        onnxprune.score(MODEL, ray_address="auto")


def test_without_the_flags_nothing_imports_ray():
    code = ("import sys, onnxprune, onnxprune.cli\n"
            f"onnxprune.score({str(MODEL)!r}, method='fisher', samples=4)\n"
            "assert 'ray' not in sys.modules, 'ray was imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr


def test_a_worker_that_cannot_differentiate_reports_it(monkeypatch):
    """A shard's task (run here, without Ray) yields its gate inputs, then the reason onnx-ad
    refused; the driver raises it as NoGradientError and fisher falls back as in one process."""
    import onnx_ad

    from onnxprune.batches import LossBatches
    from onnxprune.data import load_or_synthesise
    from onnxprune.losses import choose_loss
    from onnxprune.scores.distributed import score_shard
    from onnxprune.structure.discover import analyse

    def refuse(*args, **kwargs):
        raise onnx_ad.UnsupportedOperator("no reverse rule for FancyOp (node 'n0')")

    monkeypatch.setattr(onnx_ad, "reverse", refuse)
    model = onnxprune.modelio.load_model(MODEL)
    data = load_or_synthesise(model, None, 4, 0, None)
    analysis = analyse(model)
    spec = choose_loss(model, data.targets)
    (inputs, targets), = LossBatches(model, data, spec, 4, 0).gradient_batches()
    out = list(score_shard(analysis.model.SerializeToString(),
                           dict(analysis.structure.input_shapes), spec, ["head"], False, 1,
                           True, [(inputs, targets, np.ones(4), 0)]))
    assert len(out) == 2 and out[0] and all(isinstance(g, str) for g in out[0])
    assert isinstance(out[1], str) and "FancyOp" in out[1]


def test_workers_get_the_weights_of_a_model_in_a_weight_store(cluster, monkeypatch):
    """A large model's weights sit in the driver's weight store; the workers (possibly on
    other machines) are sent the model with its weights, put the same ones in a store of
    their own and score exactly what one process does with the store at the same thread
    count (without prepacked weights, ONNX Runtime's matmuls round by the thread count),
    and to rounding what one process does in memory."""
    from onnxprune import modelio

    options = dict(method="fisher", samples=32, batch_size=8, seed=3, threads=1)
    in_memory = onnxprune.score(MODEL, _calib(), **options)
    monkeypatch.setattr(modelio, "STORE_MIN_BYTES", 0)
    one = onnxprune.score(MODEL, _calib(), **options)
    two = onnxprune.score(MODEL, _calib(), workers=2, **options)
    _assert_same(one, two)
    for key, value in in_memory.values.items():
        np.testing.assert_allclose(two.values[key], value, rtol=1e-4, atol=1e-9,
                                   err_msg=str(key))
