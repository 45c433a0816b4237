"""The champion gate: does a challenger beat the champion, and the reference baseline, for real?

Pure functions of prediction tables, so the register stage decides and the tests check the
decision without a registry. Task classify: one row per file (``path``, ``label``, ``predicted``,
``correct``, ``kept``, and the evaluate stage's ``baseline_predicted`` / ``baseline_correct``),
McNemar or a paired bootstrap. Task enhance: one row per test utterance (``path``, the metric
``register.enhance_metric`` and the spectral-gating reference's ``ref_<metric>``), a paired
Wilcoxon signed-rank test on the per-utterance scores.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field, field_validator
from scipy.stats import rankdata
from sklearn import metrics as skm

from pipeline.config import Section
from pipeline.stats import mcnemar_exact, paired_bootstrap, small_sample_warnings_ignored, wilcoxon_pairs

METRICS = {"accuracy": skm.accuracy_score, "balanced_accuracy": skm.balanced_accuracy_score,
           "f1_macro": lambda y, p: skm.f1_score(y, p, average="macro")}
TOLERANCE = 1e-9  # 1.0 - 0.9 is 0.0999…: a difference of exactly the bound must count


class GateParams(Section):
    metric: Literal["accuracy", "balanced_accuracy", "f1_macro"] = "balanced_accuracy"
    enhance_metric: Literal["si_snr", "pesq", "stoi"] = "si_snr"  # task enhance: per utterance, Wilcoxon
    test: Literal["mcnemar", "bootstrap"] = "mcnemar"
    alpha: float = Field(0.05, gt=0, lt=1)
    min_improvement: float = 0.0
    bootstrap_resamples: int = Field(2000, ge=100)
    seed: int = 0
    when_incomparable: Literal["keep", "promote"] = "keep"  # champion evaluated on other test files
    # at_least: refuse a model below the baseline or significantly worse than it;
    # significantly_better: require it to beat the baseline significantly; off: no baseline check
    baseline_gate: Literal["at_least", "significantly_better", "off"] = "at_least"

    @field_validator("baseline_gate", mode="before")
    @classmethod
    def _yaml_off(cls, value: object) -> object:
        return "off" if value is False else value  # YAML 1.1 reads a bare `off` as false


def paired_test(table: pd.DataFrame, a: str, b: str, p: GateParams) -> dict:
    """``p.metric`` of predictions ``b`` against ``a`` (column prefixes) on the same files, with
    ``p.test``'s p-value (McNemar: two-sided; bootstrap: one-sided for b better) and whether b is
    significantly worse than a."""
    score = METRICS[p.metric]
    with small_sample_warnings_ignored():  # a test set of one class is legal, if uninformative
        old, new = score(table["label"], table[f"{a}predicted"]), score(table["label"], table[f"{b}predicted"])
    out = {"metric": p.metric, "n_files": len(table), "improvement": float(new - old)}
    if p.test == "mcnemar":
        result = mcnemar_exact(table[f"{a}correct"].to_numpy(bool), table[f"{b}correct"].to_numpy(bool))
        out.update(test="mcnemar", p_value=result.p_value, discordant=[result.b, result.c])
        out["worse"] = bool(result.p_value < p.alpha and result.b > result.c)
    else:
        labels = sorted(set(table["label"]) | set(table[f"{a}predicted"]) | set(table[f"{b}predicted"]))
        code = {c: i for i, c in enumerate(labels)}
        y, pa, pb = (table[c].map(code).to_numpy() for c in ("label", f"{a}predicted", f"{b}predicted"))
        result = paired_bootstrap(score, y, pa, pb, n_resamples=p.bootstrap_resamples, seed=p.seed,
                                  confidence=1 - 2 * p.alpha)
        out.update(test="paired_bootstrap", p_value=result.p_value, ci=[result.low, result.high])
        out["worse"] = bool(result.high < 0)  # a one-sided test at alpha of "b is worse"
    return {**out, "a": float(old), "b": float(new)}


def champion_gate(challenger: pd.DataFrame, champion: pd.DataFrame | None, p: GateParams) -> dict:
    """Whether the challenger takes the alias from the champion (the champion's table: path,
    predicted, correct); compared on the challenger's kept files only."""
    if champion is None:
        return {"move": True, "why": "no champion yet"}
    both = challenger[challenger["kept"]].merge(champion, on="path", suffixes=("", "_champion"))
    both = both.rename(columns={"predicted_champion": "champion_predicted", "correct_champion": "champion_correct"})
    if len(both) < challenger["kept"].sum() or len(both) == 0:
        return {"move": p.when_incomparable == "promote",
                "why": f"champion was evaluated on other test files ({len(both)} of "
                       f"{int(challenger['kept'].sum())} shared): not comparable; "
                       f"register.when_incomparable={p.when_incomparable}"}
    return _against_champion(paired_test(both, "champion_", "", p), p)


