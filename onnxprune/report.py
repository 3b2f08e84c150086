"""Human and machine forms of what the tool found and did."""

from __future__ import annotations

from typing import Any

import numpy as np

from onnxprune.structure.blocks import Block, Structure
from onnxprune.structure.discover import Analysis
from onnxprune.units import kinds_of, module_kind, unit_kind


def block_reason(block: Block) -> str:
    if not block.prunable:
        return block.reason
    notes = [note for kind in kinds_of(block) if (note := kind.limitation(block))]
    return "; ".join(dict.fromkeys(notes))


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
    for kind in kinds_of(block):
        entry.update(kind.describe(block))
    projections = module_kind(block).projections(block)
    if projections:
        entry["projections"] = {role: _weights(analysis, node)
                                for role, node in projections.items()}
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
        fields = block_json_sizes(b)
        heads, qk, vo, chan = (str(fields.get(k) or "-") for k in
                               ("heads", "qk_dim", "vo_dim", "channels"))
        notes = "; ".join(x for x in (fields.get("activation", ""), block_reason(b)) if x)
        lines.append(f"{b.name:<8} {b.kind:<10} {heads:>5} {qk:>4} {vo:>4} {chan:>6} "
                     f"{human(b.params):>9} {human(b.flops):>9}  "
                     f"{'yes' if b.removable else 'no':<9}  {notes}")
    shapes = ", ".join(f"{k}[{','.join(map(str, v))}]" for k, v in s.input_shapes.items())
    lines.append(f"model: {human(s.params)} params, {human(s.flops)} FLOPs at {shapes}")
    if analysis.dynamic_defaults:
        lines.append(f"note: dynamic dims of {', '.join(analysis.dynamic_defaults)} taken as 1; "
                     "use --shape NAME:D0,D1,... for real sizes")
    return "\n".join(lines)


def block_json_sizes(block: Block) -> dict[str, Any]:
    """What the kinds of ``block`` describe (sizes, activation)."""
    fields: dict[str, Any] = {}
    for kind in kinds_of(block):
        fields.update(kind.describe(block))
    return fields


def write_json(path: str, data: dict) -> None:
    """Write JSON atomically (``outputs.write_text``: temp file in the same folder, fsync,
    the umask's mode, rename; a write error is one line and leaves nothing)."""
    import json

    from onnxprune.outputs import write_text

    write_text(path, json.dumps(data, indent=2) + "\n")


def _change(before: float, after: float) -> str:
    return f"{(after - before) / before:+.1%}" if before else "n/a"


def prune_summary(report) -> str:
    """The short table the main job prints."""
    counts: dict[str, int] = {}
    for step in report.steps:
        for unit in step.units:
            counts[unit.kind.plural] = counts.get(unit.kind.plural, 0) + 1
    data = report.data
    made = "; ".join(f"{k}: {v}" for k, v in data.get("synthesised", {}).items()
                     if v != "standard normal")
    source = (f"synthetic inputs ({data['samples']} samples, data-free"
              f"{': ' + made if made else ''})" if data["data_free"]
              else f"{data['source']} ({data['samples']} samples)")
    qb, qa = report.quality_before, report.quality_after
    counted = "FLOPs" if report.target == "flops" else "params"
    prunable = [(f"  prunable {counted}", human(report.prunable_before),
                 human(report.prunable_after),
                 _change(report.prunable_before, report.prunable_after))
                ] if getattr(report, "prunable_before", 0) and report.target != "latency" \
        else []   # a latency budget counts estimated ms: its own line says what it did
    rows = [
        ("params", human(report.params_before), human(report.params_after),
         _change(report.params_before, report.params_after)),
        *(prunable if counted == "params" else []),
        ("FLOPs", human(report.flops_before), human(report.flops_after),
         _change(report.flops_before, report.flops_after)),
        *(prunable if counted == "FLOPs" else []),
        ("calib loss", f"{report.loss_before:.4g}", f"{report.loss_after:.4g}",
         _change(report.loss_before, report.loss_after)),
        (_metric_label(qb.name), f"{qb.value:.4g}", f"{qa.value:.4g}",
         _change(qb.value, qa.value)),
    ]
    lines = [f"method {report.method}, granularity {report.granularity}, loss {report.loss}, "
             f"data {source}",
             "removed " + (", ".join(f"{n} {k}" for k, n in counts.items()) or "nothing")
             + (f": {report.steps[-1].removed_fraction:.1%} of the prunable "
                f"{_BUDGET_UNITS.get(report.target, 'parameters')}"
                if report.steps else ""),
             f"{'':<18}{'before':>12}{'after':>12}{'change':>10}"]
    lines += [f"{a:<18}{b:>12}{c:>12}{d:>10}" for a, b, c, d in rows]
    lines += block_lines(getattr(report, "blocks", []))
    for step in report.steps:
        for note in step.fallbacks:
            lines.append(f"note: step {step.step}: {note}")
    lines += exclusion_lines(report.excluded)
    if getattr(report, "reconstruction", None) is not None:
        lines.append(report.reconstruction.summary())
    worst = max((s.max_abs_diff for s in report.steps), default=0.0)
    lines.append(f"verified exact against the gated original (max |diff| {worst:.2e}); "
                 f"{report.seconds:.1f} s")
    return "\n".join(lines)


