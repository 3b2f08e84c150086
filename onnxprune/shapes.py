"""A model's input signature, and every concrete input shape the stages run it at.

This is the one place that turns dynamic dims into sizes:

- :meth:`InputSpec.concrete`: the signature plus ``--shape`` overrides (checked against the
  static dims); dynamic dims nobody gave take a default (1);
- :func:`partial_dims`: static dims and overridden dynamic ones, None where still unknown
  (what a time-series file needs to cut its windows);
- :func:`check_synthesisable`: refuses to synthesise data for non-batch dims nobody gave;
- :func:`analysis_shapes`: the shapes the structure is traced at (the overrides, else the
  calibration data's at batch 1);
- :func:`verification_shapes`: the analysis shapes at another batch size, which proves that
  dynamic dims survive a cut;
- :func:`doubled_batch_feeds`: the analysis feeds with a dynamic batch doubled, which shows
  the axis of each tensor that carries the batch;
- :func:`batch_shapes`: the shapes at a given batch size (the benchmark).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from onnxprune.errors import OnnxpruneError

Shapes = dict[str, tuple[int, ...]]
Overrides = Mapping[str, tuple[int, ...]] | None

_NP_TYPES = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.BOOL: np.bool_,
    onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.INT8: np.int8,
}


@dataclass(frozen=True)
class InputSpec:
    """A graph input: name, element type and dims (int, or str for a named dynamic dim)."""

    name: str
    dtype: type
    dims: tuple[int | str, ...]

    def concrete(self, overrides: Overrides = None, dynamic: int = 1) -> tuple[int, ...]:
        """The override for this input (it must fit the static dims), else the declared
        dims with every dynamic one set to ``dynamic``."""
        if overrides and self.name in overrides:
            shape = tuple(int(d) for d in overrides[self.name])
            _check_rank(f"--shape {self.name}: {len(shape)} dims given", self.dims, shape)
            if any(isinstance(want, int) and want != got for got, want in zip(shape, self.dims)):
                raise OnnxpruneError(
                    f"--shape {self.name}: {shape} conflicts with the static shape {self.dims}")
            return shape
        return tuple(d if isinstance(d, int) else dynamic for d in self.dims)

    @property
    def is_dynamic(self) -> bool:
        return any(not isinstance(d, int) for d in self.dims)

    @property
    def dynamic_batch(self) -> bool:
        """Whether the leading (batch) dim is dynamic."""
        return bool(self.dims) and not isinstance(self.dims[0], int)


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The model's real inputs (initializers listed as inputs by old exporters are skipped)."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        ttype = vi.type.tensor_type
        dims: list[int | str] = []
        for i, d in enumerate(ttype.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(d.dim_value)
            else:
                dims.append(d.dim_param or f"{vi.name}_dim{i}")
        specs.append(InputSpec(vi.name, _NP_TYPES.get(ttype.elem_type, np.float32), tuple(dims)))
    return specs


def concrete_shapes(specs: list[InputSpec], overrides: Overrides = None,
                    dynamic: int = 1) -> Shapes:
    """Every input's :meth:`InputSpec.concrete` shape."""
    return {spec.name: spec.concrete(overrides, dynamic) for spec in specs}


def partial_dims(label: str, dims: tuple[int | str, ...], given: tuple[int, ...] | None
                 ) -> list[int | None]:
    """Static dims, dynamic ones from ``given`` (None where still unknown). The leading
    (sample) dim of ``given`` may differ from a static batch; ``label`` starts the errors
    ("data.csv: shape (1, 9) given for model input x")."""
    if given is None:
        return [d if isinstance(d, int) else None for d in dims]
    _check_rank(f"{label} has {len(given)} dims", dims, given)
    if any(isinstance(d, int) and i > 0 and given[i] != d for i, d in enumerate(dims)):
        raise OnnxpruneError(f"{label} conflicts with its static shape {format_dims(dims)}")
    return [d if isinstance(d, int) else int(given[i]) for i, d in enumerate(dims)]


def complete_shapes(specs: list[InputSpec], overrides: Overrides = None) -> Shapes | None:
    """``overrides`` plus the shape of every other input whose dynamic dims are all named
    by a given one: ``--shape input_ids:1,128`` settles ``attention_mask[batch, seq]``."""
    if not overrides:
        return None
    named: dict[str, int] = {}
    for spec in specs:
        if spec.name in overrides:
            for dim, size in zip(spec.dims, overrides[spec.name]):
                if isinstance(dim, str) and dim:
                    named.setdefault(dim, int(size))
    out = dict(overrides)
    for spec in specs:
        if spec.name not in out and spec.dims and all(
                isinstance(d, int) or d in named for d in spec.dims):
            out[spec.name] = tuple(d if isinstance(d, int) else named[d] for d in spec.dims)
    return out


