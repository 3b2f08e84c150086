"""The plan stage: from scores, costs and a budget to the units to remove.

Each unit kind makes its candidates and says what a candidate removes given what was
already taken (its constraints): a kept attention module keeps at least one head, a kept
FFN at least one channel; QK and VO channels go in per-head slots; grouped-query heads go
by KV group; a block reported as not removable (or not prunable) is never cut that way.
``round_to`` M keeps the widths of rounded kinds multiples of M. Costs are parameters,
FLOPs (``target="flops"``) or a given per-block, per-kind table (``costs``, e.g. latency).

``select`` (the default) searches, per block, how many units of each kind to remove so that
the removed importance is least while the budget is met (``search.py``, Kwon et al. 2022),
then, where the score left gradient sketches (fisher), rearranges which units of each kind
go with the block's empirical Fisher (``rearrange.py``). ``select_greedy`` ranks every
candidate by score per unit of cost and takes them cheapest first (the earlier planner).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from onnxprune.errors import OnnxpruneError
from onnxprune.rearrange import rearrange
from onnxprune.scores import Scores
from onnxprune.search import BlockOptions, block_options, choose
from onnxprune.structure.blocks import Block
from onnxprune.structure.discover import Analysis
from onnxprune.units import BlockBudget, Candidate, Unit, UnitKind, kinds_of, module_kind

Costs = dict[str, dict[str, float]]      # block -> unit kind key -> cost of one unit


@dataclass
class Selection:
    units: list[Unit]
    removed: float               # cost removed (parameters, FLOPs or the cost table's unit)
    total: float                 # prunable cost of the model
    by_kind: dict[str, int] = field(default_factory=dict)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)   # block -> kind -> units
    estimated_loss: float = 0.0  # summed scores of what is removed (before rearrangement)
    swaps: int = 0               # units exchanged by mask rearrangement

    @property
    def fraction(self) -> float:
        return self.removed / self.total if self.total else 0.0


def unit_costs(analysis: Analysis, block: Block, target: str) -> dict[str, float]:
    """Parameters (or FLOPs) one unit of each kind of ``block`` removes, by kind key."""
    scale = (block.flops / block.params) if target == "flops" and block.params else 1.0
    return {kind.key: kind.cost(analysis, block) * scale for kind in kinds_of(block)
            if kind.whole or kind.refusal(block) is None}


@dataclass(frozen=True)
class Exclusion:
    """A unit kind the run asked for that cannot be cut in one block, and why."""

    block: str
    kind: UnitKind
    reason: str

    def to_json(self) -> dict[str, str]:
        return {"block": self.block, "kind": self.kind.plural, "reason": self.reason}


def exclusions(analysis: Analysis, kinds: set[UnitKind]) -> list[Exclusion]:
    """Every (block, kind) the granularity asks for that the block refuses."""
    out = []
    for block in analysis.structure.blocks:
        for kind in kinds_of(block):
            refused = kind.refusal(block) if kind in kinds else None
            if refused is not None:   # the block-free note where there is one
                out.append(Exclusion(block.name, kind, kind.limitation(block) or refused))
    return out


def prunable_total(analysis: Analysis, target: str = "params") -> float:
    """Cost of every attention and FFN block (what ``--ratio`` is a fraction of)."""
    blocks = analysis.structure.blocks
    return float(sum(b.flops if target == "flops" else b.params for b in blocks))


def candidates(analysis: Analysis, scores: Scores, kinds: set[UnitKind],
               costs: dict[str, dict[str, float]]) -> list[Candidate]:
    out: list[Candidate] = []
    for (name, kind), values in scores.values.items():
        block = analysis.structure.block(name)
        if kind in kinds and kind.refusal(block) is None:
            out += kind.candidates(block, values, costs[name][kind.key])
    return out


class Greedy:
    """Takes candidates in priority order while the kinds' constraints allow."""

    def __init__(self, analysis: Analysis, costs: dict[str, dict[str, float]]):
        self.analysis = analysis
        self.costs = costs
        self.taken: dict[str, BlockBudget] = {}
        self.chosen: list[Candidate] = []

    def budget(self, block: str) -> BlockBudget:
        return self.taken.setdefault(block, BlockBudget())

    def gain(self, cand: Candidate) -> float:
        """Cost ``cand`` would remove now (0 when the constraints forbid it)."""
        taken = self.budget(cand.block)
        if taken.removed:
            return 0.0
        block = self.analysis.structure.block(cand.block)
        return cand.kind.gain(cand, block, taken, self.costs[cand.block])

    def take(self, cand: Candidate) -> float:
        """Take ``cand`` if the constraints allow; the cost it removed."""
        gain = self.gain(cand)
        if gain <= 0:
            return 0.0
        taken = self.budget(cand.block)
        cand.kind.take(cand, taken)
        taken.spent += gain
        self.chosen.append(cand)
        return gain

    @property
    def spent(self) -> float:
        return sum(t.spent for t in self.taken.values())

    def units(self) -> list[Unit]:
        out = []
        for cand in self.chosen:
            if cand.kind.whole or not self.budget(cand.block).removed:
                out.extend(cand.units)
        return out


