"""The plan stage: from scores, costs and a budget to the set of units to remove.

Candidates of every kind the granularity allows are ranked together by score per unit of
cost (estimated loss increase per parameter, or per FLOP with ``target="flops"``) and taken
greedily, cheapest first, until the budget is met. Constraints:

- a kept attention module keeps at least one head, a kept FFN at least one channel;
- QK and VO channels go in *slots*: slot j of a layer removes the j-th least important
  channel of every head, so all heads keep equal widths (reshapes stay rectangular) while
  the kept indices differ per head; at least one channel per head stays;
- a block reported as not removable (or not prunable) is never cut that way;
- ``round_to`` M keeps FFN widths and per-head QK/VO widths multiples of M.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from onnxprune.errors import OnnxpruneError
from onnxprune.scores import Scores
from onnxprune.scores.weights import effective_weight
from onnxprune.structure.blocks import AttentionBlock, Block, FfnBlock
from onnxprune.structure.discover import Analysis
from onnxprune.units import channel_unit, ffn_channel_unit, head_unit


@dataclass
class Candidate:
    block: str
    kind: str                    # attn | ffn | head | qk | vo | ch
    index: int                   # head, slot or channel (-1 for modules)
    units: list[str]
    score: float
    cost: float

    @property
    def priority(self) -> float:
        return self.score / max(self.cost, 1e-12)


@dataclass
class Selection:
    units: list[str]
    removed: float               # cost removed (parameters or FLOPs)
    total: float                 # prunable cost of the model
    by_kind: dict[str, int] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        return self.removed / self.total if self.total else 0.0


@dataclass
class UnitCosts:
    """Parameters (or FLOPs) one unit of each kind of a block removes."""

    module: float
    head: float = 0.0
    qk: float = 0.0
    vo: float = 0.0
    ch: float = 0.0


def block_costs(analysis: Analysis, block: Block, target: str) -> UnitCosts:
    view = analysis.view
    scale = (block.flops / block.params) if target == "flops" and block.params else 1.0
    if isinstance(block, AttentionBlock) and block.flow is not None:
        rows = {n: effective_weight(view, n).shape for n in
                {block.q_proj, block.k_proj, block.v_proj, block.flow.sinks[0].node}}
        qk = rows[block.q_proj][0] + rows[block.k_proj][0]
        vo = rows[block.v_proj][0] + rows[block.flow.sinks[0].node][1]
        head = block.qk_dim * qk + block.vo_dim * vo
        return UnitCosts(block.params * scale, head * scale, qk * scale, vo * scale)
    if isinstance(block, FfnBlock) and block.flow is not None:
        ch = sum(effective_weight(view, n).shape[0] for n in block.up_projs)
        ch += effective_weight(view, block.flow.sinks[0].node).shape[1]
        return UnitCosts(block.params * scale, ch=ch * scale)
    return UnitCosts(block.params * scale)


def prunable_total(analysis: Analysis, target: str = "params") -> float:
    """Cost of every attention and FFN block (what ``--ratio`` is a fraction of)."""
    blocks = analysis.structure.blocks
    return float(sum(b.flops if target == "flops" else b.params for b in blocks))


def candidates(analysis: Analysis, scores: Scores, kinds: set[str], target: str
               ) -> list[Candidate]:
    out: list[Candidate] = []
    for block in analysis.structure.blocks:
        costs = block_costs(analysis, block, target)
        module_kind = "attn" if isinstance(block, AttentionBlock) else "ffn"
        module_score = scores.values.get((block.name, "module"))
        if module_kind in kinds and block.removable and module_score is not None:
            out.append(Candidate(block.name, module_kind, -1, [block.name],
                                 float(module_score), costs.module))
        if not block.prunable or block.flow is None:
            continue
        if isinstance(block, AttentionBlock):
            out += _head_candidates(block, scores, kinds, costs)
        elif "ch" in kinds and (block.name, "ch") in scores.values:
            values = scores.values[(block.name, "ch")]
            out += [Candidate(block.name, "ch", c, [ffn_channel_unit(block.name, c)],
                              float(v), costs.ch) for c, v in enumerate(values)]
    return out


def _head_candidates(block: AttentionBlock, scores: Scores, kinds: set[str],
                     costs: UnitCosts) -> list[Candidate]:
    out = []
    if "head" in kinds and (block.name, "head") in scores.values:
        values = scores.values[(block.name, "head")]
        out += [Candidate(block.name, "head", h, [head_unit(block.name, h)], float(v),
                          costs.head) for h, v in enumerate(values)]
    for space in ("qk", "vo"):
        if space not in kinds or (block.name, space) not in scores.values:
            continue
        if not block.channel_prunable:
            continue
        values = np.asarray(scores.values[(block.name, space)])       # [H, d]
        order = np.argsort(values, axis=1, kind="stable")
        for slot in range(values.shape[1] - 1):                     # keep >= 1 per head
            chans = order[:, slot]
            units = [channel_unit(block.name, space, h, int(c)) for h, c in enumerate(chans)]
            score = float(values[np.arange(len(chans)), chans].sum())
            cost = getattr(costs, space) * block.heads
            out.append(Candidate(block.name, space, slot, units, score, cost))
    return out


class Greedy:
    """Takes candidates in priority order while honouring the constraints."""

    def __init__(self, analysis: Analysis, costs: dict[str, UnitCosts]):
        self.analysis = analysis
        self.costs = costs
        self.removed_modules: set[str] = set()
        self.heads: dict[str, set[int]] = {}
        self.slots: dict[tuple[str, str], int] = {}
        self.channels: dict[str, set[int]] = {}
        self.spent: dict[str, float] = {}          # cost removed inside each block
        self.chosen: list[Candidate] = []

    def gain(self, cand: Candidate) -> float:
        """Cost ``cand`` would remove now (0 when the constraints forbid it)."""
        if cand.block in self.removed_modules:
            return 0.0
        block = self.analysis.structure.block(cand.block)
        if cand.kind in ("attn", "ffn"):
            return cand.cost - self.spent.get(cand.block, 0.0)
        if cand.kind == "head":
            if len(self.heads.get(cand.block, ())) + 1 >= block.heads:
                return 0.0
            return cand.cost - self._channel_cost_in_head(block)
        if cand.kind in ("qk", "vo"):
            if self.slots.get((cand.block, cand.kind), 0) != cand.index:
                return 0.0
            kept_heads = block.heads - len(self.heads.get(cand.block, ()))
            return cand.cost * kept_heads / block.heads
        if len(self.channels.get(cand.block, ())) + 1 >= block.channels:
            return 0.0
        return cand.cost

    def take(self, cand: Candidate) -> float:
        """Take ``cand`` if the constraints allow; the cost it removed."""
        gain = self.gain(cand)
        if gain <= 0:
            return 0.0
        if cand.kind in ("attn", "ffn"):
            self.removed_modules.add(cand.block)
        elif cand.kind == "head":
            self.heads.setdefault(cand.block, set()).add(cand.index)
        elif cand.kind in ("qk", "vo"):
            self.slots[(cand.block, cand.kind)] = cand.index + 1
        else:
            self.channels.setdefault(cand.block, set()).add(cand.index)
        self.spent[cand.block] = self.spent.get(cand.block, 0.0) + gain
        self.chosen.append(cand)
        return gain

    def _channel_cost_in_head(self, block: AttentionBlock) -> float:
        """Cost already removed from one head by channel slots (counted once)."""
        costs = self.costs[block.name]
        return (self.slots.get((block.name, "qk"), 0) * costs.qk
                + self.slots.get((block.name, "vo"), 0) * costs.vo)

    def units(self) -> list[str]:
        out = []
        for cand in self.chosen:
            if cand.kind in ("attn", "ffn") or cand.block not in self.removed_modules:
                out.extend(cand.units)
        return out


def select(analysis: Analysis, scores: Scores, kinds: set[str], budget: float, *,
           target: str = "params", round_to: int = 1) -> Selection:
    """Remove at least ``budget`` (absolute cost) with the least estimated loss."""
    total = prunable_total(analysis, target)
    costs = {b.name: block_costs(analysis, b, target) for b in analysis.structure.blocks}
    ranked = sorted(candidates(analysis, scores, kinds, target),
                    key=lambda c: (c.priority, c.block, c.kind, c.index))
    greedy = Greedy(analysis, costs)
    removed = _fill(greedy, ranked, budget, slack=0.01 * total)
    if removed < budget:   # what overshot the budget is allowed once nothing smaller fits
        removed += _fill(greedy, ranked, budget - removed, slack=float("inf"))
    if removed < budget:
        raise OnnxpruneError(
            f"budget cannot be met: the constraints allow removing {removed / total:.1%} of "
            f"the prunable {'FLOPs' if target == 'flops' else 'parameters'}, "
            f"{budget / total:.1%} asked")
    if round_to > 1:
        greedy = _round(greedy, ranked, round_to)
        removed = sum(greedy.spent.values())
    units = greedy.units()
    by_kind: dict[str, int] = {}
    for cand in greedy.chosen:
        by_kind[cand.kind] = by_kind.get(cand.kind, 0) + 1
    return Selection(units, removed, total, by_kind)


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
    """Adjust FFN channel counts and QK/VO slot counts so kept widths are multiples of m
    (to the nearest multiple, never below m)."""
    structure = greedy.analysis.structure
    chosen = set(map(id, greedy.chosen))
    keep: list[Candidate] = [c for c in greedy.chosen if c.kind not in ("ch", "qk", "vo")]
    groups: dict[tuple[str, str], list[Candidate]] = {}
    for cand in ranked:
        if cand.kind in ("ch", "qk", "vo") and cand.block not in greedy.removed_modules:
            groups.setdefault((cand.block, cand.kind), []).append(cand)
    for (name, kind), cands in groups.items():
        block = structure.block(name)
        width = block.channels if kind == "ch" else getattr(block, f"{kind}_dim")
        taken = sum(1 for c in cands if id(c) in chosen)
        if not taken:
            continue
        kept = max(m, round((width - taken) / m) * m)
        n = max(0, min(width - kept, len(cands)))
        order = cands if kind == "ch" else sorted(cands, key=lambda c: c.index)
        keep.extend(order[:n])
    fresh = Greedy(greedy.analysis, greedy.costs)
    for cand in sorted(keep, key=lambda c: (c.kind in ("attn", "ffn"), c.kind, c.index)):
        fresh.take(cand)
    return fresh
