"""The reference baseline: MFCC statistics and a logistic regression, fitted beside every model.

A measuring stick, not a deployable model. The evaluate stage fits it on exactly the training
files of the exported model and scores it on the same test files, so every evaluation says how
much better than ten lines of scikit-learn the deep model is; the register stage's baseline
gate reads that comparison.

Per clip: 20 MFCCs as a DCT (type II, orthonormal) of the dB mel bands, summarised over time
by their mean and standard deviation and the standard deviation of their first differences
(60 numbers), then ``StandardScaler`` and ``LogisticRegression(class_weight="balanced")``.
"""
from __future__ import annotations

import numpy as np
import scipy.fft
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

N_MFCC = 20
BATCH = 1024  # rows read from the memmap at a time


def mfcc_statistics(db: np.ndarray) -> np.ndarray:
    """(N, n_mels, frames) dB log-mel features -> (N, 3 * N_MFCC) summary statistics."""
    coefficients = scipy.fft.dct(np.asarray(db, np.float64), type=2, norm="ortho", axis=1)[:, :N_MFCC]
    deltas = np.diff(coefficients, axis=2)
    return np.concatenate([coefficients.mean(axis=2), coefficients.std(axis=2), deltas.std(axis=2)], axis=1)


def statistics(features: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """:func:`mfcc_statistics` of ``features[rows]``, read in batches (a memmap stays on disk)."""
    rows = np.asarray(rows)
    return np.concatenate([mfcc_statistics(features[rows[i:i + BATCH]]) for i in range(0, len(rows), BATCH)]
                          or [np.empty((0, 3 * N_MFCC))])


def fit(features: np.ndarray, rows: np.ndarray, targets: np.ndarray, seed: int = 0) -> Pipeline:
    """The baseline fitted on ``features[rows]`` (dB) with integer ``targets``."""
    model = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=2000,
                                                               random_state=seed))
    return model.fit(statistics(features, rows), targets)


def class_probabilities(model: Pipeline, features: np.ndarray, rows: np.ndarray, n_classes: int) -> np.ndarray:
    """(N, n_classes) probabilities, column k for target k (0 where k was absent from training)."""
    out = np.zeros((len(rows), n_classes))
    out[:, model.classes_] = model.predict_proba(statistics(features, rows))
    return out
