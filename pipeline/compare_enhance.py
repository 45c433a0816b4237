"""Compare speech-enhancement variants on per-utterance scores (``pipeline.compare --task enhance``).

Each experiment's evaluate run logs ``predictions.csv``: one row per test utterance with the
model's si_snr, si_snr_i, pesq, stoi and the spectral-gating reference's ``ref_*`` scores. The
reference is the same for every experiment on the same data, so it joins the table once, as the
row ``spectral_gating``. Per metric, every pair of rows is compared with a paired Wilcoxon
signed-rank test on the utterances they share, Bonferroni-corrected over all pairs x metrics.

Seeds (``--seeds N``, experiments ``<variant>-s<seed>``) pool as in classify: the tests pair
two variants' scores of the same utterance under the same seed; the reference is repeated per
seed so it pairs the same way, but its own row is computed once (it has no seed).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline import tracking  # noqa: E402
from pipeline.compare import evaluate_runs, is_enhance_run, seed_spread  # noqa: E402
from pipeline.io import atomic_dir  # noqa: E402
from pipeline.stats import bootstrap_ci, wilcoxon_pairs  # noqa: E402

METRICS = ("si_snr", "si_snr_i", "pesq", "stoi")
DEFAULT_METRICS = ["si_snr_i", "pesq", "stoi"]
REFERENCE = "spectral_gating"
REF = "ref_"  # column prefix of the reference's scores


def check_columns(table: pd.DataFrame, experiment: str, metrics: list[str]) -> None:
    """Refuse a table that is not an enhance evaluation or lacks one of ``metrics``."""
    needed = ["path", "group", *metrics, *(REF + m for m in metrics)]
    missing = [c for c in needed if c not in table]
    if missing:
        raise ValueError(f"experiment '{experiment}': predictions.csv lacks column(s) {missing}; "
                         "is it an evaluate run of task enhance (dvc exp run -S task=enhance)?")
    if table["path"].duplicated().any():
        dup = table.loc[table["path"].duplicated(), "path"].iloc[0]
        raise ValueError(f"experiment '{experiment}': utterance {dup!r} appears twice in predictions.csv")


def check_same_utterances(tables: dict[str, pd.DataFrame]) -> None:
    """Refuse experiments scored on different test utterances: their scores do not pair."""
    first, reference = next(iter(tables.items()))
    paths = set(reference["path"])
    for name, table in tables.items():
        other = set(table["path"])
        if other != paths:
            only_first, only_other = sorted(paths - other), sorted(other - paths)
            example = (only_first or only_other)[0]
            raise ValueError(
                f"experiments '{first}' ({len(paths)} utterances) and '{name}' ({len(other)}) were scored on "
                f"different test utterances ({len(only_first)} only in '{first}', {len(only_other)} only in "
                f"'{name}', e.g. {example!r}); compare experiments evaluated on the same data and split")


def check_same_reference(tables: dict[str, pd.DataFrame], metrics: list[str]) -> None:
    """The reference depends only on the noisy input: if it differs, the data differed."""
    first, base = next(iter(tables.items()))
    base = base.set_index("path").sort_index()
    for name, table in tables.items():
        table = table.set_index("path").loc[base.index]
        for m in metrics:
            if not np.allclose(base[REF + m], table[REF + m], equal_nan=True):
                raise ValueError(f"the spectral-gating reference ({REF + m}) differs between experiments "
                                 f"'{first}' and '{name}' on the same utterances: were they evaluated on "
                                 "different recordings or sample rates?")


def item_scores(table: pd.DataFrame, columns: list[str], level: str) -> pd.DataFrame:
    """``columns`` per utterance (indexed by path), or their mean per group (indexed by group)."""
    if level == "groups":
        return table.groupby("group")[columns].mean()
    return table.set_index("path")[columns]


def pooled_scores(tables: dict[str, pd.DataFrame], names: dict[str, tuple[str, int]], metrics: list[str],
                  level: str) -> dict[str, pd.DataFrame]:
    """Per variant in ``names`` order, then the reference: its metric columns indexed by (seed, item)."""
    parts: dict[str, dict[int, pd.DataFrame]] = {variant: {} for variant, _ in names.values()}
    parts[REFERENCE] = {}
    for run, table in tables.items():
        variant, seed = names[run]
        parts[variant][seed] = item_scores(table, metrics, level)
        # identical across runs (checked): one copy per seed, so it pairs with every variant's seeds
        parts[REFERENCE][seed] = item_scores(table, [REF + m for m in metrics], level).set_axis(metrics, axis=1)
    return {v: pd.concat(by_seed, names=["seed", "item"]).sort_index() for v, by_seed in parts.items()}


def variant_row(name: str, frame: pd.DataFrame, metrics: list[str], resamples: int) -> dict:
    """Mean, std and 95% bootstrap CI of each metric over the rows of ``frame``."""
    seeds = frame.index.get_level_values("seed").unique()
    if name == REFERENCE:
        frame = frame.loc[[seeds[0]]]  # one copy: the reference has no seed
    row: dict = {"variant": name, "seeds": np.nan if name == REFERENCE else len(seeds), "n": len(frame)}
    for m in metrics:
        values = frame[m].dropna().to_numpy()
        if len(values) == 0:
            raise ValueError(f"{name} has no {m} score on any test utterance")
        mean, low, high = bootstrap_ci(lambda v, _: float(np.mean(v)), values, values, n_resamples=resamples)
        row.update({m: mean, f"{m}_std": float(np.std(values, ddof=1)) if len(values) > 1 else np.nan,
                    f"{m}_ci_low": low, f"{m}_ci_high": high})
        if len(seeds) > 1 and name != REFERENCE:
            row[f"{m}_seed_sd"] = float(frame[m].groupby(level="seed").mean().std(ddof=1))
    return row


def pair_table(pooled: dict[str, pd.DataFrame], metrics: list[str], alpha: float) -> pd.DataFrame:
    """Wilcoxon tests of every pair per metric, on the items every row scored (NaN-free)."""
    shared = sorted(set.intersection(*(set(f.index) for f in pooled.values())))
    if not shared:
        raise ValueError("the variants share no test utterances; compare runs on the same test split")
    tables = []
    for m in metrics:
        scores = pd.DataFrame({v: f.loc[shared, m] for v, f in pooled.items()}).dropna()
        if scores.empty:
            raise ValueError(f"no test utterance has a {m} score for every variant")
        table = wilcoxon_pairs({v: scores[v].to_numpy() for v in scores}, alpha=alpha)
        if scores.index.get_level_values("seed").nunique() > 1:
            common = {v: scores[v] for v in scores}
            table.insert(4, "seed_sd", [seed_spread(common, a, b) for a, b in zip(table["a"], table["b"])])
        tables.append(table.assign(metric=m))
    pairs = pd.concat(tables, ignore_index=True)
    # wilcoxon_pairs corrects within one metric; the family here is every pair of every metric.
    pairs["p_bonferroni"] = np.minimum(1.0, pairs["p_value"] * len(pairs))
    pairs["significant"] = pairs["p_bonferroni"] < alpha
    return pairs[["metric", *(c for c in pairs if c != "metric")]]


def compare_tables(tables: dict[str, pd.DataFrame], names: dict[str, tuple[str, int]], metrics: list[str],
                   level: str = "files", alpha: float = 0.05,
                   resamples: int = 1000) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The variants table (reference row last) and the pairs table from each run's predictions."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown enhancement metric(s) {unknown}; choose from {list(METRICS)}")
    for name, table in tables.items():
        check_columns(table, name, metrics)
    check_same_utterances(tables)
    check_same_reference(tables, metrics)
    pooled = pooled_scores(tables, names, metrics, level)
    variants = pd.DataFrame([variant_row(v, f, metrics, resamples) for v, f in pooled.items()])
    variants["seeds"] = variants["seeds"].astype("Int64")  # empty for the reference
    return variants, pair_table(pooled, metrics, alpha)


def compare(experiments: list[str] | None, metrics: list[str], level: str, alpha: float,
            seeds: int = 1) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Download each experiment's predictions.csv from its evaluate run and compare them."""
    runs, names = evaluate_runs(experiments, seeds, keep=is_enhance_run)
    tables = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run in runs:
            path = tracking.download_artifact(run["run_id"], "predictions.csv", Path(tmp) / run["run_id"])
            tables[run["dvc_experiment"]] = pd.read_csv(path)
    return compare_tables(tables, names, metrics, level, alpha)


