"""Outlier filtering of audio files by reconstruction loss and by signal energy.

Each quantity has its own :class:`OutlierRule`. Bounds are computed from the values
themselves (median/IQR, mean/std, quantiles) or fixed (hardcode); a value outside
``[low, high]`` marks its file as an outlier. Non-finite values (NaN, +-inf) are always
outliers when a filter is on: a file whose loss or energy could not be measured is not
trustworthy evidence.
"""
from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from pydantic import ConfigDict, model_validator

from pipeline.config import Section

Mode = Literal["median", "mean", "percentile", "hardcode"]

# Defaults are written into the rule at validation time, so a dumped/logged rule records
# the numbers that were actually used rather than ``None``.
_DEFAULTS: dict[str, dict[str, float]] = {
    "median": {"k": 1.5},
    "mean": {"k": 3.0},
    "percentile": {"lower": 0.05, "upper": 0.95},
    "hardcode": {"lower": 1.5, "upper": 7.0},
}

# The modes that read each optional field. Setting a field the mode ignores is an error,
# so a misplaced knob (e.g. ``k`` with ``percentile``) cannot be silently without effect.
_USED_BY: dict[str, tuple[str, ...]] = {
    "k": ("median", "mean"),
    "lower": ("percentile", "hardcode"),
    "upper": ("percentile", "hardcode"),
    "hard_low": ("median", "mean"),
    "hard_high": ("median", "mean"),
}

REASON_RECON = "reconstruction_loss"
REASON_ENERGY = "signal_energy"
REASON_BOTH = f"{REASON_RECON}+{REASON_ENERGY}"


class OutlierRule(Section):
    """How to bound one quantity; ``mode=None`` turns the filter off.

    - ``median``: ``[Q1 - k*IQR, Q3 + k*IQR]`` (k default 1.5)
    - ``mean``: ``[mean - k*std, mean + k*std]`` with population std (k default 3.0)
    - ``percentile``: ``[quantile(lower), quantile(upper)]`` (defaults 0.05, 0.95)
    - ``hardcode``: ``[lower, upper]`` as given (defaults 1.5, 7.0)

    ``hard_low``/``hard_high`` (median/mean only) tighten the computed bounds with absolute
    limits, e.g. to drop near-silent files even when the whole set is quiet.
    """

    model_config = ConfigDict(allow_inf_nan=False)

    mode: Mode | None = None
    k: float | None = None
    lower: float | None = None
    upper: float | None = None
    hard_low: float | None = None
    hard_high: float | None = None

    @model_validator(mode="before")
    @classmethod
    def _fill_defaults(cls, data: Any) -> Any:
        mode = data.get("mode") if isinstance(data, dict) else None
        if isinstance(mode, str) and mode in _DEFAULTS:
            data = dict(data)
            for field, value in _DEFAULTS[mode].items():
                if data.get(field) is None:
                    data[field] = value
        return data

    @model_validator(mode="after")
    def _check(self) -> OutlierRule:
        for field, modes in _USED_BY.items():
            if getattr(self, field) is not None and self.mode not in modes:
                raise ValueError(f"{field} is only allowed with mode {' or '.join(modes)}, "
                                 f"not with mode {self.mode!r}")
        if self.k is not None and self.k <= 0:
            raise ValueError(f"k must be > 0, got {self.k}")
        if self.mode == "percentile" and not 0 <= self.lower < self.upper <= 1:
            raise ValueError("percentile mode needs 0 <= lower < upper <= 1, "
                             f"got lower={self.lower}, upper={self.upper}")
        if self.mode == "hardcode" and not self.lower < self.upper:
            raise ValueError("hardcode mode needs lower < upper, "
                             f"got lower={self.lower}, upper={self.upper}")
        if (self.hard_low is not None and self.hard_high is not None
                and not self.hard_low < self.hard_high):
            raise ValueError("hard_low must be < hard_high, "
                             f"got hard_low={self.hard_low}, hard_high={self.hard_high}")
        return self


class FilterParams(Section):
    """The outlier filter: one rule per quantity, both off by default."""

    reconstruction: OutlierRule = OutlierRule()
    energy: OutlierRule = OutlierRule()
    level: Literal["segment", "file"] = "segment"  # with featurize.segment: judge windows or recordings


