"""The reconstruct stage: after the verified cut, re-fit the output projections of the
pruned blocks so that each block's output matches the original model's.

Blocks are taken in topological order; each sees the cut model's real inputs with the
earlier blocks' updates applied. One ONNX Runtime pass of the original collects every
block's output; the cut model (its projections' weights fed as inputs) is cut into
segments, one ending at each block's projection, and the values crossing each cut are kept
per batch, so the fitting walks through the cut model once; only the held-out loss after
each block runs the rest of the graph on the held-out batches.
The last calibration batches (about 20 %) are held out: they choose the damping and the
fit, and measure the model's calibration loss. Under ``auto`` a block keeps its update only
if the held-out loss of the model does not rise with it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper

from onnxprune import weightstore
from onnxprune.batches import Feeds, LossBatches
from onnxprune.errors import OnnxpruneError
from onnxprune.losses import LossSpec, numpy_sample_loss
from onnxprune.memory import release_memory
from onnxprune.reconstruct.outcome import MODES, BlockReconstruction, ReconstructionReport
from onnxprune.reconstruct.segments import Segments
from onnxprune.reconstruct.sites import OutputProjection, find_projections
from onnxprune.reconstruct.solve import Fit, Moments, Problem, best, candidates, error, fits
from onnxprune.reconstruct.updates import apply_updates
from onnxprune.runtime import make_session, run, with_outputs
from onnxprune.structure.discover import Analysis
from onnxprune.weightstore import model_store, release_pages, tensor_array

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
        report.note = ("every pruned block's projection was skipped (reasons per block)"
                       if not projections and skipped else
                       "no block was cut by heads or channels" if not projections else
                       "one calibration batch leaves no held-out slice: use more samples "
                       "or a smaller batch size")
        report.seconds = time.perf_counter() - start
        return model, report
    targets = _original_outputs(original.model, projections, data, threads)
    release_memory()   # the original's weights: only the cut's are read from here on
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
        fit_m, held_m, loss = fitter.collect(i, site)
        if guard and records and fitter.revert_if_worse(records[-1], loss):
            fit_m, held_m, loss = fitter.collect(i, site)
        release_pages()   # the passes read every later block's weights; the solve reads none
        fitter.losses.append(loss)
        records.append(fitter.fit(site, fit_m, held_m, methods))
        fitter.next_block()
    loss = fitter.held_loss(len(sites))
    if guard and fitter.revert_if_worse(records[-1], loss):
        loss = fitter.held_loss(len(sites))
    fitter.losses.append(loss)
    if progress:
        progress("reconstruct", len(sites), len(sites))
    return records


def held_out_batches(count: int) -> int:
    """Batches held out from ``count``: about 20 %, at least one, none when only one."""
    return 0 if count < 2 else max(1, round(HELD_OUT * count))


def _order(analysis: Analysis, block: str) -> int:
    return [b.name for b in analysis.structure.blocks].index(block)


def _original_outputs(model: onnx.ModelProto, sites: list[OutputProjection],
                      data: LossBatches, threads: int) -> list[Feeds]:
    """Per calibration batch, every block's output in the original model: those the
    calibration pass kept (``data.probed``), else from a pass of their own."""
    names = {s.output: s.elem_type for s in sites}
    if all(n in probed for probed in data.probed for n in names):
        return data.probed
    session = make_session(with_outputs(model, names), threads=threads)
    return [run(session, inputs, list(names)) for inputs, _ in data.batches]


class _Fitter:
    """The cut model with the projections' weights and biases as inputs, the current
    value of each, and the held-out losses measured so far (``losses[i]``: with the updates
    of the blocks before block i).

    The graph is cut before each projection (:class:`Segments`); ``before`` holds, per
    batch, the values crossing the cut before the block being fitted, ``at`` those at its
    own projection, so each block costs one segment of the graph, not a pass."""

    def __init__(self, model: onnx.ModelProto, sites: list[OutputProjection],
                 spec: LossSpec, batches: list[tuple[Feeds, Feeds]], targets: list[Feeds],
                 held_out: int, threads: int):
        self.spec = spec
        self.labels = [feeds for _, feeds in batches]
        self.targets = targets
        self.first_held = len(batches) - held_out
        inits = {t.name: t for t in model.graph.initializer}
        self.store = model_store(model)
        names = [n for s in sites for n in (s.weight, s.bias) if n]
        self.start = {n: tensor_array(inits[n]) for n in names}   # read-only: replaced
        self.params = dict(self.start)
        fed = onnx.ModelProto()
        fed.CopyFrom(model)
        kept = [t for t in fed.graph.initializer if t.name not in self.start]
        del fed.graph.initializer[:]
        fed.graph.initializer.extend(kept)
        fed.graph.input.extend(helper.make_tensor_value_info(n, inits[n].data_type,
                                                             list(inits[n].dims)) for n in names)
        self.segments = Segments(fed, [s.node for s in sites], set(names), threads)
        self.before: list[Feeds] = [dict(inputs) for inputs, _ in batches]
        self.at: list[Feeds] = []
        self.losses: list[float] = []

    def updates(self) -> dict[str, np.ndarray]:
        return {n: v for n, v in self.params.items() if v is not self.start[n]}

    # -- one block ------------------------------------------------------------------------
    def fit(self, site: OutputProjection, fit_m: Moments, held_m: Moments,
            methods: tuple[str, ...]) -> BlockReconstruction:
        """Choose among ``methods``' fits on the held-out moments and apply the choice."""
        problem = Problem(fit_m, self._weight(site), self._bias(site), site.groups)
        keep = candidates(problem, ("none",))[0]
        record = BlockReconstruction(site.block, site.node, "none")
        found = best(fits(problem, methods), held_m)
        if found is None:
            record.reason = "no heads or channels known for scales"
            found = keep, error(held_m, keep)
        chosen, err = found
        variance = max(held_m.yy - float(held_m.sy @ held_m.sy) / max(held_m.n, 1), 1e-30)
        record.applied, record.damping = chosen.method, chosen.damping
        record.error_before = error(held_m, keep) / variance
        record.error_after = err / variance
        record.updated = self._set(site, chosen)
        return record

    def _held(self, name: str, value: np.ndarray) -> np.ndarray:
        """A new weight as the fitter keeps it: for a model in a weight store, a view of
        the store (a large decoder's re-fitted projections would otherwise pile up in
        memory until they are written)."""
        if self.store is None or value.nbytes < weightstore.TENSOR_MIN_BYTES:
            return value
        return self.store.array(self.store.put_array(name, value))

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
    def collect(self, i: int, site: OutputProjection) -> tuple[Moments, Moments, float]:
        """Run every batch through segment ``i`` (to ``site``'s projection): the moments of
        the fit and held-out slices for ``site``, and the held-out loss of the model."""
        k, d = self._weight(site).shape
        fit_m, held_m = Moments.zeros(k, d), Moments.zeros(k, d)
        self.at = [self.segments.advance(i, values, self.params) for values in self.before]
        for b, values in enumerate(self.at):
            (fit_m if b < self.first_held else held_m).add(values[site.input],
                                                           self.targets[b][site.output])
        return fit_m, held_m, self.held_loss(i + 1)

    def next_block(self) -> None:
        self.before = self.at

    def held_loss(self, segment: int) -> float:
        """The model's loss on the held-out batches, from the values at the start of
        ``segment`` (``at``) with the current weights."""
        losses = [numpy_sample_loss(self.spec, self.segments.finish(segment, values,
                                                                    self.params), labels)
                  for values, labels in zip(self.at[self.first_held:],
                                            self.labels[self.first_held:])]
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
            self.params[site.weight] = self._held(site.weight,
                                                  w.astype(self.start[site.weight].dtype))
            changed.append(site.weight)
        if site.bias is not None and fit.method != "none":
            old = self.start[site.bias]
            self.params[site.bias] = fit.bias.reshape(old.shape).astype(old.dtype)
            changed.append(site.bias)
        return changed
