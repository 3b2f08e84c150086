"""Sensitivity metrics: gradients against finite differences, ablation against a re-run of
the cut model, SEND against a numpy reference, and the formulas of the other metrics."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxprune
from onnxprune import tracing, weightstore
from onnxprune.batches import LossBatches
from onnxprune.data import CalibrationData
from onnxprune.gates import gate_model
from onnxprune.losses import SAMPLE_LOSS, choose_loss, with_loss
from onnxprune.runtime import make_session, run
from onnxprune.scores import compute_scores
from onnxprune.scores.gradient import GradientPass, GradientStatistic
from onnxprune.structure.discover import analyse
from onnxprune.structure.graph import effective_weight
from onnxprune.units import unit_kind, unit_kinds

# forms with different layouts: batch-first, seq-first (batch on axis 1), fused QKV, the
# ONNX BatchNorm/RevIN forecaster, gated FFN
GRADIENT_FORMS = ["hf_bias", "mha_sf", "fused_chunk", "patchtst_ln", "ffn_swiglu"]
ALL_KINDS = unit_kinds()


def _kinds(*keys):
    return {unit_kind(k) for k in keys}


def _setup(export_cache, name: str, dynamic: bool = True, batch: int = 3):
    info = export_cache(name, False, dynamic)
    model = onnx.load(info["path"])
    analysis = analyse(model)
    n = batch if dynamic else info["batch"]
    x = info["make_input"](n)
    rng = np.random.default_rng(0)
    out = run(make_session(model), {"x": x})
    targets = {k: v + rng.standard_normal(v.shape).astype(np.float32) for k, v in out.items()}
    calib = CalibrationData({"x": x}, targets, "test", False)
    spec = choose_loss(model, targets)
    return model, analysis, calib, spec


def _per_sample_loss(model_with_loss, feeds):
    session = make_session(model_with_loss, optimize=False)
    return run(session, feeds)[SAMPLE_LOSS].astype(np.float64)


@pytest.mark.parametrize("name", GRADIENT_FORMS)
def test_gate_gradients_match_finite_differences(export_cache, name):
    model, analysis, calib, spec = _setup(export_cache, name)
    data = LossBatches(model, calib, spec, 8, 0)
    (inputs, targets), = data()
    grad = GradientPass(analysis, spec, ALL_KINDS)
    _, grads = grad(inputs, targets)
    lossy = with_loss(grad.gated.model, spec)
    batch = len(inputs["x"])
    base = grad.gated.feeds(batch=batch)
    eps = 2e-2   # the loss is float32: a smaller step drowns the difference in rounding
    checked = 0
    for gate in grad.gates:
        assert gate.batch_dim is not None, f"{gate.input} should carry the batch"
        unit = (gate.size // 2) if gate.size else None
        plus, minus = ({k: v.copy() for k, v in base.items()} for _ in range(2))
        for feeds, sign in ((plus, 1), (minus, -1)):
            value = np.moveaxis(feeds[gate.input], gate.batch_dim, 0)
            value[(..., unit) if unit is not None else ...] += sign * eps
        fd = (_per_sample_loss(lossy, {**inputs, **targets, **plus})
              - _per_sample_loss(lossy, {**inputs, **targets, **minus})) / (2 * eps)
        ad = grads[gate][:, unit] if unit is not None else grads[gate]
        scale = max(np.abs(fd).max(), 1e-4)
        np.testing.assert_allclose(ad, fd, atol=3e-2 * scale + 2e-5, err_msg=gate.input)
        checked += 1
    assert checked >= 3


def test_static_batch_gates_give_the_batch_gradient(export_cache):
    model, analysis, calib, spec = _setup(export_cache, "hf_bias", dynamic=False)
    grad = GradientPass(analysis, spec, _kinds("head"))
    (inputs, targets), = LossBatches(model, calib, spec, calib.n_samples, 0)()
    _, grads = grad(inputs, targets)
    gate = grad.gates[0]
    assert gate.batch_dim is None and grads[gate].shape == (1, gate.size)
    lossy = with_loss(grad.gated.model, spec)
    feeds = grad.gated.feeds()
    plus, minus = feeds[gate.input].copy(), feeds[gate.input].copy()
    plus[0] += 1e-3
    minus[0] -= 1e-3
    f = lambda g: _per_sample_loss(  # noqa: E731
        lossy, {**inputs, **targets, **feeds, gate.input: g}).sum()
    np.testing.assert_allclose(grads[gate][0, 0], (f(plus) - f(minus)) / 2e-3, rtol=2e-2)


def test_per_sample_gates_at_one_reproduce_the_model(export_cache):
    model, analysis, calib, _ = _setup(export_cache, "mha_sf")
    gated = gate_model(analysis, ALL_KINDS, per_sample=True, send=True)
    x = calib.inputs["x"]
    want = run(make_session(model, optimize=False), {"x": x})
    got = run(make_session(gated.model, optimize=False), {"x": x, **gated.feeds(batch=len(x))})
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value)


def test_per_sample_gates_of_a_stored_model_are_those_in_memory(export_cache, monkeypatch):
    """A large model is traced in segments and its gated tensors read back in segments:
    the gates, their batch axes and row orders (sequence-first: batch innermost) are the
    same as in memory."""
    model, analysis, _, _ = _setup(export_cache, "mha_sf")
    want = gate_model(analysis, ALL_KINDS, per_sample=True, send=True).gates
    assert any(g.batch_inner for g in want)
    monkeypatch.setattr(weightstore, "TENSOR_MIN_BYTES", 1024)
    monkeypatch.setattr(tracing, "TRACE_PART_BYTES", 4096)
    monkeypatch.setattr(tracing, "SHAPE_ONLY_BYTES", 256)
    stored = onnx.ModelProto()
    stored.CopyFrom(model)
    store = weightstore.offload(stored, min_total=0)
    try:
        got = gate_model(analyse(stored), ALL_KINDS, per_sample=True, send=True).gates
    finally:
        store.close()
    assert got == want


def test_ablation_equals_rerun_of_the_cut_model(export_cache):
    model, analysis, calib, spec = _setup(export_cache, "hf_bias")
    data = LossBatches(model, calib, spec, 2, 0)
    scores = compute_scores(analysis, data, spec, "ablation", _kinds("attn", "ffn", "head"))
    base, _ = data.evaluate(model)
    for unit in ("attn0.head1", "attn1", "ffn0"):
        cut = onnxprune.cut(model, [unit]).model
        loss, _ = data.evaluate(cut)
        assert scores.units()[unit] == pytest.approx(loss - base, abs=1e-5, rel=1e-4), unit


def _numpy_send(s: np.ndarray) -> float:
    """SPAT's SEND from S [B, H, T, T], written out step by step."""
    per_sample = []
    for sample in np.abs(s):
        soft = np.exp(sample - sample.max(axis=-1, keepdims=True))
        soft = soft / soft.sum(axis=-1, keepdims=True)   # softmax over keys
        over_heads = soft.mean(axis=0)                    # mean over heads -> [T, T]
        per_sample.append(over_heads.std(axis=-1).mean())  # std per row, mean over rows
    return float(np.mean(per_sample))


