"""Latency as a budget (``onnxprune.latency``): the piecewise-linear fit, the on-disk cache,
option validation, the table measured on a hand-built graph (structure only: timings belong
in tools/bench_latency.py), and the refinement loop on a deterministic clock."""

from __future__ import annotations

import json

import numpy as np
import pytest
from opgraphs import attention_model

import onnxprune
from onnxprune import latency
from onnxprune.bench import measure
from onnxprune.cli import main
from onnxprune.errors import OnnxpruneError
from onnxprune.latency import (
    REFINEMENTS,
    KindRate,
    LatencyCosts,
    LatencySetting,
    LatencyTable,
    fit_hinge,
    latency_table,
    load_cached,
    measure_table,
)
from onnxprune.modelio import save_model
from onnxprune.pipeline import PruneOptions
from onnxprune.scores import check_method, compute_scores
from onnxprune.structure.discover import analyse
from onnxprune.units import unit_kind

BATCH = 2   # the hand-built graphs have a static batch of 2


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(latency.CACHE_ENV, str(tmp_path / "cache"))


# --- the fit -----------------------------------------------------------------------------

@pytest.mark.parametrize("threshold", [1, 6, 11])
def test_the_hinge_fit_recovers_a_flat_then_linear_latency(threshold):
    widths = list(range(1, 17))
    truth = [2.0 + 0.5 * max(0, w - threshold) for w in widths]
    fit = fit_hinge(widths, truth)
    assert fit.threshold == threshold
    assert fit.base == pytest.approx(2.0)
    assert fit.slope == pytest.approx(0.5)
    assert fit(16) == pytest.approx(truth[-1])


def test_the_hinge_fit_tolerates_noise_and_never_rises_when_cutting():
    rng = np.random.default_rng(0)
    widths = [1, 4, 8, 12, 16]
    noisy = [3.0 + 0.25 * max(0, w - 4) + rng.normal(0, 0.01) for w in widths]
    fit = fit_hinge(widths, noisy)
    assert fit.slope == pytest.approx(0.25, rel=0.1)
    falling = fit_hinge(widths, [5.0, 4.0, 3.0, 2.0, 1.0])   # wider is faster: noise
    assert falling.slope == 0.0
    with pytest.raises(OnnxpruneError, match="two timed widths"):
        fit_hinge([4], [1.0])


# --- the cache ---------------------------------------------------------------------------

def _table(full_ms: float = 3.0) -> LatencyTable:
    return LatencyTable(full_ms, 2.5, {"head": KindRate("head", 1e-6, 0.25, [(2, 2.5)])},
                        1e-6)


@pytest.fixture
def counted(monkeypatch):
    """measure_table replaced by a counter returning a fixed table."""
    calls = []

    def fake(model, analysis, kinds, setting):
        calls.append(setting)
        return _table(3.0 + len(calls))
    monkeypatch.setattr(latency, "measure_table", fake)
    return calls


@pytest.fixture
def head_timing():
    """A model, its analysis, the head kind and a 1-thread setting: what a table is for."""
    model = attention_model()
    return model, analyse(model), {unit_kind("head")}, LatencySetting(threads=1, batch=BATCH)


def test_a_table_is_measured_once_then_read_from_the_cache(counted, head_timing):
    model, analysis, kinds, setting = head_timing
    first = latency_table(model, analysis, kinds, setting)
    again = latency_table(model, analysis, kinds, setting)
    assert (first.source, again.source) == ("measured", "cached")
    assert len(counted) == 1
    assert again.full_ms == first.full_ms and again.rates == first.rates
    other = latency_table(model, analysis, kinds, LatencySetting(threads=2, batch=BATCH))
    assert other.source == "measured" and len(counted) == 2
    changed = latency_table(attention_model(seed=1), analysis, kinds, setting)  # other weights
    assert changed.source == "measured" and len(counted) == 3


def test_a_corrupted_cache_entry_is_measured_again(counted, head_timing):
    model, analysis, kinds, setting = head_timing
    table = latency_table(model, analysis, kinds, setting)
    files = list(latency.cache_dir().glob("latency-*.json"))
    assert len(files) == 1
    for broken in ("{not json", json.dumps({"full_ms": 1.0}), "[]", '{"rates": 5}'):
        files[0].write_text(broken)
        assert load_cached(table.key) is None
        assert latency_table(model, analysis, kinds, setting).source == "measured"
    assert len(counted) == 5


