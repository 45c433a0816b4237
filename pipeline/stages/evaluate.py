"""Stage evaluate: the final model on the held-out test split, per file and per group.

File level: every test file gets probabilities and a prediction; metrics are computed over
the files that survived filtering. Group level (patient/speaker): majority vote over the
group's surviving files; a group whose files were all filtered out gets
``evaluate.all_filtered_class`` (default: the positive class). Metrics carry bootstrap 95% CIs.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import Field
from sklearn import metrics as skm

from pipeline import plots, tracking
from pipeline.config import Section, load_section
from pipeline.contracts import FeaturesFolder, PretrainFolder
from pipeline.evaluation import classification_metrics, curve_inputs, psnr
from pipeline.io import write_csv, write_json
from pipeline.models.inference import ExportedModel, load_pretrained_mae, reconstruction_losses
from pipeline.stats import group_vote


class EvaluateParams(Section):
    all_filtered_class: str | None = None  # None: the model's positive class (binary) / first class
    bootstrap_resamples: int = Field(1000, ge=100)
    mc_dropout_passes: int = Field(0, ge=0)  # > 1: Monte-Carlo dropout intervals per file
    seed: int = 0


def predictions_table(test: pd.DataFrame, probs: np.ndarray, classes: list[str], kept: np.ndarray) -> pd.DataFrame:
    table = test[["path", "group", "label"]].reset_index(drop=True).copy()
    table["predicted"] = [classes[i] for i in probs.argmax(axis=1)]
    for i, name in enumerate(classes):
        table[f"prob_{name}"] = probs[:, i]
    table["kept"] = kept
    table["correct"] = table["predicted"] == table["label"]
    return table


def mae_metrics(pretrained_dir: Path, features: np.ndarray, rows: np.ndarray, seed: int) -> dict:
    """Masked-patch reconstruction MSE and PSNR (peak = dynamic range of the test features)."""
    mae, norm = load_pretrained_mae(pretrained_dir)
    mse = reconstruction_losses(mae, features, rows, seed, norm=norm)
    test = np.asarray(features[rows])
    return {"mae_mse": float(mse.mean()), "mae_psnr_db": float(psnr(mse, float(test.max() - test.min())).mean())}


def run(features_dir: Path, ignored_csv: Path, model_dir: Path, pretrained_dir: Path, p: EvaluateParams,
        out: dict[str, Path]) -> dict:
    folder = FeaturesFolder(features_dir)
    index = folder.index()
    ignored = set(pd.read_csv(ignored_csv)["filename"])
    model = ExportedModel.load(model_dir)
    features = folder.array()
    test = index[index["split"] == "test"]
    rows = test["row"].to_numpy()
    probs = model.class_probabilities(features, rows)
    kept = ~test["path"].isin(ignored).to_numpy()
    table = predictions_table(test, probs, model.classes, kept)
    if p.mc_dropout_passes > 1:
        samples = model.mc_dropout_probabilities(features, rows, p.mc_dropout_passes, p.seed)
        predicted = probs.argmax(axis=1)
        picked = samples[:, np.arange(len(rows)), predicted]
        table["prob_mc_low"], table["prob_mc_high"] = np.percentile(picked, [2.5, 97.5], axis=0)
    lookup = {c: i for i, c in enumerate(model.classes)}
    y_true = table["label"].map(lookup).to_numpy()
    metrics = {"files": classification_metrics(y_true[kept], probs[kept], model.classes, p.bootstrap_resamples, p.seed)}
    fallback = p.all_filtered_class or (model.info.positive_class if model.binary else model.classes[0])
    groups = group_vote(table, all_filtered_class=fallback)
    g_true, g_pred = groups["label"].map(lookup).to_numpy(), groups["predicted"].map(lookup).to_numpy()
    g_probs = np.eye(len(model.classes))[g_pred]  # a vote is a hard decision
    metrics["groups"] = classification_metrics(g_true, g_probs, model.classes, p.bootstrap_resamples, p.seed)
    metrics["groups"].pop("roc_auc", None)  # undefined for hard votes
    metrics["counts"] = {"test_files": len(table), "kept_files": int(kept.sum()), "groups": len(groups),
                         "all_filtered_groups": int(groups["all_filtered"].sum())}
    if PretrainFolder(pretrained_dir).exists():
        metrics["mae"] = mae_metrics(pretrained_dir, features, rows, p.seed)
    write_outputs(table, groups, y_true, probs, kept, model.classes, metrics, out)
    with tracking.stage_run("evaluate", p) as stage:
        tracking.write_run_id(out["run_id"], stage)
        stage.log_metrics(flat_metrics(metrics))
        stage.log_artifact(out["predictions"])
        stage.log_artifact(out["groups"])
        stage.log_figure(plots.confusion(np.array(metrics["files"]["confusion_matrix"]), model.classes), "plots/confusion_matrix.png")
        if (curve := curve_inputs(y_true[kept], probs[kept])) is not None:
            stage.log_figure(plots.roc_pr(*curve), "plots/roc_pr.png")
    return metrics


def flat_metrics(metrics: dict) -> dict[str, float]:
    """``test/<level>/<metric>`` (+ ``_ci_low``/``_ci_high``) for MLflow."""
    flat = {}
    for level in ("files", "groups"):
        for name, value in metrics[level].items():
            if isinstance(value, dict):
                flat[f"test/{level}/{name}"] = value["value"]
                flat[f"test/{level}/{name}_ci_low"] = value["ci_low"]
                flat[f"test/{level}/{name}_ci_high"] = value["ci_high"]
    flat.update({f"test/{k}": v for k, v in metrics.get("mae", {}).items()})
    return {k: v for k, v in flat.items() if np.isfinite(v)}


def write_outputs(table: pd.DataFrame, groups: pd.DataFrame, y_true: np.ndarray, probs: np.ndarray,
                  kept: np.ndarray, classes: list[str], metrics: dict, out: dict[str, Path]) -> None:
    write_csv(out["predictions"], table)
    write_csv(out["groups"], groups)
    write_json(out["metrics"], metrics)
    write_csv(out["plots"] / "confusion.csv", table.loc[kept, ["label", "predicted"]].rename(
        columns={"label": "actual"}))
    # Written in every case (empty with one class present): dvc.yaml declares them as plots.
    fpr = tpr = recall = precision = np.empty(0)
    if (curve := curve_inputs(y_true[kept], probs[kept])) is not None:
        fpr, tpr, _ = skm.roc_curve(*curve)
        precision, recall, _ = skm.precision_recall_curve(*curve)
    write_csv(out["plots"] / "roc.csv", pd.DataFrame({"fpr": fpr, "tpr": tpr}))
    write_csv(out["plots"] / "pr.csv", pd.DataFrame({"recall": recall, "precision": precision}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("features", "ignored", "model", "pretrained", "metrics", "predictions", "groups",
                 "plots", "run-id"):
        parser.add_argument(f"--{name}", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    out = {"metrics": args.metrics, "predictions": args.predictions, "groups": args.groups,
           "plots": args.plots, "run_id": args.run_id}
    try:
        metrics = run(args.features, args.ignored, args.model, args.pretrained,
                      load_section("evaluate", EvaluateParams, args.params), out)
    except (ValueError, FileNotFoundError, tracking.TrackingUnavailable) as err:
        sys.exit(f"evaluate: {err}")
    files, groups = metrics["files"], metrics["groups"]
    print(f"evaluate: files accuracy {files['accuracy']['value']:.3f} "
          f"[{files['accuracy']['ci_low']:.3f}, {files['accuracy']['ci_high']:.3f}], "
          f"groups accuracy {groups['accuracy']['value']:.3f} ({metrics['counts']})")


if __name__ == "__main__":
    main()
