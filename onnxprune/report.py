"""Human and machine forms of what the tool found and did."""

from __future__ import annotations

from typing import Any

from onnxprune.structure.blocks import AttentionBlock, Block, FfnBlock, Structure
from onnxprune.structure.discover import Analysis


def block_reason(block: Block) -> str:
    if not block.prunable:
        return block.reason
    notes = [] if block.removable else [f"not removable whole: {block.reason}"]
    if isinstance(block, AttentionBlock) and not block.channel_prunable:
        notes.append(f"no QK/VO channel cuts: {block.channel_reason}")
    return "; ".join(notes)


def _weights(analysis: Analysis, node_name: str) -> dict[str, str | None]:
    view = analysis.view
    node = view.node[node_name]
    bias = None
    if node.op == "Gemm" and len(node.inputs) > 2:
        bias = node.inputs[2].name
    else:
        users = [u for u in view.consumers.get(node.outputs[0].name, []) if u.op == "Add"]
        consts = [t.name for u in users[:1] for t in u.inputs if view.const(t) is not None]
        bias = consts[0] if consts else None
    return {"node": node_name, "weight": node.inputs[1].name, "bias": bias}


def block_json(block: Block, analysis: Analysis) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": block.name, "kind": block.kind, "heads": None, "qk_dim": None, "vo_dim": None,
        "channels": None, "params": block.params, "flops": block.flops,
        "removable": block.removable, "prunable": block.prunable,
        "reason": block_reason(block),
    }
    if isinstance(block, AttentionBlock) and block.heads:
        entry.update(heads=block.heads, qk_dim=block.qk_dim, vo_dim=block.vo_dim,
                     channel_prunable=block.channel_prunable)
        entry["projections"] = {role: _weights(analysis, name) for role, name in
                                (("q", block.q_proj), ("k", block.k_proj),
                                 ("v", block.v_proj), ("o", block.o_proj)) if name}
    elif isinstance(block, FfnBlock):
        entry.update(channels=block.channels or None, activation=block.activation,
                     gated=block.gated)
        if block.prunable:
            entry["projections"] = {
                **{f"up{i}": _weights(analysis, u) for i, u in enumerate(block.up_projs)},
                "down": _weights(analysis, block.down_proj)}
    entry["residual_add"] = block.residual_add
    return entry


def structure_json(analysis: Analysis) -> dict[str, Any]:
    structure = analysis.structure
    return {
        "blocks": [block_json(b, analysis) for b in structure.blocks],
        "params": structure.params,
        "flops": structure.flops,
        "inputs": {k: list(v) for k, v in structure.input_shapes.items()},
        "dynamic_dims_defaulted": analysis.dynamic_defaults,
    }


def human(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def structure_table(analysis: Analysis) -> str:
    s: Structure = analysis.structure
    lines = [f"{'block':<8} {'kind':<10} {'heads':>5} {'qk':>4} {'vo':>4} {'chan':>6} "
             f"{'params':>9} {'FLOPs':>9}  removable  notes"]
    for b in s.blocks:
        heads = qk = vo = chan = "-"
        if isinstance(b, AttentionBlock) and b.heads:
            heads, qk, vo = str(b.heads), str(b.qk_dim), str(b.vo_dim)
        if isinstance(b, FfnBlock):
            chan = str(b.channels or "-")
            extra = f"{b.activation}"
        else:
            extra = ""
        notes = "; ".join(x for x in (extra, block_reason(b)) if x)
        lines.append(f"{b.name:<8} {b.kind:<10} {heads:>5} {qk:>4} {vo:>4} {chan:>6} "
                     f"{human(b.params):>9} {human(b.flops):>9}  "
                     f"{'yes' if b.removable else 'no':<9}  {notes}")
    shapes = ", ".join(f"{k}[{','.join(map(str, v))}]" for k, v in s.input_shapes.items())
    lines.append(f"model: {human(s.params)} params, {human(s.flops)} FLOPs at {shapes}")
    if analysis.dynamic_defaults:
        lines.append(f"note: dynamic dims of {', '.join(analysis.dynamic_defaults)} taken as 1; "
                     "use --shape NAME:D0,D1,... for real sizes")
    return "\n".join(lines)
