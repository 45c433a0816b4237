"""The drift guard: a profile of the training data, and the checks of one input against it.

The train stage writes the profile of its exported model's training files into the model folder
(``profile.json``), so it travels with the model to MLflow and into the Bento; the service and
``pipeline.predict`` check every input against it and report the failed checks by name. The
checks mirror what validate_raw and validate_features expect of the data:

  sample_rate   the recording's rate is one the training files had
  channels      likewise its channel count
  duration      within the training files' range, widened by ``MARGIN``
  peak, rms     the level within the training files' central 99% range, widened likewise
  silence       no larger a share of silent 20 ms frames than the training files had, widened
  spectrum      the clip's spectral shape (the mean of each mel band over time, less their mean
                over bands, so level does not count), in units of the training clips' spread per
                band, has an RMS no larger than 99.5% of the training clips', widened by 25%
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict

CHECKS = ("sample_rate", "channels", "duration", "peak", "rms", "silence", "spectrum")
MARGIN = 0.5  # widen each range by this fraction of its width, both ways
TAIL = 0.005  # quantiles of the level ranges and of the spectrum score
SPECTRUM_MARGIN = 0.25  # the spectrum threshold: this much above the training clips' 99.5% quantile


class Profile(BaseModel):
    """``profile.json``: what the training files looked like."""

    model_config = ConfigDict(frozen=True)

    sample_rates: list[int]
    channels: list[int]
    duration_s: tuple[float, float]
    peak: tuple[float, float]
    rms: tuple[float, float]
    silence_fraction: float  # the most a training file had, widened
    band_mean: list[float]  # per mel band: mean over training clips of their spectral shape
    band_std: list[float]  # and its standard deviation across clips
    spectrum_threshold: float  # RMS z-score that 1 - TAIL of the training clips stay under


def _widened(values: np.ndarray, tail: float = TAIL) -> tuple[float, float]:
    low, high = np.quantile(values, [tail, 1 - tail])
    pad = MARGIN * (high - low)
    return float(low - pad), float(high + pad)


def band_means(features: np.ndarray) -> np.ndarray:
    """(N, n_mels, frames) features -> (N, n_mels): each clip's mean per band."""
    return np.asarray(features, np.float64).mean(axis=-1)


def shape(means: np.ndarray) -> np.ndarray:
    """(N, n_mels) band means -> the same less each row's mean: the spectral shape, not the level."""
    return means - means.mean(axis=-1, keepdims=True)


def spectrum_scores(shapes: np.ndarray, band_mean: np.ndarray, band_std: np.ndarray) -> np.ndarray:
    """RMS over bands of each clip's spectral shape in units of the training spread: (N, n_mels) -> (N,)."""
    return np.sqrt(np.mean(np.square((shapes - band_mean) / band_std), axis=1))


def build(files: pd.DataFrame, features: np.ndarray, rows: np.ndarray) -> Profile:
    """The profile of training ``files`` (manifest rows: sample_rate, channels, duration_s, peak, rms,
    silence_fraction) and of their feature ``rows``."""
    rows = np.sort(rows)
    shapes = shape(np.concatenate([band_means(features[rows[i:i + 512]]) for i in range(0, len(rows), 512)]))
    band_mean, band_std = shapes.mean(axis=0), np.maximum(shapes.std(axis=0), 1e-3)
    scores = spectrum_scores(shapes, band_mean, band_std)
    return Profile(
        sample_rates=sorted(int(r) for r in files["sample_rate"].unique()),
        channels=sorted(int(c) for c in files["channels"].unique()),
        duration_s=_widened(files["duration_s"].to_numpy(float), tail=0.0),
        peak=_widened(files["peak"].to_numpy(float)), rms=_widened(files["rms"].to_numpy(float)),
        silence_fraction=min(1.0, _widened(files["silence_fraction"].to_numpy(float), tail=0.0)[1]),
        band_mean=band_mean.tolist(), band_std=band_std.tolist(),
        spectrum_threshold=float(np.quantile(scores, 1 - TAIL) * (1 + SPECTRUM_MARGIN)))


def failed_checks(profile: Profile, sample_rate: int, channels: int, duration_s: float, stats: dict[str, float],
                  means: np.ndarray) -> list[str]:
    """The names of the checks one input fails; ``means`` are the :func:`band_means` of its
    (n, n_mels, frames) feature rows (its windows, with segments) before band normalisation."""
    def outside(value: float, bounds: tuple[float, float]) -> bool:
        return not bounds[0] <= value <= bounds[1]

    score = spectrum_scores(shape(means.mean(axis=0, keepdims=True)), np.asarray(profile.band_mean),
                            np.asarray(profile.band_std))[0]
    failed = {"sample_rate": sample_rate not in profile.sample_rates, "channels": channels not in profile.channels,
              "duration": outside(duration_s, profile.duration_s), "peak": outside(stats["peak"], profile.peak),
              "rms": outside(stats["rms"], profile.rms), "silence": stats["silence_fraction"] > profile.silence_fraction,
              "spectrum": score > profile.spectrum_threshold}
    return [name for name in CHECKS if failed[name]]
