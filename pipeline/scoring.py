"""Scoring one recording with an exported model, as the service and ``pipeline.predict`` do.

Three steps, so the service can batch the middle one across requests: :func:`prepare` decodes an
upload into model-rate clips (the whole file, or its windows with segments) and notes its level
facts; :func:`score_clips` computes the features and runs the network on clips of any number of
files at once; :func:`answer` aggregates one file's clip scores exactly as the evaluate stage
does and checks the file against the training data's profile (the drift guard).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline import audio, profile
from pipeline.features import aggregate_segments, fit_length, log_mel_batch
from pipeline.models.inference import ExportedModel


@dataclass(frozen=True)
class Upload:
    """One decoded recording: its clips and the facts the drift guard checks."""

    name: str
    clips: np.ndarray  # (n, clip_samples) at the model's rate
    sample_rate: int
    channels: int
    duration_s: float
    stats: dict[str, float]  # audio.signal_stats


@dataclass(frozen=True)
class Scored:
    """One file's answer: class probabilities, its windows' (with segments), the failed checks."""

    name: str
    label: str
    probabilities: dict[str, float]
    segments: list[tuple[float, dict[str, float]]] | None  # (start_s, probabilities) per window
    drift: list[str] = field(default_factory=list)

    @property
    def in_distribution(self) -> bool:
        return not self.drift


def prepare(data: bytes, name: str, model: ExportedModel, max_duration_s: float | None = None) -> Upload:
    """Decode ``data`` and cut it as the featurize stage does; raises ``audio.AudioError``."""
    params = model.info.features
    samples, info = audio.decode(data, name=name, max_duration_s=max_duration_s)
    wave = audio.resample(audio.to_mono(samples), info.sample_rate, params.sample_rate).astype(np.float32, copy=False)
    segment = model.info.segment
    windows = segment.windows(wave, params.sample_rate) if segment else [wave]
    return Upload(name, np.stack([fit_length(w, params) for w in windows]), info.sample_rate, info.channels,
                  info.duration_s, audio.signal_stats(samples, info.sample_rate))


def score_clips(model: ExportedModel, clips: np.ndarray, chunk: int = 64) -> np.ndarray:
    """(n, clip_samples) -> (n, K + n_mels): each clip's class probabilities, then its band means
    (what the spectrum check needs), in one pass over the features."""
    feats = log_mel_batch(clips, model.info.features)[0]
    probs = model.class_probabilities(feats, np.arange(len(feats)), batch_size=chunk)
    return np.concatenate([probs, profile.band_means(feats)], axis=1)


def answer(model: ExportedModel, upload: Upload, scores: np.ndarray, drift_profile: profile.Profile | None) -> Scored:
    """One file's answer from its rows of :func:`score_clips`."""
    classes, segment, rate = model.classes, model.info.segment, model.info.features.sample_rate
    probs, means = scores[:, :len(classes)], scores[:, len(classes):]
    named = lambda p: {c: float(v) for c, v in zip(classes, p)}  # noqa: E731
    file_probs = aggregate_segments(probs, np.full(len(probs), upload.name), segment.aggregate)[1][0] if segment else probs[0]
    windows = None if segment is None else list(zip(segment.start_seconds(len(probs), rate).tolist(), map(named, probs)))
    drift = [] if drift_profile is None else profile.failed_checks(
        drift_profile, upload.sample_rate, upload.channels, upload.duration_s, upload.stats, means)
    return Scored(upload.name, classes[int(np.argmax(file_probs))], named(file_probs), windows, drift)
