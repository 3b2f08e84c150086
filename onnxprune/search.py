"""Mask search under a budget: how many units of each kind to remove from each block
(Kwon et al. 2022, §4.1, generalised to any per-block cost table and the kinds' constraints).

Each block offers its legal configurations (``BlockOptions``): nothing, the whole module
where the block allows it, or the k least important units of each kind it has, for every
count k the kinds' constraints and ``round_to`` allow. A configuration's loss is the summed
importance of what it removes, its cost what it removes of the budget's measure. Choosing
one configuration per block with the least total loss whose cost meets the budget is a
multiple-choice knapsack: ``choose`` solves it by dynamic programming over the cost (exact
when the costs are integers with a common divisor that leaves few steps, else on a grid
with costs rounded down, so the budget is always met), then trims the surplus where that
saves the most loss. Kwon's closed form (every split between heads and neurons, the top
units of each) is among the solutions the program compares, so the search never does worse.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from copy import deepcopy
from dataclasses import dataclass, field

import numpy as np

from onnxprune.structure.blocks import Block
from onnxprune.units import BlockBudget, Candidate, UnitKind

GRID = 2048                  # cost steps of the program when the costs are not integers
EXACT_STEPS = 4096           # most steps of the exact program (integer costs)
CHUNK = 256                  # options evaluated at once (bounds the program's memory)


@dataclass
class BlockOptions:
    """The configurations of one block: option i removes ``counts[i][kind]`` of the first
    candidates of ``orders[kind]`` (or the whole module, ``whole[i]``)."""

    block: str
    cost: np.ndarray
    loss: np.ndarray
    counts: list[dict[str, int]]
    whole: list[bool]
    orders: dict[str, list[Candidate]] = field(default_factory=dict)
    module: Candidate | None = None
    index: dict[tuple, int] | None = field(default=None, repr=False)   # counts -> option

    def chains(self) -> dict[str, list[int]]:
        """Per kind, the options that remove only that kind, by count (from none)."""
        none = self.counts.index({k: 0 for k in self.orders}) if self.orders else 0
        out: dict[str, list[tuple[int, int]]] = {}
        for i, counts in enumerate(self.counts):
            alone = [k for k, n in counts.items() if n]
            if not self.whole[i] and len(alone) == 1:
                out.setdefault(alone[0], []).append((counts[alone[0]], i))
        return {k: [none] + [i for _, i in sorted(v)] for k, v in out.items()}

    def option_of(self, counts: Mapping[str, int], chains: dict[str, list[int]]
                  ) -> int | None:
        """The option removing ``counts[kind]`` chain steps of each kind (None: no such)."""
        if self.index is None:
            self.index = {_signature(c): i for i, c in enumerate(self.counts)
                          if not self.whole[i]}
        want = {k: self.counts[chains[k][counts.get(k, 0)]][k] for k in chains}
        return self.index.get(_signature(want))

    def picks(self, option: int) -> list[Candidate]:
        """The candidates option ``option`` takes."""
        if self.whole[option]:
            return [self.module]
        return [c for key, n in self.counts[option].items() for c in self.orders[key][:n]]


def _signature(counts: Mapping[str, int]) -> tuple:
    return tuple(sorted((k, n) for k, n in counts.items() if n))


def block_options(block: Block, candidates: list[Candidate], costs: Mapping[str, float],
                  round_to: int = 1) -> BlockOptions:
    """Every configuration of ``block`` its candidates allow (``candidates`` of this block)."""
    module = next((c for c in candidates if c.kind.whole), None)
    orders: dict[str, list[Candidate]] = {}
    for cand in candidates:
        if not cand.kind.whole:
            orders.setdefault(cand.kind.key, []).append(cand)
    kinds = {c.kind.key: c.kind for c in candidates}
    for key, cands in orders.items():
        cands.sort(key=(lambda c: c.index) if kinds[key].slotted
                   else (lambda c: (c.score, c.index)))
    found: list[tuple[dict[str, int], float, float]] = []
    _walk(block, [(kinds[k], orders[k]) for k in orders], costs, round_to, BlockBudget(),
          {}, 0.0, 0.0, found)
    counts = [f[0] for f in found]
    loss = [f[1] for f in found]
    cost = [f[2] for f in found]
    whole = [False] * len(found)
    if module is not None:
        counts.append({module.kind.key: 1})
        loss.append(module.score)
        cost.append(module.cost)
        whole.append(True)
    return BlockOptions(block.name, np.array(cost, np.float64), np.array(loss, np.float64),
                        counts, whole, orders, module)


def _walk(block: Block, levels: list[tuple[UnitKind, list[Candidate]]],
          costs: Mapping[str, float], round_to: int, taken: BlockBudget,
          counts: dict[str, int], loss: float, cost: float,
          found: list[tuple[dict[str, int], float, float]]) -> None:
    """Depth-first over the kinds: every legal prefix count of each kind's order."""
    if not levels:
        found.append((dict(counts), loss, cost))
        return
    (kind, cands), rest = levels[0], levels[1:]
    width = kind.width(block) if round_to > 1 else 0
    taken = deepcopy(taken) if rest else taken
    for n in range(len(cands) + 1):
        if n:
            gain = kind.gain(cands[n - 1], block, taken, costs)
            if gain <= 0:
                break
            kind.take(cands[n - 1], taken)
            taken.spent += gain
            loss += cands[n - 1].score
            cost += gain
        if not width or n == 0 or ((width - n) % round_to == 0 and width - n >= round_to):
            inner = deepcopy(taken) if rest else taken
            _walk(block, rest, costs, round_to, inner, {**counts, kind.key: n}, loss, cost,
                  found)