def _as_values(values: ArrayLike) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"expected a non-empty 1-D array of values, got shape {values.shape}")
    return values


def _bounds(values: np.ndarray, rule: OutlierRule) -> tuple[float, float]:
    if rule.mode is None:
        return -np.inf, np.inf
    if rule.mode == "hardcode":
        low, high = rule.lower, rule.upper
    else:
        # Non-finite values are outliers themselves and would poison every statistic.
        finite = values[np.isfinite(values)]
        if finite.size == 0:
            raise ValueError(f"no finite values to compute {rule.mode!r} bounds from")
        if rule.mode == "median":
            q1, q3 = np.percentile(finite, [25, 75])
            low, high = q1 - rule.k * (q3 - q1), q3 + rule.k * (q3 - q1)
        elif rule.mode == "mean":
            mean, std = finite.mean(), finite.std()  # ddof=0: describes this set, no inference
            low, high = mean - rule.k * std, mean + rule.k * std
        else:
            low, high = np.quantile(finite, [rule.lower, rule.upper])
    # Hard cuts only tighten; if they cross the computed bounds every file is an outlier,
    # which is what the configured limits say.
    if rule.hard_low is not None:
        low = max(low, rule.hard_low)
    if rule.hard_high is not None:
        high = min(high, rule.hard_high)
    return float(low), float(high)


def _evaluate(values: ArrayLike, rule: OutlierRule) -> tuple[np.ndarray, float, float]:
    """Outlier mask and the ``(low, high)`` bounds it was decided with."""
    values = _as_values(values)
    low, high = _bounds(values, rule)
    if rule.mode is None:
        return np.zeros(values.shape, dtype=bool), low, high
    # Written as "not inside" so NaN (every comparison False) counts as an outlier.
    return ~((values >= low) & (values <= high)), low, high


def bounds(values: ArrayLike, rule: OutlierRule) -> tuple[float, float]:
    """``(low, high)`` bounds of ``rule`` over ``values``; ``(-inf, inf)`` when off."""
    return _bounds(_as_values(values), rule)


def outlier_mask(values: ArrayLike, rule: OutlierRule) -> np.ndarray:
    """Boolean mask, True where a value is an outlier (outside the bounds or non-finite).

    With ``mode=None`` nothing is an outlier.
    """
    return _evaluate(values, rule)[0]


def select_ignored(table: pd.DataFrame, recon_rule: OutlierRule, energy_rule: OutlierRule,
                   recon_col: str = "reconstruction_loss", energy_col: str = "signal_energy",
                   file_col: str = "filename") -> pd.DataFrame:
    """Files flagged by either filter (the union), with why and the bounds used.

    Bounds are computed over the whole ``table``. Output columns (fixed names): filename,
    reason ("reconstruction_loss", "signal_energy" or "reconstruction_loss+signal_energy"),
    reconstruction_loss, signal_energy, recon_low, recon_high, energy_low, energy_high;
    rows in table order. A filter that is off reports bounds ``(-inf, inf)``.
    """
    missing = [col for col in (file_col, recon_col, energy_col) if col not in table.columns]
    if missing:
        raise ValueError(f"select_ignored: missing column(s) {missing}")
    if table.empty:
        raise ValueError("select_ignored: the table has no files")
    recon = table[recon_col].to_numpy(dtype=float, na_value=np.nan)
    energy = table[energy_col].to_numpy(dtype=float, na_value=np.nan)
    recon_out, recon_low, recon_high = _evaluate(recon, recon_rule)
    energy_out, energy_low, energy_high = _evaluate(energy, energy_rule)

    reason = np.select([recon_out & energy_out, recon_out, energy_out],
                       [REASON_BOTH, REASON_RECON, REASON_ENERGY], default="")
    ignored = recon_out | energy_out
    return pd.DataFrame({
        "filename": table[file_col].array[ignored],  # .array keeps the dtype
        "reason": reason[ignored],
        "reconstruction_loss": recon[ignored],
        "signal_energy": energy[ignored],
        "recon_low": recon_low,
        "recon_high": recon_high,
        "energy_low": energy_low,
        "energy_high": energy_high,
    })
