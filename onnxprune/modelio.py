"""Loading and saving ONNX files: external data, clear errors, atomic writes."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from onnxprune.errors import OnnxpruneError
from onnxprune.outputs import (
    RunFiles,
    atomic_file,
    atomic_files,
    check_writable,
    external_data_paths,
)
from onnxprune.protostream import load_stubbed, save_filled
from onnxprune.weightstore import (
    STORE_MIN_BYTES,
    WeightStore,
    filled,
    full_size,
    is_large,
    make_stub,
    model_store,
    tensor_bytes,
)

# protobuf refuses to serialise a message over 2 GiB; beyond this the weights go to a side file.
_EXTERNAL_DATA_LIMIT = 1_800_000_000
# tensors smaller than this stay in the .onnx file when the weights go to a side file
_SIDE_FILE_THRESHOLD = 1024
T = TypeVar("T")


def load_model(path: str | os.PathLike, share: bool = False) -> onnx.ModelProto:
    """Read an ONNX file with its external data; raise a one-line error for anything else.

    With ``share``, a model with ``STORE_MIN_BYTES`` of weights or more keeps its large
    weights in a ``weightstore`` (read one tensor at a time, never the whole file at once):
    for the commands that copy the model and open several sessions over it."""
    path = Path(path)
    if not path.exists():
        raise OnnxpruneError(f"{path}: no such file")
    if path.is_dir():
        raise OnnxpruneError(f"{path}: is a directory, expected an .onnx file")
    if path.stat().st_size == 0:
        raise OnnxpruneError(f"{path}: file is empty")
    if share and _stored_bytes(path) >= STORE_MIN_BYTES:
        return _load_into_store(path)
    model = _read(path, lambda: onnx.load(str(path), load_external_data=True))
    if not model.graph.node:
        raise OnnxpruneError(f"{path}: not an ONNX model (no graph nodes)")
    check_model(model, path)
    return model


def _stored_bytes(path: Path) -> int:
    """The model file's size and its external data files' together."""
    return path.stat().st_size + sum(p.stat().st_size for p in external_data_paths(path)
                                     if p.is_file())


def _load_into_store(path: Path) -> onnx.ModelProto:
    """``load_model`` for a large model: its large weights go into a new store as they are
    read, checked one by one (the checks ``check_model`` makes on inline tensors)."""
    store = WeightStore()
    store.reserve(2 * _stored_bytes(path) + (1 << 20))   # room for a cut's new weights
    found: dict[str, tuple[int, int]] = {}   # tensor -> (NaN count, inf count)

    def take(tensor: onnx.TensorProto) -> onnx.TensorProto:
        _check_tensor_size(tensor, path)
        if tensor.data_type in _FLOATS:
            found[tensor.name] = _nonfinite(tensor)
        if is_large(tensor):
            store.put(tensor)
        return tensor

    try:
        if external_data_paths(path):
            model = _read(path, lambda: onnx.load(str(path), load_external_data=False))
            for tensor in model.graph.initializer:
                # read into a message of its own: data set on the model's tensor would stay
                # in the model's protobuf arena after the store took it
                alone = onnx.TensorProto()
                alone.CopyFrom(tensor)
                if onnx.external_data_helper.uses_external_data(alone):
                    _read(path, lambda t=alone: onnx.external_data_helper.
                          load_external_data_for_tensor(t, str(path.parent)))
                tensor.CopyFrom(take(alone))
        else:
            model = _read(path, lambda: load_stubbed(path, take, 1024))   # take() chooses
        if not model.graph.node:
            raise OnnxpruneError(f"{path}: not an ONNX model (no graph nodes)")
        check_model(model, path)
        weights = {name for n in model.graph.node if n.op_type in _WEIGHT_OPS
                   for name in n.input}
        for tensor in model.graph.initializer:
            nan, inf = found.get(tensor.name, (0, 0))
            _refuse_nonfinite(tensor, nan, inf if tensor.name in weights else 0, path)
    except BaseException:
        store.close()
        raise
    return model


def _read(path: Path, load: Callable[[], T]) -> T:
    """``load()``, with onnx's and the file system's errors as one line about ``path``."""
    try:
        return load()
    except onnx.checker.ValidationError as exc:   # external data onnx refuses to read
        raise OnnxpruneError(_external_data_error(path, exc)) from exc
    except (DecodeError, RuntimeWarning, ValueError) as exc:
        raise OnnxpruneError(f"{path}: not a valid ONNX file (truncated or corrupt: {exc})"
                             ) from exc
    except FileNotFoundError as exc:
        raise OnnxpruneError(f"{path}: external weight file missing: {exc.filename}") from exc
    except OSError as exc:
        raise OnnxpruneError(f"{path}: cannot read: {exc}") from exc


# --- the up-front checks of a loaded model (issue 15): one line, exit 2, before any work --

# ops whose initializer inputs are weights: an inf there makes every output inf or NaN (an
# inf elsewhere may be meant: a -inf attention mask added before a Softmax)
_WEIGHT_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum", "MatMulInteger",
                         "LayerNormalization", "SkipLayerNormalization",
                         "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization",
                         "BatchNormalization", "InstanceNormalization", "FastGelu",
                         "BiasGelu"})   # not the attention ops: their masks may be -inf
_T = onnx.TensorProto
_FLOATS = (_T.FLOAT, _T.FLOAT16, _T.DOUBLE, _T.BFLOAT16)
# where each element type keeps its values when not in raw_data (and values per element)
_TYPED_FIELD = {_T.FLOAT: ("float_data", 1), _T.DOUBLE: ("double_data", 1),
                _T.INT64: ("int64_data", 1), _T.UINT32: ("uint64_data", 1),
                _T.UINT64: ("uint64_data", 1), _T.STRING: ("string_data", 1),
                _T.COMPLEX64: ("float_data", 2), _T.COMPLEX128: ("double_data", 2),
                **{t: ("int32_data", 1) for t in (
                    _T.INT32, _T.INT16, _T.INT8, _T.UINT16, _T.UINT8, _T.BOOL, _T.FLOAT16,
                    _T.BFLOAT16, _T.FLOAT8E4M3FN, _T.FLOAT8E4M3FNUZ, _T.FLOAT8E5M2,
                    _T.FLOAT8E5M2FNUZ)}}
_ITEMSIZE = {_T.FLOAT: 4, _T.DOUBLE: 8, _T.INT64: 8, _T.UINT64: 8, _T.UINT32: 4, _T.INT32: 4,
             _T.INT16: 2, _T.UINT16: 2, _T.FLOAT16: 2, _T.BFLOAT16: 2, _T.INT8: 1,
             _T.UINT8: 1, _T.BOOL: 1, _T.FLOAT8E4M3FN: 1, _T.FLOAT8E4M3FNUZ: 1,
             _T.FLOAT8E5M2: 1, _T.FLOAT8E5M2FNUZ: 1, _T.COMPLEX64: 8, _T.COMPLEX128: 16}


def check_model(model: onnx.ModelProto, where: str | os.PathLike = "the model") -> None:
    """The checks every command makes on a model before it runs anything: it has outputs,
    an opset and IR version this onnx (and so ONNX Runtime) knows, initializers holding as
    many values as their dims declare, and no NaN (nor inf in a weight). Each problem is one
    :class:`OnnxpruneError` line naming ``where`` and the tensor."""
    graph = model.graph
    if not graph.output:
        raise OnnxpruneError(f"{where}: the model declares no outputs (graph.output is "
                             f"empty): there is nothing to run or compare")
    _check_versions(model, where)
    tensors = [*graph.initializer, *(a.t for n in graph.node if n.op_type == "Constant"
                                     for a in n.attribute if a.name == "value")]
    for tensor in tensors:
        _check_tensor_size(tensor, where)
    weights = {name for n in graph.node if n.op_type in _WEIGHT_OPS for name in n.input}
    for tensor in graph.initializer:
        if tensor.data_type in _FLOATS and not onnx.external_data_helper.uses_external_data(
                tensor):
            _check_finite_weight(tensor, tensor.name in weights, where)


def _check_versions(model: onnx.ModelProto, where: str | os.PathLike) -> None:
    newest = onnx.defs.onnx_opset_version()
    default = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if not default and any(n.domain in ("", "ai.onnx") for n in model.graph.node):
        raise OnnxpruneError(f"{where}: the model imports no opset of the default domain "
                             f"(ai.onnx) but uses its operators")
    for version in default:
        if not 1 <= version <= newest:
            raise OnnxpruneError(
                f"{where}: opset {version} of the default domain (ai.onnx) is not one onnx "
                f"{onnx.__version__} knows (1 to {newest}); export with a released opset")
    if model.ir_version > onnx.IR_VERSION:
        raise OnnxpruneError(f"{where}: IR version {model.ir_version} is newer than onnx "
                             f"{onnx.__version__} reads ({onnx.IR_VERSION}); upgrade onnx or "
                             f"re-export")


def _check_tensor_size(tensor: onnx.TensorProto, where: str | os.PathLike) -> None:
    """An initializer holds exactly the values its dims declare (a declared size is never
    allocated to find out)."""
    if tensor.data_location == _T.EXTERNAL:
        return
    if any(d < 0 for d in tensor.dims):
        raise OnnxpruneError(f"{where}: initializer {tensor.name!r} has negative dims "
                             f"{list(tensor.dims)}")
    count = 1
    for d in tensor.dims:
        count *= int(d)
    if tensor.HasField("raw_data"):
        size = _ITEMSIZE.get(tensor.data_type)
        if size is None or len(tensor.raw_data) == count * size:
            return
        held = f"{len(tensor.raw_data):,} bytes, {count * size:,} expected"
    elif tensor.data_type in _TYPED_FIELD:
        field, per = _TYPED_FIELD[tensor.data_type]
        if len(getattr(tensor, field)) == count * per:
            return
        held = f"{len(getattr(tensor, field)) // per:,} values"
    else:
        return
    raise OnnxpruneError(f"{where}: initializer {tensor.name!r} declares dims "
                         f"{list(tensor.dims)} ({count:,} values) but holds {held}")


def _check_finite_weight(tensor: onnx.TensorProto, weight: bool,
                         where: str | os.PathLike) -> None:
    nan, inf = _nonfinite(tensor)
    _refuse_nonfinite(tensor, nan, inf if weight else 0, where)


def _nonfinite(tensor: onnx.TensorProto) -> tuple[int, int]:
    """How many NaN and inf values ``tensor`` holds."""
    try:
        values = onnx.numpy_helper.to_array(tensor)
    except Exception:  # a type numpy cannot hold: nothing to check here
        return 0, 0
    with np.errstate(invalid="ignore"):
        values = np.asarray(values, dtype=np.float32) if values.dtype.kind != "f" else values
        return int(np.isnan(values).sum()), int(np.isinf(values).sum())


def _refuse_nonfinite(tensor: onnx.TensorProto, nan: int, inf: int,
                      where: str | os.PathLike) -> None:
    if nan or inf:
        found = " and ".join(f"{n:,} {what}" for n, what in ((nan, "NaN"), (inf, "inf")) if n)
        raise OnnxpruneError(f"{where}: weight {tensor.name!r} {list(tensor.dims)} holds "
                             f"{found}; the model computes nothing meaningful (fix the "
                             f"export or the checkpoint)")


def _external_data_error(path: Path, exc: Exception) -> str:
    """The one line for external data onnx refuses to read: missing, outside the model's
    folder, an absolute path or a symbolic link (onnx reads only regular files inside the
    model's folder)."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # fall back to onnx's own message
        model = None
    folder = path.parent
    tensors = [] if model is None else [
        t for t in [*model.graph.initializer,
                    *(a.t for n in model.graph.node for a in n.attribute if a.name == "value")]
        if onnx.external_data_helper.uses_external_data(t)]
    for tensor in tensors:
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        what = f"{path}: external data {location!r} of {tensor.name!r}"
        target = folder / location
        if os.path.isabs(location):
            return (f"{what} is an absolute path; onnx reads external data only from files "
                    f"inside the model's folder ({folder.resolve()})")
        if os.path.normpath(location).split(os.sep)[0] == os.pardir:
            return (f"{what} points outside the model's folder; onnx reads external data only "
                    f"from files inside it: move the file next to the model")
        if target.is_symlink():
            return (f"{what} is a symbolic link, which onnx refuses to read: copy the file "
                    f"next to the model")
        if not target.is_file():
            return f"{what}: external weight file missing ({target})"
    text = str(exc).strip().splitlines()
    return f"{path}: cannot read its external data: {text[0] if text else type(exc).__name__}"


def model_size_bytes(model: onnx.ModelProto) -> int:
    return model.ByteSize()


def uses_external_data(path: str | os.PathLike) -> bool:
    """Whether the ONNX file at ``path`` keeps its weights in external data files (read
    without loading them)."""
    return bool(external_data_paths(path))


def save_model(model: onnx.ModelProto, path: str | os.PathLike,
               external: bool | None = None) -> None:
    """Write atomically (``outputs.atomic_files``: temp file in the target folder, fsync, the
    umask's mode, rename); never a half-written file, and a full disk or read-only folder is
    a one-line error with nothing left.

    With ``external`` (the input's layout), and always for models too large for one
    protobuf message, the weights go to ``<name>.data`` beside the file, written the same
    way (the side file first, then the model).
    """
    path = Path(path)
    check_writable(path)
    external = external or full_size(model) > _EXTERNAL_DATA_LIMIT
    if not any(_nbytes(t) >= _SIDE_FILE_THRESHOLD for t in model.graph.initializer):
        external = False                  # nothing would go to the side file
    if not external:
        with atomic_file(path) as tmp:
            if model_store(model) is None:
                onnx.save_model(model, tmp)
            else:                         # weights in a store: one tensor at a time
                save_filled(model, tmp, filled)
        return
    with atomic_files(path.with_name(f"{path.name}.data"), path) as (tmp_data, tmp):
        _save_with_side_file(model, tmp, tmp_data, f"{path.name}.data")


def _save_with_side_file(model: onnx.ModelProto, model_path: str, data_path: str,
                         location: str) -> None:
    """``model`` with every main-graph initializer of ``_SIDE_FILE_THRESHOLD`` bytes or more
    in ``data_path`` (named ``location`` in the model), written one tensor at a time."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    offset = 0
    with open(data_path, "wb") as data:
        for tensor in out.graph.initializer:
            if _nbytes(tensor) < _SIDE_FILE_THRESHOLD:
                continue
            values = tensor_bytes(tensor)
            if values is None:
                values = onnx.numpy_helper.to_array(tensor).tobytes()
            offset = -(-offset // 4096) * 4096   # page-aligned: ONNX Runtime maps them
            data.seek(offset)
            data.write(values)
            make_stub(tensor, location, offset, len(values))
            offset += len(values)
            del values
    onnx.save_model(out, model_path)


def _nbytes(tensor: onnx.TensorProto) -> int:
    if tensor.data_type == onnx.TensorProto.STRING:
        return 0
    size = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return size * int(np.prod(tensor.dims, dtype=np.int64))


def check_output_path(input_path: str | os.PathLike, output_path: str | os.PathLike) -> None:
    """Refuse to overwrite the input (or its external data): a failed run must never destroy
    the user's model. The CLI checks every output of a run at once (``outputs.RunFiles``)."""
    RunFiles().read_model("the input file", input_path).write(
        "output path", output_path, model=True).check()
