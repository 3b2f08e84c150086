"""The cut's input: which units of which block to remove, validated against a structure and
normalised (a module that loses every head or channel is removed whole; channels of removed
heads are dropped)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from onnxprune.errors import NotPrunableError, OnnxpruneError
from onnxprune.structure.blocks import Block, Structure
from onnxprune.structure.labels import varies_along
from onnxprune.units.base import Index, LabelRoles, Unit, kinds_of, module_kind, parse_unit


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


def block_roles(block: Block, cut: BlockCut) -> LabelRoles:
    """The label ids the cut of ``block`` removes, as the unit kinds mark them."""
    roles = module_kind(block).base_roles(block)
    for kind in kinds_of(block):
        if cut.indices(kind.key):
            kind.mark(roles, block, cut.indices(kind.key))
    return roles


def new_shape(labels: np.ndarray, roles: LabelRoles, tensor: str) -> tuple[int, ...]:
    """The shape a labelled tensor has after the cut.

    Along an axis that carries heads only, a fibre keeps the positions of kept heads; along
    one that carries channels, each fibre through a kept head keeps its kept channels. All
    fibres must agree, or the cut tensor would not be rectangular.
    """
    head, chan, kept, head_kept = roles.arrays(labels)
    shape = []
    for axis, size in enumerate(labels.shape):
        hv, cv = varies_along(head, axis), varies_along(chan, axis)
        if not hv and not cv:
            shape.append(size)
            continue
        counts = (kept if cv else head_kept).sum(axis=axis)
        values = np.unique(counts[counts > 0] if cv else counts)
        if len(values) != 1:
            raise NotPrunableError(f"the cut would leave tensor {tensor!r} ragged along axis "
                                   f"{axis} (here the Q, K and V widths are coupled)")
        shape.append(int(values[0]))
    return tuple(shape)


def cut_cache(value: np.ndarray, labels: np.ndarray, roles: LabelRoles, name: str
              ) -> np.ndarray:
    """A key/value cache tensor (past input or present output) of the original model, with
    the entries of the removed heads/channels deleted: what the cut model reads or returns.
    ``labels`` are the cache's labels (traced shape): they vary along the head and channel
    axes only, so ``value`` may differ from the traced shape along the others."""
    vary = [a for a in range(labels.ndim) if varies_along(labels, a)]
    if not vary:
        return value
    new = new_shape(labels, roles, name)
    mask = roles.keep(labels)[tuple(slice(None) if a in vary else 0
                                    for a in range(labels.ndim))]
    last = list(range(-len(vary), 0))
    moved = np.moveaxis(value, vary, last)
    rest = moved.shape[:-len(vary)]
    kept = moved.reshape(*rest, mask.size)[..., mask.ravel()]
    return np.moveaxis(kept.reshape(*rest, *[new[a] for a in vary]), last, vary)
