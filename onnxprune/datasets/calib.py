"""Calibration data files: one ``.npz`` whose keys are the model's input names (arrays fed
to the model) and, optionally, its output names (targets for a task loss)."""

from __future__ import annotations

import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from onnxprune.errors import OnnxpruneError


@dataclass
class Calibration:
    inputs: dict[str, np.ndarray]
    targets: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n_samples(self) -> int:
        return len(next(iter(self.inputs.values())))


def write_calibration(
    path: str | Path,
    inputs: Mapping[str, np.ndarray],
    targets: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """Write ``inputs`` and ``targets`` into one ``.npz`` (atomic: temp file, then rename)."""
    path = Path(path)
    targets = dict(targets or {})
    arrays = {
        **{k: np.asarray(v) for k, v in inputs.items()},
        **{k: np.asarray(v) for k, v in targets.items()},
    }
    _check_arrays(path, dict(inputs), targets)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return path


def _check_arrays(path: Path, inputs: dict, targets: dict) -> None:
    if not inputs:
        raise OnnxpruneError(f"{path}: calibration data needs at least one input array")
    clash = sorted(set(inputs) & set(targets))
    if clash:
        raise OnnxpruneError(
            f"{path}: name(s) {', '.join(clash)} used for both an input and a target"
        )
    sizes = {
        k: np.asarray(v).shape[0] if np.asarray(v).ndim else None
        for k, v in {**inputs, **targets}.items()
    }
    if None in sizes.values() or len(set(sizes.values())) != 1:
        raise OnnxpruneError(
            f"{path}: arrays must share their first (sample) dimension, got {sizes}"
        )


def read_calibration(
    path: str | Path, input_names: Sequence[str], output_names: Sequence[str] = ()
) -> Calibration:
    """Read a calibration ``.npz``: every input name must be present; outputs are optional."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise OnnxpruneError(f"{path}: no such calibration file") from None
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise OnnxpruneError(f"{path}: not a readable .npz file ({e})") from None
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
    calib = Calibration(
        {n: arrays[n] for n in input_names}, {n: arrays[n] for n in output_names if n in arrays}
    )
    _check_arrays(path, calib.inputs, calib.targets)
    return calib


def model_io_names(model_path: str | Path) -> tuple[list[str], list[str]]:
    """Graph input names (initialisers excluded) and output names of an ONNX file."""
    import onnx

    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as e:
        raise OnnxpruneError(f"{model_path}: cannot read ONNX model ({e})") from None
    inits = {i.name for i in model.graph.initializer}
    return (
        [i.name for i in model.graph.input if i.name not in inits],
        [o.name for o in model.graph.output],
    )
