"""Evaluation metrics: classification metrics with bootstrap CIs, reconstruction PSNR.

Pure functions of predictions and labels, shared by the evaluate stage (the model and the
baseline) so both are scored the same way.
"""
from __future__ import annotations

from functools import partial

import numpy as np
from sklearn import metrics as skm

from pipeline.stats import bootstrap_ci, small_sample_warnings_ignored


def _auc(y_true: np.ndarray, probs: np.ndarray) -> float:
    if probs.shape[1] == 2:
        return skm.roc_auc_score(y_true, probs[:, 1])
    return skm.roc_auc_score(y_true, probs, multi_class="ovr", labels=np.arange(probs.shape[1]))


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, classes: list[str],
                           n_resamples: int = 1000, seed: int = 0) -> dict:
    """Accuracy, balanced accuracy, macro/weighted F1, per-class precision/recall, ROC-AUC,
    each as {value, ci_low, ci_high} (percentile bootstrap, 95%), and the confusion matrix."""
    y_pred = probs.argmax(axis=1)
    labels = np.arange(len(classes))
    scorers = {
        "accuracy": skm.accuracy_score,
        "balanced_accuracy": skm.balanced_accuracy_score,
        "f1_macro": partial(skm.f1_score, average="macro", labels=labels, zero_division=0),
        "f1_weighted": partial(skm.f1_score, average="weighted", labels=labels, zero_division=0),
    }
    for i, name in enumerate(classes):
        scorers[f"precision/{name}"] = partial(_per_class, skm.precision_score, i)
        scorers[f"recall/{name}"] = partial(_per_class, skm.recall_score, i)
    out = {}
    with small_sample_warnings_ignored():  # a small test set may lack a class
        for name, fn in scorers.items():
            value, low, high = bootstrap_ci(fn, y_true, y_pred, n_resamples=n_resamples, seed=seed)
            out[name] = {"value": value, "ci_low": low, "ci_high": high}
        if len(np.unique(y_true)) > 1:
            value, low, high = bootstrap_ci(_auc, y_true, probs, n_resamples=n_resamples, seed=seed)
            out["roc_auc"] = {"value": value, "ci_low": low, "ci_high": high}
    out["confusion_matrix"] = skm.confusion_matrix(y_true, y_pred, labels=labels).tolist()
    return out


def _per_class(score, cls: int, y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return score(y_true, y_pred, labels=[cls], average="macro", zero_division=0)


def curve_inputs(y_true: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(labels, scores) for ROC and precision-recall curves, or None with a single class present.

    Two classes: the positive class's probability. More: every (file, class) pair one-vs-rest,
    the micro-average, so a multi-class task gets one curve too.
    """
    if len(np.unique(y_true)) < 2:
        return None
    if probs.shape[1] == 2:
        return y_true, probs[:, 1]
    return np.eye(probs.shape[1], dtype=int)[y_true].ravel(), probs.ravel()


def psnr(mse: np.ndarray, peak: float) -> np.ndarray:
    """Peak signal-to-noise ratio in dB of per-clip MSEs for a signal of range ``peak``."""
    return 10.0 * np.log10(peak ** 2 / np.maximum(mse, 1e-12))