def select(analysis: Analysis, scores: Scores, kinds: set[UnitKind], budget: float, *,
           target: str = "params", round_to: int = 1, costs: Costs | None = None
           ) -> Selection:
    """Remove at least ``budget`` (absolute cost) with the least estimated loss: the mask
    search, then mask rearrangement where the scores carry gradient sketches."""
    costs = costs or cost_table(analysis, target)
    total = total_cost(analysis, costs)
    per_block: dict[str, list[Candidate]] = {}
    for cand in candidates(analysis, scores, kinds, costs):
        per_block.setdefault(cand.block, []).append(cand)
    options = [block_options(analysis.structure.block(name), cands, costs[name], round_to)
               for name, cands in per_block.items()]
    picks = choose(options, budget) if options else None
    if picks is None:
        most = sum(float(o.cost.max()) for o in options)
        _unmet(most, budget, total, target)
    selection = _selection(options, picks, total)
    single = {(c.block, c.kind) for cands in per_block.values() for c in cands
              if len(c.units) == 1 and not c.kind.whole and not c.kind.slotted}
    return _rearranged(scores, selection, single)


def _unmet(removed: float, budget: float, total: float, target: str) -> None:
    measure = {"params": "parameters", "flops": "FLOPs"}.get(target, "cost")
    raise OnnxpruneError(f"budget cannot be met: the constraints allow removing "
                         f"{removed / total:.1%} of the prunable {measure}, "
                         f"{budget / total:.1%} asked")


def _selection(options: list[BlockOptions], picks: list[int], total: float) -> Selection:
    units: list[Unit] = []
    by_kind: dict[str, int] = {}
    counts: dict[str, dict[str, int]] = {}
    for opts, pick in zip(options, picks):
        for cand in opts.picks(pick):
            units.extend(cand.units)
            by_kind[cand.kind.key] = by_kind.get(cand.kind.key, 0) + 1
            block = counts.setdefault(opts.block, {})
            block[cand.kind.key] = block.get(cand.kind.key, 0) + len(cand.units)
    removed = float(sum(o.cost[p] for o, p in zip(options, picks)))
    loss = float(sum(o.loss[p] for o, p in zip(options, picks)))
    return Selection(units, removed, total, by_kind, counts, loss)


def _rearranged(scores: Scores, selection: Selection,
                single: set[tuple[str, UnitKind]]) -> Selection:
    """Per (block, kind) with a gradient sketch whose candidates are single units, the
    removed units re-chosen with the block's empirical Fisher (same counts, same cost)."""
    units = list(selection.units)
    swaps = 0
    for (block, kind), sketch in scores.gradients.items():
        mine = [u for u in units if u.block == block and u.kind is kind]
        if not mine or (block, kind) not in single or (block, kind) not in scores.signed:
            continue
        removed = np.zeros(len(sketch.mean), bool)
        removed[[u.index[0] for u in mine]] = True
        fisher = sketch.fisher()
        signed = np.asarray(scores.signed[(block, kind)], np.float64).ravel()
        after, made = rearrange(removed, signed - 0.5 * np.diag(fisher), fisher)
        if made:
            units = [u for u in units if not (u.block == block and u.kind is kind)]
            units += [Unit(kind, block, (int(i),)) for i in np.flatnonzero(after)]
            swaps += made
    selection.units, selection.swaps = units, swaps
    return selection