def test_send_matches_numpy_reference(export_cache):
    model, analysis, calib, spec = _setup(export_cache, "hf_bias", batch=2)
    data = LossBatches(model, calib, spec, 2, 0)
    scores = compute_scores(analysis, data, spec, "send", _kinds("attn"))
    block = analysis.structure.attention[0]
    # reference: S = ∂L/∂A ⊙ A by central differences on a whole-tensor gate on A
    gated = gate_model(analysis, [], blocks=[block.name], per_sample=True, send=True)
    (gate,) = gated.gates
    lossy = with_loss(gated.model, spec)
    (inputs, targets), = data()
    base = gated.feeds(batch=2)
    s = np.zeros(gate.shape_at(2))
    eps = 1e-3
    for index in np.ndindex(*gate.shape[1:]):
        losses = []
        for sign in (1, -1):
            feeds = {k: v.copy() for k, v in base.items()}
            feeds[gate.input][(slice(None), *index)] += sign * eps
            losses.append(_per_sample_loss(lossy, {**inputs, **targets, **feeds}))
        s[(slice(None), *index)] = (losses[0] - losses[1]) / (2 * eps)
    want = _numpy_send(s)
    assert scores.array(block.name, "attn") == pytest.approx(want, rel=2e-2)


def test_fisher_and_taylor_are_means_over_every_sample():
    """No smoothing across calibration batches: the statistic over two batches of 2 and 1
    samples is the one over the 3 samples at once (the EMA runs across --steps only)."""
    from onnxprune.gates import Gate

    gate = Gate("g", "attn0", "head", 3, shape=(1, 3), batch_dim=0)
    batches = [np.array([[1.0, -2.0, 0.0], [3.0, 0.5, 0.0]]), np.array([[-1.0, 1.0, 0.0]])]
    fisher, lim = GradientStatistic("fisher"), GradientStatistic("lim")
    taylor = GradientStatistic("taylor")
    for g in batches:
        for statistic in (fisher, lim, taylor):
            statistic.update({gate: g})
    every = np.vstack(batches)
    np.testing.assert_allclose(fisher.result()[gate], 0.5 * (every ** 2).mean(0))
    np.testing.assert_allclose(lim.signed()[gate], -every.mean(0) + 0.5 * (every ** 2).mean(0))
    np.testing.assert_allclose(lim.result()[gate], np.abs(lim.signed()[gate]))
    np.testing.assert_allclose(taylor.result()[gate], np.abs(every).mean(0))
    assert fisher.result()[gate][2] == 0  # a unit that never fires scores 0
    sketch = fisher.sketches()[gate]          # every sample its own row: the exact Fisher
    np.testing.assert_allclose(sketch.fisher(), every.T @ every / 3, rtol=1e-6)


