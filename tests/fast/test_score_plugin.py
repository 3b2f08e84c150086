"""A score the package does not ship, plugged in from outside: the README's example."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import onnxprune
from onnxprune.errors import OnnxpruneError
from onnxprune.scores import ImportanceScore, check_method
from onnxprune.structure.graph import effective_weight

MODEL = Path(__file__).resolve().parents[2] / "models" / "patchtst_etth1.onnx"


class OutputRows(ImportanceScore):
    """L1 norm of the output-projection rows a unit writes through."""

    name, kinds = "output-rows", frozenset({"head", "vo", "ch"})

    def compute(self, ctx):
        out = {}
        for block in ctx.analysis.structure.blocks:
            for kind in ctx.kinds:
                if kind.fits(block) and kind.refusal(block) is None:
                    node, entry = kind.rows(ctx.analysis, block)
                    rows = np.abs(effective_weight(ctx.analysis.view, node)).sum(axis=1)
                    size = int(np.prod(kind.shape(block)))
                    out[(block.name, kind)] = np.bincount(entry, rows, size).reshape(
                        kind.shape(block))
        return out


def test_a_plugged_in_score_plans_differently_from_magnitude():
    options = dict(ratio=0.3, granularity="auto", samples=8, seed=0)
    _, mine = onnxprune.prune(str(MODEL), method=OutputRows(), **options)
    _, magnitude = onnxprune.prune(str(MODEL), method="magnitude", **options)
    assert mine.method == "output-rows"
    assert mine.removed and set(mine.removed) != set(magnitude.removed)
    scores = onnxprune.score(str(MODEL), method=OutputRows(), granularity="head", samples=8)
    assert scores.units() and all(name.split(".")[1].startswith("head")
                                  for name in scores.units())


def test_a_plugged_in_score_is_checked_against_the_granularity():
    with pytest.raises(OnnxpruneError, match="output-rows does not score --granularity "
                                             "module units"):
        check_method(OutputRows(), "module")
