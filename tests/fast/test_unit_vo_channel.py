"""Unit kind ``vo`` (attn{i}.vo{h}.{c}: a value column and an output-projection row)."""

from __future__ import annotations

import pytest
from kindcases import block_of, check_cut, check_gate_zeroes, check_name_round_trip
from opgraphs import HEAD_DIM, HEADS, WIDTH, attention_model, zeroed

from onnxprune.errors import OnnxpruneError
from onnxprune.units import Unit, make_plan, unit_kind

VO = unit_kind("vo")


def test_name_and_shape():
    analysis, block = block_of(attention_model(), "attn0")
    check_name_round_trip(analysis, "vo", "attn0", (0, 3), "attn0.vo0.3")
    assert VO.shape(block) == (HEADS, HEAD_DIM)


@pytest.mark.parametrize("fused", ["separate", "slice"])
def test_cut_equals_a_zeroed_output_row(fused):
    model = attention_model(fused)
    analysis, block = block_of(model, "attn0")
    units = [Unit(VO, "attn0", (0, 2)), Unit(VO, "attn0", (1, 0))]
    oracle = zeroed(model, {"o.W": (0, [2, HEAD_DIM])})
    assert VO.cost(analysis, block) == 2 * WIDTH
    check_cut(model, units, oracle, 2 * VO.cost(analysis, block), 2)


def test_gate_zeroes_the_channels():
    analysis, _ = block_of(attention_model(), "attn0")
    check_gate_zeroes(analysis, [Unit(VO, "attn0", (0, 2)), Unit(VO, "attn0", (1, 1))])


def test_a_channel_cut_where_columns_are_not_head_major_is_refused():
    analysis, block = block_of(attention_model(), "attn0")
    block.channel_prunable, block.channel_reason = False, "projection columns are not head-major"
    assert VO.limitation(block) == "no QK/VO channel cuts: projection columns are not head-major"
    with pytest.raises(OnnxpruneError, match="channels of attn0 cannot be cut"):
        make_plan([Unit(VO, "attn0", (0, 0)), Unit(VO, "attn0", (1, 0))], analysis.structure)
