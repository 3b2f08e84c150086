"""Calibration inputs: ``.npz`` / ``.npy`` / time-series ``.csv`` files, synthetic default.

:func:`load_calibration` turns a file (or nothing) into :class:`CalibrationData`, the
per-sample arrays that the scoring passes feed to the model batch by batch:

- ``.npz``: one array per model input, keyed by the input name (all required), and
  optionally one per model output, keyed by the output name (targets for a task loss).
- ``.npy``: one array, for a model with a single input; no targets.
- ``.csv``: a multivariate time series (a header row, an optional ``date`` column, one
  numeric column per channel). The model's single input must be ``[batch, L, C]`` and its
  output ``[batch, H, C]``; the file is cut into windows of L steps (the inputs) and the H
  steps that follow (the targets), standardised with a scaler fitted on the train rows.
  ETT files (``ETTh*``/``ETTm*``) use the standard 12/4/4-month split, any other file a
  70/10/20 % split by rows (see :func:`csv_splits`).
- no file: ``samples`` inputs synthesised from the model's input signature (standard-normal
  floats, zeros for ids, ones for masks); ``data_free`` is True and there are no targets.

:func:`load_or_synthesise` is what the stages call: data as given, from a file, or
synthesised. :func:`write_calibration` and :func:`read_calibration` handle the ``.npz``
format without a model; :func:`check_samples` is the one validator of the arrays.

Float inputs are cast to the model's input types (float32 data for a float16 model, float16
data for a float32 one), in memory as from files; float targets stay at least float32, the
type the loss is computed in.

Every problem with the data is one :class:`~onnxprune.errors.OnnxpruneError` line naming
the file and what is wrong with it.
"""

from __future__ import annotations

import csv
import math
import os
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from onnxprune.datasets.timeseries import ETT_SPLITS, SPLIT_NAMES, Splits, load_windows
from onnxprune.errors import OnnxpruneError
from onnxprune.input_roles import InputRole, input_roles
from onnxprune.runtime import synthetic_feeds
from onnxprune.shapes import (
    InputSpec,
    check_fits,
    check_synthesisable,
    format_bytes,
    format_dims,
    input_specs,
    partial_dims,
)

__all__ = [
    "DEFAULT_SYNTHETIC_SAMPLES",
    "SUFFIXES",
    "CalibrationData",
    "OutputSpec",
    "check_samples",
    "csv_splits",
    "load_calibration",
    "load_or_synthesise",
    "model_io_names",
    "output_specs",
    "read_calibration",
    "static_batch",
    "write_calibration",
]

SUFFIXES = (".npz", ".npy", ".csv")
DEFAULT_SYNTHETIC_SAMPLES = 64

Arrays = dict[str, np.ndarray]