def choose(options: list[BlockOptions], budget: float) -> list[int] | None:
    """Per block the option with the least total loss whose total cost is at least
    ``budget`` (None when even the costliest options fall short)."""
    if sum(float(o.cost.max()) for o in options) < budget * (1 - 1e-12):
        return None
    if budget <= 0:
        return [int(np.argmin(o.loss)) for o in options]
    picks = _program(options, budget, _step(options, budget))
    if picks is None:     # rounding down lost the budget: start from the costliest options
        picks = [int(np.argmax(o.cost)) for o in options]
    found = [_trim(options, picks, budget), *kwon_splits(options, budget)]
    return min(found, key=lambda p: (_total(options, p, "loss"), _total(options, p, "cost")))


def _total(options: list[BlockOptions], picks: list[int], what: str) -> float:
    return float(sum(getattr(o, what)[p] for o, p in zip(options, picks)))


def kwon_splits(options: list[BlockOptions], budget: float) -> list[list[int]]:
    """Kwon et al.'s closed form over two unit kinds (heads and neurons): for every number
    of the first kind's least important units, fill the budget with the fewest of the
    second kind's least important; every split that meets the budget (with one kind, the
    one fill). Blocks keep modules; the program above covers those, this guarantees the
    closed form's optimum."""
    chains = {b: o.chains() for b, o in enumerate(options)}
    steps = _marginal_steps(options, chains)
    if not 1 <= len(steps) <= 2:
        return []
    first, second = sorted(steps, key=lambda k: len(steps[k]["cost"]))[:2] \
        if len(steps) == 2 else (next(iter(steps)), None)
    first_spent = np.concatenate([[0.0], np.cumsum(steps[first]["cost"])])
    fill = (np.concatenate([[0.0], np.cumsum(steps[second]["cost"])]) if second
            else np.zeros(1))
    taken = {key: _taken_counts(steps[key], len(options)) for key in steps}
    found = []
    for n, spent in enumerate(first_spent):
        m = int(np.searchsorted(fill, budget - spent - 1e-9 * abs(budget)))
        if m >= len(fill):
            continue
        picks = []
        for b, opts in enumerate(options):
            counts = {key: int(taken[key][b, count]) for key, count in ((first, n), (second, m))
                      if key is not None and taken[key][b, count]}
            picks.append(opts.option_of(counts, chains[b]))
        if None not in picks and _total(options, picks, "cost") >= budget * (1 - 1e-12):
            found.append(picks)
        if m == 0:      # the first kind alone meets the budget: more of it only adds loss
            break
    return found


def _marginal_steps(options: list[BlockOptions], chains: dict[int, dict[str, list[int]]]
                    ) -> dict[str, dict[str, np.ndarray]]:
    """Per kind every chain step of every block (its loss and cost increments, its block
    and its depth j in the chain), sorted by loss increment."""
    rows: dict[str, list[tuple[float, int, int, float]]] = {}
    for b, per_kind in chains.items():
        opts = options[b]
        for key, chain in per_kind.items():
            for j in range(1, len(chain)):
                rows.setdefault(key, []).append(
                    (opts.loss[chain[j]] - opts.loss[chain[j - 1]], j, b,
                     opts.cost[chain[j]] - opts.cost[chain[j - 1]]))
    out = {}
    for key, found in rows.items():
        found.sort()
        loss, depth, block, cost = (np.array(c) for c in zip(*found))
        out[key] = {"loss": loss, "depth": depth.astype(np.int64),
                    "block": block.astype(np.int64), "cost": cost}
    return out


