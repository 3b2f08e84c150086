"""Loading and saving ONNX files: external data, clear errors, atomic writes."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from onnxprune.errors import OnnxpruneError
from onnxprune.outputs import RunFiles, atomic_file, atomic_files, check_writable

# protobuf refuses to serialise a message over 2 GiB; beyond this the weights go to a side file.
_EXTERNAL_DATA_LIMIT = 1_800_000_000


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read an ONNX file with its external data; raise a one-line error for anything else."""
    path = Path(path)
    if not path.exists():
        raise OnnxpruneError(f"{path}: no such file")
    if path.is_dir():
        raise OnnxpruneError(f"{path}: is a directory, expected an .onnx file")
    if path.stat().st_size == 0:
        raise OnnxpruneError(f"{path}: file is empty")
    try:
        model = onnx.load(str(path), load_external_data=True)
    except (DecodeError, RuntimeWarning, ValueError) as exc:
        raise OnnxpruneError(f"{path}: not a valid ONNX file (truncated or corrupt: {exc})"
                             ) from exc
    except FileNotFoundError as exc:
        raise OnnxpruneError(f"{path}: external weight file missing: {exc.filename}") from exc
    except OSError as exc:
        raise OnnxpruneError(f"{path}: cannot read: {exc}") from exc
    if not model.graph.node:
        raise OnnxpruneError(f"{path}: not an ONNX model (no graph nodes)")
    return model


def model_size_bytes(model: onnx.ModelProto) -> int:
    return model.ByteSize()


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write atomically (``outputs.atomic_files``: temp file in the target folder, fsync, the
    umask's mode, rename); never a half-written file, and a full disk or read-only folder is
    a one-line error with nothing left.

    Models too large for one protobuf message keep their weights in ``<name>.data`` beside
    the file, written the same way (the side file first, then the model).
    """
    path = Path(path)
    check_writable(path)
    if model_size_bytes(model) <= _EXTERNAL_DATA_LIMIT:
        with atomic_file(path) as tmp:
            onnx.save_model(model, tmp)
        return
    with atomic_files(path.with_name(f"{path.name}.data"), path) as (tmp_data, tmp):
        onnx.save_model(model, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=Path(tmp_data).name, size_threshold=1024)
        _rewrite_external_location(tmp, f"{path.name}.data")


def _rewrite_external_location(model_path: str, location: str) -> None:
    """Point the external-data entries of a saved file at their final name."""
    model = onnx.load(model_path, load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(model, model_path)


def check_output_path(input_path: str | os.PathLike, output_path: str | os.PathLike) -> None:
    """Refuse to overwrite the input (or its external data): a failed run must never destroy
    the user's model. The CLI checks every output of a run at once (``outputs.RunFiles``)."""
    RunFiles().read_model("the input file", input_path).write(
        "output path", output_path, model=True).check()
