"""Outlier rules, bounds and the union filter, checked against hand-computed numbers.

Reference array X = [1, 2, 3, 4, 5, 100] (n = 6). Linear-interpolation quantile q sits at
position (n - 1) * q = 5q of the sorted values:
  Q1: position 1.25 -> 2 + 0.25 * (3 - 2)   = 2.25
  Q3: position 3.75 -> 4 + 0.75 * (5 - 4)   = 4.75    IQR = 2.5
  q05: position 0.25 -> 1 + 0.25 * (2 - 1)  = 1.25
  q95: position 4.75 -> 5 + 0.75 * (100 - 5) = 76.25
  mean = 115 / 6; population variance = (sum x^2 - n mean^2) / n
       = (10055 - 13225 / 6) / 6 = 47105 / 36, so std = sqrt(47105) / 6 (~36.17)
"""
import math

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from pipeline.outliers import FilterParams, OutlierRule, bounds, outlier_mask, select_ignored

X = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 100.0])
MEAN = 115 / 6
STD = math.sqrt(47105) / 6


def _flags(*indices: int, n: int = 6) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    mask[list(indices)] = True
    return mask


# --- bounds and masks, one mode at a time ---------------------------------------------

def test_median_mode_default_k():
    rule = OutlierRule(mode="median")
    # [2.25 - 1.5 * 2.5, 4.75 + 1.5 * 2.5]
    assert bounds(X, rule) == pytest.approx((-1.5, 8.5))
    np.testing.assert_array_equal(outlier_mask(X, rule), _flags(5))


def test_median_mode_value_on_the_bound_is_kept():
    rule = OutlierRule(mode="median", k=0.5)
    # [2.25 - 0.5 * 2.5, 4.75 + 0.5 * 2.5] = [1.0, 6.0]: 1 sits exactly on the low bound.
    assert bounds(X, rule) == pytest.approx((1.0, 6.0))
    np.testing.assert_array_equal(outlier_mask(X, rule), _flags(5))


def test_mean_mode_default_k_uses_population_std():
    rule = OutlierRule(mode="mean")
    # [mean - 3 std, mean + 3 std] ~ [-89.35, 127.69]: 100 is inside.
    assert bounds(X, rule) == pytest.approx((MEAN - 3 * STD, MEAN + 3 * STD))
    assert not outlier_mask(X, rule).any()


def test_mean_mode_k1():
    rule = OutlierRule(mode="mean", k=1.0)
    # [19.17 - 36.17, 19.17 + 36.17] ~ [-17.0, 55.3]
    assert bounds(X, rule) == pytest.approx((MEAN - STD, MEAN + STD))
    np.testing.assert_array_equal(outlier_mask(X, rule), _flags(5))


def test_percentile_mode_defaults():
    rule = OutlierRule(mode="percentile")
    assert bounds(X, rule) == pytest.approx((1.25, 76.25))
    np.testing.assert_array_equal(outlier_mask(X, rule), _flags(0, 5))


def test_percentile_mode_custom_quantiles():
    rule = OutlierRule(mode="percentile", lower=0.2, upper=0.8)
    # positions 1.0 and 4.0 -> exactly the sorted values 2 and 5
    assert bounds(X, rule) == pytest.approx((2.0, 5.0))
    np.testing.assert_array_equal(outlier_mask(X, rule), _flags(0, 5))


def test_hardcode_mode_defaults():
    rule = OutlierRule(mode="hardcode")
    assert bounds(X, rule) == (1.5, 7.0)
    np.testing.assert_array_equal(outlier_mask(X, rule), _flags(0, 5))


def test_hardcode_mode_custom():
    rule = OutlierRule(mode="hardcode", lower=0.0, upper=4.0)
    assert bounds(X, rule) == (0.0, 4.0)
    np.testing.assert_array_equal(outlier_mask(X, rule), _flags(4, 5))


def test_hard_high_tightens_median_bounds():
    rule = OutlierRule(mode="median", hard_high=4.5)
    # min(8.5, 4.5) = 4.5: 5 becomes an outlier too
    assert bounds(X, rule) == pytest.approx((-1.5, 4.5))
    np.testing.assert_array_equal(outlier_mask(X, rule), _flags(4, 5))


