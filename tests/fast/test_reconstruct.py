"""The reconstruct stage: the least squares against numpy references, the stage on a small
graph (it never raises the held-out loss, it changes only the weights it names), and the
check that proves the written model is the verified cut with exactly those updates."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from opgraphs import attention_model, feeds, run
from test_search import attention_then_ffn

import onnxprune
from onnxprune.batches import LossBatches
from onnxprune.data import load_or_synthesise
from onnxprune.errors import OnnxpruneError, VerificationError
from onnxprune.losses import choose_loss
from onnxprune.reconstruct import apply_updates, block_outputs, check_updates
from onnxprune.reconstruct.solve import Moments, Problem, best, candidates, error, fits
from onnxprune.runtime import make_session, with_outputs
from onnxprune.runtime import run as own_run
from onnxprune.structure.discover import analyse

K, D, N = 6, 4, 200


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, K)) + rng.standard_normal(K)
    w0 = rng.standard_normal((K, D))
    y = x @ (w0 + 0.3 * rng.standard_normal((K, D))) + rng.standard_normal(D) \
        + 0.05 * rng.standard_normal((N, D))
    return x, y, w0, rng.standard_normal(D)


def _moments(x: np.ndarray, y: np.ndarray) -> Moments:
    m = Moments.zeros(K, D)
    m.add(x[: N // 2], y[: N // 2])      # accumulated over two batches, as the stage does
    m.add(x[N // 2:], y[N // 2:])
    return m


def test_moments_error_is_the_sum_of_squares():
    x, y, w0, b0 = _data()
    m = _moments(x, y)
    (fit,) = candidates(Problem(m, w0, b0, None), ("none",))
    assert error(m, fit) == pytest.approx(((x @ w0 + b0 - y) ** 2).sum(), rel=1e-10)


def test_refit_is_ridge_regression_towards_the_cut_weight_with_a_free_bias():
    """min ‖Xc·W − Yc‖² + λ‖W − W0‖² on centred rows, b = ȳ − Wᵀx̄: numpy's lstsq on the
    stacked system gives the same W for every damping."""
    x, y, w0, b0 = _data(1)
    fits = candidates(Problem(_moments(x, y), w0, b0, None), ("refit",))
    assert len(fits) > 1
    xc, yc = x - x.mean(0), y - y.mean(0)
    for fit in fits:
        root = np.sqrt(fit.damping)
        a = np.vstack([xc, root * np.eye(K)])
        rhs = np.vstack([yc, root * w0])
        want = np.linalg.lstsq(a, rhs, rcond=None)[0]
        np.testing.assert_allclose(fit.weight, want, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(fit.bias, y.mean(0) - want.T @ x.mean(0), rtol=1e-7,
                                   atol=1e-9)


def test_refit_without_a_bias_keeps_none():
    x, y, w0, _ = _data(2)
    fit = candidates(Problem(_moments(x, y), w0, None, None), ("refit",))[0]
    root = np.sqrt(fit.damping)
    want = np.linalg.lstsq(np.vstack([x, root * np.eye(K)]), np.vstack([y, root * w0]),
                           rcond=None)[0]
    np.testing.assert_allclose(fit.weight, want, rtol=1e-7, atol=1e-9)
    assert not fit.bias.any()


@pytest.mark.parametrize("groups", [[0, 0, 1, 1, 2, 2], [4, 2, 5, 0, 1, 3]],
                         ids=["heads", "a group a row"])
def test_scale_is_one_factor_per_group_damped_towards_one(groups):
    """W = diag(s[groups])·W0: s from numpy's lstsq on the groups' contributions."""
    x, y, w0, b0 = _data(3)
    groups = np.array(groups)
    count = len(set(groups))
    fits = candidates(Problem(_moments(x, y), w0, b0, groups), ("scale",))
    xc, yc = x - x.mean(0), y - y.mean(0)
    columns = np.stack([(xc[:, groups == g] @ w0[groups == g]).ravel()
                        for g in range(count)], 1)
    for fit in fits:
        root = np.sqrt(fit.damping)
        a = np.vstack([columns, root * np.eye(count)])
        rhs = np.concatenate([yc.ravel(), root * np.ones(count)])
        s = np.linalg.lstsq(a, rhs, rcond=None)[0]
        np.testing.assert_allclose(fit.weight, w0 * s[groups][:, None], rtol=1e-7, atol=1e-9)


def test_the_best_fit_is_judged_one_at_a_time_and_ties_keep_the_first():
    x, y, w0, b0 = _data(5)
    problem = Problem(_moments(x, y), w0, b0, np.array([1, 0, 1, 0, 2, 2]))
    held = _moments(x[::2], y[::2])
    made = []

    def counted():
        for fit in fits(problem, ("none", "scale", "refit", "none")):
            made.append(fit)
            yield fit

    chosen, err = best(counted(), held)
    errors = [error(held, f) for f in made]
    assert len(made) == 12 and err == min(errors)
    assert chosen is made[errors.index(min(errors))]
    first, second = (candidates(problem, ("none",))[0] for _ in range(2))
    assert best(iter([first, second]), held)[0] is first
    assert best(iter([]), held) is None


def test_bias_compensation_moves_the_mean_error_into_the_bias():
    x, y, w0, b0 = _data(4)
    (fit,) = candidates(Problem(_moments(x, y), w0, b0, None), ("bias",))
    np.testing.assert_allclose(fit.weight, w0)
    np.testing.assert_allclose((x @ fit.weight + fit.bias - y).mean(0), 0, atol=1e-9)


MODELS = {"attention+ffn": attention_then_ffn, "attention": attention_model,
          "wide ffn": lambda: attention_then_ffn(32)}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("mode", ["auto", "scale", "refit"])
def test_the_stage_changes_only_named_weights(name, mode):
    model = MODELS[name]()
    pruned, report = onnxprune.prune(model, 0.4, method="magnitude", samples=64,
                                     batch_size=8, reconstruct=mode)
    rec = report.reconstruction
    assert rec.mode == mode and rec.held_out >= 1
    baseline, plain = onnxprune.prune(model, 0.4, method="magnitude", samples=64,
                                      batch_size=8, reconstruct="none")
    assert plain.reconstruction.updated == [] and plain.removed == report.removed
    check_updates(baseline, pruned, rec.updates)        # the verified cut + these updates
    if mode == "auto":                                   # kept only where it helps
        assert rec.loss_after <= rec.loss_before * (1 + 1e-9)
    touched = {n for b in rec.blocks for n in b.updated}
    assert touched == set(rec.updated)


def test_auto_lowers_the_held_out_loss_on_a_pruned_ffn():
    """Half of a wide FFN's channels removed by magnitude: refitting the down projection on
    the kept channels wins back part of the loss on held-out calibration data."""
    _, report = onnxprune.prune(attention_then_ffn(32), 0.5, method="magnitude",
                                samples=256, granularity="ffn")
    rec = report.reconstruction
    (block,) = [b for b in rec.blocks if b.block.startswith("ffn")]
    assert block.applied in ("bias", "scale", "refit") and block.updated
    assert block.error_after < block.error_before
    assert rec.loss_after < rec.loss_before


def test_none_writes_the_verified_cut():
    model = attention_then_ffn()
    a, report = onnxprune.prune(model, 0.4, method="magnitude", samples=16, reconstruct="none")
    b = onnxprune.cut(model, report.removed).model
    x = feeds(a)
    np.testing.assert_allclose(run(a, x)[0], run(b, x)[0], rtol=1e-6, atol=1e-6)
    assert report.reconstruction.summary() == "reconstruction: off (--reconstruct none)"


def test_an_unknown_mode_is_refused():
    with pytest.raises(OnnxpruneError, match="--reconstruct 'lsq'"):
        onnxprune.prune(attention_model(), 0.4, method="magnitude", samples=8,
                        reconstruct="lsq")


@pytest.fixture(scope="module")
def updated():
    cut, _ = onnxprune.prune(attention_then_ffn(32), 0.5, method="magnitude", samples=16,
                             granularity="ffn", reconstruct="none")
    rng = np.random.default_rng(0)
    name = next(t.name for t in cut.graph.initializer if t.name.startswith("down"))
    value = numpy_helper.to_array(next(t for t in cut.graph.initializer if t.name == name))
    updates = {name: value + rng.standard_normal(value.shape).astype(np.float32)}
    return cut, apply_updates(cut, updates), updates


def test_the_check_accepts_the_named_updates(updated):
    cut, written, updates = updated
    check_updates(cut, written, updates)


def test_the_check_catches_a_tampered_weight(updated):
    cut, written, updates = updated
    tampered = onnx.ModelProto()
    tampered.CopyFrom(written)
    other = next(t for t in tampered.graph.initializer if t.name.startswith("up.W"))
    value = numpy_helper.to_array(other).copy()
    value.flat[0] += 1e-3
    other.CopyFrom(numpy_helper.from_array(value, other.name))
    with pytest.raises(VerificationError, match="changed without being named"):
        check_updates(cut, tampered, updates)


def test_the_check_catches_an_update_that_is_not_held(updated):
    cut, written, updates = updated
    name = next(iter(updates))
    with pytest.raises(VerificationError, match="does not hold its update"):
        check_updates(cut, written, {name: updates[name] * 2})


def test_the_check_catches_a_changed_graph(updated):
    cut, written, updates = updated
    changed = onnx.ModelProto()
    changed.CopyFrom(written)
    changed.graph.node[0].name = "renamed"
    with pytest.raises(VerificationError, match="changed the graph"):
        check_updates(cut, changed, updates)


def test_the_calibration_pass_keeps_the_original_block_outputs():
    """The targets come from the pass that loads the calibration data (no second run of the
    original), equal a run of their own, and the original's loss needs no pass either."""
    model = attention_then_ffn(32)
    data = load_or_synthesise(model, None, 24, 0, None)
    spec = choose_loss(model, data.targets, None)
    probes = dict(block_outputs(analyse(model)).values())
    assert len(probes) == 2                                   # attention and FFN outputs
    batches = LossBatches(model, data, spec, 8, 0, probes=probes)
    plain = LossBatches(model, data, spec, 8, 0)
    assert plain.probed and not set(probes) & set(plain.probed[0])
    session = make_session(with_outputs(model, probes))
    for (inputs, _), kept in zip(batches(), batches.probed):
        for name, value in own_run(session, inputs, list(probes)).items():
            np.testing.assert_allclose(kept[name], value, rtol=1e-6, atol=1e-6)
    loss, quality = batches.evaluate_original()
    assert (loss, quality) == batches.evaluate(model)


def test_a_run_whose_every_projection_is_refused_says_so(monkeypatch):
    """Blocks cut by units whose projections cannot be re-fitted (each with its reason)
    are not "no block cut by heads or channels"."""
    from onnxprune.reconstruct import stage
    from onnxprune.reconstruct.sites import Skipped

    monkeypatch.setattr(stage, "find_projections",
                        lambda original, cut: ([], [Skipped("ffn1", "weight is shared")]))
    _, report = onnxprune.prune(attention_then_ffn(32), 0.5, method="magnitude",
                                samples=64, batch_size=8, granularity="ffn")
    rec = report.reconstruction
    assert rec.note == "every pruned block's projection was skipped (reasons per block)"
    assert [(b.block, b.applied, b.reason) for b in rec.blocks] == \
        [("ffn1", "skipped", "weight is shared")]
