"""Recovery fine-tuning inside ONNX Runtime: no training framework, no source model.

The chosen weights become graph inputs, the loss is appended (losses.py), onnx-ad builds the
reverse-mode graph of the loss with respect to those inputs once, and every step is one
ONNX Runtime run of it followed by an AdamW update in numpy (decoupled weight decay, linear
warm-up, cosine decay, global-norm clipping). The validation loss picks the best weights
(early stopping); a NaN loss stops the run and keeps the last good weights. The result is
the model with the trained weights written back as initializers.

``onnxprune.finetune(model, train, val, steps=100)`` (the module is callable: it runs
:func:`finetune`) takes files or :class:`~onnxprune.data.CalibrationData`; :func:`fit` is
the same on loaded data with :class:`FinetuneOptions`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxprune.autodiff import declare_static_shapes, freeze_shape_operands, gradient_graph
from onnxprune.callable_module import make_callable
from onnxprune.data import CalibrationData, load_or_synthesise, static_batch
from onnxprune.errors import OnnxpruneError
from onnxprune.losses import SAMPLE_LOSS, TOTAL_LOSS, LossSpec, choose_loss, target_feeds, with_loss
from onnxprune.modelio import load_model
from onnxprune.runtime import make_session, run
from onnxprune.tracing import trace
from onnxprune.weightstore import tensor_array

TRAINABLE = ("all", "norms", "blocks")
Progress = Callable[[str, int, int], None] | None


@dataclass
class FinetuneOptions:
    epochs: int | None = None
    steps: int | None = None
    lr: float = 1e-4
    batch_size: int = 32
    weight_decay: float = 0.01
    warmup: float = 0.05          # fraction of the steps
    clip: float = 1.0             # global gradient norm (0 = off)
    patience: int = 3             # validations without improvement before stopping
    eval_every: int | None = None  # steps between validations (default: once per epoch)
    trainable: str = "all"        # all | norms (1-D: norms and biases) | blocks (given names)
    names: tuple[str, ...] = ()   # initializers for trainable="blocks"
    loss: str | None = None
    seed: int = 0
    threads: int = 0

    def check(self) -> None:
        if (self.epochs is None) == (self.steps is None):
            raise OnnxpruneError("give exactly one of --epochs or --steps")
        if (self.epochs or self.steps or 0) < 1:
            raise OnnxpruneError("--epochs/--steps must be at least 1")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise OnnxpruneError(f"--lr {self.lr}: must be a positive number")
        if self.batch_size < 1:
            raise OnnxpruneError(f"--batch-size {self.batch_size}: must be at least 1")
        if self.trainable not in TRAINABLE:
            raise OnnxpruneError(f"--train-only {self.trainable!r}: choose one of "
                                 f"{', '.join(TRAINABLE)}")


@dataclass
class FinetuneResult:
    model: onnx.ModelProto
    steps: int
    best_step: int
    train_loss: list[float]
    val_loss: list[tuple[int, float]]
    stopped: str
    seconds: float
    trainable: int                # number of trained parameters
    notes: list[str] = field(default_factory=list)


def trainable_weights(model: onnx.ModelProto, opts: FinetuneOptions) -> list[str]:
    """Float initializers to train: all of them with more than one element, the 1-D ones
    (norm scales and biases), or the named ones."""
    floats = [t for t in model.graph.initializer
              if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
              and int(np.prod(t.dims)) > 1]
    consumed = {name for node in model.graph.node for name in node.input}
    floats = [t for t in floats if t.name in consumed]
    if opts.trainable == "norms":
        return [t.name for t in floats if len(t.dims) == 1]
    if opts.trainable == "blocks":
        wanted = set(opts.names)
        return [t.name for t in floats if t.name in wanted]
    return [t.name for t in floats]


def flatten_weight_matmuls(model: onnx.ModelProto, weights: set[str]) -> None:
    """X[..., K] @ W[K, N] → reshape(reshape(X, [-1, K]) @ W, [..., N]): the weight gradient
    is then one matmul instead of a batched outer product summed over the batch. In place."""
    inits = {t.name: t for t in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        init = inits.get(node.input[1]) if node.op_type == "MatMul" else None
        if init is None or node.input[1] not in weights or len(init.dims) != 2:
            nodes.append(node)
            continue
        x, w, y = node.input[0], node.input[1], node.output[0]
        base = f"{y}.flat"
        k = init.dims[0]
        model.graph.initializer.extend([
            numpy_helper.from_array(np.array([-1, k], np.int64), f"{base}.rows"),
            numpy_helper.from_array(np.array([0], np.int64), f"{base}.zero"),
            numpy_helper.from_array(np.array([-1], np.int64), f"{base}.last"),
        ])
        nodes += [
            helper.make_node("Reshape", [x, f"{base}.rows"], [f"{base}.x2"]),
            helper.make_node("MatMul", [f"{base}.x2", w], [f"{base}.y2"], name=node.name),
            helper.make_node("Shape", [x], [f"{base}.xshape"]),
            helper.make_node("Slice", [f"{base}.xshape", f"{base}.zero", f"{base}.last"],
                             [f"{base}.lead"]),
            helper.make_node("Shape", [f"{base}.y2"], [f"{base}.yshape"]),
            helper.make_node("Slice", [f"{base}.yshape", f"{base}.last",
                                       numpy_name(model, f"{base}.end", np.array(
                                           [np.iinfo(np.int64).max], np.int64))],
                             [f"{base}.n"]),
            helper.make_node("Concat", [f"{base}.lead", f"{base}.n"], [f"{base}.shape"],
                             axis=0),
            helper.make_node("Reshape", [f"{base}.y2", f"{base}.shape"], [y]),
        ]
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def numpy_name(model: onnx.ModelProto, name: str, value: np.ndarray) -> str:
    model.graph.initializer.append(numpy_helper.from_array(value, name))
    return name


class Trainer:
    """The training graph and session; weights live in numpy and are fed each run."""

    def __init__(self, model: onnx.ModelProto, spec: LossSpec, names: list[str],
                 threads: int, example: dict[str, np.ndarray], batch: int):
        self.spec = spec
        self.weights = {t.name: tensor_array(t).astype(np.float32)
                        for t in model.graph.initializer if t.name in set(names)}
        work = onnx.ModelProto()
        work.CopyFrom(model)
        flatten_weight_matmuls(work, set(names))
        # onnx-ad needs constant slice bounds and static slice shapes: read both from
        # traces at batch 1 and 2 (a batch baked into the graph: at that batch only), and
        # build the graph for the training batch size
        if static_batch(model):
            one = two = trace(work, {k: v[:batch] for k, v in example.items()})
        else:
            one, two = (trace(work, {k: v[:n] for k, v in example.items()}) for n in (1, 2))
        freeze_shape_operands(work, one, two)
        kept = [t for t in work.graph.initializer if t.name not in self.weights]
        del work.graph.initializer[:]
        work.graph.initializer.extend(kept)
        for name, value in self.weights.items():
            work.graph.input.append(helper.make_tensor_value_info(
                name, onnx.TensorProto.FLOAT, list(value.shape)))
        _cast_half_weights(work, {t.name: t.data_type for t in model.graph.initializer
                                  if t.name in self.weights})
        lossy = with_loss(work, spec)
        self.eval_session = make_session(lossy, threads=threads)
        # static slice shapes only in the training graph: it runs at one batch size
        declare_static_shapes(lossy, one, two, batch)
        self.graph = gradient_graph(lossy, list(self.weights), TOTAL_LOSS)
        self.session = make_session(self.graph.model, threads=threads, arena=False)
        self.outputs = [SAMPLE_LOSS, *self.graph.gradients.values()]

    def step(self, inputs: dict, targets: dict) -> tuple[float, dict[str, np.ndarray]]:
        feeds = {**inputs, **targets, **self.weights, self.graph.seed: self.graph.seed_value()}
        values = run(self.session, feeds, self.outputs)
        n = len(values[SAMPLE_LOSS])
        grads = {w: values[self.graph.gradients[w]][..., 0] / n for w in self.weights}
        return float(values[SAMPLE_LOSS].mean()), grads

    def loss(self, batches: list[tuple[dict, dict]]) -> float:
        total, count = 0.0, 0
        for inputs, targets in batches:
            losses = run(self.eval_session, {**inputs, **targets, **self.weights},
                         [SAMPLE_LOSS])[SAMPLE_LOSS]
            total += float(losses.astype(np.float64).sum())
            count += len(losses)
        return total / max(count, 1)


def _cast_half_weights(model: onnx.ModelProto, types: dict[str, int]) -> None:
    """Trained weights are float32 inputs (the optimiser's master copy); where the model
    holds one in another type (float16), its readers get it through a Cast to that type, so
    the graph computes as the model does. In place."""
    half = {name: t for name, t in types.items() if t != onnx.TensorProto.FLOAT}
    if not half:
        return
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in half:
                node.input[i] = f"{name}.cast"
    casts = [helper.make_node("Cast", [name], [f"{name}.cast"], name=f"{name}.cast", to=t)
             for name, t in half.items()]
    nodes = casts + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)


class AdamW:
    def __init__(self, params: dict[str, np.ndarray], lr: float, weight_decay: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.lr, self.wd, self.betas, self.eps = lr, weight_decay, betas, eps
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}
        self.t = 0

    def update(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray],
               lr: float) -> None:
        self.t += 1
        b1, b2 = self.betas
        for name, g in grads.items():
            p = params[name]
            self.m[name] = b1 * self.m[name] + (1 - b1) * g
            self.v[name] = b2 * self.v[name] + (1 - b2) * g * g
            m_hat = self.m[name] / (1 - b1 ** self.t)
            v_hat = self.v[name] / (1 - b2 ** self.t)
            decay = self.wd if p.ndim > 1 else 0.0   # no decay on norms and biases
            p -= lr * (m_hat / (np.sqrt(v_hat) + self.eps) + decay * p)


def schedule(step: int, total: int, peak: float, warmup: float) -> float:
    """Linear warm-up to ``peak``, then cosine decay to 0."""
    warm = max(1, round(warmup * total))
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return peak * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _batches(model: onnx.ModelProto, data: CalibrationData, spec: LossSpec,
             batch_size: int, order: np.ndarray | None = None) -> list[tuple[dict, dict]]:
    if order is not None:
        data = CalibrationData({k: v[order] for k, v in data.inputs.items()},
                               {k: v[order] for k, v in data.targets.items()},
                               data.source, data.data_free, data.fixed_batch)
    out = []
    for inputs, targets in data.batches(batch_size):
        shapes = {k: v for k, v in targets.items()}
        out.append((inputs, target_feeds(spec, targets, _output_like(model, shapes))))
    return out


def _output_like(model: onnx.ModelProto, targets: dict) -> dict:
    """Stand-ins for the outputs target_feeds reads the class count from (ce)."""
    out = {}
    for o in model.graph.output:
        dims = [d.dim_value for d in o.type.tensor_type.shape.dim]
        if o.name in targets and dims and dims[-1] > 0:
            out[o.name] = np.zeros((1, dims[-1]), np.float32)
    return out


def finetune(model: onnx.ModelProto | str | os.PathLike,
             train: str | os.PathLike | CalibrationData,
             val: str | os.PathLike | CalibrationData | None = None, *,
             trainable: str = "all", names: tuple[str, ...] = (), progress: Progress = None,
             **options) -> FinetuneResult:
    """Recovery fine-tuning of ``model`` on ``train`` (a file is read at its train split),
    the best weights picked on ``val`` (read at its validation split); ``options`` are
    :class:`FinetuneOptions` fields (``steps`` or ``epochs``, ``lr``, ...)."""
    model = model if isinstance(model, onnx.ModelProto) else load_model(model)
    opts = FinetuneOptions(trainable=trainable, names=tuple(names), **options)
    opts.check()
    train_data = load_or_synthesise(model, train, seed=opts.seed, split="train")
    val_data = None if val is None else load_or_synthesise(model, val, seed=opts.seed,
                                                           split="val")
    return fit(model, train_data, val_data, opts, progress)


def fit(model: onnx.ModelProto, train: CalibrationData, val: CalibrationData | None,
        opts: FinetuneOptions, progress: Progress = None) -> FinetuneResult:
    """Fine-tune on loaded data: AdamW steps in ONNX Runtime, the best weights on ``val``."""
    opts.check()
    start = time.perf_counter()
    if not train.targets:
        raise OnnxpruneError("fine-tuning needs targets: the training data has none")
    spec = choose_loss(model, train.targets, opts.loss)
    names = trainable_weights(model, opts)
    if not names:
        raise OnnxpruneError(f"no trainable weights for --train-only {opts.trainable}")
    batch = train.fixed_batch or min(opts.batch_size, train.n_samples)
    example = {k: v[:max(batch, 2)] for k, v in train.inputs.items()}
    trainer = Trainer(model, spec, names, opts.threads, example, batch)
    steps_per_epoch = max(1, train.n_samples // batch)
    total = opts.steps or opts.epochs * steps_per_epoch
    eval_every = opts.eval_every or min(steps_per_epoch, total)
    val_batches = _batches(model, val, spec, 256) if val is not None else None
    optimizer = AdamW(trainer.weights, opts.lr, opts.weight_decay)
    rng = np.random.default_rng(opts.seed)
    best = {k: v.copy() for k, v in trainer.weights.items()}
    best_loss = trainer.loss(val_batches) if val_batches else math.inf
    val_history = [(0, best_loss)] if val_batches else []
    best_step, bad, stopped, history = 0, 0, "", []
    queue: list = []
    for step in range(total):
        if not queue:
            queue = _batches(model, train, spec, batch, rng.permutation(train.n_samples))
            queue = [b for b in queue if len(next(iter(b[0].values()))) == batch]
        inputs, targets = queue.pop(0)
        loss, grads = trainer.step(inputs, targets)
        if not math.isfinite(loss) or not all(np.isfinite(g).all() for g in grads.values()):
            stopped = (f"loss became {loss} at step {step + 1}: stopped, kept the last good "
                       "weights (lower --lr)")
            trainer.weights.update({k: v.copy() for k, v in best.items()})
            break
        history.append(loss)
        _clip(grads, opts.clip)
        optimizer.update(trainer.weights, grads, schedule(step, total, opts.lr, opts.warmup))
        if progress:
            progress(f"finetune loss {loss:.4g}", step + 1, total)
        if (step + 1) % eval_every == 0 or step + 1 == total:
            current = trainer.loss(val_batches) if val_batches else loss
            if val_batches:
                val_history.append((step + 1, current))
            if current < best_loss or not val_batches:
                best_loss, best_step, bad = current, step + 1, 0
                best = {k: v.copy() for k, v in trainer.weights.items()}
            else:
                bad += 1
                if bad >= opts.patience:
                    stopped = f"early stop at step {step + 1}: validation loss did not improve"
                    break
    trained = with_weights(model, best)
    n_params = int(sum(v.size for v in best.values()))
    return FinetuneResult(trained, len(history), best_step, history, val_history, stopped,
                          time.perf_counter() - start, n_params)


def _clip(grads: dict[str, np.ndarray], limit: float) -> None:
    if limit <= 0:
        return
    norm = math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads.values()))
    if norm > limit:
        for g in grads.values():
            g *= limit / norm


def with_weights(model: onnx.ModelProto, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` with these initializer values."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        if init.name in weights:
            value = weights[init.name].astype(tensor_array(init).dtype)
            init.CopyFrom(numpy_helper.from_array(value, init.name))
    return out


make_callable(__name__, finetune)
