"""The cut's input: which units of which block to remove, validated against a structure and
normalised (a module that loses every head or channel is removed whole; channels of removed
heads are dropped)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from onnxprune.errors import OnnxpruneError
from onnxprune.structure.blocks import Block, Structure
from onnxprune.units.base import Index, Unit, kinds_of, parse_unit


@dataclass
class BlockCut:
    """What to remove from one block: the whole block, or unit indices by kind key."""

    block: str
    whole: bool = False
    removed: dict[str, set[Index]] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not (self.whole or any(self.removed.values()))

    def indices(self, key: str) -> set[Index]:
        return self.removed.get(key, set())

    def remove_whole(self, block: Block, what: str) -> None:
        """Removing ``what`` (every head, every channel) removes the module."""
        if not block.removable:
            raise OnnxpruneError(f"{block.name}: removing {what} removes the module, which is "
                                 f"not possible: {block.reason}")
        self.whole = True
        self.removed.clear()


@dataclass
class Plan:
    """The units to remove (as asked) and, per block, the normalised cut."""

    cuts: dict[str, BlockCut]
    units: list[Unit]

    @property
    def names(self) -> list[str]:
        return [u.name for u in self.units]


def make_plan(units: Iterable[Unit], structure: Structure) -> Plan:
    """Validate typed units against ``structure`` and normalise them per block."""
    cuts: dict[str, BlockCut] = {}
    chosen = list(units)
    for unit in chosen:
        block = structure.block(unit.block)
        reason = unit.kind.refusal(block)
        if reason is not None:
            raise OnnxpruneError(f"unit {unit.name!r}: {reason}")
        unit.kind.check(unit, block)
        cut = cuts.setdefault(block.name, BlockCut(block.name))
        if unit.kind.whole:
            cut.whole = True
        else:
            cut.removed.setdefault(unit.kind.key, set()).add(unit.index)
    for name, cut in cuts.items():
        _normalise(cut, structure.block(name))
    return Plan(cuts, chosen)


def _normalise(cut: BlockCut, block: Block) -> None:
    for kind in kinds_of(block):
        if cut.whole:
            break
        kind.normalise(cut, block)
    if cut.whole:
        cut.removed.clear()


def parse_units(names: Iterable[str], structure: Structure) -> Plan:
    """A plan from printed unit names (``--remove``, the API's string form)."""
    blocks = {b.name: b for b in structure.blocks}
    return make_plan([parse_unit(n.strip(), blocks) for n in names if n.strip()], structure)
