"""Statistics for evaluation reports: confidence intervals, paired tests and group votes.

Everything here is a pure function of its arguments (no I/O, no logging) so that the
evaluation stages can compute numbers once and log them however they like.
"""
from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy import stats
from sklearn.exceptions import UndefinedMetricWarning

Metric = Callable[[np.ndarray, np.ndarray], float]

_ALTERNATIVES = ("two-sided", "greater", "less")


@dataclass(frozen=True)
class McNemarResult:
    """Exact McNemar test of two classifiers scored on the same items."""

    b: int  # A right, B wrong
    c: int  # A wrong, B right
    n_discordant: int  # b + c: only these pairs carry information about A vs B
    p_value: float  # two-sided


@dataclass(frozen=True)
class PairedBootstrapResult:
    """Bootstrap comparison ``metric(B) - metric(A)`` on the same resampled items."""

    delta: float  # point estimate on the full sample
    low: float
    high: float
    p_value: float  # one-sided: fraction of resamples with delta <= 0 (B not better)
    n_valid: int  # resamples on which the metric was defined for both A and B


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def _paired(names: Sequence[str], *arrays: ArrayLike) -> tuple[np.ndarray, ...]:
    """Arrays indexed by the same items: non-empty, same length along axis 0."""
    out = tuple(np.asarray(a) for a in arrays)
    for name, arr in zip(names, out):
        if arr.ndim == 0 or len(arr) == 0:
            raise ValueError(f"{name} is empty (need at least one item)")
    lengths = {name: len(arr) for name, arr in zip(names, out)}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"length mismatch between paired arrays: {lengths}")
    return out


