"""Log-mel features: pure functions over waves, plus a thin ``nn.Module``.

One definition serves the featurize stage, training-time checks and the BentoML service, so a
recording gets the same features wherever it is seen. The mel filterbank comes from librosa
(Slaney mel scale and norm, as ``librosa.feature.melspectrogram``); the STFT runs batched in
torch, which is where the speed over a per-file librosa loop comes from.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import librosa
import numpy as np
import torch
from pydantic import Field, model_validator

from pipeline.config import Section

AMIN = 1e-10  # floor before log, as librosa.power_to_db
BLOCK = 16  # clips per STFT call in log_mel_batch


class FeatureParams(Section):
    """Every knob of the log-mel front end (``params.yaml``: ``featurize.features``)."""

    sample_rate: int = Field(16000, gt=0)
    n_fft: int = Field(512, gt=0)
    win_length: int | None = Field(None, gt=0)  # None: n_fft
    hop_length: int = Field(160, gt=0)
    n_mels: int = Field(64, gt=0)
    fmin: float = Field(0.0, ge=0)
    fmax: float | None = None  # None: sample_rate / 2
    frames: int = Field(128, gt=1)  # clip length in STFT frames
    pad_mode: Literal["constant", "wrap"] = "constant"  # fill for short clips: zeros or repeat
    crop: Literal["start", "center"] = "center"  # which part of a long clip is kept
    top_db: float | None = Field(80.0, gt=0)
    # peak: dB re the clip's own maximum (gain invariance); fixed: (dB - norm_mean) / norm_std
    normalize: Literal["none", "per_clip", "fixed", "peak"] = "none"
    norm_mean: float = 0.0  # used by normalize=fixed
    norm_std: float = Field(1.0, gt=0)
    # Then each mel band standardised with the mean and std of the training rows (featurize
    # computes them per fold; a model carries its own: BandNorm), after augmentation in training.
    band_norm: bool = False

    @model_validator(mode="after")
    def _check(self) -> FeatureParams:
        if (self.win_length or self.n_fft) > self.n_fft:
            raise ValueError(f"win_length {self.win_length} > n_fft {self.n_fft}")
        nyquist = self.sample_rate / 2
        if (self.fmax or nyquist) > nyquist or self.fmin >= (self.fmax or nyquist):
            raise ValueError(f"need 0 <= fmin < fmax <= sample_rate/2 = {nyquist:g}")
        return self

    @property
    def clip_samples(self) -> int:
        """Samples that give exactly ``frames`` centred STFT frames."""
        return (self.frames - 1) * self.hop_length


class SegmentParams(Section):
    """Long recordings as consecutive windows (``featurize.segment``): each window is one row,
    padded or cropped to the clip length like any clip; a file's prediction aggregates them."""

    window_s: float = Field(gt=0)
    hop_s: float = Field(gt=0)
    aggregate: Literal["mean", "median", "vote"] = "mean"  # segment probabilities -> the file's

    def starts(self, n_samples: int, sample_rate: int) -> np.ndarray:
        """Start samples of the windows over ``n_samples``: every window lies inside the wave but
        the last, which may run past its end (and is zero-padded); at least one window."""
        window, hop = round(self.window_s * sample_rate), round(self.hop_s * sample_rate)
        return np.arange(1 + max(0, -(-(n_samples - window) // hop))) * hop

    def start_seconds(self, count: int, sample_rate: int) -> np.ndarray:
        """Where the first ``count`` windows start, in seconds."""
        return np.arange(count) * round(self.hop_s * sample_rate) / sample_rate

    def windows(self, wave: np.ndarray, sample_rate: int) -> list[np.ndarray]:
        """The windows of a mono wave, in order."""
        window = round(self.window_s * sample_rate)
        return [wave[start:start + window] for start in self.starts(len(wave), sample_rate)]


def aggregate_segments(probs: np.ndarray, files: np.ndarray, how: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, K) segment probabilities of ``files`` (N,) -> (the files in first-seen order, (F, K)).

    ``mean``/``median``: of each class's probability; ``vote``: the share of the file's segments
    that predict each class (a tie goes to the first class in order).
    """
    order = list(dict.fromkeys(files))
    position = {f: i for i, f in enumerate(order)}
    which = np.array([position[f] for f in files])
    out = np.zeros((len(order), probs.shape[1]))
    for i in range(len(order)):
        mine = probs[which == i]
        if how == "vote":
            out[i] = np.bincount(mine.argmax(axis=1), minlength=probs.shape[1]) / len(mine)
        else:
            out[i] = mine.mean(axis=0) if how == "mean" else np.median(mine, axis=0)
    return np.asarray(order), out


def fit_length(wave: np.ndarray, params: FeatureParams, out: np.ndarray | None = None) -> np.ndarray:
    """Pad or crop a mono wave (n,) to ``params.clip_samples`` by the pad/crop policy.

    ``out``: a zero-filled (clip_samples,) float32 view to write into (a row of a batch buffer,
    which saves a copy per clip); a new array when None.
    """
    n = params.clip_samples
    out = np.zeros(n, np.float32) if out is None else out
    if len(wave) >= n:
        start = (len(wave) - n) // 2 if params.crop == "center" else 0
        out[:] = wave[start:start + n]
    elif params.pad_mode == "wrap" and len(wave) > 0:
        out[:] = np.resize(wave, n)  # np.resize repeats the input cyclically
    else:
        out[:len(wave)] = wave
    return out


@lru_cache(maxsize=8)
def _mel_basis(params: FeatureParams) -> torch.Tensor:
    basis = librosa.filters.mel(sr=params.sample_rate, n_fft=params.n_fft, n_mels=params.n_mels,
                                fmin=params.fmin, fmax=params.fmax)
    return torch.from_numpy(basis)


@lru_cache(maxsize=8)
def _window(params: FeatureParams) -> torch.Tensor:
    return torch.hann_window(params.win_length or params.n_fft, periodic=True)


def _mel_power_centered(padded: torch.Tensor, params: FeatureParams) -> torch.Tensor:
    """(B, clip_samples + 2 * (n_fft // 2)) zero-padded waves → (B, n_mels, frames) mel power."""
    spec = torch.stft(padded, n_fft=params.n_fft, hop_length=params.hop_length,
                      win_length=params.win_length, window=_window(params), center=False,
                      return_complex=True).transpose(-2, -1)
    # re² + im² in one fused addcmul skips abs()'s square root and a temporary, and the
    # frames-major layout makes the projection one long matmul: faster on a CPU than
    # basis @ spec.abs().pow(2) (benchmarks/featurize.py measures the stage).
    power = torch.addcmul(spec.real.square(), spec.imag, spec.imag)  # (B, frames, n_fft // 2 + 1)
    return torch.matmul(power, _mel_basis(params).T).transpose(-2, -1)


def mel_power(waves: torch.Tensor, params: FeatureParams) -> torch.Tensor:
    """Mel power spectrogram of fixed-length waves, centred frames with zero padding.

    Args: waves (B, clip_samples) float32.
    Returns: (B, n_mels, frames) float32, |STFT|² projected on the mel filterbank.
    """
    half = params.n_fft // 2
    return _mel_power_centered(torch.nn.functional.pad(waves, (half, half)), params)


def power_to_db(power: torch.Tensor, params: FeatureParams) -> torch.Tensor:
    """(B, n_mels, frames) power → dB re 1.0, floored at ``max - top_db`` per clip."""
    db = 10.0 * torch.log10(power.clamp_min(AMIN))
    if params.top_db is not None:
        db = torch.maximum(db, db.amax(dim=(-2, -1), keepdim=True) - params.top_db)
    return db


def normalize(db: torch.Tensor, params: FeatureParams) -> torch.Tensor:
    """Apply the front end's normalization policy to (B, n_mels, frames) dB features.

    ``band_norm`` is not applied here: its statistics come from training data (:class:`BandNorm`).
    """
    if params.normalize == "per_clip":
        mean = db.mean(dim=(-2, -1), keepdim=True)
        std = db.std(dim=(-2, -1), keepdim=True).clamp_min(1e-5)
        return (db - mean) / std
    if params.normalize == "fixed":
        return (db - params.norm_mean) / params.norm_std
    if params.normalize == "peak":
        return db - db.amax(dim=(-2, -1), keepdim=True)
    return db


def log_mel_batch(waves: list[np.ndarray] | np.ndarray, params: FeatureParams) -> tuple[np.ndarray, np.ndarray]:
    """Features of mono waves already at ``params.sample_rate``.

    Args: waves: list of (n_i,) float arrays, any lengths (padded/cropped here).
    Returns: features (B, n_mels, frames) float32, energy (B,) float32 = mean of mel power
        (mel² of the magnitude mel spectrogram), the signal energy used for filtering.
    """
    # One zero buffer with the STFT's centring pad built in: no per-clip arrays, no pad copy.
    half, n = params.n_fft // 2, params.clip_samples
    batch = np.zeros((len(waves), n + 2 * half), np.float32)
    for row, wave in zip(batch, waves):
        fit_length(np.asarray(wave, np.float32), params, out=row[half:half + n])
    feats = np.empty((len(waves), params.n_mels, params.frames), np.float32)
    energy = np.empty(len(waves), np.float32)
    # Blocks of BLOCK clips keep the complex spectrogram in cache: faster than one large batch.
    # Every step is per clip, so blocking does not change any value.
    with torch.no_grad():
        for start in range(0, len(waves), BLOCK):
            power = _mel_power_centered(torch.from_numpy(batch[start:start + BLOCK]), params)
            feats[start:start + BLOCK] = normalize(power_to_db(power, params), params).numpy()
            energy[start:start + BLOCK] = power.mean(dim=(-2, -1)).numpy()
    return feats, energy


def log_mel(wave: np.ndarray, params: FeatureParams) -> np.ndarray:
    """Features of one mono wave: (n,) → (n_mels, frames); equals one row of :func:`log_mel_batch`."""
    return log_mel_batch([wave], params)[0][0]


@dataclass(frozen=True)
class BandNorm:
    """Per-mel-band standardisation with statistics of training rows: (x - mean) / std per band."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def fit(cls, features: np.ndarray, rows: np.ndarray, batch: int = 512) -> BandNorm:
        """Mean and std of each band over ``features[rows]`` (N, n_mels, frames), every frame counted."""
        rows = np.sort(np.asarray(rows))
        if len(rows) == 0:
            raise ValueError("no rows to compute band statistics from")
        total = np.zeros(features.shape[1])
        squares = np.zeros(features.shape[1])
        for start in range(0, len(rows), batch):
            x = np.asarray(features[rows[start:start + batch]], np.float64)
            total += x.sum(axis=(0, 2))
            squares += np.square(x).sum(axis=(0, 2))
        count = len(rows) * features.shape[2]
        mean = total / count
        std = np.sqrt(np.maximum(squares / count - mean ** 2, 0.0))
        return cls(tuple(mean.tolist()), tuple(np.maximum(std, 1e-5).tolist()))

    def apply(self, x: np.ndarray) -> np.ndarray:
        """(..., n_mels, frames) -> the same shape, float32."""
        mean = np.asarray(self.mean, np.float32)[:, None]
        std = np.asarray(self.std, np.float32)[:, None]
        return ((np.asarray(x, np.float32) - mean) / std).astype(np.float32, copy=False)


class LogMel(torch.nn.Module):
    """Thin module over the same functions: (B, clip_samples) waves → (B, n_mels, frames)."""

    def __init__(self, params: FeatureParams) -> None:
        super().__init__()
        self.params = params

    def forward(self, waves: torch.Tensor) -> torch.Tensor:
        return normalize(power_to_db(mel_power(waves, self.params), self.params), self.params)
