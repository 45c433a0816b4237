"""Compare experiment variants: mean ± 95% CI per variant, paired Wilcoxon tests between them.

``python -m pipeline.compare --experiments cnn mae-scratch ...`` reads the evaluate runs of
those DVC experiments from MLflow (each logs its per-file predictions). Every pair is compared
with a Wilcoxon signed-rank test on per-file (or per-group) scores, the probability given to
the true class, Bonferroni-corrected across pairs. Writes a markdown and CSV table and a plot.

With ``--seeds N`` each variant ran N times, as experiments ``<variant>-s0`` .. ``-s<N-1>``
(``make compare SEEDS=N``): the tests pair the variants' scores of the same file under the same
seed, pooled over the seeds, and the tables show the seed-to-seed spread (standard deviation
over seeds of each variant's metric, and of each pair's mean difference) beside the effect.

Task enhance (``--task enhance``, or params.yaml's ``task``) compares per-utterance SI-SNRi,
PESQ and STOI instead, with the spectral-gating reference as one more row: pipeline.compare_enhance.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline import tracking  # noqa: E402
from pipeline.config import DEFAULT_PARAMS, TASKS, ParamsError, load_task  # noqa: E402
from pipeline.io import atomic_dir  # noqa: E402
from pipeline.stats import wilcoxon_pairs  # noqa: E402


def true_class_scores(predictions: pd.DataFrame, level: str) -> pd.Series:
    """P(true class) per kept file, or its mean per group; indexed by path or group."""
    kept = predictions[predictions["kept"]]
    score = kept.apply(lambda r: r[f"prob_{r['label']}"], axis=1)
    if level == "groups":
        return score.groupby(kept["group"]).mean()
    return pd.Series(score.to_numpy(), index=kept["path"])


def run_names(variants: list[str], seeds: int) -> dict[str, tuple[str, int]]:
    """DVC experiment name -> (variant, seed); one seed keeps the variant's own name."""
    if seeds == 1:
        return {v: (v, 0) for v in variants}
    return {f"{v}-s{s}": (v, s) for v in variants for s in range(seeds)}


def variant_table(runs: list[dict], names: dict[str, tuple[str, int]], metrics: list[str], level: str) -> pd.DataFrame:
    """One row per variant: each metric's value with its 95% CI (one seed), or its mean over the
    seeds with the seed-to-seed standard deviation (several)."""
    rows = []
    for variant in dict.fromkeys(v for v, _ in names.values()):
        mine = [r for r in runs if names[r["dvc_experiment"]][0] == variant]
        row: dict = {"variant": variant, "seeds": len(mine)}
        for m in metrics:
            key = f"test/{level}/{m}"
            values = np.array([r["metrics"].get(key, np.nan) for r in mine], dtype=float)
            row[m] = float(np.mean(values))
            if len(mine) == 1:
                row[f"{m}_ci_low"] = mine[0]["metrics"].get(f"{key}_ci_low")
                row[f"{m}_ci_high"] = mine[0]["metrics"].get(f"{key}_ci_high")
            else:
                row[f"{m}_seed_sd"] = float(np.std(values, ddof=1))
        rows.append(row)
    return pd.DataFrame(rows)


def pooled_scores(scores: dict[str, pd.Series], names: dict[str, tuple[str, int]]) -> dict[str, pd.Series]:
    """Per variant, its scores indexed by (seed, item) over every seed it ran with."""
    pooled: dict[str, list[pd.Series]] = {}
    for run, series in scores.items():
        variant, seed = names[run]
        pooled.setdefault(variant, []).append(series.set_axis(pd.MultiIndex.from_product([[seed], series.index])))
    return {v: pd.concat(parts) for v, parts in pooled.items()}


def seed_spread(pooled: dict[str, pd.Series], a: str, b: str) -> float:
    """Standard deviation over seeds of the mean difference b - a (nan with one seed)."""
    diff = pooled[b] - pooled[a]
    per_seed = diff.groupby(level=0).mean()
    return float(per_seed.std(ddof=1)) if len(per_seed) > 1 else float("nan")


def plot(table: pd.DataFrame, metric: str) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(table), 3.5))
    if f"{metric}_seed_sd" in table:
        err, label = table[f"{metric}_seed_sd"], f"{metric} (mean ± sd over seeds)"
    else:
        err, label = [table[metric] - table[f"{metric}_ci_low"], table[f"{metric}_ci_high"] - table[metric]], f"{metric} (95% CI)"
    ax.bar(table["variant"], table[metric], yerr=err, capsize=4, color="tab:blue")
    ax.set_ylabel(label)
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    return fig


