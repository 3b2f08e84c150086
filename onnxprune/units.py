"""Unit names (DESIGN.md) and the plan: which units of which block to remove."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from onnxprune.errors import OnnxpruneError
from onnxprune.structure.blocks import AttentionBlock, Block, FfnBlock, Structure

_UNIT = re.compile(r"^(attn|ffn)(\d+)(?:\.(head|qk|vo|ch)(\d+)(?:\.(\d+))?)?$")


@dataclass
class BlockCut:
    """What to remove from one block. Channel sets are keyed by head."""

    block: str
    whole: bool = False
    heads: set[int] = field(default_factory=set)
    qk: dict[int, set[int]] = field(default_factory=dict)
    vo: dict[int, set[int]] = field(default_factory=dict)
    channels: set[int] = field(default_factory=set)

    @property
    def empty(self) -> bool:
        return not (self.whole or self.heads or self.qk or self.vo or self.channels)


@dataclass
class Plan:
    """The units to remove, validated against a structure and normalised (a module that
    loses every head is removed whole; channels of removed heads are dropped)."""

    cuts: dict[str, BlockCut]
    units: list[str]


def head_unit(block: str, head: int) -> str:
    return f"{block}.head{head}"


def channel_unit(block: str, space: str, head: int, channel: int) -> str:
    return f"{block}.{space}{head}.{channel}"


def ffn_channel_unit(block: str, channel: int) -> str:
    return f"{block}.ch{channel}"


def parse_units(names: Iterable[str], structure: Structure) -> Plan:
    cuts: dict[str, BlockCut] = {}
    units = []
    for raw in names:
        name = raw.strip()
        if not name:
            continue
        match = _UNIT.match(name)
        if not match:
            raise OnnxpruneError(f"unit {name!r}: not a unit name (examples: attn0, attn0.head1, "
                                 "attn0.qk1.3, attn0.vo2.0, ffn1, ffn1.ch7)")
        kind, index, sub, a, b = match.groups()
        block = _find_block(structure, f"{kind}{index}", name)
        cut = cuts.setdefault(block.name, BlockCut(block.name))
        _add_unit(cut, block, sub, None if a is None else int(a), None if b is None else int(b),
                  name)
        units.append(name)
    for name, cut in cuts.items():
        _normalise(cut, structure.block(name))
    return Plan(cuts, units)


def _find_block(structure: Structure, block_name: str, unit: str) -> Block:
    try:
        return structure.block(block_name)
    except KeyError:
        names = ", ".join(b.name for b in structure.blocks) or "none"
        raise OnnxpruneError(f"unit {unit!r}: no block {block_name} (blocks: {names})") from None


def _add_unit(cut: BlockCut, block: Block, sub: str | None, a: int | None, b: int | None,
              name: str) -> None:
    if sub is None:
        if not block.removable:
            raise OnnxpruneError(f"unit {name!r}: {block.name} cannot be removed whole: "
                                 f"{block.reason}")
        cut.whole = True
        return
    if not block.prunable:
        raise OnnxpruneError(f"unit {name!r}: {block.name} is not prunable: {block.reason}")
    if isinstance(block, AttentionBlock):
        _add_attention_unit(cut, block, sub, a, b, name)
    elif isinstance(block, FfnBlock):
        if sub != "ch" or b is not None:
            raise OnnxpruneError(f"unit {name!r}: feed-forward units are {block.name} and "
                                 f"{block.name}.ch<c>")
        _check_range(name, "channel", a, block.channels)
        cut.channels.add(a)


def _add_attention_unit(cut: BlockCut, block: AttentionBlock, sub: str, a: int | None,
                        b: int | None, name: str) -> None:
    if sub == "head" and b is None:
        _check_range(name, "head", a, block.heads)
        cut.heads.add(a)
        return
    if sub in ("qk", "vo") and b is not None:
        if not block.channel_prunable:
            raise OnnxpruneError(f"unit {name!r}: channels of {block.name} cannot be cut: "
                                 f"{block.channel_reason}")
        _check_range(name, "head", a, block.heads)
        _check_range(name, "channel", b, block.qk_dim if sub == "qk" else block.vo_dim)
        getattr(cut, sub).setdefault(a, set()).add(b)
        return
    raise OnnxpruneError(f"unit {name!r}: attention units are {block.name}, {block.name}.head<h>, "
                         f"{block.name}.qk<h>.<c>, {block.name}.vo<h>.<c>")


def _check_range(unit: str, what: str, value: int, size: int) -> None:
    if not 0 <= value < size:
        raise OnnxpruneError(f"unit {unit!r}: {what} {value} out of range (0..{size - 1})")


def _normalise(cut: BlockCut, block: Block) -> None:
    if cut.whole:
        cut.heads.clear(), cut.qk.clear(), cut.vo.clear(), cut.channels.clear()
        return
    if isinstance(block, FfnBlock):
        if len(cut.channels) == block.channels:
            _remove_whole(cut, block, "every channel")
        return
    assert isinstance(block, AttentionBlock)
    if len(cut.heads) == block.heads:
        _remove_whole(cut, block, "every head")
        return
    for space, width in (("qk", block.qk_dim), ("vo", block.vo_dim)):
        per_head = getattr(cut, space)
        for h in list(per_head):
            if h in cut.heads:
                del per_head[h]
        if not per_head:
            continue
        counts = {h: len(per_head.get(h, ())) for h in range(block.heads) if h not in cut.heads}
        if len(set(counts.values())) != 1:
            detail = ", ".join(f"head {h}: {n}" for h, n in counts.items())
            raise OnnxpruneError(f"{block.name}: a {space.upper()} cut must remove the same "
                                 f"number of channels from every kept head ({detail})")
        if next(iter(counts.values())) == width:
            raise OnnxpruneError(f"{block.name}: cannot remove every {space.upper()} channel; "
                                 "remove the heads or the module instead")


def _remove_whole(cut: BlockCut, block: Block, what: str) -> None:
    if not block.removable:
        raise OnnxpruneError(f"{block.name}: removing {what} removes the module, which is not "
                             f"possible: {block.reason}")
    cut.whole = True
    cut.heads.clear(), cut.qk.clear(), cut.vo.clear(), cut.channels.clear()
