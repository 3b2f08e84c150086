"""Planning: budgets, constraints, granularities and rounding, on the reference forecaster
with controlled scores (so each rule is tested, not the metric)."""

from __future__ import annotations

import numpy as np
import pytest

import onnxprune
from onnxprune.errors import OnnxpruneError
from onnxprune.plan import prunable_total, select, unit_costs
from onnxprune.scores import Scores
from onnxprune.units import granularity_kinds, kinds_of, make_plan, unit_kind


def _kinds(*keys):
    return {unit_kind(k) for k in keys}


def _granularity(name):
    return _kinds(*granularity_kinds()[name])


@pytest.fixture(scope="module")
def analysis(reference_model):
    return onnxprune.inspect(reference_model)


def _scores(analysis, seed=0, **overrides) -> Scores:
    """Random scores of every kind (modules in [1, 2)); ``attn0__head=...`` overrides one."""
    rng = np.random.default_rng(seed)
    values = {}
    for block in analysis.structure.blocks:
        for kind in kinds_of(block):
            values[(block.name, kind)] = np.float64(1.0 + rng.random()) if kind.whole \
                else rng.random(kind.shape(block))
    for key, value in overrides.items():
        block, kind = key.split("__")
        kind = kinds_of(analysis.structure.block(block))[0].key if kind == "module" else kind
        values[(block, unit_kind(kind))] = value
    return Scores("test", values, 0)


def _removed_params(analysis, units):
    result = onnxprune.cut(analysis.model, units, analysis=analysis)
    return result.params_before - result.params_after


@pytest.mark.parametrize("granularity", ["head", "channel", "ffn", "auto"])
def test_budget_is_met_and_the_cut_agrees(analysis, granularity):
    kinds = _granularity(granularity)
    total = prunable_total(analysis)
    ratio = 0.5 if granularity == "auto" else 0.3
    chosen = select(analysis, _scores(analysis), kinds, ratio * total)
    assert chosen.removed >= ratio * total * 0.999
    assert chosen.removed <= (ratio + 0.05) * total
    actual = _removed_params(analysis, chosen.units)
    assert actual == pytest.approx(chosen.removed, rel=0.02)   # biases are not counted


def test_a_kept_module_keeps_a_head(analysis):
    zeros = {f"attn{i}__head": np.zeros(16) for i in range(3)}
    with pytest.raises(OnnxpruneError, match="budget cannot be met"):
        select(analysis, _scores(analysis, **zeros), _kinds("head"),
               0.99 * prunable_total(analysis))
    attn_total = sum(b.params for b in analysis.structure.attention)
    chosen = select(analysis, _scores(analysis, **zeros), _kinds("head"), 0.9 * attn_total)
    plan = make_plan(chosen.units, analysis.structure)
    for block in analysis.structure.attention:
        cut = plan.cuts.get(block.name)
        assert cut is None or (not cut.whole and len(cut.indices("head")) <= block.heads - 1)


def test_channel_slots_keep_equal_widths_per_head(analysis):
    chosen = select(analysis, _scores(analysis), _kinds("qk", "vo"),
                    0.2 * prunable_total(analysis))
    plan = make_plan(chosen.units, analysis.structure)
    assert plan.cuts
    for cut in plan.cuts.values():
        per_head = {}
        for space in ("qk", "vo"):
            per_head[space] = {}
            for h, c in cut.indices(space):
                per_head[space].setdefault(h, set()).add(c)
            if per_head[space]:
                assert len({len(c) for c in per_head[space].values()}) == 1
                assert len(per_head[space]) == 16                # every head
        # indices differ per head: the scores differ
        if per_head["qk"]:
            assert len({tuple(sorted(c)) for c in per_head["qk"].values()}) > 1


def test_auto_finds_the_cheap_kind(analysis):
    cheap_ffn = {f"ffn{i}__ch": np.zeros(256) for i in range(3)}
    chosen = select(analysis, _scores(analysis, **cheap_ffn), _granularity("auto"),
                    0.3 * prunable_total(analysis))
    assert set(chosen.by_kind) == {"ch"}
    cheap_heads = {f"attn{i}__head": np.full(16, 1e-9) for i in range(3)}
    expensive = {f"ffn{i}__ch": np.full(256, 10.0) for i in range(3)}
    chosen = select(analysis, _scores(analysis, **cheap_heads, **expensive),
                    _granularity("auto"), 0.3 * prunable_total(analysis))
    assert set(chosen.by_kind) <= {"head", "attn"}


def test_module_granularity_takes_whole_attention_modules(analysis):
    chosen = select(analysis, _scores(analysis, attn1__module=np.float64(0.0)), _kinds("attn"),
                    0.1 * prunable_total(analysis))
    assert [u.name for u in chosen.units] == ["attn1"]
    with pytest.raises(OnnxpruneError, match=r"allow removing 50\.0%"):
        select(analysis, _scores(analysis), _kinds("attn"), 0.7 * prunable_total(analysis))


def test_round_to_keeps_multiples(analysis):
    chosen = select(analysis, _scores(analysis), _kinds("ch"), 0.37 * prunable_total(analysis),
                    round_to=16)
    plan = make_plan(chosen.units, analysis.structure)
    for block in analysis.structure.ffn:
        removed = len(plan.cuts[block.name].indices("ch")) if block.name in plan.cuts else 0
        assert (block.channels - removed) % 16 == 0


def test_flops_target_counts_flops(analysis):
    total = prunable_total(analysis, "flops")
    assert total == sum(b.flops for b in analysis.structure.blocks)
    chosen = select(analysis, _scores(analysis), _kinds("head"), 0.25 * total, target="flops")
    assert chosen.removed >= 0.25 * total
    costs = unit_costs(analysis, analysis.structure.attention[0], "flops")
    assert costs["head"] * 16 == pytest.approx(analysis.structure.attention[0].flops, rel=0.05)
