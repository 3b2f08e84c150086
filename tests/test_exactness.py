"""The exactness contract (DESIGN.md) on every export form: for random plans of every unit
kind, cut(model)(x) == gated(model)(x, removed gates = 0) on fresh inputs at another batch
size, the cut passes onnx.checker (full), and re-discovery of the cut model finds the
smaller heads and channels, so no stale head count survives."""

from __future__ import annotations

import zlib

import numpy as np
import onnx
import pytest
from forms import working_combos
from plans import KINDS, random_plan

from onnxprune.errors import NotPrunableError
from onnxprune.gates import gate_model
from onnxprune.runtime import make_session, run
from onnxprune.structure.blocks import AttentionBlock, FfnBlock
from onnxprune.structure.discover import analyse
from onnxprune.surgery import apply_plan
from onnxprune.units import parse_units

# Layouts whose exported reshapes put Q, K and V side by side ([.., 3, H, dh]): a QK cut
# without the same VO cut would make that tensor ragged, and the engine must refuse it.
COUPLED_QKV = ("fused_reshape", "mha_", "tel_")

COMBOS = working_combos()
_analyses: dict = {}


def _analysis(export_cache, combo):
    if combo not in _analyses:
        info = export_cache(*combo)
        _analyses[combo] = (info, analyse(onnx.load(info["path"])))
    return _analyses[combo]


def _ids(combo) -> str:
    name, dynamo, dyn = combo
    return f"{name}-{'dynamo' if dynamo else 'script'}-{'dyn' if dyn else 'static'}"


@pytest.mark.parametrize("combo", COMBOS, ids=_ids)
def test_discovery_finds_every_block(export_cache, combo):
    info, analysis = _analysis(export_cache, combo)
    torch_model = info["model"]
    want_attn = sum(_is_attention(m) and not any(_is_attention(c) for c in m.modules()
                                                 if c is not m)
                    for m in torch_model.modules())
    attn, ffn = analysis.structure.attention, analysis.structure.ffn
    assert len(attn) == want_attn, [b.name for b in attn]
    assert len(ffn) == want_attn
    for block in attn:
        assert block.prunable, block.reason
        assert block.removable, block.reason
        assert block.heads * block.qk_dim > 0
    for block in ffn:
        assert block.prunable and block.removable, block.reason


def _is_attention(module) -> bool:
    return type(module).__name__.endswith("Attention")


@pytest.mark.parametrize("combo", COMBOS, ids=_ids)
def test_all_ones_gates_reproduce_original(export_cache, combo):
    info, analysis = _analysis(export_cache, combo)
    gated = gate_model(analysis)
    x = info["input"]
    # graph optimisation off in both: fusions that differ around the gates would change the
    # rounding, not the maths
    original = run(make_session(analysis.model, optimize=False), {"x": x})
    with_gates = run(make_session(gated.model, optimize=False), {"x": x, **gated.feeds()})
    for name, value in original.items():
        np.testing.assert_array_equal(with_gates[name], value)


def case_seed(case: str) -> int:
    """The plan's seed, stable across processes (``hash`` of a str is salted per run)."""
    return zlib.crc32(case.encode()) % 1000


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("combo", COMBOS, ids=_ids)
def test_cut_equals_gated(export_cache, combo, kind):
    info, analysis = _analysis(export_cache, combo)
    case = f"{_ids(combo)}-{kind}"
    units = random_plan(analysis.structure, kind, seed=case_seed(case))
    if not units:
        pytest.skip(f"no {kind} units in this form")
    # printed (shown when the case fails): enough to rebuild the plan by hand
    reproduce = f"case {case}: random_plan(seed={case_seed(case)}) = {units}"
    print(reproduce)
    plan = parse_units(units, analysis.structure)
    if kind in ("qk", "vo") and combo[0].startswith(COUPLED_QKV):
        with pytest.raises(NotPrunableError, match="coupled"):
            apply_plan(analysis, plan)
        return
    cut = apply_plan(analysis, plan)
    onnx.checker.check_model(cut, full_check=True)

    batch = 3 if combo[2] else info["batch"]
    x = info["make_input"](batch)
    gated = gate_model(analysis, blocks=list(plan.cuts))
    want = run(make_session(gated.model), {"x": x, **gated.feeds(plan)})
    got = run(make_session(cut), {"x": x})
    for name, ref in want.items():
        np.testing.assert_allclose(got[name], ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max(),
                                   err_msg=reproduce)
    _check_rediscovery(analysis, plan, cut, reproduce)


def _check_rediscovery(analysis, plan, cut, reproduce: str) -> None:
    after = analyse(cut)
    kept = [b for b in analysis.structure.blocks
            if not (plan.cuts.get(b.name) and plan.cuts[b.name].whole)]
    assert [b.kind for b in after.structure.blocks] == [b.kind for b in kept], reproduce
    for old, new in zip(kept, after.structure.blocks):
        cut_of = plan.cuts.get(old.name)
        if isinstance(old, AttentionBlock):
            heads = len(cut_of.indices("head")) if cut_of else 0
            qk = _per_head(cut_of, "qk")
            vo = _per_head(cut_of, "vo")
            assert (new.heads, new.qk_dim, new.vo_dim) == \
                (old.heads - heads, old.qk_dim - qk, old.vo_dim - vo), reproduce
        elif isinstance(old, FfnBlock):
            removed = len(cut_of.indices("ch")) if cut_of else 0
            assert new.channels == old.channels - removed, reproduce


def _per_head(cut_of, key: str) -> int:
    """Channels removed from each kept head (equal across the heads of a layer)."""
    indices = cut_of.indices(key) if cut_of else set()
    return len([c for h, c in indices if h == min(h for h, _ in indices)]) if indices else 0
