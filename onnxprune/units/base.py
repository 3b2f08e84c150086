"""What a unit kind is, the registry of kinds, and the typed unit that flows from score to
plan to cut.

A unit kind is one class that owns everything the stages need to know about one kind of
prunable unit: which blocks it lives in, where its gate sits, which label ids the cut
removes, its cost, its planning candidates and constraints, and its printed name. Stages ask
the kind; they never switch on it. Adding a kind is one class plus ``register_kind``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from onnxprune.errors import OnnxpruneError
from onnxprune.structure.blocks import Block
from onnxprune.structure.graph import weight_shape

if TYPE_CHECKING:
    from onnxprune.structure.discover import Analysis
    from onnxprune.units.removal import BlockCut

Index = tuple[int, ...]


@dataclass(frozen=True)
class Unit:
    """One prunable unit: its kind, its block and its position in the block (() for a whole
    module, (h,) for a head, (h, c) for a per-head channel, (c,) for an FFN channel)."""

    kind: UnitKind
    block: str
    index: Index = ()

    @property
    def name(self) -> str:
        return self.kind.format(self.block, self.index)

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"Unit({self.name})"


@dataclass(frozen=True)
class GateSite:
    """Where a vector gate goes: the tensor whose last axis it scales, and per column the
    gate entry it reads (-1: none). ``size`` entries, ``width`` channels per head.

    A fused op that projects inside itself (com.microsoft Attention's packed Q/K/V) has no
    such tensor: then ``weights`` names its constant weight and bias, whose last axis the gate
    scales instead (x·(W·g) + b·g = (x·W + b)·g), and ``tensor`` is the op's input x."""

    tensor: str
    index: np.ndarray = field(compare=False)
    size: int
    width: int = 0
    weights: tuple[str, ...] = ()


@dataclass
class LabelRoles:
    """Per label id of a block: its head and channel (-1 where none), and which label ids
    (and which heads) the cut removes. Kinds fill it; the cut reads it."""

    head: dict[int, int] = field(default_factory=dict)
    channel: dict[int, int] = field(default_factory=dict)
    removed: set[int] = field(default_factory=set)
    removed_heads: set[int] = field(default_factory=set)

    def keep(self, labels: np.ndarray) -> np.ndarray:
        return ~np.isin(labels, list(self.removed))

    def arrays(self, labels: np.ndarray) -> tuple[np.ndarray, ...]:
        """(head, channel, kept, head kept) arrays in the shape of ``labels``."""
        ids, inverse = np.unique(labels, return_inverse=True)
        inverse = inverse.reshape(labels.shape)
        head = np.array([self.head.get(int(i), -1) for i in ids])[inverse]
        chan = np.array([self.channel.get(int(i), -1) for i in ids])[inverse]
        kept = np.array([int(i) not in self.removed for i in ids])[inverse]
        head_kept = ~np.isin(head, list(self.removed_heads))
        return head, chan, kept, head_kept


@dataclass
class Candidate:
    """One step the planner can take: removing ``units`` (one unit, or one channel slot of
    every head) for ``cost``; ``score`` is their summed importance."""

    block: str
    kind: UnitKind
    index: int                   # head, slot or channel (-1 for modules)
    units: list[Unit]
    score: float
    cost: float

    @property
    def priority(self) -> float:
        return self.score / max(self.cost, 1e-12)

    @property
    def sort_key(self) -> tuple:
        return (self.priority, self.block, self.kind.key, self.index)


@dataclass
class BlockBudget:
    """What the planner has taken from one block so far (the constraints read it)."""

    removed: bool = False
    taken: dict[str, set[int]] = field(default_factory=dict)     # kind key -> indices
    slots: dict[str, int] = field(default_factory=dict)          # kind key -> slots taken
    spent: float = 0.0

    def count(self, key: str) -> int:
        return len(self.taken.get(key, ()))


class UnitKind:
    """Base of every unit kind; subclasses set the class attributes and override what
    differs. Instances are singletons held by the registry."""

    key: ClassVar[str]                     # registry key: attn, ffn, head, qk, vo, ch
    block_type: ClassVar[type[Block]]
    gate: ClassVar[str]                    # gate input kind: module, head, qk, vo, ch
    plural: ClassVar[str]                  # "heads", for summaries
    granularities: ClassVar[tuple[str, ...]] = ()
    whole: ClassVar[bool] = False          # removes the whole block
    slotted: ClassVar[bool] = False        # candidates are per-head channel slots
    pattern: ClassVar[str]                 # name after the block: "" or "head(\d+)" ...

    # -- names ----------------------------------------------------------------------------
    def format(self, block: str, index: Index) -> str:
        raise NotImplementedError

    template: ClassVar[str]                # how the name is written: "{block}.head<h>"

    def usage(self, block: str) -> str:
        return self.template.format(block=block)

    # -- which blocks ---------------------------------------------------------------------
    def fits(self, block: Block) -> bool:
        """Whether units of this kind exist in this type of block at all."""
        return isinstance(block, self.block_type)

    def refusal(self, block: Block) -> str | None:
        """Why this kind cannot be cut in ``block`` (None: it can)."""
        if not self.fits(block):
            return f"{block.name} has no {self.plural}"
        if not block.prunable or block.flow is None:
            return f"{block.name} is not prunable: {block.reason}"
        return None

    def limitation(self, block: Block) -> str | None:
        """The note ``inspect`` prints when a prunable block cannot be cut by this kind."""
        return None

    def shape(self, block: Block) -> tuple[int, ...]:
        """Shape of this kind's score array in ``block``."""
        raise NotImplementedError

    def units(self, block: Block) -> Iterator[Unit]:
        for index in np.ndindex(*self.shape(block)):
            yield Unit(self, block.name, tuple(int(i) for i in index))

    def check(self, unit: Unit, block: Block) -> None:
        """Raise naming the unit when its index is out of range."""
        for value, size, what in zip(unit.index, self.shape(block), self.axes):
            if not 0 <= value < size:
                raise OnnxpruneError(f"unit {unit.name!r}: {what} {value} out of range "
                                     f"(0..{size - 1})")

    axes: ClassVar[tuple[str, ...]] = ()

    def describe(self, block: Block) -> dict:
        """Fields this kind adds to ``inspect`` (sizes of the block along this kind)."""
        return {}

    def projections(self, block: Block) -> dict[str, str]:
        """Whole-module kinds: the block's projection nodes by role."""
        return {}

    # -- the gate and the cut -------------------------------------------------------------
    def site(self, analysis: Analysis, block: Block) -> GateSite:
        raise NotImplementedError

    def zero_gate(self, value: np.ndarray, width: int, cut: BlockCut) -> None:
        """Set to 0 the entries of this kind's gate that ``cut`` removes."""
        for index in cut.removed.get(self.key, ()):
            value[..., index[-1] if not width else index[0] * width + index[1]] = 0

    def mark(self, roles: LabelRoles, block: Block, removed: set[Index]) -> None:
        """Record in ``roles`` the label ids the cut removes for these units."""

    def normalise(self, cut: BlockCut, block: Block) -> None:
        """Make a block's cut canonical (and refuse an impossible one)."""

    # -- cost, importance by weights ------------------------------------------------------
    def cost(self, analysis: Analysis, block: Block) -> float:
        """Parameters one unit removes."""
        raise NotImplementedError

    def columns(self, block: Block) -> np.ndarray:
        """Label ids of the projection columns each unit owns: shape (*shape, n)."""
        raise NotImplementedError

    def rows(self, analysis: Analysis, block: Block) -> tuple[str, np.ndarray] | None:
        """The output projection and, per weight row, the flat unit entry it belongs to."""
        return None

    # -- planning -------------------------------------------------------------------------
    def candidates(self, block: Block, scores: np.ndarray, cost: float) -> list[Candidate]:
        values = np.asarray(scores)
        return [Candidate(block.name, self, i[-1] if i else -1,
                          [Unit(self, block.name, tuple(int(x) for x in i))],
                          float(values[i]), cost)
                for i in np.ndindex(*values.shape)]

    def gain(self, cand: Candidate, block: Block, taken: BlockBudget,
             costs: Mapping[str, float]) -> float:
        """Cost ``cand`` removes now given what was taken (0 when a constraint forbids it)."""
        return cand.cost

    def take(self, cand: Candidate, taken: BlockBudget) -> None:
        taken.taken.setdefault(self.key, set()).add(cand.index)

    def width(self, block: Block) -> int:
        """Width a ``--round-to`` applies to (0: not rounded)."""
        return 0


class ModuleKind(UnitKind):
    """A kind that removes its whole block (its residual add becomes a pass-through)."""

    gate = "module"
    whole = True
    pattern = ""
    template = "{block}"

    def format(self, block: str, index: Index) -> str:
        return block

    def refusal(self, block: Block) -> str | None:
        if not self.fits(block):
            return f"{block.name} has no {self.plural}"
        if not block.removable:
            return f"{block.name} cannot be removed whole: {block.reason}"
        return None

    def limitation(self, block: Block) -> str | None:
        return None if block.removable else f"not removable whole: {block.reason}"

    def shape(self, block: Block) -> tuple[int, ...]:
        return ()

    def base_roles(self, block: Block) -> LabelRoles:
        """Head and channel of every label id of the block (what the cut's shapes read)."""
        raise NotImplementedError

    def cost(self, analysis: Analysis, block: Block) -> float:
        return float(block.params)

    def rows(self, analysis: Analysis, block: Block) -> tuple[str, np.ndarray]:
        sink = block.flow.sinks[0]
        return sink.node, np.zeros(len(sink.rows), np.int64)

    def gain(self, cand: Candidate, block: Block, taken: BlockBudget,
             costs: Mapping[str, float]) -> float:
        return cand.cost - taken.spent

    def take(self, cand: Candidate, taken: BlockBudget) -> None:
        taken.removed = True


_KINDS: dict[str, UnitKind] = {}
_NAME = re.compile(r"^(attn|ffn)(\d+)(?:\.(.+))?$")


def register_kind(cls: type[UnitKind]) -> type[UnitKind]:
    """Class decorator: add a unit kind to the registry (its key must be new)."""
    if cls.key in _KINDS:
        raise ValueError(f"unit kind {cls.key!r} is already registered")
    _KINDS[cls.key] = cls()
    return cls


def unit_kinds() -> list[UnitKind]:
    """Every registered kind, in registration order."""
    return list(_KINDS.values())


def unit_kind(key: str) -> UnitKind:
    try:
        return _KINDS[key]
    except KeyError:
        raise OnnxpruneError(f"unknown unit kind {key!r}; kinds: {', '.join(_KINDS)}") from None


def module_kind(block: Block) -> UnitKind:
    """The kind that removes ``block`` whole."""
    return next(k for k in _KINDS.values() if k.whole and k.fits(block))


def kinds_of(block: Block) -> list[UnitKind]:
    """The kinds that live in ``block``'s type, module kind first."""
    return [k for k in _KINDS.values() if k.fits(block)]


def granularity_kinds() -> dict[str, set[str]]:
    """Granularity name -> the keys of the kinds it prunes."""
    out: dict[str, set[str]] = {}
    for kind in _KINDS.values():
        for name in kind.granularities:
            out.setdefault(name, set()).add(kind.key)
    return out


def parse_unit(name: str, blocks: Mapping[str, Block]) -> Unit:
    """A unit from its printed name (the CLI's and the API's string form)."""
    match = _NAME.match(name)
    if not match:
        raise OnnxpruneError(f"unit {name!r}: not a unit name (examples: attn0, attn0.head1, "
                             "attn0.qk1.3, attn0.vo2.0, ffn1, ffn1.ch7)")
    prefix, number, tail = match.groups()
    block = blocks.get(f"{prefix}{number}")
    if block is None:
        names = ", ".join(blocks) or "none"
        raise OnnxpruneError(f"unit {name!r}: no block {prefix}{number} (blocks: {names})")
    for kind in kinds_of(block):
        found = re.fullmatch(kind.pattern, tail or "")
        if found:
            return Unit(kind, block.name, tuple(int(g) for g in found.groups()))
    forms = ", ".join(k.usage(block.name) for k in kinds_of(block))
    raise OnnxpruneError(f"unit {name!r}: units of {block.name} are {forms}")


def projection_rows(analysis: Analysis, node: str) -> int:
    """Rows (input features) of a projection's effective [K, N] weight."""
    return weight_shape(analysis.view, node)[0]


def projection_cols(analysis: Analysis, node: str) -> int:
    return weight_shape(analysis.view, node)[1]