def markdown(variants: pd.DataFrame, pairs: pd.DataFrame, metrics: list[str], level: str, seeds: int) -> str:
    """Variants as 'mean ± std [CI]' per metric (the CSV keeps the numbers), then the tests."""
    shown = pd.DataFrame({"variant": variants["variant"], "n": variants["n"]})
    for m in metrics:
        cells = [f"{r[m]:.3f} ± {r[f'{m}_std']:.3f} [{r[f'{m}_ci_low']:.3f}, {r[f'{m}_ci_high']:.3f}]"
                 for _, r in variants.iterrows()]
        if seeds > 1:
            cells = [c + ("" if np.isnan(sd) else f" (seed sd {sd:.3f})")
                     for c, sd in zip(cells, variants[f"{m}_seed_sd"])]
        shown[m] = cells
    pooled = f", {seeds} seeds pooled" if seeds > 1 else ""
    return (f"## Variants (test {'utterances' if level == 'files' else 'speaker groups'}{pooled}: "
            f"mean ± std [95% bootstrap CI]; {REFERENCE} = the classical reference)\n\n"
            f"{shown.to_markdown(index=False)}\n\n"
            f"## Paired Wilcoxon signed-rank (differences b - a), Bonferroni-corrected over "
            f"{len(pairs)} tests ({len(pairs) // len(metrics)} pairs x {len(metrics)} metrics)\n\n"
            f"{pairs.to_markdown(index=False, floatfmt='.4g')}\n")


