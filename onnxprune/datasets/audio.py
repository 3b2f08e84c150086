"""WAV clips → log-mel spectrograms, numpy only.

WAV files are read with the standard library's :mod:`wave` (mono integer PCM only); the
STFT and the mel filterbank are written in numpy, so pruning an audio model needs no
audio library. :func:`load_fsdd` reads the Free Spoken Digit Dataset layout
(``{digit}_{speaker}_{index}.wav``, test split = index 0–4) from a folder or a tarball.
"""

from __future__ import annotations

import io
import re
import tarfile
import wave
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnxprune.errors import OnnxpruneError

FSDD_NAME = re.compile(r"^(\d)_([A-Za-z0-9]+)_(\d+)\.wav$")


@dataclass(frozen=True)
class LogMelConfig:
    """Feature settings; the defaults suit 8 kHz speech (25 ms window, 10 ms hop, 64 mels)."""

    sample_rate: int = 8000
    n_fft: int = 256
    win_length: int = 200
    hop_length: int = 80
    n_mels: int = 64
    fmin: float = 20.0
    fmax: float | None = None
    n_frames: int | None = 96  # pad (with silence) or crop to this many frames; None keeps all
    log_floor: float = 1e-6


@dataclass
class AudioSet:
    """Log-mel features of a set of clips: ``features`` [N, 1, n_mels, n_frames] float32."""

    features: np.ndarray
    labels: np.ndarray
    names: list[str]
    speakers: list[str]
    indices: np.ndarray

    def subset(self, mask: np.ndarray) -> AudioSet:
        keep = np.flatnonzero(mask)
        return AudioSet(
            self.features[keep],
            self.labels[keep],
            [self.names[i] for i in keep],
            [self.speakers[i] for i in keep],
            self.indices[keep],
        )


def read_wav(source: str | Path | bytes, name: str | None = None) -> tuple[int, np.ndarray]:
    """Read a mono integer-PCM WAV; returns (sample rate, float32 samples in [-1, 1])."""
    label = name or ("<WAV bytes>" if isinstance(source, bytes) else str(source))
    handle = io.BytesIO(source) if isinstance(source, bytes) else str(source)
    try:
        with wave.open(handle, "rb") as w:
            channels, width = w.getnchannels(), w.getsampwidth()
            rate, frames = w.getframerate(), w.readframes(w.getnframes())
    except (wave.Error, EOFError) as e:
        raise OnnxpruneError(f"{label}: not a mono PCM WAV file ({e})") from None
    except OSError as e:
        raise OnnxpruneError(f"{label}: cannot read WAV file ({e.strerror})") from None
    if channels != 1:
        raise OnnxpruneError(f"{label}: not a mono PCM WAV file ({channels} channels)")
    return rate, _pcm_to_float(frames, width, label)


def _pcm_to_float(frames: bytes, width: int, label: str) -> np.ndarray:
    if width == 1:
        return (np.frombuffer(frames, np.uint8).astype(np.float32) - 128.0) / 128.0
    if width == 2:
        return np.frombuffer(frames, "<i2").astype(np.float32) / 32768.0
    if width == 3:
        raw = np.frombuffer(frames, np.uint8).reshape(-1, 3).astype(np.int32)
        ints = (raw[:, 0] | (raw[:, 1] << 8) | (raw[:, 2] << 16)) << 8 >> 8
        return ints.astype(np.float32) / 8388608.0
    if width == 4:
        return (np.frombuffer(frames, "<i4").astype(np.float64) / 2147483648.0).astype(np.float32)
    raise OnnxpruneError(f"{label}: not a mono PCM WAV file ({8 * width}-bit samples)")


def hz_to_mel(f: np.ndarray | float) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)


def mel_to_hz(m: np.ndarray | float) -> np.ndarray:
    return 700.0 * (10.0 ** (np.asarray(m) / 2595.0) - 1.0)


def mel_filterbank(cfg: LogMelConfig) -> np.ndarray:
    """Triangular HTK-mel filters, [n_mels, n_fft // 2 + 1], each of unit area (Slaney norm)."""
    fmax = cfg.fmax or cfg.sample_rate / 2
    edges = mel_to_hz(np.linspace(hz_to_mel(cfg.fmin), hz_to_mel(fmax), cfg.n_mels + 2))
    bins = np.linspace(0.0, cfg.sample_rate / 2, cfg.n_fft // 2 + 1)
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins - lower) / (centre - lower)
    falling = (upper - bins) / (upper - centre)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    return (weights * (2.0 / (upper - lower))).astype(np.float32)


