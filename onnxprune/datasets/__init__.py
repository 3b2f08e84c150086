"""Data loaders for calibration, evaluation and the reference models (numpy only).

- :mod:`.timeseries`: a multivariate CSV to sliding windows with a train/val/test split
  and per-channel standardisation fitted on train (ETT defaults).
- :mod:`.audio`: a folder or ``.tar.gz`` of WAV clips to log-mel spectrograms.
- :mod:`.synthetic`: generated series (seasonal, trend, AR, random walk, regime switches).
- :mod:`.calib`: calibration ``.npz`` files keyed by model input and output names.
"""

from onnxprune.datasets.audio import (
    AudioSet,
    LogMelConfig,
    load_clips,
    load_fsdd,
    log_mel,
    read_wav,
)
from onnxprune.datasets.calib import Calibration, read_calibration, write_calibration
from onnxprune.datasets.timeseries import (
    ETT_SPLITS,
    Scaler,
    Splits,
    WindowedSeries,
    load_windows,
    read_csv,
)

__all__ = [
    "ETT_SPLITS",
    "AudioSet",
    "Calibration",
    "LogMelConfig",
    "Scaler",
    "Splits",
    "WindowedSeries",
    "load_clips",
    "load_fsdd",
    "load_windows",
    "log_mel",
    "read_calibration",
    "read_csv",
    "read_wav",
    "write_calibration",
]
