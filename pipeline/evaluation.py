"""Evaluation: predictions tables, classification metrics with bootstrap CIs, group votes,
paired comparisons, reconstruction PSNR.

Pure functions of predictions and labels, shared by the evaluate stage for the model and the
baseline, so both are scored the same way.
"""
from __future__ import annotations

from functools import partial

import numpy as np
import pandas as pd
from sklearn import metrics as skm

from pipeline.features import SegmentParams, aggregate_segments
from pipeline.stats import (bootstrap_ci, group_vote, mcnemar_exact, paired_bootstrap,
                            small_sample_warnings_ignored)

HEADLINE = {"accuracy": skm.accuracy_score, "balanced_accuracy": skm.balanced_accuracy_score,
            "f1_macro": partial(skm.f1_score, average="macro", zero_division=0)}


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


def predictions_table(test: pd.DataFrame, probs: np.ndarray, classes: list[str], kept: np.ndarray,
                      prefix: str = "") -> pd.DataFrame:
    """Per test file: ``<prefix>predicted``, ``<prefix>prob_<class>`` and ``<prefix>correct``;
    without a prefix also its path, group, label and ``kept`` (survived filtering)."""
    predicted = np.asarray(classes)[probs.argmax(axis=1)]
    columns = {f"{prefix}predicted": predicted, **{f"{prefix}prob_{c}": probs[:, i] for i, c in enumerate(classes)}}
    if not prefix:
        columns = {"path": test["path"].to_numpy(), "group": test["group"].to_numpy(),
                   "label": test["label"].to_numpy(), **columns, "kept": kept}
    columns[f"{prefix}correct"] = predicted == test["label"].to_numpy()
    return pd.DataFrame(columns)


def scored(table: pd.DataFrame, probs: np.ndarray, classes: list[str], all_filtered_class: str,
           n_resamples: int, seed: int, prefix: str = "") -> tuple[dict, pd.DataFrame]:
    """File metrics over the kept files and group metrics of the majority vote, with CIs.

    ``table`` is the predictions table (``kept``, ``label``, ``<prefix>predicted``, ``group``).
    Returns ({"files": ..., "groups": ...}, the group votes).
    """
    lookup = {c: i for i, c in enumerate(classes)}
    kept = table["kept"].to_numpy(bool)
    y_true = table["label"].map(lookup).to_numpy()
    metrics = {"files": classification_metrics(y_true[kept], probs[kept], classes, n_resamples, seed)}
    groups = group_vote(table, all_filtered_class=all_filtered_class, pred_col=f"{prefix}predicted")
    g_true, g_pred = groups["label"].map(lookup).to_numpy(), groups["predicted"].map(lookup).to_numpy()
    metrics["groups"] = classification_metrics(g_true, np.eye(len(classes))[g_pred], classes, n_resamples, seed)
    metrics["groups"].pop("roc_auc", None)  # undefined for hard votes
    return metrics, groups


def differences(model: dict, other: dict) -> dict:
    """``model - other`` for every metric with a value, per level."""
    return {level: {name: value["value"] - other[level][name]["value"]
                    for name, value in model[level].items() if isinstance(value, dict) and name in other[level]}
            for level in ("files", "groups")}


def paired_comparison(table: pd.DataFrame, a: str, b: str, n_resamples: int, seed: int) -> dict:
    """Columns ``<b>predicted`` against ``<a>predicted`` on the kept files: exact McNemar on
    per-file correctness (files only a, or only b, got right), and a paired bootstrap of each
    headline metric (delta = b - a; p: the share of resamples where b is not better)."""
    kept = table[table["kept"].to_numpy(bool)]
    result = mcnemar_exact(kept[f"{a}correct"].to_numpy(bool), kept[f"{b}correct"].to_numpy(bool))
    out: dict = {"mcnemar": {"a_only_right": result.b, "b_only_right": result.c, "p_value": result.p_value}}
    labels = sorted(set(kept["label"]) | set(kept[f"{a}predicted"]) | set(kept[f"{b}predicted"]))
    code = {c: i for i, c in enumerate(labels)}
    y, pa, pb = (kept[c].map(code).to_numpy() for c in ("label", f"{a}predicted", f"{b}predicted"))
    for name in HEADLINE:
        boot = paired_bootstrap(HEADLINE[name], y, pa, pb, n_resamples=n_resamples, seed=seed)
        out[name] = {"delta": boot.delta, "ci_low": boot.low, "ci_high": boot.high, "p_value": boot.p_value}
    return out


def flat_metrics(metrics: dict, prefix: str = "test") -> dict[str, float]:
    """``test/<section>/<level>/<metric>`` (+ ``_ci_low``/``_ci_high``) of a nested metrics dict, for MLflow."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}/{key}"
        if isinstance(value, dict) and "value" in value:
            flat[name] = value["value"]
            flat[f"{name}_ci_low"], flat[f"{name}_ci_high"] = value["ci_low"], value["ci_high"]
        elif isinstance(value, dict):
            flat.update(flat_metrics(value, name))
        elif isinstance(value, float | int) and not isinstance(value, bool):
            flat[name] = float(value)
    return {k: v for k, v in flat.items() if np.isfinite(v)}


def file_level(test: pd.DataFrame, probs: np.ndarray, kept: np.ndarray,
               segment: SegmentParams | None) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Rows (clips or segments) -> files: (path, group, label per file; (F, K) probabilities; kept).

    Without segments a row is a file. With them, a file's probabilities aggregate its kept
    segments (``segment.aggregate``); a file none of whose segments survived filtering is not
    kept, and gets the aggregate of all its segments for the record.
    """
    if segment is None:
        return test[["path", "group", "label"]].reset_index(drop=True), probs, kept
    files = test["file"].to_numpy()
    use = kept | ~np.isin(files, files[kept])
    order, aggregated = aggregate_segments(probs[use], files[use], segment.aggregate)
    first = test.drop_duplicates("file").set_index("file").loc[order]
    frame = pd.DataFrame({"path": order, "group": first["group"].to_numpy(), "label": first["label"].to_numpy()})
    return frame, aggregated, np.isin(order, files[kept])
