"""Shared helpers of the training scripts in tools/ (not part of the package)."""

from __future__ import annotations

import json
import os
import random
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def default_data_dir() -> Path:
    """``$ONNXPRUNE_DATA`` or ``../shared/data`` relative to the repository root."""
    return Path(os.environ.get("ONNXPRUNE_DATA", REPO.parent / "shared" / "data"))


def require(path: Path) -> Path:
    if not path.exists():
        sys.exit(f"error: {path} not found; pass --data-dir or set ONNXPRUNE_DATA")
    return path


def seed_everything(seed: int, threads: int) -> None:
    torch.set_num_threads(threads)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def command_line() -> str:
    script = Path(sys.argv[0]).resolve()
    if script.is_relative_to(REPO):
        script = script.relative_to(REPO)
    return shlex.join(["python", str(script), *sys.argv[1:]])


class Clock:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    tmp.replace(path)


def _jsonable(obj: object) -> object:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def onnx_forecast_metrics(
    onnx_path: Path, x: np.ndarray, y: np.ndarray, batch: int = 256
) -> dict[str, float]:
    """MSE / MAE of an exported forecaster, run in ONNX Runtime on windows (x, y)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    sq, ab, n = 0.0, 0.0, 0
    for i in range(0, len(x), batch):
        xb, yb = np.ascontiguousarray(x[i : i + batch]), y[i : i + batch]
        pred = sess.run(["y"], {"x": xb.astype(np.float32)})[0]
        sq += float(((pred - yb) ** 2).sum())
        ab += float(np.abs(pred - yb).sum())
        n += yb.size
    return {"mse": sq / n, "mae": ab / n}


def print_row(row: dict) -> None:
    """One line of a training log: key=value pairs, floats to 4 significant digits."""
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                   for k, v in row.items()), flush=True)