def test_hard_low_tightens_median_bounds():
    rule = OutlierRule(mode="median", hard_low=2.0)
    # max(-1.5, 2.0) = 2.0
    assert bounds(X, rule) == pytest.approx((2.0, 8.5))
    np.testing.assert_array_equal(outlier_mask(X, rule), _flags(0, 5))


def test_hard_cuts_never_loosen():
    rule = OutlierRule(mode="median", hard_low=-10.0, hard_high=50.0)
    assert bounds(X, rule) == pytest.approx((-1.5, 8.5))


def test_hard_low_with_mean_mode():
    rule = OutlierRule(mode="mean", k=1.0, hard_low=0.0)
    # max(-17.0, 0.0) = 0.0
    assert bounds(X, rule) == pytest.approx((0.0, MEAN + STD))


def test_mode_none_is_off():
    rule = OutlierRule()
    values = np.append(X, np.nan)
    assert bounds(values, rule) == (-np.inf, np.inf)
    assert not outlier_mask(values, rule).any()


def test_non_finite_values_are_outliers_and_ignored_by_statistics():
    values = np.append(X, [np.nan, np.inf])
    rule = OutlierRule(mode="median")
    # Statistics over the finite values only: same bounds as for X.
    assert bounds(values, rule) == pytest.approx((-1.5, 8.5))
    np.testing.assert_array_equal(outlier_mask(values, rule), _flags(5, 6, 7, n=8))


def test_all_nan_values():
    values = np.array([np.nan, np.nan])
    with pytest.raises(ValueError, match="no finite values"):
        outlier_mask(values, OutlierRule(mode="median"))
    # hardcode needs no statistics: every NaN is simply an outlier
    assert outlier_mask(values, OutlierRule(mode="hardcode")).all()


@pytest.mark.parametrize("values", [np.array([]), np.ones((2, 2))])
def test_bad_value_arrays(values):
    with pytest.raises(ValueError, match="non-empty 1-D"):
        outlier_mask(values, OutlierRule(mode="median"))


# --- rule validation ------------------------------------------------------------------

@pytest.mark.parametrize(("mode", "expected"), [
    ("median", {"k": 1.5}),
    ("mean", {"k": 3.0}),
    ("percentile", {"lower": 0.05, "upper": 0.95}),
    ("hardcode", {"lower": 1.5, "upper": 7.0}),
])
def test_defaults_are_recorded_in_the_rule(mode, expected):
    dumped = OutlierRule(mode=mode).model_dump()
    assert {key: dumped[key] for key in expected} == expected


@pytest.mark.parametrize(("config", "message"), [
    ({"mode": "percentile", "hard_low": 1.0}, "hard_low is only allowed with mode median"),
    ({"mode": "hardcode", "hard_high": 1.0}, "hard_high is only allowed with mode median"),
    ({"hard_low": 1.0}, "hard_low is only allowed"),
    ({"mode": "percentile", "k": 2.0}, "k is only allowed with mode median or mean"),
    ({"mode": "median", "lower": 0.1}, "lower is only allowed with mode percentile"),
    ({"mode": "percentile", "lower": 0.9, "upper": 0.1}, "0 <= lower < upper <= 1"),
    ({"mode": "percentile", "upper": 1.5}, "0 <= lower < upper <= 1"),
    ({"mode": "percentile", "lower": -0.1}, "0 <= lower < upper <= 1"),
    ({"mode": "hardcode", "lower": 7.0, "upper": 7.0}, "lower < upper"),
    ({"mode": "median", "k": 0.0}, "k must be > 0"),
    ({"mode": "mean", "k": -1.0}, "k must be > 0"),
    ({"mode": "median", "hard_low": 5.0, "hard_high": 1.0}, "hard_low must be < hard_high"),
    ({"mode": "iqr"}, "mode"),
    ({"mode": "median", "kk": 1.0}, "Extra inputs are not permitted"),
    ({"mode": "median", "k": float("nan")}, "finite"),
])
def test_invalid_rules(config, message):
    with pytest.raises(ValidationError, match=message):
        OutlierRule(**config)


def test_filter_params():
    assert FilterParams() == FilterParams(reconstruction=OutlierRule(), energy=OutlierRule())
    params = FilterParams.model_validate(
        {"reconstruction": {"mode": "median"}, "energy": {"mode": "hardcode", "lower": 0.5}})
    assert params.reconstruction.k == 1.5
    assert (params.energy.lower, params.energy.upper) == (0.5, 7.0)
    with pytest.raises(ValidationError, match="Extra inputs"):
        FilterParams.model_validate({"recon": {"mode": "median"}})
    with pytest.raises(ValidationError, match="hard_low is only allowed"):
        FilterParams.model_validate({"energy": {"mode": "percentile", "hard_low": 1.0}})


