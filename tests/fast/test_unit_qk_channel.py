"""Unit kind ``qk`` (attn{i}.qk{h}.{c}: a query and a key column together)."""

from __future__ import annotations

import numpy as np
import pytest
from kindcases import block_of, check_cut, check_gate_zeroes, check_name_round_trip
from opgraphs import HEAD_DIM, HEADS, WIDTH, attention_model, zeroed

from onnxprune.errors import OnnxpruneError
from onnxprune.units import BlockBudget, Unit, make_plan, unit_kind

QK = unit_kind("qk")


def test_name_and_shape():
    analysis, block = block_of(attention_model(), "attn0")
    check_name_round_trip(analysis, "qk", "attn0", (1, 2), "attn0.qk1.2")
    assert QK.shape(block) == (HEADS, HEAD_DIM) and QK.width(block) == HEAD_DIM


def test_cut_equals_a_zeroed_query_channel():
    model = attention_model()
    analysis, block = block_of(model, "attn0")
    units = [Unit(QK, "attn0", (0, 1)), Unit(QK, "attn0", (1, 3))]
    cols = [1, HEAD_DIM + 3]
    oracle = zeroed(model, {"q.W": (1, cols), "q.b": (0, cols)})
    check_cut(model, units, oracle, 2 * QK.cost(analysis, block), 4)
    assert QK.cost(analysis, block) == 2 * WIDTH


def test_gate_zeroes_the_channels():
    analysis, _ = block_of(attention_model(), "attn0")
    check_gate_zeroes(analysis, [Unit(QK, "attn0", (0, 1)), Unit(QK, "attn0", (1, 0))])


def test_unequal_counts_per_head_are_refused():
    analysis, _ = block_of(attention_model(), "attn0")
    with pytest.raises(OnnxpruneError, match="same number of channels"):
        make_plan([Unit(QK, "attn0", (0, 1))], analysis.structure)
    every = [Unit(QK, "attn0", (h, c)) for h in range(HEADS) for c in range(HEAD_DIM)]
    with pytest.raises(OnnxpruneError, match="cannot remove every QK channel"):
        make_plan(every, analysis.structure)


def test_channels_of_a_removed_head_are_dropped():
    analysis, _ = block_of(attention_model(), "attn0")
    plan = make_plan([Unit(unit_kind("head"), "attn0", (0,)), Unit(QK, "attn0", (0, 1))],
                     analysis.structure)
    assert plan.cuts["attn0"].indices("qk") == set()


def test_slots_take_the_weakest_channel_of_every_head_in_order():
    _, block = block_of(attention_model(), "attn0")
    scores = np.array([[0.4, 0.1, 0.3, 0.2], [0.0, 0.9, 0.8, 0.7]])
    slots = QK.candidates(block, scores, 10.0)
    assert len(slots) == HEAD_DIM - 1                      # one channel per head stays
    assert [u.index for u in slots[0].units] == [(0, 1), (1, 0)]
    assert slots[0].cost == 10.0 * HEADS
    assert QK.gain(slots[1], block, BlockBudget(), {}) == 0.0     # slot 0 first
    taken = BlockBudget(taken={"head": {0}}, slots={"qk": 1})
    assert QK.gain(slots[1], block, taken, {}) == slots[1].cost / HEADS
