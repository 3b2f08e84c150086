"""The mask search: per block how many units of each kind to remove under a budget, at least
as good as Kwon et al.'s closed form and as the greedy planner, within the kinds' rules."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from opgraphs import HEADS, SEQ, WIDTH, Builder, heads_split, qkv_inputs

from onnxprune.plan import select, select_greedy
from onnxprune.scores import Scores
from onnxprune.search import BlockOptions, choose
from onnxprune.structure.discover import analyse
from onnxprune.units import kinds_of, make_plan, unit_kind

HIDDEN = 20


def attention_then_ffn(hidden: int = HIDDEN) -> onnx.ModelProto:
    """x + attn(x) -> y; y + ffn(y) -> z -> constant head: one attention and one FFN block."""
    b = Builder(0)
    q, k, v = qkv_inputs(b, "x", "separate")
    qh = heads_split(b, q, "q", [0, 2, 1, 3])
    kh = heads_split(b, k, "k", [0, 2, 3, 1])
    vh = heads_split(b, v, "v", [0, 2, 1, 3])
    probs = b.op("Softmax", [b.op("MatMul", [qh, kh], "scores")], "probs", axis=-1)
    ctx = b.op("Transpose", [b.op("MatMul", [probs, vh], "ctx")], "ctx.t", perm=[0, 2, 1, 3])
    flat = b.op("Reshape", [ctx, b.ints("ctx.shape", [-1, SEQ, WIDTH])], "ctx.flat")
    y = b.op("Add", ["x", b.linear(flat, "o", WIDTH, WIDTH)], "y")
    act = b.op("Relu", [b.linear(y, "up", WIDTH, hidden)], "act")
    z = b.op("Add", [y, b.linear(act, "down", hidden, WIDTH)], "z")
    b.op("MatMul", [z, b.weight("head.W", WIDTH, 3)], "out")
    return b.model({"x": (2, SEQ, WIDTH)}, {"out": (2, SEQ, 3)}, 18)


@pytest.fixture(scope="module")
def analysis():
    return analyse(attention_then_ffn())


def _scores(analysis, head, channel, modules=10.0) -> Scores:
    values = {}
    for block in analysis.structure.blocks:
        for kind in kinds_of(block):
            if kind.whole:
                values[(block.name, kind)] = np.float64(modules)
            elif kind.key == "head":
                values[(block.name, kind)] = np.asarray(head, np.float64)
            elif kind.key == "ch":
                values[(block.name, kind)] = np.asarray(channel, np.float64)
    return Scores("test", values, 0)


def _costs(analysis, head=10.0, channel=1.0, module=100.0):
    return {b.name: {k.key: {"head": head, "ch": channel}.get(k.key, module)
                     for k in kinds_of(b)} for b in analysis.structure.blocks}


def _removed_loss(scores: Scores, units) -> float:
    return sum(float(scores.array(u.block, u.kind)[u.index]) for u in units)


def kwon(heads: list[float], neurons: list[float], head_cost: float, neuron_cost: float,
         budget: float) -> float:
    """Kwon et al.'s closed form for two unit types of uniform cost: for every number h of
    heads removed take the h least important heads and fill the budget with the least
    important neurons; the least removed importance over h."""
    heads, neurons = np.sort(heads), np.sort(neurons)
    best = np.inf
    for h in range(len(heads) + 1):
        rest = max(0.0, budget - h * head_cost)
        n = int(np.ceil(rest / neuron_cost - 1e-12))
        if n <= len(neurons):
            best = min(best, heads[:h].sum() + neurons[:n].sum())
    return best


def test_the_search_beats_greedy_where_kwons_split_does(analysis):
    """Five very cheap channels tempt the greedy ratio ranking; then the head no longer fits
    the budget and the rest is filled with expensive channels. Removing the head alone
    (Kwon's h = 1) costs far less."""
    channels = [0.05] * 5 + [0.3] * (HIDDEN - 5)
    head = [0.8, 5.0]
    scores = _scores(analysis, head, channels)
    costs, kinds = _costs(analysis), {unit_kind(k) for k in ("head", "ch", "attn", "ffn")}
    greedy = select_greedy(analysis, scores, kinds, 10.0, costs=costs)
    search = select(analysis, scores, kinds, 10.0, costs=costs)
    closed = kwon(head[:HEADS - 1], channels, 10.0, 1.0, 10.0)    # a kept module keeps a head
    assert closed < greedy.estimated_loss - 0.5                    # the case is a real one
    assert search.removed >= 10.0
    assert _removed_loss(scores, search.units) == pytest.approx(search.estimated_loss)
    assert search.estimated_loss <= closed + 1e-12
    assert search.estimated_loss <= greedy.estimated_loss
    assert search.counts == {analysis.structure.attention[0].name: {"head": 1}}


@pytest.mark.parametrize("budget", [3.0, 12.0, 25.0, 60.0, 101.0, 130.0])
def test_the_search_is_never_worse_than_greedy_and_keeps_the_rules(analysis, budget):
    rng = np.random.default_rng(int(budget))
    scores = _scores(analysis, rng.random(HEADS) * 3, rng.random(HIDDEN), modules=8.0)
    costs, kinds = _costs(analysis), {unit_kind(k) for k in ("head", "ch", "attn", "ffn")}
    greedy = select_greedy(analysis, scores, kinds, budget, costs=costs)
    search = select(analysis, scores, kinds, budget, costs=costs)
    assert search.removed >= budget
    assert search.estimated_loss <= greedy.estimated_loss + 1e-12
    plan = make_plan(search.units, analysis.structure)          # legal: the cut accepts it
    for name, cut in plan.cuts.items():
        block = analysis.structure.block(name)
        assert cut.whole or len(cut.indices("head")) < getattr(block, "heads", 1 << 30)
        assert cut.whole or len(cut.indices("ch")) < getattr(block, "channels", 1 << 30)


def test_round_to_keeps_multiples(analysis):
    scores = _scores(analysis, [5.0, 5.0], np.linspace(0.1, 1.0, HIDDEN))
    kinds = {unit_kind("ch")}
    ffn = analysis.structure.ffn[0]
    chosen = select(analysis, scores, kinds, 0.3 * ffn.params, round_to=8)
    kept = HIDDEN - chosen.counts[ffn.name]["ch"]
    assert kept % 8 == 0 and kept >= 8
    assert chosen.removed >= 0.3 * ffn.params


def _prefix_options(name: str, scores: np.ndarray, cost: float, keep_one: bool = True,
                    key: str = "u") -> BlockOptions:
    """The options of one block with one kind of uniform cost: remove the n least important."""
    ordered = np.sort(scores)
    n = len(ordered) - (1 if keep_one else 0)
    loss = np.concatenate([[0.0], np.cumsum(ordered[:n])])
    return BlockOptions(name, cost * np.arange(n + 1, dtype=np.float64), loss,
                        [{key: i} for i in range(n + 1)], [False] * (n + 1))


def test_bert_base_sized_search_matches_kwon():
    """12 layers × 12 heads × 3072 channels, parameter costs of BERT-base (the search's
    time is measured by tools/bench_search.py, not here)."""
    keys = ("head", "ch")
    rng = np.random.default_rng(0)
    head_cost, channel_cost = 4 * 768 * 64, 2 * 768
    heads = [rng.gamma(2.0, 1.0, 12) * head_cost for _ in range(12)]
    channels = [rng.gamma(2.0, 1.0, 3072) * channel_cost for _ in range(12)]
    options = [_prefix_options(f"attn{i}", heads[i], head_cost, key=keys[0])
               for i in range(12)]
    options += [_prefix_options(f"ffn{i}", channels[i], channel_cost, key=keys[1])
                for i in range(12)]
    total = 12 * (12 * head_cost + 3072 * channel_cost)
    for ratio in (0.3, 0.5):
        budget = ratio * total
        picks = choose(options, budget)
        removed = sum(o.cost[p] for o, p in zip(options, picks))
        loss = sum(o.loss[p] for o, p in zip(options, picks))
        assert removed >= budget
        closed = kwon(np.concatenate([np.sort(h)[:11] for h in heads]),
                      np.concatenate([np.sort(c)[:3071] for c in channels]),
                      head_cost, channel_cost, budget)
        assert loss <= closed * (1 + 1e-9)


def test_an_unreachable_budget_is_none():
    options = [_prefix_options("a", np.ones(4), 1.0)]
    assert choose(options, 3.0) is not None
    assert choose(options, 3.5) is None
