"""Calibration batches ready for a loss: the inputs, the loss-target feeds, and the original
model's outputs on them (the reference that self-distillation and the quality figure need).

Self-distillation has its minimum at the original model, so its gradient there is zero and
says nothing. Gradient scores then use targets *sampled* from the model's own predictive
distribution (output + Gaussian noise of the output's spread; a class drawn from the
softmax): the mean squared per-sample gradient is then the true Fisher information, i.e.
the curvature of the distillation loss (:meth:`LossBatches.gradient_batches`).
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx

from onnxprune.data import CalibrationData
from onnxprune.errors import OnnxpruneError
from onnxprune.losses import (
    LossSpec,
    Quality,
    numpy_sample_loss,
    quality,
    softmax,
    target_feeds,
    target_name,
)
from onnxprune.runtime import make_session, run_in_parts, with_outputs
from onnxprune.weightstore import model_store

Feeds = dict[str, np.ndarray]
Progress = Callable[[str, int, int], None]


class LossBatches:
    """The calibration data cut into batches of ``(inputs, loss-target feeds)``, with the
    original ``model``'s outputs on every batch; calling it returns the batches.

    ``probes`` (tensor name -> element type) are intermediate tensors of ``model`` kept per
    batch from the same pass (``probed``): reconstruction's targets, without a second run
    of the original."""

    def __init__(self, model: onnx.ModelProto, calib: CalibrationData, spec: LossSpec,
                 batch_size: int, threads: int, seed: int = 0,
                 probes: Mapping[str, int] | None = None, progress: Progress | None = None,
                 part: int | None = None):
        self.spec = spec
        self.seed = seed
        self.part = part   # forward passes run this many samples at a time (None: a batch)
        # maps the calibration inputs to the inputs of the model now scored and evaluated
        # (after a cut that shrank a key/value cache input: that input with the removed
        # heads' entries deleted); None while they fit the model as they are
        self.adapt: Callable[[Feeds], Feeds] | None = None
        outputs = [o.name for o in model.graph.output]
        probes = {n: t for n, t in (probes or {}).items() if n not in outputs}
        session = make_session(with_outputs(model, probes) if probes else model,
                               threads=threads)
        self.batches: list[tuple[Feeds, Feeds]] = []
        self.raw_targets: list[Feeds] = []
        self.reference: list[Feeds] = []
        self.probed: list[Mapping[str, np.ndarray]] = []
        spill = _spill_folder(self, model) if probes else None
        chunks = list(calib.batches(batch_size))
        for n, (inputs, targets) in enumerate(chunks):
            if progress:
                progress("baseline", n, len(chunks))
            values = run_in_parts(session, inputs, part, outputs + list(probes))
            out = {n: values[n] for n in outputs}
            _check_finite(out)
            self.batches.append((inputs, target_feeds(spec, targets, out)))
            self.raw_targets.append(targets)
            self.reference.append(out)
            self.probed.append(values if spill is None else SpilledFeeds(spill, n, values))
        if progress:
            progress("baseline", len(chunks), len(chunks))

    def __call__(self) -> list[tuple[Feeds, Feeds]]:
        if self.adapt is None:
            return self.batches
        return [(self.adapt(inputs), feeds) for inputs, feeds in self.batches]

    def gradient_batches(self) -> list[tuple[Feeds, Feeds]]:
        """The batches to differentiate: task targets as they are; for self-distillation,
        targets sampled from the original model's predictive distribution (seeded)."""
        if not self.spec.distill:
            return self()
        rng = np.random.default_rng(self.seed)
        return [(inputs, sampled_targets(self.spec, reference, rng))
                for (inputs, _), reference in zip(self(), self.reference)]

    def evaluate(self, model: onnx.ModelProto, threads: int = 0,
                 progress: Progress | None = None) -> tuple[float, Quality]:
        """Mean calibration loss and the quality figure of ``model``."""
        session = make_session(model, threads=threads)
        batches = self()
        outputs = []
        for n, (inputs, _) in enumerate(batches):
            if progress:
                progress("evaluate", n, len(batches))
            outputs.append(run_in_parts(session, inputs, self.part))
        if progress:
            progress("evaluate", len(batches), len(batches))
        return self._measure(outputs)

    def evaluate_original(self) -> tuple[float, Quality]:
        """:meth:`evaluate` of the original model, from the outputs kept at loading."""
        return self._measure(self.reference)

    def _measure(self, outputs: list[Feeds]) -> tuple[float, Quality]:
        losses = [numpy_sample_loss(self.spec, out, feeds)
                  for out, (_, feeds) in zip(outputs, self.batches)]
        joined = {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}
        targets = {k: np.concatenate([t[k] for t in self.raw_targets])
                   for k in (self.raw_targets[0] if self.raw_targets else {})}
        reference = {k: np.concatenate([o[k] for o in self.reference]) for k in joined}
        return float(np.concatenate(losses).mean()), quality(self.spec, joined, targets,
                                                             reference)


def _spill_folder(owner: object, model: onnx.ModelProto) -> Path | None:
    """Where a large model's kept tensors wait on disk (beside its weight store, removed
    with ``owner``); None for a model held in memory."""
    store = model_store(model)
    if store is None:
        return None
    folder = Path(tempfile.mkdtemp(prefix="probes-", dir=store.folder))
    weakref.finalize(owner, shutil.rmtree, folder, True)
    return folder


class SpilledFeeds(Mapping[str, np.ndarray]):
    """One batch's tensors kept on disk until read (each read loads that tensor alone): a
    large model's per-block outputs on every calibration batch would otherwise take more
    memory than its weights."""

    def __init__(self, folder: Path, batch: int, values: Feeds):
        self.paths: dict[str, Path] = {}
        for i, (name, value) in enumerate(values.items()):
            self.paths[name] = folder / f"{batch}-{i}.npy"
            try:
                np.save(self.paths[name], value, allow_pickle=False)
            except OSError as exc:
                raise OnnxpruneError(f"cannot keep the calibration pass's block outputs in "
                                     f"{folder} ({exc.strerror or exc}); set TMPDIR to a "
                                     f"folder with room, or pass --reconstruct none") from exc

    def __getitem__(self, name: str) -> np.ndarray:
        return np.load(self.paths[name], allow_pickle=False)

    def __iter__(self) -> Iterator[str]:
        return iter(self.paths)

    def __len__(self) -> int:
        return len(self.paths)


def sampled_targets(spec: LossSpec, outputs: Feeds, rng: np.random.Generator) -> Feeds:
    """Targets drawn from the model's predictive distribution at these outputs."""
    feeds = {}
    for name in spec.outputs:
        y = np.asarray(outputs[name], dtype=np.float32)
        if spec.kind == "ce":
            p = softmax(y).reshape(-1, y.shape[-1]).astype(np.float64)
            draws = [rng.choice(p.shape[1], p=row / row.sum()) for row in p]
            value = np.eye(y.shape[-1], dtype=np.float32)[draws].reshape(y.shape)
        else:
            spread = float(y.std()) or 1.0
            value = y + spread * rng.standard_normal(y.shape).astype(np.float32)
        feeds[target_name(name)] = value
    return feeds


def _check_finite(outputs: Feeds) -> None:
    for name, value in outputs.items():
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            raise OnnxpruneError(f"the model's output {name!r} has NaN or inf on the "
                                 "calibration data")