def plot(variants: pd.DataFrame, metrics: list[str]) -> plt.Figure:
    """One panel per metric: each row's mean with its 95% CI, the reference in grey."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(0.5 + len(metrics) * (1 + 0.9 * len(variants)), 3.5),
                             squeeze=False)
    colors = ["tab:gray" if v == REFERENCE else "tab:blue" for v in variants["variant"]]
    for ax, m in zip(axes[0], metrics):
        err = [variants[m] - variants[f"{m}_ci_low"], variants[f"{m}_ci_high"] - variants[m]]
        ax.bar(variants["variant"], variants[m], yerr=err, capsize=4, color=colors)
        ax.set_ylabel(f"{m} (95% CI)")
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    return fig


def main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """The enhance half of ``pipeline.compare``'s CLI (``args`` parsed there)."""
    metrics = args.metrics or DEFAULT_METRICS
    if unknown := [m for m in metrics if m not in METRICS]:
        parser.error(f"--metrics: unknown enhancement metric(s) {unknown}; choose from {list(METRICS)}")
    try:
        variants, pairs = compare(args.experiments or None, metrics, args.level, args.alpha, args.seeds)
    except (ValueError, FileNotFoundError, tracking.TrackingUnavailable) as err:
        sys.exit(f"compare: {err}")
    text = markdown(variants, pairs, metrics, args.level, args.seeds)
    with atomic_dir(args.out) as tmp:
        variants.to_csv(tmp / "variants.csv", index=False)
        pairs.to_csv(tmp / "pairs.csv", index=False)
        (tmp / "compare.md").write_text(text)
        plot(variants, metrics).savefig(tmp / "compare.png", dpi=120)
    print(text)