@contextmanager
def small_sample_warnings_ignored() -> Iterator[None]:
    """Silence scikit-learn's warnings about classes absent from a (re)sample.

    A bootstrap resample, or a test set of a few groups, often lacks a class; the metric is then
    undefined (skipped) or computed over the classes present, which is what these warn about.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        warnings.filterwarnings("ignore", "y_pred contains classes not in y_true", UserWarning)
        warnings.filterwarnings("ignore", "A single label was found in 'y_true' and 'y_pred'", UserWarning)
        yield


def _bootstrap(statistic: Callable[[np.ndarray], float], n: int, n_resamples: int,
               seed: int) -> np.ndarray:
    """``statistic(indices)`` over ``n_resamples`` index resamples, undefined ones dropped.

    Indices are drawn one resample at a time rather than as an (n_resamples, n) matrix so
    memory stays O(n) on large test sets.
    """
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    rng = np.random.default_rng(seed)
    values = []
    with small_sample_warnings_ignored():  # an undefined resample is skipped below
        for _ in range(n_resamples):
            idx = rng.integers(0, n, size=n)
            try:
                value = float(statistic(idx))
            except ValueError:
                # Older sklearn versions and custom metrics raise instead of returning nan.
                continue
            if not np.isnan(value):
                values.append(value)
    return np.asarray(values, dtype=float)


def _percentile_interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    if values.size == 0:
        return float("nan"), float("nan")
    tail = (1 - confidence) / 2
    low, high = np.quantile(values, [tail, 1 - tail])
    return float(low), float(high)


def bootstrap_ci(metric: Metric, y_true: ArrayLike, y_pred_or_score: ArrayLike,
                 n_resamples: int = 1000, confidence: float = 0.95,
                 seed: int = 0) -> tuple[float, float, float]:
    """Percentile-bootstrap confidence interval of ``metric(y_true, y_pred_or_score)``.

    Returns ``(point estimate on the full sample, low, high)``. Items are resampled with
    replacement; resamples where the metric is undefined (raises ``ValueError`` or returns
    nan, e.g. ROC AUC on a single-class resample) are skipped, and if every resample is
    skipped the bounds are nan. An error of the metric on the full sample propagates.

    ``scipy.stats.bootstrap(paired=True)`` is not used because it cannot skip resamples on
    which the metric is undefined.
    """
    _check_confidence(confidence)
    y_true, y_pred = _paired(("y_true", "y_pred_or_score"), y_true, y_pred_or_score)
    point = float(metric(y_true, y_pred))
    values = _bootstrap(lambda idx: metric(y_true[idx], y_pred[idx]), len(y_true),
                        n_resamples, seed)
    return (point, *_percentile_interval(values, confidence))


def paired_bootstrap(metric: Metric, y_true: ArrayLike, pred_a: ArrayLike, pred_b: ArrayLike,
                     n_resamples: int = 1000, seed: int = 0,
                     confidence: float = 0.95) -> PairedBootstrapResult:
    """Bootstrap the difference ``metric(y, pred_b) - metric(y, pred_a)``.

    Both variants are scored on the same resampled items, so item difficulty cancels out.
    ``p_value`` is one-sided for "B is better than A" on a higher-is-better metric; for a
    loss, swap A and B or negate the metric.
    """
    _check_confidence(confidence)
    y_true, pred_a, pred_b = _paired(("y_true", "pred_a", "pred_b"), y_true, pred_a, pred_b)

    def delta(idx: np.ndarray) -> float:
        return metric(y_true[idx], pred_b[idx]) - metric(y_true[idx], pred_a[idx])

    point = float(delta(np.arange(len(y_true))))
    deltas = _bootstrap(delta, len(y_true), n_resamples, seed)
    low, high = _percentile_interval(deltas, confidence)
    p_value = float(np.mean(deltas <= 0)) if deltas.size else float("nan")
    return PairedBootstrapResult(point, low, high, p_value, int(deltas.size))


def _as_bool(name: str, values: np.ndarray) -> np.ndarray:
    if values.ndim != 1 or not np.isin(values, (0, 1)).all():
        raise ValueError(f"{name} must be a 1-D boolean (or 0/1) array")
    return values.astype(bool)


def mcnemar_exact(correct_a: ArrayLike, correct_b: ArrayLike) -> McNemarResult:
    """Exact McNemar test: are classifiers A and B right on different items?

    ``correct_a[i]`` says whether A classified item ``i`` correctly. Only discordant items
    matter; under H0 each is equally likely to favour A or B, so the p-value is a two-sided
    binomial test of ``b`` successes in ``b + c`` trials with p = 0.5 (1.0 when there are
    no discordant items).
    """
    correct_a, correct_b = _paired(("correct_a", "correct_b"), correct_a, correct_b)
    correct_a, correct_b = _as_bool("correct_a", correct_a), _as_bool("correct_b", correct_b)
    b = int(np.sum(correct_a & ~correct_b))
    c = int(np.sum(~correct_a & correct_b))
    p_value = float(stats.binomtest(b, b + c, 0.5).pvalue) if b + c else 1.0
    return McNemarResult(b=b, c=c, n_discordant=b + c, p_value=p_value)


def wilcoxon_pairs(scores: Mapping[str, ArrayLike], alternative: str = "two-sided",
                   alpha: float = 0.05) -> pd.DataFrame:
    """Wilcoxon signed-rank test for every pair of variants scored on the same items.

    Pairs are ``itertools.combinations(sorted(names), 2)``; for each pair ``(a, b)`` the test
    is on the differences ``b - a`` (so ``alternative="greater"`` means b scores higher).
    Zero differences are dropped (scipy's default ``zero_method="wilcox"``); a pair whose
    differences are all zero gets statistic 0 and p-value 1. ``p_bonferroni`` multiplies
    by the number of pairs (capped at 1) and ``significant`` is ``p_bonferroni < alpha``.
    Columns: a, b, n, mean_diff, statistic, p_value, p_bonferroni, significant.
    """
    if alternative not in _ALTERNATIVES:
        raise ValueError(f"unknown alternative {alternative!r}; expected one of {_ALTERNATIVES}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if len(scores) < 2:
        raise ValueError(f"need at least two variants to compare, got {sorted(scores)}")
    arrays = {name: np.asarray(values, dtype=float) for name, values in scores.items()}
    for name, arr in arrays.items():
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError(f"scores of variant {name!r} must be a non-empty 1-D array")
        if np.isnan(arr).any():
            raise ValueError(f"scores of variant {name!r} contain NaN")

    pairs = list(itertools.combinations(sorted(arrays), 2))
    rows = []
    for a, b in pairs:
        x, y = arrays[a], arrays[b]
        if len(x) != len(y):
            raise ValueError(f"variants {a!r} ({len(x)} items) and {b!r} ({len(y)} items) "
                             "must be scored on the same items")
        diff = y - x
        if np.all(diff == 0):
            # No evidence of any difference; scipy would divide by zero here (nan + warning
            # or an error depending on the version), so answer directly.
            statistic, p_value = 0.0, 1.0
        else:
            result = stats.wilcoxon(y, x, alternative=alternative)
            statistic, p_value = float(result.statistic), float(result.pvalue)
        rows.append({"a": a, "b": b, "n": len(x), "mean_diff": float(diff.mean()),
                     "statistic": statistic, "p_value": p_value})
    table = pd.DataFrame(rows)
    table["p_bonferroni"] = np.minimum(1.0, table["p_value"] * len(pairs))
    table["significant"] = table["p_bonferroni"] < alpha
    return table


def mean_ci(values: ArrayLike, confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and Student-t confidence interval ``(mean, low, high)``.

    A single value has no spread estimate, so its bounds are nan; values that are all equal
    give the degenerate interval ``(v, v, v)``.
    """
    _check_confidence(confidence)
    values = np.asarray(values, dtype=float)
    if values.ndim != 1 or values.size == 0:
        raise ValueError("mean_ci needs a non-empty 1-D array")
    if not np.isfinite(values).all():
        raise ValueError("mean_ci values contain NaN or infinity")
    mean = float(values.mean())
    if values.size == 1:
        return mean, float("nan"), float("nan")
    sem = float(stats.sem(values))
    if sem == 0:
        # scipy returns nan for a zero scale, but the interval is really just the point.
        return mean, mean, mean
    low, high = stats.t.interval(confidence, df=values.size - 1, loc=mean, scale=sem)
    return mean, float(low), float(high)


def _top_classes(values: pd.Series) -> list[Hashable]:
    """The most frequent classes in sorted order (more than one on a tie)."""
    counts = values.value_counts()
    return sorted(counts.index[counts == counts.max()])


def _votes(values: pd.Series) -> str:
    counts = values.value_counts()
    return ",".join(f"{cls}:{int(counts[cls])}" for cls in sorted(counts.index))


def group_vote(files: pd.DataFrame, *, all_filtered_class: Hashable, group_col: str = "group",
               pred_col: str = "predicted", label_col: str = "label", kept_col: str = "kept",
               prob_col: str | None = None,
               positive_class: Hashable | None = None) -> pd.DataFrame:
    """Group-level (e.g. patient-level) majority vote over the group's kept files.

    - ``predicted``: majority of ``pred_col`` over the files whose ``kept_col`` is True. A
      tie is broken by the mean of ``prob_col`` over those files (binary only: mean >= 0.5
      picks ``positive_class``, the class ``prob_col`` is the probability of) when
      ``prob_col`` is given, else by the smallest tied class in sorted order.
    - A group with no kept file gets ``all_filtered_class`` and ``all_filtered=True``.
    - ``label``: majority of ``label_col`` over all the group's files, kept or not. A tie is
      always broken by the smallest class in sorted order, never by ``prob_col``: letting
      model scores choose the ground truth would bias the evaluation towards the model.
    - ``votes``: the kept predictions' counts as ``"class:count"`` joined by commas in
      sorted class order, e.g. ``"bad:1,good:3"`` ("" for an all-filtered group).

    Output columns (fixed names, whatever the input names): group, label, predicted,
    n_files, n_kept, all_filtered, votes; one row per group, sorted by group.
    """
    required = [group_col, pred_col, label_col, kept_col] + ([prob_col] if prob_col else [])
    missing = [col for col in required if col not in files.columns]
    if missing:
        raise ValueError(f"group_vote: missing column(s) {missing}")
    if files.empty:
        raise ValueError("group_vote: no files")
    if not pd.api.types.is_bool_dtype(files[kept_col]):
        raise ValueError(f"group_vote: column {kept_col!r} must be boolean, "
                         f"got {files[kept_col].dtype}")
    kept = files[kept_col].to_numpy(dtype=bool)
    # Filtered files may never have been predicted, so only kept rows need predictions.
    for col, rows in ((group_col, files), (label_col, files), (pred_col, files[kept])):
        if rows[col].isna().any():
            raise ValueError(f"group_vote: column {col!r} has missing values")

    if prob_col is not None:
        if positive_class is None:
            raise ValueError("group_vote: prob_col needs positive_class (the class it is the "
                             "probability of)")
        classes = set(files[label_col]) | set(files.loc[kept, pred_col]) | {positive_class}
        if len(classes) > 2:
            raise ValueError(f"group_vote: prob_col tie-break is binary only, found classes "
                             f"{sorted(classes, key=str)}")
        if files.loc[kept, prob_col].isna().any():
            raise ValueError(f"group_vote: column {prob_col!r} has missing values")

    rows = []
    for group, frame in files.groupby(group_col, sort=True):
        kept_frame = frame[frame[kept_col]]
        label = _top_classes(frame[label_col])[0]
        if kept_frame.empty:
            predicted, votes = all_filtered_class, ""
        else:
            tied = _top_classes(kept_frame[pred_col])
            predicted = tied[0]
            if len(tied) > 1 and prob_col is not None:
                # Binary (checked above): the tie is between positive_class and the other.
                other = next(cls for cls in tied if cls != positive_class)
                predicted = positive_class if kept_frame[prob_col].mean() >= 0.5 else other
            votes = _votes(kept_frame[pred_col])
        rows.append({"group": group, "label": label, "predicted": predicted,
                     "n_files": len(frame), "n_kept": len(kept_frame),
                     "all_filtered": kept_frame.empty, "votes": votes})
    return pd.DataFrame(rows)