# --- options -----------------------------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    ({"target": "latency"}, "exactly one of --speedup S and --latency-ms M"),
    ({"target": "latency", "speedup": 1.5, "latency_ms": 3.0}, "exactly one"),
    ({"target": "latency", "speedup": 1.0}, "--speedup 1.0: must be greater than 1"),
    ({"target": "latency", "latency_ms": 0.0}, "--latency-ms 0.0: must be positive"),
    ({"target": "latency", "speedup": 2.0, "latency_batch": 0}, "--latency-batch 0"),
    ({"ratio": 0.5, "target": "latency", "speedup": 2.0}, "--ratio does not apply"),
    ({"ratio": 0.5, "speedup": 2.0}, "need --target latency"),
    ({}, "--ratio R is required"),
])
def test_bad_latency_options_are_one_line_errors(options, message):
    opts = PruneOptions(**{"ratio": None, **options})
    with pytest.raises(OnnxpruneError, match=message) as caught:
        opts.check()
    assert "\n" not in str(caught.value)


def test_the_cli_refuses_both_budgets_with_exit_2(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    save_model(attention_model(), path)
    code = main([str(path), str(tmp_path / "out.onnx"), "--target", "latency",
                 "--speedup", "2", "--latency-ms", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "exactly one" in err[0]
    assert not (tmp_path / "out.onnx").exists()


def test_an_unreachable_speedup_names_the_best_possible():
    table = LatencyTable(4.0, 4.0, {}, 1e-9)   # the blocks take almost nothing
    model = attention_model()
    analysis = analyse(model)
    prunable = table.total(analysis)
    with pytest.raises(OnnxpruneError, match=r"cannot be reached.*at most 1\.00x"):
        latency._to_remove(table, 2.0, prunable)


# --- a real measurement on a hand-built graph (structure, not timings) -------------------

def test_a_measured_table_covers_every_kind_and_prices_every_unit():
    model = attention_model()
    analysis = analyse(model)
    kinds = check_method("fisher", "auto") | check_method("fisher", "channel")
    table = measure_table(model, analysis, kinds, LatencySetting(threads=1, batch=BATCH,
                                                                 runs=3, warmup=1))
    assert table.full_ms > 0 and table.rewritten_ms > 0
    assert set(table.rates) == {"attn", "head", "qk", "vo"}   # no FFN in this graph
    assert [w for w, _ in table.rates["head"].points] == [2, 1]
    assert [w for w, _ in table.rates["qk"].points] == [4, 3, 2, 1]
    assert all(r.ms_per_flop >= 0 and 0 <= r.threshold < 1 for r in table.rates.values())
    costs = table.costs(analysis)
    assert set(costs) == {"attn0"} and set(costs["attn0"]) >= {"attn", "head", "qk", "vo"}
    assert costs["attn0"]["attn"] == pytest.approx(table.total(analysis))


def test_the_search_spends_a_latency_budget_in_milliseconds():
    model = attention_model()
    analysis = analyse(model)
    kinds = {unit_kind("head"), unit_kind("attn")}
    table = LatencyTable(2.0, 2.0, {"attn": KindRate("attn", 1e-3), "head": KindRate("head",
                                                                                    1e-3)}, 0)
    scores = compute_scores(analysis, None, None, "magnitude", kinds)
    head_ms = table.costs(analysis)["attn0"]["head"]
    chosen = LatencyCosts(table).select(analysis, scores, kinds, 0.5 * head_ms)
    assert [u.name for u in chosen.units] in (["attn0.head0"], ["attn0.head1"])
    assert chosen.removed == pytest.approx(head_ms)


# --- the whole run on a deterministic clock ----------------------------------------------

def flops_clock(reference, others, setting):
    """Milliseconds = MFLOPs at the setting's batch, plus a fixed 1 µs: no machine noise."""
    def ms(model):
        return measure(model, {"x": (BATCH, 3, 8)})[1] * 1e-6 + 1e-3
    return ms(reference), [ms(m) for m in others]


def test_a_latency_run_reports_what_it_asked_and_measured(monkeypatch):
    monkeypatch.setattr(latency, "time_against", flops_clock)
    pruned, report = onnxprune.prune(attention_model(), target="latency", speedup=1.3,
                                     granularity="channel", method="magnitude", threads=1,
                                     latency_batch=BATCH)
    got = report.latency
    assert got["requested_speedup"] == 1.3 and report.target == "latency"
    assert got["table"]["source"] == "measured"
    assert 1 <= len(got["attempts"]) <= REFINEMENTS + 1
    closest = min(got["attempts"], key=lambda a: abs(a["speedup"] - 1.3))
    assert got["measured"]["speedup"] == closest["speedup"]
    before, after = flops_clock(attention_model(), [pruned], None)
    assert got["measured"]["speedup"] == pytest.approx(before / after[0], rel=1e-3)
    assert got["within_tolerance"] == (abs(got["measured"]["speedup"] / 1.3 - 1) <= 0.05)
    assert report.to_json()["latency"] == got
