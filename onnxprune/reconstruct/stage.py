"""The reconstruct stage: after the verified cut, re-fit the output projections of the
pruned blocks so that each block's output matches the original model's.

Blocks are taken in topological order; each sees the cut model's real inputs with the
earlier blocks' updates applied. One ONNX Runtime pass of the original collects every
block's output; then one pass of the cut model per block collects that block's projection
input (the projections' weights are fed as inputs, so one session serves every pass; on
the fit slice a session of the graph's prefix that ends at the block is enough).
The last calibration batches (about 20 %) are held out: they choose the damping and the
fit, and measure the model's calibration loss. Under ``auto`` a block keeps its update only
if the held-out loss of the model does not rise with it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxprune.autodiff import DropDeadNodes
from onnxprune.batches import Feeds, LossBatches
from onnxprune.errors import OnnxpruneError
from onnxprune.losses import LossSpec, numpy_sample_loss
from onnxprune.reconstruct.outcome import MODES, BlockReconstruction, ReconstructionReport
from onnxprune.reconstruct.sites import OutputProjection, find_projections
from onnxprune.reconstruct.solve import Fit, Moments, Problem, best, candidates, error
from onnxprune.reconstruct.updates import apply_updates
from onnxprune.runtime import make_session, run
from onnxprune.structure.discover import Analysis

Progress = Callable[[str, int, int], None]

# mode -> the fits a block chooses among (on the held-out slice)
METHODS = {"scale": ("scale",), "refit": ("refit",), "auto": ("none", "bias", "scale", "refit")}
HELD_OUT = 0.2


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise OnnxpruneError(f"--reconstruct {mode!r}: choose {', '.join(MODES)}")


def reconstruct(original: Analysis, cut: Analysis, model: onnx.ModelProto, data: LossBatches,
                mode: str = "auto", threads: int = 0, progress: Progress | None = None
                ) -> tuple[onnx.ModelProto, ReconstructionReport]:
    """``model`` (the verified cut, analysed as ``cut``) with the kept weights of its pruned
    blocks re-fitted against ``original``, and the record of what changed."""
    check_mode(mode)
    start = time.perf_counter()
    report = ReconstructionReport(mode)
    if mode == "none":
        return model, report
    projections, skipped = find_projections(original, cut)
    report.blocks = [BlockReconstruction(s.block, "", "skipped", reason=s.reason)
                     for s in skipped]
    batches = data()
    report.held_out = held_out_batches(len(batches))
    if not projections or not report.held_out:
        report.note = ("no block was cut by heads or channels" if not projections else
                       "one calibration batch leaves no held-out slice: use more samples "
                       "or a smaller batch size")
        report.seconds = time.perf_counter() - start
        return model, report
    targets = _original_outputs(original.model, projections, data.batches, threads)
    fitter = _Fitter(model, projections, data.spec, batches, targets, report.held_out, threads)
    report.blocks += _fit_blocks(fitter, projections, METHODS[mode], mode == "auto", progress)
    report.loss_before, report.loss_after = fitter.losses[0], fitter.losses[-1]
    report.updates = fitter.updates()
    report.blocks.sort(key=lambda b: _order(original, b.block))
    report.seconds = time.perf_counter() - start
    return apply_updates(model, report.updates), report


def _fit_blocks(fitter: _Fitter, sites: list[OutputProjection], methods: tuple[str, ...],
                guard: bool, progress: Progress | None) -> list[BlockReconstruction]:
    """Fit every block in order. With ``guard`` (auto), a block whose update raised the
    model's held-out loss (seen on the next pass) is reverted, and that pass redone."""
    records: list[BlockReconstruction] = []
    for i, site in enumerate(sites):
        if progress:
            progress("reconstruct", i, len(sites))
        fit_m, held_m, loss = fitter.collect(site)
        if guard and records and fitter.revert_if_worse(records[-1], loss):
            fit_m, held_m, loss = fitter.collect(site)
        fitter.losses.append(loss)
        records.append(fitter.fit(site, fit_m, held_m, methods))
    loss = fitter.held_loss()
    if guard and fitter.revert_if_worse(records[-1], loss):
        loss = fitter.held_loss()
    fitter.losses.append(loss)
    if progress:
        progress("reconstruct", len(sites), len(sites))
    return records


def held_out_batches(count: int) -> int:
    """Batches held out from ``count``: about 20 %, at least one, none when only one."""
    return 0 if count < 2 else max(1, round(HELD_OUT * count))


def _order(analysis: Analysis, block: str) -> int:
    return [b.name for b in analysis.structure.blocks].index(block)


def _with_outputs(model: onnx.ModelProto, outputs: dict[str, int]) -> onnx.ModelProto:
    """A copy that also returns the tensors ``outputs`` (name -> element type)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    have = {o.name for o in out.graph.output}
    out.graph.output.extend(helper.make_tensor_value_info(n, t, None)
                            for n, t in outputs.items() if n not in have)
    return out


def _original_outputs(model: onnx.ModelProto, sites: list[OutputProjection],
                      batches: list[tuple[Feeds, Feeds]], threads: int) -> list[Feeds]:
    """Per calibration batch, every block's output in the original model."""
    names = {s.output: s.elem_type for s in sites}
    session = make_session(_with_outputs(model, names), threads=threads)
    return [run(session, inputs, list(names)) for inputs, _ in batches]


