"""The main job's summary cannot be misread: the prunable part next to the whole model, a
line per changed block with its sizes before and after, the metric's change like the
other rows; the report carries the same per-block sizes."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from test_search import attention_then_ffn

import onnxprune
from onnxprune.report import block_order, plot_scores, prune_summary
from onnxprune.scores.base import Scores
from onnxprune.units import unit_kind


def test_summary_shows_prunable_params_and_each_changed_block():
    _, report = onnxprune.prune(attention_then_ffn(32), 0.5, method="magnitude", samples=32,
                                batch_size=8, granularity="ffn", reconstruct="none")
    text = prune_summary(report)
    assert "  prunable params" in text and "drop" not in text
    (ffn,) = [b for b in report.blocks if b.kind == "ffn"]
    assert ffn.changed and ffn.after is not None
    assert ffn.after["channels"] < ffn.before["channels"] == 32
    assert f"  {ffn.block:<8}channels 32 -> {ffn.after['channels']}" in text
    assert "(1 other block unchanged)" in text               # the attention block
    removed = ffn.before["channels"] - ffn.after["channels"]
    assert len(report.removed) == removed
    assert report.prunable_after < report.prunable_before
    blob = report.to_json()
    assert blob["prunable"]["counts"] == "params"
    latency = replace(report, target="latency")        # its budget counts estimated ms
    assert "  prunable params" not in prune_summary(latency)
    assert latency.to_json()["prunable"]["counts"] == "estimated ms"
    assert {b["block"] for b in blob["blocks"]} == {b.block for b in report.blocks}


def test_blocks_sort_in_numeric_order():
    names = ["ffn10", "attn10", "attn2", "ffn2", "attn9", "attn0"]
    assert sorted(names, key=block_order) == ["attn0", "attn2", "ffn2", "attn9", "attn10",
                                              "ffn10"]


def test_the_score_plot_draws_heads_channels_and_modules(tmp_path):
    pytest.importorskip("matplotlib")
    rng = np.random.default_rng(0)
    values = {}
    for layer in (0, 2, 10):
        values[(f"attn{layer}", unit_kind("head"))] = rng.random(4) + 1e-6
        values[(f"ffn{layer}", unit_kind("ch"))] = rng.random(16) * 10.0 ** rng.integers(-6, 0)
        values[(f"attn{layer}", unit_kind("attn"))] = np.float64(rng.random())
    png = tmp_path / "scores.png"
    plot_scores(Scores("fisher", values, samples=8), str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