def stft_power(signal: np.ndarray, cfg: LogMelConfig) -> np.ndarray:
    """Power spectrogram [n_fft // 2 + 1, frames] with a Hann window, centred frames."""
    pad = cfg.n_fft // 2
    x = np.pad(
        signal.astype(np.float32), (pad, pad), mode="reflect" if len(signal) > pad else "constant"
    )
    if len(x) < cfg.n_fft:
        x = np.pad(x, (0, cfg.n_fft - len(x)))
    n_frames = 1 + (len(x) - cfg.n_fft) // cfg.hop_length
    window = np.zeros(cfg.n_fft, np.float32)
    offset = (cfg.n_fft - cfg.win_length) // 2
    window[offset : offset + cfg.win_length] = np.hanning(cfg.win_length + 1)[:-1]
    frames = np.lib.stride_tricks.sliding_window_view(x, cfg.n_fft)[:: cfg.hop_length][:n_frames]
    spectrum = np.fft.rfft(frames * window, axis=-1)
    return (spectrum.real**2 + spectrum.imag**2).T.astype(np.float32)


def log_mel(
    signal: np.ndarray, cfg: LogMelConfig | None = None, fbank: np.ndarray | None = None
) -> np.ndarray:
    """Log-mel spectrogram [n_mels, frames], padded or cropped to ``cfg.n_frames`` if set."""
    cfg = cfg or LogMelConfig()
    fbank = mel_filterbank(cfg) if fbank is None else fbank
    mel = np.log(fbank @ stft_power(signal, cfg) + cfg.log_floor)
    return fit_frames(mel, cfg.n_frames, float(np.log(cfg.log_floor)))


def fit_frames(mel: np.ndarray, n_frames: int | None, fill: float) -> np.ndarray:
    """Crop (keeping the start) or pad with ``fill`` (silence) to ``n_frames`` frames."""
    if n_frames is None or mel.shape[1] == n_frames:
        return mel
    if mel.shape[1] > n_frames:
        return mel[:, :n_frames]
    out = np.full((mel.shape[0], n_frames), fill, np.float32)
    out[:, : mel.shape[1]] = mel
    return out


def iter_wavs(path: str | Path) -> Iterator[tuple[str, bytes]]:
    """(file name, bytes) of every ``.wav`` in a folder (recursively) or a tar archive, sorted."""
    path = Path(path)
    if path.is_dir():
        for f in sorted(path.rglob("*.wav")):
            yield f.name, f.read_bytes()
        return
    if not path.exists():
        raise OnnxpruneError(f"{path}: no such folder or archive")
    # Read in archive order (seeking back in a gzip stream re-decompresses it), then sort.
    clips = []
    try:
        with tarfile.open(path) as tar:
            for m in tar:
                if m.isfile() and m.name.endswith(".wav"):
                    clips.append((Path(m.name).name, tar.extractfile(m).read()))
    except (tarfile.TarError, EOFError, OSError) as e:
        raise OnnxpruneError(f"{path}: not a folder or a readable tar archive ({e})") from None
    yield from sorted(clips)


def load_clips(path: str | Path, cfg: LogMelConfig | None = None) -> tuple[list[str], np.ndarray]:
    """Log-mel features of every WAV under ``path``: (names, [N, 1, n_mels, n_frames])."""
    cfg = cfg or LogMelConfig()
    if cfg.n_frames is None:
        raise OnnxpruneError(
            "load_clips needs a fixed n_frames to stack clips of different lengths"
        )
    fbank = mel_filterbank(cfg)
    names, feats = [], []
    for name, data in iter_wavs(path):
        rate, signal = read_wav(data, name=f"{path}:{name}" if not Path(path).is_dir() else name)
        if rate != cfg.sample_rate:
            raise OnnxpruneError(f"{name}: sample rate {rate} Hz, expected {cfg.sample_rate} Hz")
        names.append(name)
        feats.append(log_mel(signal, cfg, fbank))
    if not names:
        raise OnnxpruneError(f"{path}: no .wav files found")
    return names, np.stack(feats)[:, None].astype(np.float32)


def parse_fsdd_name(name: str) -> tuple[int, str, int]:
    """``7_jackson_32.wav`` → (7, 'jackson', 32)."""
    m = FSDD_NAME.match(name)
    if not m:
        raise OnnxpruneError(
            f"{name}: file name does not match '{{digit}}_{{speaker}}_{{index}}.wav'"
        )
    return int(m.group(1)), m.group(2), int(m.group(3))


def load_fsdd(
    path: str | Path, cfg: LogMelConfig | None = None, test_indices: range = range(5)
) -> tuple[AudioSet, AudioSet]:
    """Free Spoken Digit Dataset → (train, test); test = clips with index in ``test_indices``."""
    names, feats = load_clips(path, cfg)
    parsed = [parse_fsdd_name(n) for n in names]
    full = AudioSet(
        feats,
        np.array([p[0] for p in parsed], np.int64),
        names,
        [p[1] for p in parsed],
        np.array([p[2] for p in parsed], np.int64),
    )
    is_test = np.isin(full.indices, np.asarray(test_indices))
    return full.subset(~is_test), full.subset(is_test)