def _against_champion(test: dict, p: GateParams) -> dict:
    """The champion gate's decision from a paired test of the champion (``a``) and the challenger (``b``)."""
    old, new = test.pop("a"), test.pop("b")
    test.pop("worse")
    wins = new - old >= p.min_improvement - TOLERANCE and new > old and test["p_value"] < p.alpha
    return {**test, "challenger": new, "champion": old, "move": bool(wins),
            "why": "challenger is significantly better" if wins else
                   f"not better enough: improvement {new - old:+.4f} (min {p.min_improvement}), "
                   f"p={test['p_value']:.4g} (alpha {p.alpha})"}


def baseline_gate(challenger: pd.DataFrame, p: GateParams) -> dict:
    """Whether the challenger clears the reference baseline on its kept test files (``passed``)."""
    if p.baseline_gate == "off":
        return {"gate": "off", "passed": True}
    if "baseline_predicted" not in challenger:
        raise ValueError("the predictions have no baseline columns (baseline_predicted); rerun the evaluate stage")
    return _against_baseline(paired_test(challenger[challenger["kept"]], "baseline_", "", p), p, p.metric,
                             "the baseline")


def _against_baseline(test: dict, p: GateParams, metric: str, name: str) -> dict:
    """The baseline gate's decision from a paired test of the baseline (``a``) and the model (``b``)."""
    base, model = test.pop("a"), test.pop("b")
    if p.baseline_gate == "at_least":
        passed = model >= base - TOLERANCE and not test["worse"]
        why = (f"at least as good as {name}" if passed else
               f"below {name}: {metric} {model:.4f} vs {base:.4f}, p={test['p_value']:.4g}")
    else:
        passed = model > base and test["p_value"] < p.alpha and not test["worse"]
        why = (f"significantly better than {name}" if passed else
               f"not significantly better than {name}: {metric} {model:.4f} vs {base:.4f}, "
               f"p={test['p_value']:.4g} (alpha {p.alpha})")
    return {"gate": p.baseline_gate, "model": model, "baseline": base, **test, "passed": bool(passed), "why": why}


# --- task enhance: per-utterance scores, paired Wilcoxon --------------------------------------------

def paired_wilcoxon(table: pd.DataFrame, a: str, b: str, p: GateParams) -> dict:
    """Column ``b`` against column ``a`` (per-utterance scores of one metric) on the same rows: the
    mean of each, the two-sided Wilcoxon p-value, and whether b is significantly worse (p below
    alpha and the signed ranks lean to a). Rows where either score is missing are left out."""
    for column in (a, b):
        if column not in table:
            raise ValueError(f"the predictions have no {column!r} column; rerun the evaluate stage")
    scores = table[[a, b]].astype(float)
    usable = scores.notna().all(axis=1)
    old, new = scores.loc[usable, a].to_numpy(), scores.loc[usable, b].to_numpy()
    if len(old) == 0:
        raise ValueError(f"no utterance has both {a!r} and {b!r} scores; rerun the evaluate stage")
    test = wilcoxon_pairs({"a": old, "b": new}, alpha=p.alpha).iloc[0]
    diff = (new - old)[new != old]
    signed_ranks = float((np.sign(diff) * rankdata(np.abs(diff))).sum()) if len(diff) else 0.0
    out = {"metric": p.enhance_metric, "test": "wilcoxon", "n_files": len(old),
           "improvement": float(new.mean() - old.mean()), "statistic": float(test["statistic"]),
           "p_value": float(test["p_value"]), "worse": bool(test["p_value"] < p.alpha and signed_ranks < 0)}
    if missing := int((~usable).sum()):
        out["n_missing"] = missing  # utterances without a score (recorded, not silently dropped)
    return {**out, "a": float(old.mean()), "b": float(new.mean())}


def enhance_baseline_gate(challenger: pd.DataFrame, p: GateParams) -> dict:
    """Whether the enhancer clears the spectral-gating reference (``ref_<metric>``) on the test
    utterances (``passed``): as ``baseline_gate``, with a paired Wilcoxon test."""
    if p.baseline_gate == "off":
        return {"gate": "off", "passed": True}
    metric = p.enhance_metric
    return _against_baseline(paired_wilcoxon(challenger, f"ref_{metric}", metric, p), p, metric,
                             "the reference (spectral gating)")


def enhance_champion_gate(challenger: pd.DataFrame, champion: pd.DataFrame | None, p: GateParams) -> dict:
    """Whether the enhancer takes the alias from the champion (the champion's table: path and
    ``p.enhance_metric``), compared on every test utterance of the challenger."""
    if champion is None:
        return {"move": True, "why": "no champion yet"}
    metric = p.enhance_metric
    shared = (challenger[["path", metric]].merge(champion[["path", metric]], on="path", suffixes=("", "_champion"))
              if metric in champion else challenger.iloc[:0])
    if len(shared) < len(challenger) or len(shared) == 0:
        return {"move": p.when_incomparable == "promote",
                "why": f"champion was evaluated on other test utterances or without {metric} ({len(shared)} of "
                       f"{len(challenger)} shared): not comparable; register.when_incomparable={p.when_incomparable}"}
    return _against_champion(paired_wilcoxon(shared, f"{metric}_champion", metric, p), p)
