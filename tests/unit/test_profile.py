"""pipeline.profile: the drift guard's profile of the training data and its checks."""
from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline import profile


def _files(n: int, rng: np.random.Generator) -> pd.DataFrame:
    return pd.DataFrame({"sample_rate": 16000, "channels": 1, "duration_s": rng.uniform(0.5, 1.5, n),
                         "peak": rng.uniform(0.3, 0.9, n), "rms": rng.uniform(0.02, 0.1, n),
                         "silence_fraction": rng.uniform(0.0, 0.4, n)})


def _speechy(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 16, 20) dB features falling 2 dB per band, at random levels, with noise."""
    return (-20 - 2 * np.arange(16)[None, :, None] + rng.normal(0, 3, (n, 1, 1)) + rng.normal(0, 1, (n, 16, 20)))


def test_profile_describes_the_training_rows_only_and_checks_name_what_fails() -> None:
    rng = np.random.default_rng(0)
    features = np.concatenate([_speechy(200, rng), np.full((10, 16, 20), 99.0)])  # the last 10: not training
    p = profile.build(_files(200, rng), features, np.arange(200))
    assert p.sample_rates == [16000] and p.channels == [1]
    training_shapes = profile.shape(profile.band_means(features[:200]))  # the other rows never count
    np.testing.assert_allclose(p.band_mean, training_shapes.mean(axis=0))
    np.testing.assert_allclose(p.band_std, training_shapes.std(axis=0))
    ok = {"peak": 0.5, "rms": 0.05, "silence_fraction": 0.1}
    means = profile.band_means(_speechy(1, rng))
    assert profile.failed_checks(p, 16000, 1, 1.0, ok, means) == []
    tilted = profile.band_means(_speechy(1, rng) + 4 * np.arange(16)[None, :, None])  # another spectral shape
    louder = profile.band_means(_speechy(1, rng) + 30)  # the same shape, 30 dB up: level is not spectrum
    assert profile.failed_checks(p, 16000, 1, 1.0, ok, tilted) == ["spectrum"]
    assert profile.failed_checks(p, 16000, 1, 1.0, ok, louder) == []
    odd = {"peak": 0.001, "rms": 0.5, "silence_fraction": 0.99}  # far quieter peaks, far louder RMS
    assert profile.failed_checks(p, 4000, 2, 60.0, odd, means) == ["sample_rate", "channels", "duration", "peak",
                                                                  "rms", "silence"]


def test_false_alarms_on_fresh_draws_of_the_training_distribution_are_rare() -> None:
    rng = np.random.default_rng(1)
    p = profile.build(_files(400, rng), _speechy(400, rng), np.arange(400))
    fresh, files = _speechy(1000, rng), _files(1000, rng)
    flagged = sum(bool(profile.failed_checks(p, 16000, 1, f.duration_s, f._asdict(), profile.band_means(x[None])))
                  for f, x in zip(files.itertuples(index=False), fresh))
    assert flagged / 1000 <= 0.01
