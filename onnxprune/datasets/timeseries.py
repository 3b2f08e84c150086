"""Multivariate CSV time series → standardised sliding windows.

The split follows the usual long-horizon forecasting convention (Informer, PatchTST):
a window belongs to the split that holds its *forecast* rows; its lookback may reach
back into the previous split. For ETT hourly data the train rows are 0–8639, val
8640–11519 and test 11520–14399; the per-channel mean and standard deviation are
fitted on the train rows only.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnxprune.errors import OnnxpruneError

SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class Splits:
    """Row boundaries of a split.

    train = rows [0, train_end), val = [train_end, val_end), test = [val_end, test_end).
    """

    train_end: int
    val_end: int
    test_end: int

    def rows(self, split: str) -> tuple[int, int]:
        bounds = {
            "train": (0, self.train_end),
            "val": (self.train_end, self.val_end),
            "test": (self.val_end, self.test_end),
        }
        if split not in bounds:
            raise OnnxpruneError(
                f"unknown split {split!r}; expected one of {', '.join(SPLIT_NAMES)}"
            )
        return bounds[split]

    @classmethod
    def fractions(cls, n_rows: int, train: float = 0.7, val: float = 0.1) -> Splits:
        """Split ``n_rows`` by fractions (the rest is test), for data without a standard split."""
        train_end = int(n_rows * train)
        val_end = train_end + int(n_rows * val)
        return cls(train_end, val_end, n_rows)


ETT_SPLITS = Splits(train_end=8640, val_end=11520, test_end=14400)
"""ETTh1/ETTh2: 12 months train, 4 months val, 4 months test, hourly rows."""


@dataclass(frozen=True)
class Scaler:
    """Per-channel standardisation: ``(x - mean) / std``."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, data: np.ndarray) -> Scaler:
        std = data.std(axis=0)
        return cls(data.mean(axis=0), np.where(std > 0, std, 1.0))

    def transform(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.std).astype(np.float32)

    def inverse(self, z: np.ndarray) -> np.ndarray:
        return (z * self.std + self.mean).astype(np.float32)


@dataclass
class WindowedSeries:
    """A standardised series and the windows of each split.

    ``data`` is [rows, channels] float32 (already standardised). Windows are views into it:
    ``x`` [N, lookback, C] and ``y`` [N, horizon, C]; nothing is copied until indexed.
    """

    source: str
    columns: list[str]
    data: np.ndarray
    scaler: Scaler
    lookback: int
    horizon: int
    splits: Splits

    def starts(self, split: str) -> np.ndarray:
        """First row of the lookback of every window whose forecast lies in ``split``."""
        lo, hi = self.splits.rows(split)
        first = max(lo - self.lookback, 0)
        last = hi - self.lookback - self.horizon
        return np.arange(first, last + 1)

    def __len__(self) -> int:
        return len(self.starts("train"))

    def windows(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """All windows of ``split`` as read-only views: (x [N, L, C], y [N, H, C])."""
        starts = self.starts(split)
        size = self.lookback + self.horizon
        view = np.lib.stride_tricks.sliding_window_view(self.data, size, axis=0)  # [R, C, size]
        view = view[starts[0] : starts[-1] + 1].transpose(0, 2, 1)
        return view[:, : self.lookback], view[:, self.lookback :]

    def batch(self, split: str, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the windows ``index`` (positions within the split)."""
        x, y = self.windows(split)
        return np.ascontiguousarray(x[index]), np.ascontiguousarray(y[index])


def read_csv(
    path: str | Path, columns: Sequence[str] | None = None, time_column: str | None = "date"
) -> tuple[list[str], np.ndarray]:
    """Read numeric columns of a CSV with a header row; returns (names, float64 [rows, C]).

    ``columns=None`` takes every column except ``time_column``.
    """
    path = Path(path)
    try:
        with path.open(newline="") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            if not header:
                raise OnnxpruneError(f"{path}: empty CSV file, expected a header row")
            wanted = _select_columns(path, header, columns, time_column)
            positions = [header.index(c) for c in wanted]
            rows = [
                _parse_row(path, line_no, row, positions, wanted)
                for line_no, row in enumerate(reader, start=2)
                if row
            ]
    except OSError as e:
        raise OnnxpruneError(f"{path}: cannot read CSV file ({e.strerror})") from e
    except UnicodeDecodeError as e:
        raise OnnxpruneError(f"{path}: not a text CSV file ({e.reason})") from e
    return wanted, np.asarray(rows, dtype=np.float64).reshape(len(rows), len(wanted))


def _select_columns(
    path: Path, header: list[str], columns: Sequence[str] | None, time_column: str | None
) -> list[str]:
    if columns is None:
        wanted = [h for h in header if h != time_column]
        if not wanted:
            raise OnnxpruneError(f"{path}: no data columns in header {header}")
        return wanted
    missing = [c for c in columns if c not in header]
    if missing:
        raise OnnxpruneError(
            f"{path}: missing column(s) {', '.join(map(repr, missing))}; "
            f"header has {', '.join(header)}"
        )
    return list(columns)


def _parse_row(
    path: Path, line_no: int, row: list[str], positions: list[int], names: list[str]
) -> list[float]:
    values = []
    for pos, name in zip(positions, names, strict=True):
        cell = row[pos].strip() if pos < len(row) else ""
        try:
            value = float(cell)
        except ValueError:
            raise OnnxpruneError(
                f"{path}: non-numeric value {cell!r} at row {line_no}, column {name!r}"
            ) from None
        if not np.isfinite(value):
            raise OnnxpruneError(
                f"{path}: non-finite value {cell!r} at row {line_no}, column {name!r}"
            )
        values.append(value)
    return values


def load_windows(
    path: str | Path,
    lookback: int = 336,
    horizon: int = 96,
    splits: Splits = ETT_SPLITS,
    columns: Sequence[str] | None = None,
    time_column: str | None = "date",
) -> WindowedSeries:
    """Read ``path`` and return its standardised windows (scaler fitted on the train rows)."""
    names, raw = read_csv(path, columns, time_column)
    _check_length(Path(path), len(raw), lookback, horizon, splits)
    scaler = Scaler.fit(raw[: splits.train_end])
    return WindowedSeries(
        str(path), names, scaler.transform(raw), scaler, lookback, horizon, splits
    )


def _check_length(path: Path, n_rows: int, lookback: int, horizon: int, splits: Splits) -> None:
    if lookback < 1 or horizon < 1:
        raise OnnxpruneError(
            f"{path}: lookback and horizon must be positive, got {lookback}, {horizon}"
        )
    if n_rows < lookback + horizon:
        raise OnnxpruneError(
            f"{path}: {n_rows} rows, fewer than lookback + horizon = {lookback + horizon}"
        )
    if not 0 < splits.train_end < splits.val_end < splits.test_end:
        raise OnnxpruneError(f"{path}: split boundaries must increase, got {splits}")
    if splits.test_end > n_rows:
        raise OnnxpruneError(
            f"{path}: {n_rows} rows, but the split needs {splits.test_end} (test_end)"
        )
    if splits.train_end < lookback + horizon:
        raise OnnxpruneError(
            f"{path}: train split has {splits.train_end} rows, fewer than lookback + horizon = "
            f"{lookback + horizon}"
        )
    for split in ("val", "test"):
        lo, hi = splits.rows(split)
        if hi - lo < horizon:
            raise OnnxpruneError(
                f"{path}: {split} split has {hi - lo} rows, fewer than horizon {horizon}"
            )
