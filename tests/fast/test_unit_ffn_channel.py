"""Unit kind ``ch`` (ffn{i}.ch{c}: up column(s), gate column for SwiGLU, down row)."""

from __future__ import annotations

import pytest
from kindcases import block_of, check_cut, check_gate_zeroes, check_name_round_trip
from opgraphs import WIDTH, ffn_model, zeroed

from onnxprune.errors import OnnxpruneError
from onnxprune.units import BlockBudget, Unit, make_plan, parse_unit, unit_kind

CH = unit_kind("ch")


def test_name_shape_and_parse_errors():
    analysis, block = block_of(ffn_model(), "ffn0")
    check_name_round_trip(analysis, "ch", "ffn0", (4,), "ffn0.ch4")
    assert CH.shape(block) == (6,)
    blocks = {b.name: b for b in analysis.structure.blocks}
    with pytest.raises(OnnxpruneError, match=r"units of ffn0 are ffn0, ffn0\.ch<c>"):
        parse_unit("ffn0.head1", blocks)
    with pytest.raises(OnnxpruneError, match="no block ffn3"):
        parse_unit("ffn3.ch1", blocks)


@pytest.mark.parametrize("gated", [False, True])
def test_cut_equals_a_zeroed_down_row(gated):
    model = ffn_model("Relu", gated=gated)
    analysis, block = block_of(model, "ffn0")
    units = [Unit(CH, "ffn0", (1,)), Unit(CH, "ffn0", (4,))]
    oracle = zeroed(model, {"down.W": (0, [1, 4])})
    ups = 2 if gated else 1
    assert CH.cost(analysis, block) == ups * WIDTH + WIDTH
    check_cut(model, units, oracle, 2 * CH.cost(analysis, block), 2 * ups)


def test_gate_zeroes_the_channels():
    analysis, _ = block_of(ffn_model(), "ffn0")
    check_gate_zeroes(analysis, [Unit(CH, "ffn0", (0,)), Unit(CH, "ffn0", (5,))])


def test_every_channel_removes_the_module_and_one_stays_when_planning():
    analysis, block = block_of(ffn_model(), "ffn0")
    plan = make_plan([Unit(CH, "ffn0", (c,)) for c in range(6)], analysis.structure)
    assert plan.cuts["ffn0"].whole
    cand = CH.candidates(block, [0.0] * 6, 1.0)[0]
    assert CH.gain(cand, block, BlockBudget(taken={"ch": {1, 2, 3, 4, 5}}), {}) == 0.0
    assert CH.width(block) == 6
