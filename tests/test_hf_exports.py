"""Models exported from Hugging Face transformers (random weights from configs, no hub):
discovery finds their blocks and the exactness contract holds for head and mixed plans."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hf_forms import export_hf, hf_combos
from plans import random_plan

from onnxprune.gates import gate_model
from onnxprune.runtime import make_session, run
from onnxprune.structure.discover import analyse
from onnxprune.surgery import apply_plan
from onnxprune.units import parse_units

COMBOS = [(n, d) for n, d, dyn, why in hf_combos() if dyn and why is None]


@pytest.mark.parametrize(("name", "dynamo"), COMBOS,
                         ids=[f"{n}-{'dynamo' if d else 'script'}" for n, d in COMBOS])
def test_hf_export_prunes_exactly(tmp_path, name, dynamo):
    info = export_hf(name, str(tmp_path / "m.onnx"), dynamo=dynamo, perturbed=True)
    analysis = analyse(onnx.load(info["path"]))
    attn = analysis.structure.attention
    assert len(attn) == 2, [b.name for b in analysis.structure.blocks]
    assert all(b.prunable for b in attn), [b.reason for b in attn]
    assert len(analysis.structure.ffn) == 2
    x = info["make_input"](3)
    feed_name = analysis.model.graph.input[0].name
    for kind in ("head", "mixed", "module"):
        units = random_plan(analysis.structure, kind, seed=1)
        plan = parse_units(units, analysis.structure)
        cut = apply_plan(analysis, plan)
        gated = gate_model(analysis, blocks=list(plan.cuts))
        want = run(make_session(gated.model), {feed_name: x, **gated.feeds(plan)})
        got = run(make_session(cut), {feed_name: x})
        for key, ref in want.items():
            np.testing.assert_allclose(got[key], ref, rtol=1e-4,
                                       atol=1e-5 * max(1.0, float(np.abs(ref).max())))
