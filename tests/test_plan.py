"""Planning: budgets, constraints, granularities and rounding, on the reference forecaster
with controlled scores (so each rule is tested, not the metric)."""

from __future__ import annotations

import numpy as np
import pytest

import onnxprune
from onnxprune.errors import OnnxpruneError
from onnxprune.plan import block_costs, prunable_total, select
from onnxprune.scores import GRANULARITY_KINDS, Scores
from onnxprune.units import parse_units


@pytest.fixture(scope="module")
def analysis(reference_model):
    return onnxprune.inspect(reference_model)


def _scores(analysis, seed=0, **overrides) -> Scores:
    rng = np.random.default_rng(seed)
    values = {}
    for block in analysis.structure.blocks:
        values[(block.name, "module")] = np.float64(1.0 + rng.random())
        if block.kind == "attention":
            values[(block.name, "head")] = rng.random(block.heads)
            values[(block.name, "qk")] = rng.random((block.heads, block.qk_dim))
            values[(block.name, "vo")] = rng.random((block.heads, block.vo_dim))
        else:
            values[(block.name, "ch")] = rng.random(block.channels)
    for key, value in overrides.items():
        block, kind = key.split("__")
        values[(block, kind)] = value
    return Scores("test", values, 0)


def _removed_params(analysis, units):
    result = onnxprune.cut(analysis.model, units, analysis=analysis)
    return result.params_before - result.params_after


@pytest.mark.parametrize("granularity", ["head", "channel", "ffn", "auto"])
def test_budget_is_met_and_the_cut_agrees(analysis, granularity):
    kinds = GRANULARITY_KINDS[granularity]
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
        select(analysis, _scores(analysis, **zeros), {"head"},
               0.99 * prunable_total(analysis))
    attn_total = sum(b.params for b in analysis.structure.attention)
    chosen = select(analysis, _scores(analysis, **zeros), {"head"}, 0.9 * attn_total)
    plan = parse_units(chosen.units, analysis.structure)
    for block in analysis.structure.attention:
        cut = plan.cuts.get(block.name)
        assert cut is None or (not cut.whole and len(cut.heads) <= block.heads - 1)


def test_channel_slots_keep_equal_widths_per_head(analysis):
    chosen = select(analysis, _scores(analysis), {"qk", "vo"}, 0.2 * prunable_total(analysis))
    plan = parse_units(chosen.units, analysis.structure)
    assert plan.cuts
    for cut in plan.cuts.values():
        for space in (cut.qk, cut.vo):
            if space:
                assert len({len(c) for c in space.values()}) == 1
                assert len(space) == 16                         # every head
        # indices differ per head: the scores differ
        if cut.qk:
            assert len({tuple(sorted(c)) for c in cut.qk.values()}) > 1


def test_auto_finds_the_cheap_kind(analysis):
    cheap_ffn = {f"ffn{i}__ch": np.zeros(256) for i in range(3)}
    chosen = select(analysis, _scores(analysis, **cheap_ffn), GRANULARITY_KINDS["auto"],
                    0.3 * prunable_total(analysis))
    assert set(chosen.by_kind) == {"ch"}
    cheap_heads = {f"attn{i}__head": np.full(16, 1e-9) for i in range(3)}
    expensive = {f"ffn{i}__ch": np.full(256, 10.0) for i in range(3)}
    chosen = select(analysis, _scores(analysis, **cheap_heads, **expensive),
                    GRANULARITY_KINDS["auto"], 0.3 * prunable_total(analysis))
    assert set(chosen.by_kind) <= {"head", "attn"}


def test_module_granularity_takes_whole_attention_modules(analysis):
    chosen = select(analysis, _scores(analysis, attn1__module=np.float64(0.0)), {"attn"},
                    0.1 * prunable_total(analysis))
    assert chosen.units == ["attn1"]
    with pytest.raises(OnnxpruneError, match=r"allow removing 50\.0%"):
        select(analysis, _scores(analysis), {"attn"}, 0.7 * prunable_total(analysis))


def test_round_to_keeps_multiples(analysis):
    chosen = select(analysis, _scores(analysis), {"ch"}, 0.37 * prunable_total(analysis),
                    round_to=16)
    plan = parse_units(chosen.units, analysis.structure)
    for block in analysis.structure.ffn:
        removed = len(plan.cuts[block.name].channels) if block.name in plan.cuts else 0
        assert (block.channels - removed) % 16 == 0


def test_flops_target_counts_flops(analysis):
    total = prunable_total(analysis, "flops")
    assert total == sum(b.flops for b in analysis.structure.blocks)
    chosen = select(analysis, _scores(analysis), {"head"}, 0.25 * total, target="flops")
    assert chosen.removed >= 0.25 * total
    costs = block_costs(analysis, analysis.structure.attention[0], "flops")
    assert costs.head * 16 == pytest.approx(analysis.structure.attention[0].flops, rel=0.05)