# --- select_ignored -------------------------------------------------------------------

def _table() -> pd.DataFrame:
    return pd.DataFrame({
        "filename": [f"f{i}.wav" for i in range(6)],
        "reconstruction_loss": X,
        "signal_energy": [1.0, 2.0, 3.0, 9.0, 5.0, 3.0],
    })


def test_select_ignored_union_and_reasons():
    # recon percentile bounds (1.25, 76.25) flag f0 and f5;
    # energy hardcode bounds (1.5, 7.0) flag f0 (1.0) and f3 (9.0).
    out = select_ignored(_table(), OutlierRule(mode="percentile"), OutlierRule(mode="hardcode"))
    assert list(out.columns) == ["filename", "reason", "reconstruction_loss", "signal_energy",
                                 "recon_low", "recon_high", "energy_low", "energy_high"]
    assert list(out["filename"]) == ["f0.wav", "f3.wav", "f5.wav"]
    assert list(out["reason"]) == ["reconstruction_loss+signal_energy", "signal_energy",
                                   "reconstruction_loss"]
    assert list(out["reconstruction_loss"]) == [1.0, 4.0, 100.0]
    assert list(out["signal_energy"]) == [1.0, 9.0, 3.0]
    assert out["recon_low"].tolist() == pytest.approx([1.25] * 3)
    assert out["recon_high"].tolist() == pytest.approx([76.25] * 3)
    assert out["energy_low"].tolist() == [1.5] * 3
    assert out["energy_high"].tolist() == [7.0] * 3


def test_select_ignored_custom_columns_and_one_filter_off():
    table = _table().rename(columns={"filename": "path", "reconstruction_loss": "mse",
                                     "signal_energy": "rms"})
    out = select_ignored(table, OutlierRule(mode="median"), OutlierRule(), recon_col="mse",
                         energy_col="rms", file_col="path")
    assert list(out["filename"]) == ["f5.wav"]
    assert list(out["reason"]) == ["reconstruction_loss"]
    assert (out["energy_low"].iloc[0], out["energy_high"].iloc[0]) == (-np.inf, np.inf)


def test_select_ignored_nothing_flagged():
    out = select_ignored(_table(), OutlierRule(), OutlierRule())
    assert out.empty
    assert "reason" in out.columns


def test_select_ignored_bad_tables():
    with pytest.raises(ValueError, match="missing column"):
        select_ignored(_table().drop(columns="signal_energy"), OutlierRule(), OutlierRule())
    with pytest.raises(ValueError, match="no files"):
        select_ignored(_table().iloc[:0], OutlierRule(), OutlierRule())


def test_filter_stage_judges_segments_or_whole_files(tmp_path) -> None:
    """level: segment drops the odd window; level: file judges each recording by its mean and
    drops all of an outlying recording's windows."""
    from pipeline.stages.filter import run as filter_run

    rng = np.random.default_rng(0)
    for part, n_files in (("train", 30), ("val", 10), ("test", 10)):
        files = [f"{part}{i:02d}.wav" for i in range(n_files) for _ in range(4)]
        loss = rng.normal(1.0, 0.05, len(files))
        if part == "test":
            loss[0] = 5.0  # one window of test00 is odd
            loss[4:8] = 1.6  # every window of test01 is somewhat high
        pd.DataFrame({"filename": [f"{f}#{k % 4:04d}" for k, f in enumerate(files)], "file": files,
                      "reconstruction_loss": loss, "signal_energy": 1.0}).to_csv(tmp_path / f"{part}_recon.csv", index=False)
    rule = {"reconstruction": {"mode": "median", "k": 3.0}}
    by_segment, summary = filter_run(tmp_path, FilterParams.model_validate(rule))
    assert "test00.wav#0000" in set(by_segment["filename"]) and summary["level"] == "segment"
    by_file, summary = filter_run(tmp_path, FilterParams.model_validate({**rule, "level": "file"}))
    assert set(by_file["filename"]) >= {f"test01.wav#{k:04d}" for k in range(4)}
    assert summary["ignored_rows"] == len(by_file) == 4 * summary["ignored"]