def cost_table(analysis: Analysis, target: str = "params") -> Costs:
    """Per block, the cost one unit of each kind removes (parameters or FLOPs)."""
    return {b.name: unit_costs(analysis, b, target) for b in analysis.structure.blocks}


def total_cost(analysis: Analysis, costs: Costs) -> float:
    """The prunable total under a cost table: every block's whole-module cost."""
    return float(sum(costs[b.name].get(module_kind(b).key, 0.0)
                     for b in analysis.structure.blocks))


def select_greedy(analysis: Analysis, scores: Scores, kinds: set[UnitKind], budget: float,
                  *, target: str = "params", round_to: int = 1, costs: Costs | None = None
                  ) -> Selection:
    """The greedy planner: candidates by score per unit of cost, cheapest first."""
    costs = costs or cost_table(analysis, target)
    total = total_cost(analysis, costs)
    ranked = sorted(candidates(analysis, scores, kinds, costs), key=lambda c: c.sort_key)
    greedy = Greedy(analysis, costs)
    removed = _fill(greedy, ranked, budget, slack=0.01 * total)
    if removed < budget:   # what overshot the budget is allowed once nothing smaller fits
        removed += _fill(greedy, ranked, budget - removed, slack=float("inf"))
    if removed < budget:
        _unmet(removed, budget, total, target)
    if round_to > 1:
        greedy = _round(greedy, ranked, round_to)
        removed = greedy.spent
    by_kind: dict[str, int] = {}
    counts: dict[str, dict[str, int]] = {}
    for cand in greedy.chosen:
        by_kind[cand.kind.key] = by_kind.get(cand.kind.key, 0) + 1
    for unit in greedy.units():
        block = counts.setdefault(unit.block, {})
        block[unit.kind.key] = block.get(unit.kind.key, 0) + 1
    loss = sum(c.score for c in greedy.chosen
               if c.kind.whole or not greedy.budget(c.block).removed)
    return Selection(greedy.units(), removed, total, by_kind, counts, loss)


def _fill(greedy: Greedy, ranked: list[Candidate], budget: float, slack: float) -> float:
    """Take candidates in order until ``budget`` is removed, skipping any that would
    overshoot it by more than ``slack``; repeat while later QK/VO slots become legal."""
    removed = 0.0
    progress = True
    while removed < budget and progress:
        progress = False
        for cand in ranked:
            if removed >= budget:
                break
            gain = greedy.gain(cand)
            if gain > 0 and removed + gain <= budget + slack:
                removed += greedy.take(cand)
                progress = True
    return removed


def _round(greedy: Greedy, ranked: list[Candidate], m: int) -> Greedy:
    """Adjust the counts of rounded kinds (FFN channels, QK/VO slots) so kept widths are
    multiples of m (to the nearest multiple, never below m)."""
    structure = greedy.analysis.structure
    chosen = set(map(id, greedy.chosen))
    rounded = [c for c in ranked if c.kind.width(structure.block(c.block))]
    rounded_ids = set(map(id, rounded))
    keep: list[Candidate] = [c for c in greedy.chosen if id(c) not in rounded_ids]
    groups: dict[tuple[str, str], list[Candidate]] = {}
    for cand in rounded:
        if not greedy.budget(cand.block).removed:
            groups.setdefault((cand.block, cand.kind.key), []).append(cand)
    for cands in groups.values():
        width = cands[0].kind.width(structure.block(cands[0].block))
        taken = sum(1 for c in cands if id(c) in chosen)
        if not taken:
            continue
        kept = max(m, round((width - taken) / m) * m)
        n = max(0, min(width - kept, len(cands)))
        order = sorted(cands, key=lambda c: c.index) if cands[0].kind.slotted else cands
        keep.extend(order[:n])
    fresh = Greedy(greedy.analysis, greedy.costs)
    for cand in sorted(keep, key=lambda c: (c.kind.whole, c.kind.key, c.index)):
        fresh.take(cand)
    return fresh
