"""Data loaders for calibration, evaluation and the reference models (numpy only).

- :mod:`.timeseries`: a multivariate CSV to sliding windows with a train/val/test split
  and per-channel standardisation fitted on train (ETT defaults).
- :mod:`.audio`: a folder or ``.tar.gz`` of WAV clips to log-mel spectrograms.
- :mod:`.synthetic`: generated series (seasonal, trend, AR, random walk, regime switches).

Calibration ``.npz`` files keyed by model input and output names are read and written by
:mod:`onnxprune.data` (``read_calibration``, ``write_calibration``), which builds on these
loaders.
"""

from onnxprune.datasets.audio import (
    AudioSet,
    LogMelConfig,
    load_clips,
    load_fsdd,
    log_mel,
    read_wav,
)
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
    "LogMelConfig",
    "Scaler",
    "Splits",
    "WindowedSeries",
    "load_clips",
    "load_fsdd",
    "load_windows",
    "log_mel",
    "read_csv",
    "read_wav",
]