def test_magnitude_adds_up_to_the_projection_weights(export_cache):
    _, analysis, _, spec = _setup(export_cache, "hf_bias")
    scores = compute_scores(analysis, None, spec, "magnitude", set(ALL_KINDS))
    view = analysis.view
    for block in analysis.structure.attention:
        total = sum((effective_weight(view, n) ** 2).sum()
                    for n in (block.q_proj, block.k_proj, block.v_proj, block.o_proj))
        assert float(scores.array(block.name, "attn")) == pytest.approx(total, rel=1e-9)
        heads = scores.array(block.name, "head")
        pairs = scores.array(block.name, "qk").sum(1) + scores.array(block.name, "vo").sum(1)
        np.testing.assert_allclose(heads, pairs)
    for block in analysis.structure.ffn:
        total = sum((effective_weight(view, n) ** 2).sum()
                    for n in (*block.up_projs, block.down_proj))
        assert scores.array(block.name, "ch").sum() == pytest.approx(total, rel=1e-9)


def test_stat_sees_a_dead_ffn_channel(export_cache):
    model, analysis, calib, spec = _setup(export_cache, "ffn_relu")
    block = analysis.structure.ffn[0]
    up = analysis.view.node[block.up_projs[0]]
    weight = up.inputs[1].name
    for init in model.graph.initializer:   # channel 3 gets weight 0 and bias -1: relu → 0
        if init.name == weight:
            w = onnx.numpy_helper.to_array(init).copy()
            w[:, 3] = 0
            init.CopyFrom(onnx.numpy_helper.from_array(w, init.name))
    bias = next(t for t in analysis.view.node[block.up_projs[0]].outputs[0].outputs[0].inputs
                if t.name != up.outputs[0].name)
    for init in model.graph.initializer:
        if init.name == bias.name:
            b = onnx.numpy_helper.to_array(init).copy()
            b[3] = -1
            init.CopyFrom(onnx.numpy_helper.from_array(b, init.name))
    analysis = analyse(model)
    data = LossBatches(model, calib, spec, 3, 0)
    scores = compute_scores(analysis, data, spec, "stat", _kinds("ch", "head"))
    ch = scores.array(block.name, "ch")
    assert ch[3] == 0 and ((ch >= 0) & (ch <= 1)).all() and ch.max() > 0
    assert (scores.array(analysis.structure.attention[0].name, "head") > 0).all()


def test_random_is_seeded(export_cache):
    _, analysis, _, spec = _setup(export_cache, "hf_bias")
    kinds = _kinds("head", "ch")
    a = compute_scores(analysis, None, spec, "random", kinds, seed=1).units()
    b = compute_scores(analysis, None, spec, "random", kinds, seed=1).units()
    c = compute_scores(analysis, None, spec, "random", kinds, seed=2).units()
    assert a == b and a != c


def test_data_free_fisher_agrees_with_ablation(export_cache):
    """Self-distillation has zero gradient at the original model; the sampled-target
    (true Fisher) scores must still rank heads like the exact ablation does."""
    info = export_cache("hf_bias", False, True)
    model = onnx.load(info["path"])
    calib = CalibrationData({"x": info["make_input"](32)}, {}, "synthetic", True)
    spec = choose_loss(model, {})
    assert spec.distill
    analysis = analyse(model)
    data = LossBatches(model, calib, spec, 8, 0)
    fisher = compute_scores(analysis, data, spec, "fisher", _kinds("head")).values
    exact = compute_scores(analysis, data, spec, "ablation", _kinds("head")).values
    a = np.concatenate([fisher[k] for k in sorted(fisher, key=lambda k: k[0])])
    b = np.concatenate([exact[k] for k in sorted(exact, key=lambda k: k[0])])
    assert a.min() > 1e-8                      # not the numerical noise of a zero gradient
    rank = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    assert np.corrcoef(rank(a), rank(b))[0, 1] > 0.6


def test_no_gradient_falls_back_to_forward_scores(export_cache, monkeypatch):
    """When onnx-ad cannot differentiate an op, fisher falls back to ablation (heads) and
    stat (channels) and says so, naming the op; send, which has no fallback, fails."""
    import onnx_ad

    from onnxprune.errors import OnnxpruneError

    def refuse(*args, **kwargs):
        raise onnx_ad.UnsupportedOperator("no reverse rule for FancyOp (node 'n0')")

    monkeypatch.setattr(onnx_ad, "reverse", refuse)
    model, analysis, calib, spec = _setup(export_cache, "hf_bias", batch=8)
    data = LossBatches(model, calib, spec, 8, 0)
    scores = compute_scores(analysis, data, spec, "fisher", _kinds("head", "ch"))
    assert len(scores.fallbacks) == 1 and "FancyOp" in scores.fallbacks[0]
    exact = compute_scores(analysis, data, spec, "ablation", _kinds("head")).values
    for name, values in exact.items():
        assert np.allclose(scores.values[name], values)
    stat = compute_scores(analysis, data, spec, "stat", _kinds("ch")).values
    channels = [key for key in scores.values if key[1].key == "ch"]
    assert channels and all(np.allclose(scores.values[k], stat[k]) for k in channels)
    with pytest.raises(OnnxpruneError, match="FancyOp"):
        compute_scores(analysis, data, spec, "send", _kinds("attn"))
