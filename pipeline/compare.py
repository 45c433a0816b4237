"""Compare experiment variants: mean ± 95% CI per variant, paired Wilcoxon tests between them.

``python -m pipeline.compare --experiments cnn mae-scratch ...`` reads the evaluate runs of
those DVC experiments from MLflow (each logs its per-file predictions). Every pair is compared
with a Wilcoxon signed-rank test on per-file (or per-group) scores, the probability given to
the true class, Bonferroni-corrected across pairs. Writes a markdown and CSV table and a plot.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline import tracking  # noqa: E402
from pipeline.io import atomic_dir  # noqa: E402
from pipeline.stats import wilcoxon_pairs  # noqa: E402


def true_class_scores(predictions: pd.DataFrame, level: str) -> pd.Series:
    """P(true class) per kept file, or its mean per group; indexed by path or group."""
    kept = predictions[predictions["kept"]]
    score = kept.apply(lambda r: r[f"prob_{r['label']}"], axis=1)
    if level == "groups":
        return score.groupby(kept["group"]).mean()
    return pd.Series(score.to_numpy(), index=kept["path"])


def variant_table(runs: list[dict], metrics: list[str], level: str) -> pd.DataFrame:
    rows = []
    for run in runs:
        row = {"variant": run["dvc_experiment"], "run_id": run["run_id"]}
        for m in metrics:
            key = f"test/{level}/{m}"
            row[m] = run["metrics"].get(key)
            row[f"{m}_ci_low"] = run["metrics"].get(f"{key}_ci_low")
            row[f"{m}_ci_high"] = run["metrics"].get(f"{key}_ci_high")
        rows.append(row)
    return pd.DataFrame(rows)


def plot(table: pd.DataFrame, metric: str) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(table), 3.5))
    err = [table[metric] - table[f"{metric}_ci_low"], table[f"{metric}_ci_high"] - table[metric]]
    ax.bar(table["variant"], table[metric], yerr=err, capsize=4, color="tab:blue")
    ax.set_ylabel(f"{metric} (95% CI)")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    return fig


def compare(experiments: list[str] | None, metrics: list[str], level: str, alpha: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    runs = tracking.stage_runs("evaluate", experiments)
    missing = sorted(set(experiments or []) - {r["dvc_experiment"] for r in runs})
    if missing:
        raise ValueError(f"no finished evaluate run in MLflow for experiment(s) {missing}")
    if len(runs) < 2:
        raise ValueError(f"need at least 2 variants to compare, found {len(runs)}")
    scores = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run in runs:
            path = tracking.download_artifact(run["run_id"], "predictions.csv", Path(tmp) / run["run_id"])
            scores[run["dvc_experiment"]] = true_class_scores(pd.read_csv(path), level)
    shared = sorted(set.intersection(*(set(s.index) for s in scores.values())))
    if not shared:
        raise ValueError("the variants share no test items; compare runs on the same test split")
    pairs = wilcoxon_pairs({name: s.loc[shared].to_numpy() for name, s in scores.items()}, alpha=alpha)
    table = variant_table(runs, metrics, level)
    missing = [m for m in metrics if table[m].isna().all()]
    if missing:
        raise ValueError(f"metric(s) {missing} not logged at level '{level}' by the evaluate runs")
    return table, pairs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiments", nargs="*", help="DVC experiment names (default: all found)")
    parser.add_argument("--metrics", nargs="+", default=["accuracy", "balanced_accuracy", "f1_macro"])
    parser.add_argument("--level", choices=["files", "groups"], default="files")
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--out", type=Path, default=Path("reports/compare"))
    args = parser.parse_args(argv)
    try:
        table, pairs = compare(args.experiments or None, args.metrics, args.level, args.alpha)
    except (ValueError, FileNotFoundError, tracking.TrackingUnavailable) as err:
        sys.exit(f"compare: {err}")
    with atomic_dir(args.out) as tmp:
        table.to_csv(tmp / "variants.csv", index=False)
        pairs.to_csv(tmp / "pairs.csv", index=False)
        text = (f"## Variants (test {args.level}, 95% bootstrap CI)\n\n{table.drop(columns='run_id').to_markdown(index=False, floatfmt='.3f')}\n\n"
                f"## Paired Wilcoxon signed-rank, Bonferroni-corrected ({len(pairs)} pairs)\n\n"
                f"{pairs.to_markdown(index=False, floatfmt='.4g')}\n")
        (tmp / "compare.md").write_text(text)
        plot(table, args.metrics[0]).savefig(tmp / "compare.png", dpi=120)
    print(text)


if __name__ == "__main__":
    main()