def check_synthesisable(specs: list[InputSpec], overrides: Overrides = None) -> None:
    """Raise for an input whose non-batch dims are dynamic and not given: synthetic data of
    a guessed size would score the model at a size it never runs at."""
    for spec in specs:
        loose = [d for d in spec.dims[1:] if not isinstance(d, int)]
        if loose and spec.name not in (overrides or {}):
            raise OnnxpruneError(
                f"input {spec.name!r} has dynamic dims {loose} besides the batch: without "
                f"--calib give its shape for the synthetic inputs, e.g. --shape "
                f"{spec.name}:1,{','.join('128' for _ in loose)}")


def analysis_shapes(specs: list[InputSpec], inputs: Mapping[str, np.ndarray],
                    overrides: Overrides = None) -> Shapes:
    """The shapes to analyse at: the overrides when given, else the shapes of the
    calibration ``inputs`` at batch 1 (a static batch stays), so dynamic sequence lengths
    are traced as they will be scored."""
    if overrides:
        return dict(overrides)
    out = {}
    for spec in specs:
        array = inputs.get(spec.name)
        if array is None:
            continue
        dims = [d if isinstance(d, int) else int(n) for d, n in zip(spec.dims, array.shape)]
        if spec.dynamic_batch:
            dims[0] = 1
        out[spec.name] = tuple(dims)
    return out


def verification_shapes(specs: list[InputSpec], analysed: Mapping[str, tuple[int, ...]]
                        ) -> Shapes:
    """The ``analysed`` shapes with a dynamic batch set to 2 (3 when it was 2): a size the
    analysis did not trace proves that dynamic dims survive a cut."""
    shapes = dict(analysed)
    for spec in specs:
        if spec.dynamic_batch:
            shape = list(shapes[spec.name])
            shape[0] = 2 if shape[0] != 2 else 3
            shapes[spec.name] = tuple(shape)
    return shapes


def doubled_batch_feeds(specs: list[InputSpec], first: Mapping[str, np.ndarray],
                        extra: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Feeds with every dynamic batch doubled: ``first`` (the analysis feeds) followed by
    ``extra`` (other inputs of the same shapes); inputs with a static batch stay ``first``.
    Comparing a trace of these with the analysis trace shows which axis of each tensor
    carries the batch, and in which order its rows are."""
    return {spec.name: (np.concatenate([np.asarray(first[spec.name]), extra[spec.name]])
                        if spec.dynamic_batch else np.asarray(first[spec.name]))
            for spec in specs}


def batch_shapes(specs: list[InputSpec], batch: int, overrides: Overrides, where: str
                 ) -> Shapes:
    """Shapes at ``batch``: the batch dim set (a static one must equal it), other dynamic
    dims from ``overrides`` (their batch entry is replaced), else 1."""
    out = {}
    for spec in specs:
        shape = list(spec.concrete(overrides))
        if spec.dims and not spec.dynamic_batch and spec.dims[0] != batch:
            raise OnnxpruneError(f"{where}: input {spec.name} has a static batch of "
                                 f"{spec.dims[0]} {list(spec.dims)}; cannot run it at batch "
                                 f"{batch}")
        if spec.dims:
            shape[0] = batch
        out[spec.name] = tuple(shape)
    return out


def memory_bytes() -> int:
    """This machine's physical memory: no array the tool allocates may be larger."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):   # not a POSIX system: 1 TiB
        return 1 << 40


def check_fits(what: str, nbytes: int, share: float = 1.0) -> None:
    """Refuse before allocating ``nbytes`` for ``what`` ("input x [2, 10⁹, 8] float32")
    when that exceeds ``share`` of the machine's memory (:func:`memory_bytes`)."""
    memory = memory_bytes()
    if nbytes > share * memory:
        part = "" if share == 1 else f"{share:.0%} of "
        raise OnnxpruneError(f"{what} needs {format_bytes(nbytes)}, more than {part}this "
                             f"machine's {format_bytes(memory)} of memory")


def format_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def format_dims(dims: tuple[int | str, ...] | None) -> str:
    return "of unknown shape" if dims is None else "[" + ", ".join(map(str, dims)) + "]"


def _check_rank(given: str, dims: tuple[int | str, ...], shape: tuple[int, ...]) -> None:
    if len(shape) != len(dims):
        raise OnnxpruneError(f"{given}, the model declares {format_dims(dims)}")


def fit_static(specs: list[InputSpec], shapes: Mapping[str, tuple[int, ...]] | None
               ) -> dict[str, tuple[int, ...]] | None:
    """``shapes`` (of a model before a cut) fitted to ``specs`` (of the cut model): where a
    cut shrank a static dim of an input (a key/value cache's head axis), the declared size
    replaces the old one; every other entry stays."""
    if shapes is None:
        return None
    dims = {spec.name: spec.dims for spec in specs}
    out = {}
    for name, shape in shapes.items():
        want = dims.get(name)
        if want is not None and len(want) == len(shape):
            shape = tuple(w if isinstance(w, int) else s for s, w in zip(shape, want))
        out[name] = tuple(shape)
    return out
