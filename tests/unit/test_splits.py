"""pipeline.splits: whole groups per place, stratified folds, reproducible, leakage named."""
from __future__ import annotations

import pandas as pd
import pytest

from pipeline.splits import LeakageError, SplitParams, assign, check_leakage


def group_labelled(n_groups: int, clips: int = 10, classes: tuple[str, ...] = ("good", "bad")) -> pd.DataFrame:
    """Every group carries one class (like a diagnosis per patient); classes alternate by group."""
    rows = [{"group": f"g{g:02d}", "label": classes[g % len(classes)]} for g in range(n_groups) for _ in range(clips)]
    return pd.DataFrame(rows)


def clip_labelled(n_groups: int, classes: int = 5, per_class: int = 3) -> pd.DataFrame:
    """Every group says every class (like speakers saying every digit)."""
    rows = [{"group": f"s{g:02d}", "label": str(c)} for g in range(n_groups) for c in range(classes)
            for _ in range(per_class)]
    return pd.DataFrame(rows)


def split(frame: pd.DataFrame, **params) -> pd.DataFrame:
    return pd.concat([frame, assign(frame["label"], frame["group"], SplitParams(**params))], axis=1)


def place(index: pd.DataFrame) -> pd.Series:
    return index["split"].where(index["split"] == "test", "fold" + index["fold"].astype(str))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("make", [group_labelled, clip_labelled])
def test_whole_groups_stay_in_one_place(make, seed: int) -> None:
    index = split(make(20), test_fraction=0.25, n_folds=3, seed=seed)
    assert (index.assign(place=place(index)).groupby("group")["place"].nunique() == 1).all()
    check_leakage(index)  # does not raise


def test_output_columns_and_fold_numbers() -> None:
    frame = group_labelled(12)
    result = assign(frame["label"], frame["group"], SplitParams(test_fraction=0.25, n_folds=3))
    assert list(result.columns) == ["split", "fold"] and result.index.equals(frame.index)
    assert set(result["split"]) == {"train", "test"}
    assert set(result.loc[result["split"] == "test", "fold"]) == {-1}
    assert set(result.loc[result["split"] == "train", "fold"]) == {0, 1, 2}


@pytest.mark.parametrize(("test_fraction", "n_groups"), [(0.25, 20), (0.2, 20), (0.34, 12), (0.1, 40)])
def test_test_fraction_is_roughly_as_configured(test_fraction: float, n_groups: int) -> None:
    index = split(group_labelled(n_groups), test_fraction=test_fraction, n_folds=3)
    share = (index["split"] == "test").mean()
    assert share == pytest.approx(1 / round(1 / test_fraction), abs=0.06)
    assert index.loc[index["split"] == "test", "group"].nunique() == round(n_groups / round(1 / test_fraction))


@pytest.mark.parametrize("seed", range(5))
def test_every_fold_and_the_test_set_have_every_class(seed: int) -> None:
    frame = group_labelled(24, classes=("a", "b", "c"))
    index = split(frame, test_fraction=0.25, n_folds=3, seed=seed)
    counts = pd.crosstab(place(index), index["label"])
    assert list(counts.columns) == ["a", "b", "c"]
    assert sorted(counts.index) == ["fold0", "fold1", "fold2", "test"]
    assert (counts > 0).all().all(), counts
    # balanced in, roughly balanced out: each place holds 2 groups of each class
    assert (counts == 20).all().all(), counts


def test_seeded_reproducibility() -> None:
    frame = clip_labelled(15)
    a = split(frame, test_fraction=0.2, n_folds=4, seed=7)
    b = split(frame, test_fraction=0.2, n_folds=4, seed=7)
    pd.testing.assert_frame_equal(a, b)
    others = [split(frame, test_fraction=0.2, n_folds=4, seed=s) for s in range(3)]
    assert any(not o[["split", "fold"]].equals(a[["split", "fold"]]) for o in others)


def test_assign_respects_a_non_default_index() -> None:
    frame = group_labelled(8).set_axis(range(100, 180))
    result = assign(frame["label"], frame["group"], SplitParams(test_fraction=0.25, n_folds=3))
    assert list(result.index) == list(range(100, 180))


@pytest.mark.parametrize(("n_groups", "test_fraction", "n_folds"), [(3, 0.25, 3), (4, 0.2, 3), (5, 0.25, 5)])
def test_too_few_groups_is_a_clear_error(n_groups: int, test_fraction: float, n_folds: int) -> None:
    frame = group_labelled(n_groups)
    with pytest.raises(ValueError, match=rf"{n_groups} groups are too few for test_fraction={test_fraction} "
                                         rf"and n_folds={n_folds}"):
        assign(frame["label"], frame["group"], SplitParams(test_fraction=test_fraction, n_folds=n_folds))


def test_too_few_groups_left_after_the_holdout_is_a_clear_error() -> None:
    # 7 groups, k=3 holdout: a naive count expects 7 - 7 // 3 = 5 left, but the fold takes 3.
    frame = group_labelled(7)
    with pytest.raises(ValueError, match=r"too few .* the test set took 3, leaving 4 for 5 folds"):
        assign(frame["label"], frame["group"], SplitParams(test_fraction=0.3, n_folds=5))


@pytest.mark.parametrize(("key", "value"), [("test_fraction", 0.5), ("test_fraction", 0.0), ("n_folds", 1)])
def test_split_params_bounds(key: str, value: float) -> None:
    with pytest.raises(ValueError, match=key):
        SplitParams(**{key: value})


# --- check_leakage ---------------------------------------------------------------------

def hand_index(rows: list[tuple[str, str, int]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["group", "split", "fold"])


CLEAN = [("a", "train", 0), ("b", "train", 1), ("c", "test", -1), ("a", "train", 0)]


def test_check_leakage_accepts_a_clean_index() -> None:
    check_leakage(hand_index(CLEAN))


def test_check_leakage_names_a_group_in_train_and_test() -> None:
    with pytest.raises(LeakageError, match=r"group 'b' in train/test") as err:
        check_leakage(hand_index([*CLEAN, ("b", "test", -1)]))
    assert "'a'" not in str(err.value) and "'c'" not in str(err.value)


def test_check_leakage_names_a_group_in_two_folds() -> None:
    with pytest.raises(LeakageError, match=r"fold 0: group 'a' in train/val") as err:
        check_leakage(hand_index([*CLEAN, ("a", "train", 1)]))
    assert "fold 1: group 'a' in train/val" in str(err.value)


def test_check_leakage_on_a_custom_group_column() -> None:
    index = hand_index([*CLEAN, ("b", "test", -1)]).rename(columns={"group": "speaker"})
    with pytest.raises(LeakageError, match="'b'"):
        check_leakage(index, group_col="speaker")
    assert issubclass(LeakageError, ValueError)