def evaluate_runs(experiments: list[str] | None, seeds: int,
                  keep: Callable[[dict[str, float]], bool]) -> tuple[list[dict], dict[str, tuple[str, int]]]:
    """The newest evaluate run of each experiment and its (variant, seed). Without named
    experiments, every experiment whose run's metrics pass ``keep`` (the task's own runs)."""
    if seeds > 1 and not experiments:
        raise ValueError("--seeds needs the variants named with --experiments")
    names = run_names(experiments, seeds) if experiments else None
    runs = tracking.stage_runs("evaluate", list(names) if names else None)
    missing = sorted(set(names or []) - {r["dvc_experiment"] for r in runs})
    if missing:
        raise ValueError(f"no finished evaluate run in MLflow for experiment(s) {missing}; if the queue "
                         f"failed them, `dvc queue status` and `dvc queue logs {missing[0]}` say why")
    if names is None:
        runs = [r for r in runs if keep(r["metrics"])]
        names = {r["dvc_experiment"]: (r["dvc_experiment"], 0) for r in runs}
    if len({v for v, _ in names.values()}) < 2:
        raise ValueError(f"need at least 2 variants to compare, found {len(set(v for v, _ in names.values()))}")
    return runs, names


def is_enhance_run(metrics: dict[str, float]) -> bool:
    """An evaluate run of task enhance (it logs ``si_snr``; a classify run never does)."""
    return "si_snr" in metrics


def compare(experiments: list[str] | None, metrics: list[str], level: str, alpha: float,
            seeds: int = 1) -> tuple[pd.DataFrame, pd.DataFrame]:
    runs, names = evaluate_runs(experiments, seeds, keep=lambda m: not is_enhance_run(m))
    scores = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run in runs:
            path = tracking.download_artifact(run["run_id"], "predictions.csv", Path(tmp) / run["run_id"])
            table = pd.read_csv(path)
            if "kept" not in table:
                raise ValueError(f"experiment '{run['dvc_experiment']}' logged no classifier predictions "
                                 "(no 'kept' column): is it a task enhance run? use --task enhance")
            scores[run["dvc_experiment"]] = true_class_scores(table, level)
    pooled = pooled_scores(scores, names)
    shared = sorted(set.intersection(*(set(s.index) for s in pooled.values())))
    if not shared:
        raise ValueError("the variants share no test items; compare runs on the same test split")
    pairs = wilcoxon_pairs({name: s.loc[shared].to_numpy() for name, s in pooled.items()}, alpha=alpha)
    if seeds > 1:
        common = {name: s.loc[shared] for name, s in pooled.items()}
        pairs.insert(4, "seed_sd", [seed_spread(common, a, b) for a, b in zip(pairs["a"], pairs["b"])])
    table = variant_table(runs, names, metrics, level)
    missing = [m for m in metrics if table[m].isna().all()]
    if missing:
        raise ValueError(f"metric(s) {missing} not logged at level '{level}' by the evaluate runs")
    return table, pairs


def default_task() -> str:
    """params.yaml's task; classify outside a checkout (compare reads MLflow, not the workspace)."""
    return load_task(DEFAULT_PARAMS) if DEFAULT_PARAMS.exists() else "classify"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=TASKS, help="classify or enhance (default: params.yaml's task)")
    parser.add_argument("--experiments", nargs="*", help="DVC experiment names, or variants with --seeds (default: all found)")
    parser.add_argument("--seeds", type=int, default=1, help="runs per variant, named <variant>-s<seed>")
    parser.add_argument("--metrics", nargs="+", help="classify default: accuracy balanced_accuracy f1_macro; "
                                                     "enhance: si_snr_i pesq stoi (or si_snr)")
    parser.add_argument("--level", choices=["files", "groups"], default="files",
                        help="per file (utterance), or per group (speaker) means")
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--out", type=Path, default=Path("reports/compare"))
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    try:
        task = args.task or default_task()
    except ParamsError as err:
        sys.exit(f"compare: {err}")
    if task == "enhance":
        from pipeline import compare_enhance  # imported here: it builds on this module's helpers

        compare_enhance.main(args, parser)
        return
    args.metrics = args.metrics or ["accuracy", "balanced_accuracy", "f1_macro"]
    try:
        table, pairs = compare(args.experiments or None, args.metrics, args.level, args.alpha, args.seeds)
    except (ValueError, FileNotFoundError, tracking.TrackingUnavailable) as err:
        sys.exit(f"compare: {err}")
    spread = (f", mean ± sd over {args.seeds} seeds; tests pool the seeds" if args.seeds > 1
              else ", 95% bootstrap CI")
    with atomic_dir(args.out) as tmp:
        table.to_csv(tmp / "variants.csv", index=False)
        pairs.to_csv(tmp / "pairs.csv", index=False)
        text = (f"## Variants (test {args.level}{spread})\n\n{table.to_markdown(index=False, floatfmt='.3f')}\n\n"
                f"## Paired Wilcoxon signed-rank, Bonferroni-corrected ({len(pairs)} pairs)\n\n"
                f"{pairs.to_markdown(index=False, floatfmt='.4g')}\n")
        (tmp / "compare.md").write_text(text)
        plot(table, args.metrics[0]).savefig(tmp / "compare.png", dpi=120)
    print(text)


if __name__ == "__main__":
    main()
