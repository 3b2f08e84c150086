"""Gradient scoring over Ray workers (``--workers N`` / ``--ray-address ADDR``).

The calibration batches are cut into contiguous shards, one Ray task each. A task gets the
model scored (its bytes, put once in the object store), the input shapes it was analysed at,
the loss, the unit kinds, and its shard: per batch the inputs, the loss targets (sampled on
the driver for self-distillation, so they do not depend on the sharding), the sketch's random
signs and the number of samples before the batch. It analyses the model and builds its own
gradient graph and ONNX Runtime session (:class:`~onnxprune.scores.gradient.GradientPass`),
and streams back one :class:`~onnxprune.scores.gradient.BatchSums` per batch as it is scored:
sums of g, g², |g| per unit, the sketch rows the batch adds to. The driver adds them in batch
order, exactly as the single process does, so the scores are identical to a single-process
run; results of later shards wait in the object store, not in the driver's memory.

Ray is optional (``pip install 'onnxprune[ray]'``); nothing here imports it until a cluster
is used. Only gradient scores (fisher, lim, taylor, send) are distributed; the others
(ablation, stat, magnitude, random) run on the driver.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx

from onnxprune.autodiff import NoGradientError
from onnxprune.errors import OnnxpruneError
from onnxprune.scores.gradient import BatchSums, GradientPass, GradientStatistic, batch_sums
from onnxprune.structure.discover import analyse
from onnxprune.units import UnitKind, unit_kind
from onnxprune.weightstore import materialised, offload, store_of

if TYPE_CHECKING:
    from onnxprune.losses import LossSpec
    from onnxprune.structure.discover import Analysis

MISSING_RAY = "--workers needs ray: pip install 'onnxprune[ray]'"

Batch = tuple[dict, dict]


def require_ray():
    """The ``ray`` module, or the one-line error that says how to get it."""
    try:
        return importlib.import_module("ray")
    except ImportError:
        raise OnnxpruneError(MISSING_RAY) from None


def check_cluster(workers: int | None, address: str | None) -> RayCluster | None:
    """The cluster the options ask for (None: score in this process); raises when they are
    invalid or ray is not installed."""
    if workers is not None and workers < 0:
        raise OnnxpruneError(f"--workers {workers}: must be at least 1")
    if not workers and not address:
        return None
    require_ray()
    return RayCluster(int(workers or 0), address or None)


@dataclass(frozen=True)
class RayCluster:
    """Where the gradient batches run: ``workers`` Ray tasks (0: one per CPU of the cluster)
    on the cluster at ``address`` (None: a local cluster started by ``ray.init()``, or the one
    this process already joined)."""

    workers: int = 0
    address: str | None = None

    def connect(self, cpus: int):
        ray = require_ray()
        if not ray.is_initialized():
            options = {"include_dashboard": False, "logging_level": logging.ERROR,
                       "log_to_driver": False}
            if self.address:
                try:
                    ray.init(address=self.address, **options)
                except (ConnectionError, RuntimeError, ValueError) as exc:
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                    raise OnnxpruneError(f"--ray-address {self.address}: cannot join the Ray "
                                         f"cluster: {first or type(exc).__name__}") from None
            else:   # a local cluster wide enough for every worker at once
                ray.init(num_cpus=max(os.cpu_count() or 1, self.workers * cpus), **options)
        return ray

    def gradient_sums(self, analysis: Analysis, spec: LossSpec, kinds: set[UnitKind],
                      send: bool, threads: int, acc: GradientStatistic,
                      batches: Sequence[Batch],
                      progress: Callable[[int, int], None] | None = None
                      ) -> Iterator[BatchSums]:
        """Every batch's contribution, in batch order, computed by the workers."""
        cpus = threads or 1
        ray = self.connect(cpus)
        workers = self.workers or max(1, int(ray.cluster_resources().get("CPU", 1)) // cpus)
        offsets = np.cumsum([0] + [_size(inputs) for inputs, _ in batches])
        signs = [acc.signs(_size(inputs)) for inputs, _ in batches]   # in batch order
        model = ray.put(_model_bytes(analysis))
        stored = [t.name for t in analysis.model.graph.initializer if store_of(t) is not None]
        task = ray.remote(num_cpus=cpus, max_retries=0, num_returns="streaming")(score_shard)
        shards = [s for s in np.array_split(np.arange(len(batches)), workers) if len(s)]
        streams = [task.remote(model, dict(analysis.structure.input_shapes), spec,
                               sorted(k.key for k in kinds), send, cpus, acc.sketch,
                               [(*batches[i], signs[i], int(offsets[i])) for i in shard],
                               stored)
                   for shard in shards]
        wanted = list(acc.gates)
        done = 0
        try:
            # shard by shard, batch by batch as each arrives: the driver adds the batches in
            # the order one process would (later shards wait in the object store)
            for stream in streams:
                gates = ray.get(next(stream))
                if gates != wanted:
                    raise OnnxpruneError(f"a Ray worker gated the model differently: "
                                         f"{gates[:3]} vs {wanted[:3]} (different onnxprune "
                                         "versions on the cluster?)")
                for ref in stream:
                    part = ray.get(ref)
                    if isinstance(part, str):
                        raise NoGradientError(part)
                    yield part
                    done += 1
                    if progress:
                        progress(done, len(batches))
        finally:   # an error or an interrupt: stop the shards still running
            if done < len(batches):
                for stream in streams:
                    ray.cancel(stream, force=True)


def score_shard(model: bytes, shapes: dict[str, tuple[int, ...]], spec: LossSpec,
                kinds: list[str], send: bool, threads: int, sketch: bool,
                shard: list[tuple[dict, dict, np.ndarray, int]], stored: Sequence[str] = ()
                ) -> Iterator[list[str] | BatchSums | str]:
    """A Ray task (a streaming generator): the gate inputs, then one ``BatchSums`` per batch
    of the shard as it is scored, or the reason the model cannot be differentiated (the
    driver falls back to forward-only scores). The weights the driver held in a weight
    store (``stored``) go into one of the worker's own, so that its sessions compute as
    the driver's do, bit for bit."""
    proto = onnx.load_from_string(model)
    del model
    store = offload(proto, 0, names=set(stored)) if stored else None
    analysis = analyse(proto, shapes)
    grad = GradientPass(analysis, spec, {unit_kind(k) for k in kinds}, threads, send=send)
    yield [g.input for g in grad.gates]
    try:
        for inputs, targets, signs, offset in shard:
            _, grads = grad(inputs, targets)
            yield batch_sums(grads, signs, offset, sketch)
    except NoGradientError as exc:
        yield str(exc)
    finally:
        if store is not None:
            store.close()


def _model_bytes(analysis: Analysis) -> bytes:
    """The model as workers load it: a weight store's stubs filled in (a worker may run on
    another machine)."""
    try:
        return materialised(analysis.model).SerializeToString()
    except ValueError as exc:   # protobuf's 2 GB limit
        raise OnnxpruneError(f"--workers: the model cannot be sent to Ray workers ({exc}); "
                             "score models over 2 GB without --workers for now") from None


def _size(inputs: dict) -> int:
    return len(next(iter(inputs.values())))