class _Fitter:
    """The cut model with the projections' weights and biases as inputs, the current
    value of each, and the held-out losses measured so far (``losses[i]``: with the updates
    of the blocks before block i)."""

    def __init__(self, model: onnx.ModelProto, sites: list[OutputProjection],
                 spec: LossSpec, batches: list[tuple[Feeds, Feeds]], targets: list[Feeds],
                 held_out: int, threads: int):
        self.spec = spec
        self.batches = batches
        self.targets = targets
        self.first_held = len(batches) - held_out
        inits = {t.name: t for t in model.graph.initializer}
        names = [n for s in sites for n in (s.weight, s.bias) if n]
        self.start = {n: numpy_helper.to_array(inits[n]) for n in names}
        self.params = dict(self.start)
        fed = onnx.ModelProto()
        fed.CopyFrom(model)
        kept = [t for t in fed.graph.initializer if t.name not in self.start]
        del fed.graph.initializer[:]
        fed.graph.initializer.extend(kept)
        fed.graph.input.extend(helper.make_tensor_value_info(n, inits[n].data_type,
                                                             list(inits[n].dims)) for n in names)
        self.outputs = [o.name for o in model.graph.output]
        extra = {s.input: s.elem_type for s in sites}
        self.fed, self.threads = fed, threads
        self.session = make_session(_with_outputs(fed, extra), threads=threads)
        self.losses: list[float] = []

    def updates(self) -> dict[str, np.ndarray]:
        return {n: v for n, v in self.params.items() if v is not self.start[n]}

    # -- one block ------------------------------------------------------------------------
    def fit(self, site: OutputProjection, fit_m: Moments, held_m: Moments,
            methods: tuple[str, ...]) -> BlockReconstruction:
        """Choose among ``methods``' fits on the held-out moments and apply the choice."""
        problem = Problem(fit_m, self._weight(site), self._bias(site), site.groups)
        keep = candidates(problem, ("none",))[0]
        fits = candidates(problem, methods)
        record = BlockReconstruction(site.block, site.node, "none")
        if not fits:
            record.reason = "no heads or channels known for scales"
            fits = [keep]
        chosen, err = best(fits, held_m)
        variance = max(held_m.yy - float(held_m.sy @ held_m.sy) / max(held_m.n, 1), 1e-30)
        record.applied, record.damping = chosen.method, chosen.damping
        record.error_before = error(held_m, keep) / variance
        record.error_after = err / variance
        record.updated = self._set(site, chosen)
        return record

    def revert_if_worse(self, record: BlockReconstruction, loss: float) -> bool:
        """Undo ``record``'s update when the held-out loss with it (``loss``) is above the
        loss before it; whether it did."""
        if not record.updated or loss <= self.losses[-1]:
            return False
        for name in record.updated:
            self.params[name] = self.start[name]
        record.reason = (f"{record.applied} raised the held-out loss "
                         f"{self.losses[-1]:.4g} -> {loss:.4g}; dropped")
        record.applied, record.updated, record.damping = "none", [], None
        record.error_after = record.error_before
        return True

    # -- runs -----------------------------------------------------------------------------
    def _run(self, inputs: Feeds, extra: list[str]) -> Feeds:
        return run(self.session, {**inputs, **self.params}, self.outputs + extra)

    def _prefix(self, site: OutputProjection):
        """A session of only the nodes ``site``'s projection input depends on."""
        prefix = _with_outputs(self.fed, {site.input: site.elem_type})
        (last,) = [o for o in prefix.graph.output if o.name == site.input]
        del prefix.graph.output[:]
        prefix.graph.output.append(last)
        DropDeadNodes().apply(prefix)
        return make_session(prefix, threads=self.threads)

    def collect(self, site: OutputProjection) -> tuple[Moments, Moments, float]:
        """Moments of the fit and held-out slices for ``site``, and the held-out loss."""
        k, d = self._weight(site).shape
        fit_m, held_m, losses = Moments.zeros(k, d), Moments.zeros(k, d), []
        prefix = self._prefix(site)
        for i, (inputs, feeds) in enumerate(self.batches):
            if i < self.first_held:
                out = run(prefix, {**inputs, **self.params}, [site.input])
                fit_m.add(out[site.input], self.targets[i][site.output])
                continue
            out = self._run(inputs, [site.input])
            held_m.add(out[site.input], self.targets[i][site.output])
            losses.append(numpy_sample_loss(self.spec, out, feeds))
        return fit_m, held_m, float(np.concatenate(losses).mean())

    def held_loss(self) -> float:
        losses = [numpy_sample_loss(self.spec, self._run(inputs, []), feeds)
                  for inputs, feeds in self.batches[self.first_held:]]
        return float(np.concatenate(losses).mean())

    # -- the projection's values ----------------------------------------------------------
    def _weight(self, site: OutputProjection) -> np.ndarray:
        w = self.params[site.weight].astype(np.float64)
        return w.T if site.transposed else w

    def _bias(self, site: OutputProjection) -> np.ndarray | None:
        return None if site.bias is None else self.params[site.bias].astype(np.float64).ravel()

    def _set(self, site: OutputProjection, fit: Fit) -> list[str]:
        """Store ``fit`` as the current value; the names it changed."""
        changed = []
        if fit.method not in ("none", "bias"):
            w = fit.weight.T if site.transposed else fit.weight
            self.params[site.weight] = w.astype(self.start[site.weight].dtype)
            changed.append(site.weight)
        if site.bias is not None and fit.method != "none":
            old = self.start[site.bias]
            self.params[site.bias] = fit.bias.reshape(old.shape).astype(old.dtype)
            changed.append(site.bias)
        return changed
