"""Group-aware splits: a held-out test set by group, stratified group k-fold over the rest.

A group (speaker, patient) never spans train, validation and test, so scores measure how a
model does on people it has never heard. :func:`check_leakage` guards that promise.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from pydantic import Field
from sklearn.model_selection import StratifiedGroupKFold

from pipeline.config import Section


class SplitParams(Section):
    test_fraction: float = Field(0.2, gt=0, lt=0.5)
    n_folds: int = Field(5, ge=2)
    seed: int = 0


class LeakageError(ValueError):
    """A group appears in more than one of train / val / test."""


def assign(labels: pd.Series, groups: pd.Series, p: SplitParams) -> pd.DataFrame:
    """Split rows into ``split`` (train|test) and ``fold`` (0..k-1 for train rows, -1 for test).

    Test groups are the first fold of a stratified group k-fold with k = round(1/test_fraction);
    the remaining rows get their validation fold from a second stratified group k-fold.
    """
    n_groups = groups.nunique()
    holdout_k = max(2, round(1 / p.test_fraction))
    if n_groups < holdout_k:
        raise ValueError(f"{n_groups} groups are too few for test_fraction={p.test_fraction} and "
                         f"n_folds={p.n_folds}: need at least {holdout_k} (featurize.split)")
    x = np.zeros(len(labels))
    outer = StratifiedGroupKFold(n_splits=holdout_k, shuffle=True, random_state=p.seed)
    _, test_idx = next(outer.split(x, labels, groups))
    split = np.full(len(labels), "train", dtype=object)
    split[test_idx] = "test"
    # Stratification decides how many groups the test fold takes, so count what is left.
    left = groups[split == "train"].nunique()
    if left < p.n_folds:
        raise ValueError(
            f"{n_groups} groups are too few for test_fraction={p.test_fraction} and n_folds={p.n_folds}: "
            f"the test set took {n_groups - left}, leaving {left} for {p.n_folds} folds (featurize.split)")
    fold = np.full(len(labels), -1, dtype=np.int64)
    train_idx = np.flatnonzero(split == "train")
    inner = StratifiedGroupKFold(n_splits=p.n_folds, shuffle=True, random_state=p.seed)
    for k, (_, val) in enumerate(inner.split(x[train_idx], labels.iloc[train_idx], groups.iloc[train_idx])):
        fold[train_idx[val]] = k
    return pd.DataFrame({"split": split, "fold": fold}, index=labels.index)


def check_leakage(index: pd.DataFrame, group_col: str = "group") -> None:
    """Raise :class:`LeakageError` naming each group found in two of train/val/test in any fold."""
    test_groups = set(index.loc[index["split"] == "test", group_col])
    problems = []
    for k in sorted(index.loc[index["split"] != "test", "fold"].unique()):
        trainval = index[index["split"] != "test"]
        val = set(trainval.loc[trainval["fold"] == k, group_col])
        train = set(trainval.loc[trainval["fold"] != k, group_col])
        for name, a, b in (("train/val", train, val), ("train/test", train, test_groups),
                           ("val/test", val, test_groups)):
            for g in sorted(a & b):
                problems.append(f"fold {k}: group '{g}' in {name}")
    if problems:
        raise LeakageError("group leakage: " + "; ".join(sorted(set(problems))))