def block_order(name: str) -> tuple:
    """Sort key: blocks in numeric order (attn9 before attn10), attention before FFN of a
    layer number."""
    head = name.rstrip("0123456789")
    number = name[len(head):]
    return (int(number) if number else -1, head != "attn", head)


_BUDGET_UNITS = {"flops": "FLOPs", "latency": "latency (estimated)"}


def _metric_label(name: str) -> str:
    return name.upper() if name in ("mse", "mae") else name


def block_lines(blocks) -> list[str]:
    """The blocks the run changed, one line each (heads 16 -> 12, channels 256 -> 171)."""
    changed = [b for b in blocks if b.changed]
    if not changed:
        return []
    lines = ["block     sizes before -> after"]
    for b in changed:
        if b.after is None:
            lines.append(f"  {b.block:<8}removed whole")
            continue
        sizes = ", ".join(f"{k.replace('_', ' ')} {v} -> {b.after.get(k, 0)}"
                          for k, v in b.before.items() if b.after.get(k, 0) != v)
        lines.append(f"  {b.block:<8}{sizes or 'removed whole'}")
    if len(changed) < len(blocks):
        same = len(blocks) - len(changed)
        lines.append(f"  ({same} other block{'s' if same > 1 else ''} unchanged)")
    return lines


def exclusion_lines(excluded: list[dict]) -> list[str]:
    """One line per (kind, reason): the blocks a kind was left out of, and why."""
    groups: dict[tuple[str, str], list[str]] = {}
    for entry in excluded:
        reason = entry["reason"].removeprefix(f"{entry['block']} ")
        groups.setdefault((entry["kind"], reason), []).append(entry["block"])
    return [f"not cut: {kind} of {', '.join(blocks)}: {reason}"
            for (kind, reason), blocks in groups.items()]


def scores_json(scores) -> dict[str, Any]:
    return {"method": scores.method, "samples": scores.samples,
            "seconds": round(scores.seconds, 3), "fallbacks": scores.fallbacks,
            "units": scores.units()}


def scores_table(scores) -> str:
    """Per block: module score, and the lowest/highest unit of each kind."""
    lines = [f"method {scores.method} over {scores.samples} samples "
             f"({scores.seconds:.1f} s); higher = more important"]
    for note in scores.fallbacks:
        lines.append(f"note: {note}")
    for (block, kind), value in sorted(scores.values.items(),
                                       key=lambda kv: (block_order(kv[0][0]), kv[0][1].gate)):
        v = np.asarray(value, dtype=float)
        kind = kind.gate
        if v.ndim == 0:
            lines.append(f"  {block:<8}{kind:<7}{float(v):12.4g}")
        else:
            lines.append(f"  {block:<8}{kind:<7}min {v.min():10.4g}  median "
                         f"{float(np.median(v)):10.4g}  max {v.max():10.4g}  ({v.size} units)")
    return "\n".join(lines)


def _heatmap(fig, ax, rows: dict[str, np.ndarray], unit: str, title: str) -> None:
    """Blocks (numeric order, top to bottom) × units, on a log colour scale when every
    score is positive (scores span orders of magnitude)."""
    from matplotlib.colors import LogNorm

    ax.set_title(title)
    if not rows:
        ax.set_axis_off()
        return
    names = sorted(rows, key=block_order)
    grid = np.full((len(names), max(len(rows[n]) for n in names)), np.nan)
    for i, n in enumerate(names):
        grid[i, :len(rows[n])] = rows[n]
    finite = grid[np.isfinite(grid)]
    norm = LogNorm(finite.min(), finite.max()) \
        if finite.size and finite.min() > 0 and finite.max() > finite.min() else None
    im = ax.imshow(grid, aspect="auto", cmap="viridis", norm=norm, interpolation="nearest")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel(unit)
    fig.colorbar(im, ax=ax, label="score (log)" if norm else "score")


def plot_scores(scores, path: str) -> None:
    """Heatmaps of the scores: attention layers × heads and FFN layers × channels (numeric
    block order, log colour scale), and the whole-module scores (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from onnxprune.errors import OnnxpruneError

        raise OnnxpruneError("--plot needs matplotlib: pip install 'onnxprune[plot]'") from None
    heads = {b: np.asarray(v) for (b, k), v in scores.values.items() if k is unit_kind("head")}
    channels = {b: np.asarray(v) for (b, k), v in scores.values.items()
                if k is unit_kind("ch")}
    modules = {b: float(v) for (b, k), v in scores.values.items() if k.whole}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), width_ratios=[2, 3, 1])
    _heatmap(fig, axes[0], heads, "head", f"{scores.method}: heads")
    _heatmap(fig, axes[1], channels, "FFN channel", f"{scores.method}: FFN channels")
    if modules:
        names = sorted(modules, key=block_order, reverse=True)   # first block on top
        axes[2].barh(names, [modules[n] for n in names])
        if min(modules.values()) > 0:
            axes[2].set_xscale("log")
    axes[2].set_title("whole modules")
    fig.tight_layout()
    from onnxprune.outputs import save_figure

    try:
        save_figure(fig, path)
    finally:
        plt.close(fig)