@dataclass
class CalibrationData:
    """Per-sample model inputs (and optional targets), all sharing the first axis N.

    ``fixed_batch`` is the batch size baked into the model's graph (see
    :func:`static_batch`); when set, :meth:`batches` yields only full batches of that size.
    """

    inputs: Arrays
    targets: Arrays = field(default_factory=dict)
    source: str = "<memory>"
    data_free: bool = False
    fixed_batch: int | None = None
    synthesised: dict[str, str] = field(default_factory=dict)   # input -> what was made

    @property
    def n_samples(self) -> int:
        return len(next(iter(self.inputs.values()))) if self.inputs else 0

    def n_batches(self, batch_size: int) -> int:
        """How many batches :meth:`batches` yields for ``batch_size``."""
        size = self._batch_size(batch_size)
        if self.fixed_batch:
            return self.n_samples // size
        return -(-self.n_samples // size)

    def batches(self, batch_size: int) -> Iterator[tuple[Arrays, Arrays]]:
        """Consecutive slices ``(inputs, targets)`` in sample order.

        The last batch may be smaller, except for a model with a static batch: then every
        batch has exactly ``fixed_batch`` samples (``batch_size`` is ignored) and the
        remainder is dropped.
        """
        size = self._batch_size(batch_size)
        stop = self.n_samples - self.n_samples % size if self.fixed_batch else self.n_samples
        return self._iter(size, stop)

    def _iter(self, size: int, stop: int) -> Iterator[tuple[Arrays, Arrays]]:
        for lo in range(0, stop, size):
            hi = min(lo + size, stop)
            yield (
                {k: v[lo:hi] for k, v in self.inputs.items()},
                {k: v[lo:hi] for k, v in self.targets.items()},
            )

    def _batch_size(self, batch_size: int) -> int:
        if self.fixed_batch:
            if self.n_samples < self.fixed_batch:
                raise OnnxpruneError(
                    f"{self.source}: {self.n_samples} calibration sample(s), fewer than the "
                    f"model's static batch size {self.fixed_batch}"
                )
            return self.fixed_batch
        if int(batch_size) < 1:
            raise OnnxpruneError(f"batch size must be positive, got {batch_size}")
        return int(batch_size)

    def take(self, n: int) -> CalibrationData:
        """The first ``n`` samples (all of them when there are fewer)."""
        if int(n) < 1:
            raise OnnxpruneError(f"number of samples must be positive, got {n}")
        return self._select(slice(0, int(n)))

    def _select(self, index: slice | np.ndarray) -> CalibrationData:
        return CalibrationData(
            {k: np.ascontiguousarray(v[index]) for k, v in self.inputs.items()},
            {k: np.ascontiguousarray(v[index]) for k, v in self.targets.items()},
            self.source,
            self.data_free,
            self.fixed_batch,
        )


@dataclass(frozen=True)
class OutputSpec:
    """A graph output: name, element type and dims (None when the graph gives no shape)."""

    name: str
    dtype: type
    dims: tuple[int | str, ...] | None


def output_specs(model: onnx.ModelProto) -> list[OutputSpec]:
    specs = []
    for vi in model.graph.output:
        ttype = vi.type.tensor_type
        try:
            dtype = helper.tensor_dtype_to_np_dtype(ttype.elem_type).type
        except (KeyError, ValueError, TypeError):
            dtype = np.float32
        dims = None
        if ttype.HasField("shape"):
            dims = tuple(
                d.dim_value if d.HasField("dim_value") and d.dim_value > 0
                else d.dim_param or f"{vi.name}_dim{i}"
                for i, d in enumerate(ttype.shape.dim)
            )
        specs.append(OutputSpec(vi.name, dtype, dims))
    return specs


def static_batch(model: onnx.ModelProto) -> int | None:
    """The batch size baked into the graph: the first dim of every input when all of them
    are the same fixed int; None when the batch is dynamic (or the model has no inputs)."""
    firsts = {spec.dims[0] if spec.dims else None for spec in input_specs(model)}
    if len(firsts) == 1:
        (first,) = firsts
        if isinstance(first, int):
            return first
    return None


def csv_splits(path: str | os.PathLike, n_rows: int) -> Splits:
    """The train/val/test rows of a time-series CSV.

    ``ETTh*`` files: the standard 12/4/4 months of hourly rows (:data:`ETT_SPLITS`);
    ``ETTm*``: the same months at 15-minute rows; any other file: 70/10/20 % of its rows.
    """
    name = Path(path).name.lower()
    if name.startswith("etth"):
        return ETT_SPLITS
    if name.startswith("ettm"):
        return Splits(ETT_SPLITS.train_end * 4, ETT_SPLITS.val_end * 4, ETT_SPLITS.test_end * 4)
    return Splits.fractions(n_rows)


def load_calibration(
    path: str | os.PathLike | None,
    model: onnx.ModelProto,
    *,
    samples: int | None = None,
    seed: int = 0,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    split: str = "train",
) -> CalibrationData:
    """Calibration data for ``model`` from ``path`` (``.npz``/``.npy``/``.csv``) or, with
    ``path=None``, synthesised from the input signature.

    ``samples``: with a file, a seeded random subset of that many samples (kept in file
    order) when the file holds more; without one, how many to synthesise (default 64, or
    the static batch if larger). ``shapes`` gives concrete shapes for dynamic dims (input
    and, for a ``.csv``, output names → full shapes including the batch dim); ``split``
    picks the ``.csv`` windows (``train``, ``val`` or ``test``).
    """
    if samples is not None and int(samples) < 1:
        raise OnnxpruneError(f"number of calibration samples must be positive, got {samples}")
    specs = input_specs(model)
    if not specs:
        raise OnnxpruneError("the model has no inputs to feed calibration data to")
    batch = static_batch(model)
    if path is None:
        data = _synthesise(specs, samples, seed, shapes, batch, input_roles(model))
    else:
        data = _load_file(Path(path), model, specs, samples, seed, shapes, split)
    data.fixed_batch = batch
    if batch and data.n_samples < batch:
        raise OnnxpruneError(
            f"{data.source}: {data.n_samples} calibration sample(s), fewer than the model's "
            f"static batch size {batch}"
        )
    return data


def load_or_synthesise(
    model: onnx.ModelProto,
    source: str | os.PathLike | CalibrationData | None,
    samples: int | None = None,
    seed: int = 0,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    split: str = "train",
) -> CalibrationData:
    """``source`` as given (its first ``samples``), read from a file, or, when None,
    synthesised from the input signature; dynamic dims besides the batch must then be given
    in ``shapes`` (guessed sizes would measure the model at a size it never runs at)."""
    if isinstance(source, CalibrationData):
        data = source.take(samples) if samples and samples < source.n_samples else source
        return _in_model_dtypes(data, input_specs(model))
    if source is None:
        check_synthesisable(input_specs(model), shapes)
    return load_calibration(source, model, samples=samples, seed=seed,
                            shapes=dict(shapes) if shapes else None, split=split)


# --- calibration .npz files: inputs keyed by input name, targets by output name --------


def write_calibration(
    path: str | os.PathLike,
    inputs: Mapping[str, np.ndarray],
    targets: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """Write ``inputs`` and ``targets`` into one ``.npz`` (atomic: temp file, then rename)."""
    path = Path(path)
    data = CalibrationData({k: np.asarray(v) for k, v in inputs.items()},
                           {k: np.asarray(v) for k, v in (targets or {}).items()}, str(path))
    check_samples(path, data.inputs, data.targets)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **data.inputs, **data.targets)
    tmp.replace(path)
    return path


def read_calibration(
    path: str | os.PathLike, input_names: Sequence[str], output_names: Sequence[str] = ()
) -> CalibrationData:
    """Read a calibration ``.npz`` (no model needed): every input name must be present;
    outputs are optional."""
    inputs, targets = _read_npz(Path(path), input_names, output_names)
    check_samples(path, inputs, targets)
    return CalibrationData(inputs, targets, str(path))


def model_io_names(model_path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """Graph input names (initialisers excluded) and output names of an ONNX file."""
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as e:
        raise OnnxpruneError(f"{model_path}: cannot read ONNX model ({e})") from None
    return [s.name for s in input_specs(model)], [o.name for o in model.graph.output]


def _read_npz(path: Path, input_names: Sequence[str], output_names: Sequence[str]
              ) -> tuple[Arrays, Arrays]:
    try:
        with np.load(path, allow_pickle=False) as z:
            for member in z.zip.infolist():   # declared sizes first: nothing allocated yet
                with z.zip.open(member) as f:
                    _check_npy_header(path, member.filename.removesuffix(".npy"), f,
                                      member.file_size)
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise OnnxpruneError(f"{path}: no such calibration file") from None
    except EOFError:
        raise OnnxpruneError(f"{path}: not a readable .npz file (truncated)") from None
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise OnnxpruneError(f"{path}: not a readable .npz file ({_first_line(e)})") from None
    missing = [n for n in input_names if n not in arrays]
    if missing:
        raise OnnxpruneError(
            f"{path}: no array for model input(s) {', '.join(missing)}; "
            f"file has {', '.join(arrays) or 'none'}"
        )
    unknown = sorted(set(arrays) - set(input_names) - set(output_names))
    if unknown:
        raise OnnxpruneError(
            f"{path}: array(s) {', '.join(unknown)} match no model input or output name"
        )
    return {n: arrays[n] for n in input_names}, {n: arrays[n] for n in output_names
                                                 if n in arrays}


# --- synthetic ------------------------------------------------------------------------


def _synthesise(
    specs: list[InputSpec],
    samples: int | None,
    seed: int,
    shapes: Mapping[str, tuple[int, ...]] | None,
    batch: int | None,
    roles: Mapping[str, InputRole],
) -> CalibrationData:
    n = int(samples) if samples is not None else max(DEFAULT_SYNTHETIC_SAMPLES, batch or 0)
    batched = []
    for spec in specs:
        if not spec.dims:
            raise OnnxpruneError(
                f"model input {spec.name} is a scalar: it has no sample axis to calibrate over"
            )
        shape = spec.concrete(shapes)
        batched.append(InputSpec(spec.name, spec.dtype, (n, *shape[1:])))
    data = CalibrationData(synthetic_feeds(batched, seed=seed, roles=roles), {}, "synthetic",
                           True)
    data.synthesised = {s.name: roles[s.name].describe() for s in specs if s.name in roles}
    return data


# --- files ----------------------------------------------------------------------------


def _load_file(
    path: Path,
    model: onnx.ModelProto,
    specs: list[InputSpec],
    samples: int | None,
    seed: int,
    shapes: Mapping[str, tuple[int, ...]] | None,
    split: str,
) -> CalibrationData:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise OnnxpruneError(
            f"{path}: unsupported calibration file type {suffix or '(no extension)'}; "
            f"expected {', '.join(SUFFIXES)}"
        )
    if path.is_dir():
        raise OnnxpruneError(f"{path}: is a folder, not a calibration file")
    if not path.exists():
        raise OnnxpruneError(f"{path}: no such calibration file")
    if path.stat().st_size == 0:
        raise OnnxpruneError(f"{path}: empty file")
    outputs = output_specs(model)
    if suffix == ".npz":
        inputs, targets = _read_npz(path, [s.name for s in specs], [o.name for o in outputs])
    elif suffix == ".npy":
        inputs, targets = _read_npy(path, specs), {}
    else:
        inputs, targets = _read_csv(path, specs, outputs, shapes, split)

    n = check_samples(path, inputs, targets)
    _check_arrays(path, specs, outputs, inputs, targets)
    index: slice | np.ndarray = slice(None)
    if samples is not None and int(samples) < n:
        rng = np.random.default_rng(seed)
        index = np.sort(rng.choice(n, size=int(samples), replace=False))
    return CalibrationData(
        {s.name: _cast_input(path, s, inputs[s.name][index]) for s in specs},
        {
            o.name: _cast_target(path, o, targets[o.name][index])
            for o in outputs
            if o.name in targets
        },
        str(path),
        False,
    )


def _read_npy(path: Path, specs: list[InputSpec]) -> Arrays:
    if len(specs) != 1:
        raise OnnxpruneError(
            f"{path}: a .npy file holds one array, but the model has {len(specs)} inputs "
            f"({', '.join(s.name for s in specs)}); use a .npz keyed by input name"
        )
    try:
        if not zipfile.is_zipfile(path):
            with path.open("rb") as f:
                _check_npy_header(path, specs[0].name, f, path.stat().st_size)
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise OnnxpruneError(f"{path}: not a readable .npy file ({_first_line(e)})") from None
    if not isinstance(array, np.ndarray):
        array.close()
        raise OnnxpruneError(f"{path}: is a .npz archive, not a .npy array; name it .npz")
    return {specs[0].name: array}


def _check_npy_header(path: Path, name: str, f, size: int) -> None:
    """Refuse an array whose header declares more data than the file holds or than this
    machine's memory, before numpy allocates it (a forged header of 10¹² rows)."""
    try:
        version = np.lib.format.read_magic(f)
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
        shape, _, dtype = read(f)
    except (OSError, ValueError, EOFError, SyntaxError):
        return   # not a readable array: np.load says why
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    what = f"{path}: array {name!r} declares shape {shape} {dtype}"
    if nbytes > size:
        raise OnnxpruneError(f"{what} ({format_bytes(nbytes)}), but the file holds "
                             f"{format_bytes(size)} for it (corrupt or truncated)")
    check_fits(what, nbytes)


def _read_csv(
    path: Path,
    specs: list[InputSpec],
    outputs: list[OutputSpec],
    shapes: Mapping[str, tuple[int, ...]] | None,
    split: str,
) -> tuple[Arrays, Arrays]:
    if split not in SPLIT_NAMES:
        raise OnnxpruneError(
            f"{path}: unknown split {split!r}; expected one of {', '.join(SPLIT_NAMES)}"
        )
    if len(specs) != 1 or len(outputs) != 1:
        raise OnnxpruneError(
            f"{path}: a .csv time series needs a model with one input [batch, lookback, "
            f"channels] and one output [batch, horizon, channels]; this one has "
            f"{len(specs)} input(s) and {len(outputs)} output(s)"
        )
    spec, out = specs[0], outputs[0]
    if not np.issubdtype(spec.dtype, np.floating):
        raise OnnxpruneError(
            f"{path}: a .csv time series gives float windows, but model input {spec.name} "
            f"is {np.dtype(spec.dtype).name}"
        )
    in_dims = _given_dims(path, "input", spec.name, spec.dims, shapes)
    if len(in_dims) != 3:
        raise OnnxpruneError(
            f"{path}: a .csv time series needs the model input to be [batch, lookback, "
            f"channels]; {spec.name} is {format_dims(spec.dims)}"
        )
    lookback, channels = in_dims[1], in_dims[2]
    for what, value in (("lookback", lookback), ("channels", channels)):
        if value is None:
            raise OnnxpruneError(
                f"{path}: the {what} dim of model input {spec.name} {format_dims(spec.dims)} is "
                f"dynamic; give its shape (--shape {spec.name}=...)"
            )
    if out.dims is None or len(out.dims) != 3:
        raise OnnxpruneError(
            f"{path}: a .csv time series needs the model output to be [batch, horizon, "
            f"channels]; {out.name} is {format_dims(out.dims)}"
        )
    out_dims = _given_dims(path, "output", out.name, out.dims, shapes)
    horizon = out_dims[1]
    if horizon is None:
        raise OnnxpruneError(
            f"{path}: the horizon dim of model output {out.name} {format_dims(out.dims)} is "
            f"dynamic; give its shape (--shape {out.name}=...)"
        )
    if out_dims[2] is not None and out_dims[2] != channels:
        raise OnnxpruneError(
            f"{path}: model input {spec.name} has {channels} channels but output {out.name} "
            f"has {out_dims[2]}; cannot cut forecast windows"
        )
    time_column = _time_column(path)
    ett = path.name.lower().startswith(("etth", "ettm"))
    splits = csv_splits(path, 0 if ett else _count_rows(path))
    series = load_windows(path, lookback, horizon, splits, time_column=time_column)
    if len(series.columns) != channels:
        raise OnnxpruneError(
            f"{path}: {len(series.columns)} data column(s) ({', '.join(series.columns)}), but "
            f"model input {spec.name} {format_dims(spec.dims)} expects {channels} channels"
        )
    x, y = series.windows(split)
    return {spec.name: x}, {out.name: y}


def _given_dims(path: Path, kind: str, name: str, dims: tuple[int | str, ...],
                shapes: Mapping[str, tuple[int, ...]] | None) -> list[int | None]:
    given = tuple(shapes[name]) if shapes and name in shapes else None
    return partial_dims(f"{path}: shape {given} given for model {kind} {name}", dims, given)


def _time_column(path: Path) -> str | None:
    """``date`` when the header has it; else the first column if its first value is not a
    number (a timestamp under another name); else None (every column is data)."""
    try:
        with path.open(newline="") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            first = next(reader, [])
    except (OSError, UnicodeDecodeError):
        return "date"  # let the CSV reader report the problem
    if "date" in header or not header or not first:
        return "date"
    try:
        float(first[0])
    except ValueError:
        return header[0]
    return None


def _count_rows(path: Path) -> int:
    try:
        with path.open(newline="") as f:
            return max(sum(1 for row in csv.reader(f) if row) - 1, 0)
    except (OSError, UnicodeDecodeError, csv.Error):
        return 0  # the CSV reader reports the problem


# --- validation -----------------------------------------------------------------------


def check_samples(where: str | os.PathLike, inputs: Mapping[str, np.ndarray],
                  targets: Mapping[str, np.ndarray]) -> int:
    """The one validator of calibration arrays: at least one input, no name both an input
    and a target, every array with the same number of samples (its first dim), more than
    none. Returns that number; raises naming ``where`` (the file) otherwise."""
    if not inputs:
        raise OnnxpruneError(f"{where}: calibration data needs at least one input array")
    clash = sorted(set(inputs) & set(targets))
    if clash:
        raise OnnxpruneError(
            f"{where}: name(s) {', '.join(clash)} used for both an input and a target")
    arrays = {k: np.asarray(v) for k, v in {**inputs, **targets}.items()}
    for name, array in arrays.items():
        if array.ndim == 0:
            raise OnnxpruneError(
                f"{where}: array {name!r} is a scalar; calibration arrays need a sample axis "
                f"first")
    counts = {name: array.shape[0] for name, array in arrays.items()}
    if len(set(counts.values())) > 1:
        raise OnnxpruneError(
            f"{where}: arrays must share their first (sample) dimension, got {counts}")
    n = next(iter(counts.values()))
    if n == 0:
        raise OnnxpruneError(f"{where}: no calibration samples (the arrays have 0 rows)")
    return n


def _check_arrays(
    path: Path,
    specs: list[InputSpec],
    outputs: list[OutputSpec],
    inputs: Arrays,
    targets: Arrays,
) -> None:
    named: dict[str, tuple[int, str]] = {}  # dim_param -> (size, where)
    for spec in specs:
        array = inputs[spec.name]
        _check_kind(path, spec.name, array, spec.dtype)
        _check_dims(path, "input", spec.name, array, spec.dims, named)
        _check_finite(path, spec.name, array)
    for out in outputs:
        if out.name not in targets:
            continue
        array = targets[out.name]
        if array.dtype.kind not in "fiub":
            raise OnnxpruneError(
                f"{path}: target array {out.name!r} has dtype {array.dtype}, which cannot be "
                f"used as a target"
            )
        if out.dims is not None and _is_class_ids(array, out):
            _check_class_ids(path, out, array)
        elif out.dims is not None:
            if array.ndim == len(out.dims) - 1 and array.dtype.kind == "f":
                raise OnnxpruneError(
                    f"{path}: target array {out.name!r} has shape {array.shape}, one dim fewer "
                    f"than output {out.name} {format_dims(out.dims)}; class-id targets must be "
                    f"integers, got {array.dtype}"
                )
            _check_dims(path, "output", out.name, array, out.dims, named)
        if np.issubdtype(out.dtype, np.integer) and array.dtype.kind == "f":
            raise OnnxpruneError(
                f"{path}: target array {out.name!r} is {array.dtype}, but model output "
                f"{out.name} is {np.dtype(out.dtype).name}; integer targets needed"
            )
        _check_finite(path, out.name, array)


def _is_class_ids(array: np.ndarray, out: OutputSpec) -> bool:
    """Integer ids [N, ...] for float scores [N, ..., K] (cross-entropy targets)."""
    return (
        np.issubdtype(out.dtype, np.floating)
        and array.dtype.kind in "iu"
        and len(out.dims) >= 2
        and array.ndim == len(out.dims) - 1
    )


def _check_class_ids(path: Path, out: OutputSpec, array: np.ndarray) -> None:
    for i, (want, got) in enumerate(zip(out.dims[1:-1], array.shape[1:]), start=1):
        if isinstance(want, int) and want != got:
            raise OnnxpruneError(
                f"{path}: class-id target array {out.name!r} has shape {array.shape}, model "
                f"output {out.name} is {format_dims(out.dims)}: dim {i} expected {want}, got {got}"
            )
    n_classes = out.dims[-1]
    if array.size:
        lo, hi = int(array.min()), int(array.max())
        if lo < 0 or (isinstance(n_classes, int) and hi >= n_classes):
            limit = f"0..{n_classes - 1}" if isinstance(n_classes, int) else "non-negative"
            raise OnnxpruneError(
                f"{path}: class-id target array {out.name!r} has ids {lo}..{hi}, model output "
                f"{out.name} {format_dims(out.dims)} allows {limit}"
            )


def _check_kind(path: Path, name: str, array: np.ndarray, want: type) -> None:
    kind, want_dt = array.dtype.kind, np.dtype(want)
    if want_dt.kind == "f":
        ok = kind == "f"
        need = "floating-point"
    elif want_dt.kind in "iu":
        ok = kind in "iu"
        need = "integer"
    elif want_dt.kind == "b":
        ok = kind == "b" or (
            kind in "iu" and bool(np.isin(array, (0, 1)).all())
        )
        need = "boolean (or 0/1)"
    else:
        ok = kind == want_dt.kind
        need = want_dt.name
    if not ok:
        raise OnnxpruneError(
            f"{path}: array {name!r} has dtype {array.dtype}, but model input {name} is "
            f"{want_dt.name}; {need} data needed"
        )
    if want_dt.kind in "iu" and array.size:
        info = np.iinfo(want_dt)
        lo, hi = array.min(), array.max()
        if lo < info.min or hi > info.max:
            raise OnnxpruneError(
                f"{path}: array {name!r} has values {lo}..{hi}, outside the range of model "
                f"input {name} ({want_dt.name})"
            )


def _check_dims(
    path: Path,
    kind: str,
    name: str,
    array: np.ndarray,
    dims: tuple[int | str, ...] | None,
    named: dict[str, tuple[int, str]],
) -> None:
    if dims is None:
        return
    what = "array" if kind == "input" else "target array"
    if array.ndim != len(dims):
        raise OnnxpruneError(
            f"{path}: {what} {name!r} has shape {array.shape}, but model {kind} {name} is "
            f"{format_dims(dims)}: expected rank {len(dims)}, got {array.ndim}"
        )
    for i, (want, got) in enumerate(zip(dims, array.shape)):
        if i == 0:
            continue  # the sample axis: N samples for any batch size
        if isinstance(want, int):
            if want != got:
                raise OnnxpruneError(
                    f"{path}: {what} {name!r} has shape {array.shape}, but model {kind} {name} "
                    f"is {format_dims(dims)}: dim {i} expected {want}, got {got}"
                )
        elif want in named and named[want][0] != got:
            size, where = named[want]
            raise OnnxpruneError(
                f"{path}: dynamic dim {want!r} is {size} in {where} but {got} in {what} "
                f"{name!r} (dim {i})"
            )
        else:
            named.setdefault(want, (got, f"{what} {name!r}"))


def _check_finite(path: Path, name: str, array: np.ndarray) -> None:
    if array.dtype.kind != "f":
        return
    finite = np.isfinite(array)
    if finite.all():
        return
    n_nan = int(np.isnan(array).sum())
    n_inf = int((~finite).sum()) - n_nan
    found = " and ".join(
        f"{count} {label}" for count, label in ((n_nan, "NaN"), (n_inf, "inf")) if count
    )
    sample = int(np.argwhere(~finite)[0][0])
    raise OnnxpruneError(
        f"{path}: array {name!r} contains non-finite values ({found}; first in sample {sample})"
    )


def _cast_input(path: Path, spec: InputSpec, array: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        out = np.ascontiguousarray(array, dtype=spec.dtype)
    narrowed = out.dtype.kind == "f" and out.dtype.itemsize < array.dtype.itemsize
    if narrowed and not np.isfinite(out).all():
        raise OnnxpruneError(
            f"{path}: array {spec.name!r} has values too large for model input "
            f"{spec.name} ({out.dtype.name})"
        )
    return out


def _in_model_dtypes(data: CalibrationData, specs: list[InputSpec]) -> CalibrationData:
    """``data`` with float inputs cast to the model's float input types (float32 arrays for
    a float16 model); the same object when nothing needs casting."""
    wanted = {s.name: np.dtype(s.dtype) for s in specs}
    cast = {k: v for k, v in data.inputs.items() if k in wanted
            and np.asarray(v).dtype.kind == "f" == wanted[k].kind
            and np.asarray(v).dtype != wanted[k]}
    if not cast:
        return data
    inputs = dict(data.inputs)
    for name, value in cast.items():
        spec = next(s for s in specs if s.name == name)
        inputs[name] = _cast_input(Path(data.source), spec, np.asarray(value))
    return replace(data, inputs=inputs)


def _cast_target(path: Path, out: OutputSpec, array: np.ndarray) -> np.ndarray:
    if out.dims is not None and _is_class_ids(array, out):
        return np.ascontiguousarray(array, dtype=np.int64)
    # float targets stay at least float32: the loss is computed in float32 (a float16
    # output's targets keep their precision)
    want = np.promote_types(out.dtype, np.float32) if np.dtype(out.dtype).kind == "f" \
        else out.dtype
    with np.errstate(over="ignore"):
        cast = np.ascontiguousarray(array, dtype=want)
    if cast.dtype.kind == "f" and array.dtype.kind == "f" and not np.isfinite(cast).all():
        raise OnnxpruneError(
            f"{path}: target array {out.name!r} has values too large for model output "
            f"{out.name} ({cast.dtype.name})"
        )
    return cast


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