def _taken_counts(steps: dict[str, np.ndarray], blocks: int) -> np.ndarray:
    """[blocks, steps + 1]: the chain depth each block reaches after the first m steps."""
    depth = np.zeros((blocks, len(steps["cost"]) + 1), np.int64)
    depth[steps["block"], np.arange(1, len(steps["cost"]) + 1)] = steps["depth"]
    return np.maximum.accumulate(depth, axis=1)


def _step(options: list[BlockOptions], budget: float) -> float:
    """The program's cost unit: the costs' greatest common divisor when they are integers
    and the budget is a manageable multiple of it, else budget / GRID."""
    costs = np.concatenate([o.cost for o in options])
    if np.all(costs == np.round(costs)) and costs.max() < 2 ** 53:
        divisor = 0
        for value in np.unique(costs.astype(np.int64)):
            divisor = math.gcd(divisor, int(value))
        if divisor and budget / divisor <= EXACT_STEPS:
            return float(divisor)
    return budget / GRID


def _program(options: list[BlockOptions], budget: float, step: float) -> list[int] | None:
    """Dynamic program over removed cost in ``step`` units, capped at the budget's: the
    least loss reaching each cost, one block at a time; then back through the choices."""
    top = math.ceil(budget / step - 1e-9)
    best = np.full(top + 1, np.inf)
    best[0] = 0.0
    trail = []
    for opts in options:
        units = np.minimum(np.floor(opts.cost / step + 1e-9), top).astype(np.int64)
        best, choice, source = _add_block(best, units, opts.loss, top)
        trail.append((choice, source))
    if not np.isfinite(best[top]):
        return None
    picks = []
    at = top
    for choice, source in reversed(trail):
        picks.append(int(choice[at]))
        at = int(source[at])
    return picks[::-1]


def _add_block(best: np.ndarray, units: np.ndarray, loss: np.ndarray, top: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One knapsack step: new[r] = min over options of best[r − units] + loss (r < top);
    at ``top`` (the budget met) the best of every reachable cost at or beyond it."""
    order = np.lexsort((loss, units))
    first = np.ones(len(order), bool)
    first[1:] = units[order][1:] != units[order][:-1]
    kept = order[first]                     # per distinct cost the option of least loss
    tail = np.minimum.accumulate(best[::-1])[::-1]          # min of best[r:]
    tail_at = _suffix_argmin(best)
    new = np.full(top + 1, np.inf)
    choice = np.zeros(top + 1, np.int64)
    source = np.zeros(top + 1, np.int64)
    r = np.arange(top + 1)
    for start in range(0, len(kept), CHUNK):
        opts = kept[start:start + CHUNK]
        u = units[opts][:, None]
        prev = r[None, :] - u
        value = np.where(prev >= 0, best[np.clip(prev, 0, top)], np.inf)
        value[:, top] = tail[np.maximum(top - u[:, 0], 0)]
        value += loss[opts][:, None]
        at = np.argmin(value, axis=0)
        low = value[at, r]
        better = low < new
        new[better] = low[better]
        choice[better] = opts[at[better]]
        origin = np.clip(r[None, :] - u, 0, top)[at, r]
        origin[top] = tail_at[max(top - int(u[at[top], 0]), 0)]
        source[better] = origin[better]
    return new, choice, source


def _suffix_argmin(values: np.ndarray) -> np.ndarray:
    """Per r the index of the least value in values[r:]."""
    out = np.empty(len(values), np.int64)
    best = len(values) - 1
    for r in range(len(values) - 1, -1, -1):
        if values[r] <= values[best]:
            best = r
        out[r] = best
    return out


def _trim(options: list[BlockOptions], picks: list[int], budget: float) -> list[int]:
    """Give back surplus cost (rounding leaves some) where it saves the most loss: switch
    one block at a time to a cheaper option that still meets the budget."""
    picks = list(picks)
    while True:
        surplus = sum(o.cost[p] for o, p in zip(options, picks)) - budget
        best, move = 0.0, None
        for b, (opts, p) in enumerate(zip(options, picks)):
            fits = (opts.cost < opts.cost[p]) & (opts.cost >= opts.cost[p] - surplus)
            if fits.any():
                saved = np.where(fits, opts.loss[p] - opts.loss, -np.inf)
                i = int(np.argmax(saved))
                if saved[i] > best:
                    best, move = float(saved[i]), (b, i)
        if move is None:
            return picks
        picks[move[0]] = move[1]
