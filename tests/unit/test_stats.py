"""Statistics helpers, checked against hand-computed values."""
import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, roc_auc_score

from pipeline.stats import (McNemarResult, bootstrap_ci, group_vote, mcnemar_exact, mean_ci,
                            paired_bootstrap, wilcoxon_pairs)


# --- McNemar --------------------------------------------------------------------------

def _pairs(both: int, only_a: int, only_b: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    correct_a = [True] * both + [True] * only_a + [False] * only_b + [False] * neither
    correct_b = [True] * both + [False] * only_a + [True] * only_b + [False] * neither
    return np.array(correct_a), np.array(correct_b)


def test_mcnemar_small_table():
    # b = 1, c = 6: p = 2 * (C(7,0) + C(7,1)) / 2^7 = 2 * 8 / 128 = 0.125
    result = mcnemar_exact(*_pairs(both=10, only_a=1, only_b=6, neither=3))
    assert result == McNemarResult(b=1, c=6, n_discordant=7, p_value=pytest.approx(0.125))


def test_mcnemar_is_symmetric_and_accepts_zero_one():
    correct_a, correct_b = _pairs(both=2, only_a=6, only_b=1, neither=0)
    result = mcnemar_exact(correct_a.astype(int), correct_b.astype(int))
    assert (result.b, result.c) == (6, 1)
    assert result.p_value == pytest.approx(0.125)


def test_mcnemar_one_sided_table():
    # b = 0, c = 5: p = 2 * C(5,0) / 2^5 = 2 / 32 = 0.0625
    assert mcnemar_exact(*_pairs(both=4, only_a=0, only_b=5, neither=1)).p_value == \
        pytest.approx(0.0625)


def test_mcnemar_no_discordant_pairs():
    result = mcnemar_exact(*_pairs(both=3, only_a=0, only_b=0, neither=2))
    assert result == McNemarResult(b=0, c=0, n_discordant=0, p_value=1.0)


def test_mcnemar_bad_input():
    with pytest.raises(ValueError, match="length mismatch"):
        mcnemar_exact(np.array([True, False]), np.array([True]))
    with pytest.raises(ValueError, match="empty"):
        mcnemar_exact(np.array([], dtype=bool), np.array([], dtype=bool))
    with pytest.raises(ValueError, match="boolean"):
        mcnemar_exact(np.array([0, 2]), np.array([1, 0]))


# --- Wilcoxon + Bonferroni ------------------------------------------------------------

# a = [1..5]; b - a = [1, 2, 3, 4, 5]; c - a = [4, 1, 7, 2, 10]; c - b = [3, -1, 4, -2, 5].
# Exact null distribution for n = 5: each of the 2^5 = 32 sign patterns is equally likely.
#   (a, b), (a, c): every difference positive -> W- = 0; only the empty subset of ranks sums
#       to <= 0, so p = 2 * 1/32 = 0.0625.
#   (b, c): |d| = [3, 1, 4, 2, 5] -> ranks [3, 1, 4, 2, 5]; the negatives hold ranks 1 and 2,
#       W- = 3; subsets of {1..5} summing to <= 3: {}, {1}, {2}, {3}, {1,2} -> 5,
#       so p = 2 * 5/32 = 0.3125.
# Bonferroni over 3 pairs: 0.1875, 0.1875, 0.9375.
SCORES = {
    "c": np.array([5.0, 3.0, 10.0, 6.0, 15.0]),
    "a": np.array([1.0, 2.0, 3.0, 4.0, 5.0]),
    "b": np.array([2.0, 4.0, 6.0, 8.0, 10.0]),
}


def test_wilcoxon_pairs_three_variants():
    table = wilcoxon_pairs(SCORES)
    assert list(table.columns) == ["a", "b", "n", "mean_diff", "statistic", "p_value",
                                   "p_bonferroni", "significant"]
    assert list(zip(table["a"], table["b"])) == [("a", "b"), ("a", "c"), ("b", "c")]
    assert list(table["n"]) == [5, 5, 5]
    # mean differences: 15/5, 24/5, 9/5
    assert table["mean_diff"].tolist() == pytest.approx([3.0, 4.8, 1.8])
    # two-sided statistic = min(W+, W-): 0, 0, 3
    assert table["statistic"].tolist() == pytest.approx([0.0, 0.0, 3.0])
    assert table["p_value"].tolist() == pytest.approx([0.0625, 0.0625, 0.3125])
    assert table["p_bonferroni"].tolist() == pytest.approx([0.1875, 0.1875, 0.9375])
    assert not table["significant"].any()


def test_wilcoxon_pairs_alpha_and_one_sided():
    assert wilcoxon_pairs(SCORES, alpha=0.2)["significant"].tolist() == [True, True, False]
    # one-sided "b greater than a": only the all-positive pattern is as extreme, p = 1/32
    table = wilcoxon_pairs({"a": SCORES["a"], "b": SCORES["b"]}, alternative="greater")
    assert table["p_value"].iloc[0] == pytest.approx(1 / 32)
    assert table["p_bonferroni"].iloc[0] == pytest.approx(1 / 32)  # a single pair


def test_wilcoxon_pairs_identical_scores():
    table = wilcoxon_pairs({"x": SCORES["a"], "y": SCORES["a"].copy()})
    assert table["p_value"].iloc[0] == 1.0
    assert table["statistic"].iloc[0] == 0.0
    assert table["mean_diff"].iloc[0] == 0.0


def test_wilcoxon_pairs_bad_input():
    with pytest.raises(ValueError, match="'a' \\(5 items\\) and 'short' \\(2 items\\)"):
        wilcoxon_pairs({"a": SCORES["a"], "short": np.array([1.0, 2.0])})
    with pytest.raises(ValueError, match="at least two variants"):
        wilcoxon_pairs({"a": SCORES["a"]})
    with pytest.raises(ValueError, match="unknown alternative"):
        wilcoxon_pairs(SCORES, alternative="bigger")
    with pytest.raises(ValueError, match="non-empty"):
        wilcoxon_pairs({"a": np.array([]), "b": np.array([])})


# --- mean_ci --------------------------------------------------------------------------

def test_mean_ci_t_interval():
    # mean 3, sample sd sqrt(2.5), sem = sqrt(2.5 / 5) = sqrt(0.5);
    # t(0.975, df=4) = 2.7764451051977987 (t table)
    half = 2.7764451051977987 * math.sqrt(0.5)
    assert mean_ci(np.array([1.0, 2.0, 3.0, 4.0, 5.0])) == pytest.approx((3.0, 3 - half, 3 + half))


def test_mean_ci_degenerate_cases():
    mean, low, high = mean_ci(np.array([0.7]))
    assert mean == 0.7 and math.isnan(low) and math.isnan(high)
    assert mean_ci(np.array([2.0, 2.0, 2.0])) == (2.0, 2.0, 2.0)
    with pytest.raises(ValueError, match="non-empty"):
        mean_ci(np.array([]))
    with pytest.raises(ValueError, match="NaN"):
        mean_ci(np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match="confidence"):
        mean_ci(np.array([1.0, 2.0]), confidence=1.5)


# --- bootstrap ------------------------------------------------------------------------

RNG = np.random.default_rng(42)
Y_TRUE = RNG.integers(0, 2, size=200)
# a is right 60% of the time, b 90%: items 0..119 / 0..179 predicted correctly.
PRED_A = np.where(np.arange(200) < 120, Y_TRUE, 1 - Y_TRUE)
PRED_B = np.where(np.arange(200) < 180, Y_TRUE, 1 - Y_TRUE)


def test_bootstrap_ci_covers_point_and_is_reproducible():
    point, low, high = bootstrap_ci(accuracy_score, Y_TRUE, PRED_B, n_resamples=300, seed=3)
    assert point == pytest.approx(0.9)
    assert low < point < high
    assert bootstrap_ci(accuracy_score, Y_TRUE, PRED_B, n_resamples=300, seed=3) == \
        (point, low, high)
    assert bootstrap_ci(accuracy_score, Y_TRUE, PRED_B, n_resamples=300, seed=4) != \
        (point, low, high)


def test_bootstrap_ci_constant_metric():
    # every prediction right: every resample has accuracy 1
    assert bootstrap_ci(accuracy_score, Y_TRUE, Y_TRUE, n_resamples=50) == (1.0, 1.0, 1.0)


def test_bootstrap_ci_skips_undefined_resamples():
    # one positive in five: ~1/3 of resamples (0.8^5) hold a single class, where ROC AUC is
    # undefined; the rest still give an interval.
    y_true = np.array([0, 0, 0, 0, 1])
    score = np.array([0.1, 0.2, 0.3, 0.9, 0.8])
    point, low, high = bootstrap_ci(roc_auc_score, y_true, score, n_resamples=200)
    assert point == pytest.approx(0.75)  # 3 of the 4 negatives rank below the positive
    assert 0.0 <= low <= high <= 1.0


def test_bootstrap_ci_all_resamples_undefined():
    def distinct_only(y_true, y_pred):
        # defined only without repeated items: 20!/20^20 ~ 2e-8 of resamples qualify
        if len(np.unique(y_true)) < len(y_true):
            raise ValueError("undefined")
        return 1.0

    point, low, high = bootstrap_ci(distinct_only, np.arange(20), np.arange(20),
                                    n_resamples=50)
    assert point == 1.0 and math.isnan(low) and math.isnan(high)


def test_bootstrap_ci_bad_input():
    with pytest.raises(ValueError, match="length mismatch"):
        bootstrap_ci(accuracy_score, Y_TRUE, PRED_B[:10])
    with pytest.raises(ValueError, match="empty"):
        bootstrap_ci(accuracy_score, np.array([]), np.array([]))
    with pytest.raises(ValueError, match="n_resamples"):
        bootstrap_ci(accuracy_score, Y_TRUE, PRED_B, n_resamples=0)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci(accuracy_score, Y_TRUE, PRED_B, confidence=0.0)


def test_paired_bootstrap_sign():
    better = paired_bootstrap(accuracy_score, Y_TRUE, PRED_A, PRED_B, n_resamples=300)
    assert better.delta == pytest.approx(0.3)  # 0.9 - 0.6
    assert 0 < better.low < better.delta < better.high
    assert better.p_value < 0.01
    assert better.n_valid == 300

    worse = paired_bootstrap(accuracy_score, Y_TRUE, PRED_B, PRED_A, n_resamples=300)
    assert worse.delta == pytest.approx(-0.3)
    assert worse.high < 0
    assert worse.p_value > 0.99


def test_paired_bootstrap_identical_variants():
    # every resample's delta is exactly 0, which counts as "B not better"
    result = paired_bootstrap(accuracy_score, Y_TRUE, PRED_A, PRED_A, n_resamples=50)
    assert (result.delta, result.low, result.high, result.p_value) == (0.0, 0.0, 0.0, 1.0)


def test_paired_bootstrap_length_mismatch():
    with pytest.raises(ValueError, match="pred_b"):
        paired_bootstrap(accuracy_score, Y_TRUE, PRED_A, PRED_B[:-1])


# --- group_vote -----------------------------------------------------------------------

def _files() -> pd.DataFrame:
    rows = [
        # group, label, predicted, kept, prob(good)
        ("g2", "bad", "good", True, 0.9),   # kept vote tie 1-1, mean prob 0.65
        ("g2", "bad", "bad", True, 0.4),
        ("g1", "good", "good", True, 0.8),  # kept votes good 2, bad 1
        ("g1", "good", "good", True, 0.7),
        ("g1", "good", "bad", True, 0.3),
        ("g1", "good", None, False, None),  # filtered before prediction
        ("g3", "bad", "bad", False, 0.1),   # every file filtered
        ("g3", "bad", "good", False, 0.6),
        ("g4", "good", "bad", True, 0.2),   # label tie 1-1
        ("g4", "bad", "bad", True, 0.1),
    ]
    return pd.DataFrame(rows, columns=["group", "label", "predicted", "kept", "prob"])


def test_group_vote_sorted_tie_break_and_all_filtered():
    out = group_vote(_files(), all_filtered_class="good")
    assert list(out.columns) == ["group", "label", "predicted", "n_files", "n_kept",
                                 "all_filtered", "votes"]
    assert list(out["group"]) == ["g1", "g2", "g3", "g4"]
    # g2's prediction tie and g4's label tie go to "bad" (< "good"); g3 gets the default.
    assert list(out["label"]) == ["good", "bad", "bad", "bad"]
    assert list(out["predicted"]) == ["good", "bad", "good", "bad"]
    assert list(out["n_files"]) == [4, 2, 2, 2]
    assert list(out["n_kept"]) == [3, 2, 0, 2]
    assert list(out["all_filtered"]) == [False, False, True, False]
    assert list(out["votes"]) == ["bad:1,good:2", "bad:1,good:1", "", "bad:2"]


def test_group_vote_probability_tie_break():
    out = group_vote(_files(), all_filtered_class="bad", prob_col="prob",
                     positive_class="good")
    # g2: mean prob(good) = (0.9 + 0.4) / 2 = 0.65 >= 0.5 -> good; labels never use probs.
    assert list(out["predicted"]) == ["good", "good", "bad", "bad"]
    assert list(out["label"]) == ["good", "bad", "bad", "bad"]

    files = _files()
    files.loc[0, "prob"] = 0.5  # g2: mean (0.5 + 0.4) / 2 = 0.45 < 0.5 -> bad
    out = group_vote(files, all_filtered_class="bad", prob_col="prob", positive_class="good")
    assert out.loc[out["group"] == "g2", "predicted"].item() == "bad"


def test_group_vote_bad_input():
    files = _files()
    with pytest.raises(ValueError, match="missing column"):
        group_vote(files.drop(columns="kept"), all_filtered_class="good")
    with pytest.raises(ValueError, match="'kept' must be boolean"):
        group_vote(files.assign(kept=files["kept"].astype(int)), all_filtered_class="good")
    with pytest.raises(ValueError, match="positive_class"):
        group_vote(files, all_filtered_class="good", prob_col="prob")
    with pytest.raises(ValueError, match="binary only"):
        group_vote(files.replace({"label": {"bad": "noisy"}}), all_filtered_class="good",
                   prob_col="prob", positive_class="good")
    with pytest.raises(ValueError, match="'label' has missing values"):
        group_vote(files.assign(label=None), all_filtered_class="good")
    with pytest.raises(ValueError, match="no files"):
        group_vote(files.iloc[:0], all_filtered_class="good")
