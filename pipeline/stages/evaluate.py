"""Stage evaluate: the final model and the reference baseline on the held-out test split.

File level: every test file gets probabilities and a prediction (with ``featurize.segment``,
the aggregate of its segments' probabilities, by ``segment.aggregate``, over the segments that
survived filtering; every segment's are in the segments table); metrics are computed over
the files that survived filtering. Group level (patient/speaker): majority vote over the
group's surviving files; a group whose files were all filtered out gets
``evaluate.all_filtered_class`` (default: the positive class). Metrics carry bootstrap 95% CIs.

The baseline (``pipeline.baseline``: MFCC statistics + logistic regression) is fitted on exactly
the model's training files and scored on the same test files with the same metrics: the report
has a ``baseline`` section, ``model_minus_baseline`` and a paired comparison (McNemar, paired
bootstrap) in ``model_vs_baseline``; the predictions table carries its ``baseline_*`` columns.

Task enhance (params.yaml ``task``): every test utterance is enhanced whole, through the same
``ExportedEnhancer.enhance`` the service calls, and scored against its clean pair (SI-SNR, its
improvement, PESQ, STOI); spectral gating, the classical reference, is scored on the same
utterances (``ref_*`` columns, the ``baseline`` section, a paired Wilcoxon per metric). The
predictions table has one row per utterance; groups are speakers; the plots folder holds the
scores by input SNR and ``evaluate.enhance_samples`` clean/noisy/enhanced triplets.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import Field
from sklearn import metrics as skm
from sklearn.pipeline import Pipeline

from pipeline import audio, baseline, enhancement, plots, tracking
from pipeline.config import Section, load_section, load_task
from pipeline.contracts import FeaturesFolder, ModelFolder, PretrainFolder
from pipeline.evaluation import (curve_inputs, differences, file_level, flat_metrics, paired_comparison,
                                 predictions_table, psnr, scored)
from pipeline.io import write_csv, write_json
from pipeline.models.enhancer import ExportedEnhancer
from pipeline.models.inference import ExportedModel, load_pretrained_mae, reconstruction_losses


BASELINE = "baseline_"  # column prefix of the baseline's predictions


class EvaluateParams(Section):
    all_filtered_class: str | None = None  # None: the model's positive class (binary) / first class
    bootstrap_resamples: int = Field(1000, ge=100)
    mc_dropout_passes: int = Field(0, ge=0)  # > 1: Monte-Carlo dropout intervals per file
    enhance_samples: int = Field(4, ge=0)  # task enhance: clean/noisy/enhanced triplets kept
    seed: int = 0


def mae_metrics(pretrained_dir: Path, features: np.ndarray, rows: np.ndarray, seed: int) -> dict:
    """Masked-patch reconstruction MSE and PSNR (peak = dynamic range of the test features)."""
    mae, norm = load_pretrained_mae(pretrained_dir)
    mse = reconstruction_losses(mae, features, rows, seed, norm=norm)
    test = np.asarray(features[rows])
    return {"mae_mse": float(mse.mean()), "mae_psnr_db": float(psnr(mse, float(test.max() - test.min())).mean())}


def fit_baseline(model: ExportedModel, model_dir: Path, index: pd.DataFrame, features: np.ndarray,
                 seed: int) -> Pipeline:
    """The MFCC baseline fitted on exactly the files the exported model was trained on."""
    train = index.set_index("path").loc[ModelFolder(model_dir).training_files()["path"]]
    targets = train["label"].map({c: i for i, c in enumerate(model.classes)}).to_numpy()
    return baseline.fit(features, train["row"].to_numpy(), targets, seed)


def run(features_dir: Path, ignored_csv: Path, model_dir: Path, pretrained_dir: Path, p: EvaluateParams,
        out: dict[str, Path]) -> dict:
    folder = FeaturesFolder(features_dir)
    index = folder.index()
    ignored = set(pd.read_csv(ignored_csv)["filename"])
    model = ExportedModel.load(model_dir)
    features = folder.array()
    test = index[index["split"] == "test"]
    rows = test["row"].to_numpy()
    kept_rows = ~test["path"].isin(ignored).to_numpy()
    row_probs = model.class_probabilities(features, rows)
    row_base = baseline.class_probabilities(fit_baseline(model, model_dir, index, features, p.seed),
                                            features, rows, len(model.classes))
    files, probs, kept = file_level(test, row_probs, kept_rows, model.info.segment)
    base_probs = file_level(test, row_base, kept_rows, model.info.segment)[1]
    table = pd.concat([predictions_table(files, probs, model.classes, kept),
                       predictions_table(files, base_probs, model.classes, kept, prefix=BASELINE)], axis=1)
    segments = test[["path", "file", "segment", "start_s", "group", "label"]].reset_index(drop=True).assign(kept=kept_rows)
    segments[[f"prob_{c}" for c in model.classes]] = row_probs
    if p.mc_dropout_passes > 1:
        samples = model.mc_dropout_probabilities(features, rows, p.mc_dropout_passes, p.seed)
        per_file = np.stack([file_level(test, s, kept_rows, model.info.segment)[1] for s in samples])
        picked = per_file[:, np.arange(len(files)), probs.argmax(axis=1)]
        table["prob_mc_low"], table["prob_mc_high"] = np.percentile(picked, [2.5, 97.5], axis=0)
    fallback = p.all_filtered_class or (model.info.positive_class if model.binary else model.classes[0])
    metrics, groups = scored(table, probs, model.classes, fallback, p.bootstrap_resamples, p.seed)
    metrics["baseline"], base_groups = scored(table, base_probs, model.classes, fallback,
                                              p.bootstrap_resamples, p.seed, prefix=BASELINE)
    metrics["model_minus_baseline"] = differences(metrics, metrics["baseline"])
    metrics["model_vs_baseline"] = paired_comparison(table, BASELINE, "", p.bootstrap_resamples, p.seed)
    groups[f"{BASELINE}predicted"], groups[f"{BASELINE}votes"] = base_groups["predicted"], base_groups["votes"]
    metrics["counts"] = {"test_files": len(table), "kept_files": int(kept.sum()), "groups": len(groups),
                         "all_filtered_groups": int(groups["all_filtered"].sum())}
    if PretrainFolder(pretrained_dir).exists():
        metrics["mae"] = mae_metrics(pretrained_dir, features, rows, p.seed)
    y_true = table["label"].map({c: i for i, c in enumerate(model.classes)}).to_numpy()
    write_outputs(table, groups, y_true, {"": probs, BASELINE: base_probs}, kept, metrics, out)
    write_csv(out["segments"], segments)
    with tracking.stage_run("evaluate", p) as stage:
        tracking.write_run_id(out["run_id"], stage)
        stage.log_metrics(flat_metrics({k: v for k, v in metrics.items() if k != "counts"}))
        stage.log_artifact(out["predictions"])
        stage.log_artifact(out["groups"])
        for prefix, source, scores in (("", metrics, probs), (BASELINE, metrics["baseline"], base_probs)):
            stage.log_figure(plots.confusion(np.array(source["files"]["confusion_matrix"]), model.classes),
                             f"plots/{prefix}confusion_matrix.png")
            if (curve := curve_inputs(y_true[kept], scores[kept])) is not None:
                stage.log_figure(plots.roc_pr(*curve), f"plots/{prefix}roc_pr.png")
    return metrics


def run_enhance(raw_dir: Path, features_dir: Path, model_dir: Path, p: EvaluateParams, out: dict[str, Path]) -> dict:
    """Task enhance (see the module docstring): the report; every output written."""
    index = FeaturesFolder(features_dir).enhance_index()
    enhancer = ExportedEnhancer.load(model_dir)
    rate = enhancer.sample_rate
    test = index[index["split"] == "test"]
    scores, waves = enhancement.score_utterances(test, lambda rel: audio.load(raw_dir / rel, rate, name=rel), rate,
                                                 lambda noisy: enhancer.enhance(noisy, rate))
    report = {"task": "enhance", "utterances": len(scores), "speakers": int(scores["group"].nunique()),
              **enhancement.summarise(scores, p.bootstrap_resamples, p.seed)}
    snr = enhancement.by_snr(scores)
    report["by_snr"] = {f"{s:g}": part.set_index("enhancer").drop(columns="snr_db").to_dict("index")
                        for s, part in snr.groupby("snr_db")}
    write_csv(out["predictions"], scores)
    write_csv(out["groups"], scores.groupby("group")[list(enhancement.METRICS)].mean().reset_index())
    write_csv(out["segments"], pd.DataFrame(columns=["path"]))  # no segments in task enhance
    write_json(out["metrics"], report)
    write_csv(out["plots"] / "enhance_by_snr.csv", snr)
    picks = scores.sort_values(["snr_db", "path"]).iloc[np.linspace(0, len(scores) - 1, p.enhance_samples).astype(int)
                                                        if p.enhance_samples and len(scores) else []]
    samples = out["plots"] / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    for row in picks.drop_duplicates("path").itertuples(index=False):
        stem = Path(row.path).stem
        for kind, rel in (("clean", row.pair), ("noisy", row.path)):
            audio.write_wav(samples / f"{stem}_{kind}.wav", audio.load(raw_dir / rel, rate, name=rel), rate)
        # clipped as the service sends it: PCM_16 holds [-1, 1] and libsndfile would wrap, not clip
        audio.write_wav(samples / f"{stem}_enhanced.wav", np.clip(waves[row.path], -1.0, 1.0), rate)
    with tracking.stage_run("evaluate", p) as stage:
        tracking.write_run_id(out["run_id"], stage)
        stage.log_metrics({**{m: report["model"][m]["mean"] for m in enhancement.METRICS},
                           **{f"baseline/{m}": report["baseline"][m]["mean"] for m in enhancement.METRICS}})
        stage.log_artifact(out["predictions"])
        stage.log_artifact(out["groups"])
        stage.log_artifact(samples, "samples")
    return report


def write_outputs(table: pd.DataFrame, groups: pd.DataFrame, y_true: np.ndarray, probs: dict[str, np.ndarray],
                  kept: np.ndarray, metrics: dict, out: dict[str, Path]) -> None:
    write_csv(out["predictions"], table)
    write_csv(out["groups"], groups)
    write_json(out["metrics"], metrics)
    for prefix, scores in probs.items():
        write_csv(out["plots"] / f"{prefix}confusion.csv", table.loc[kept, ["label", f"{prefix}predicted"]].set_axis(
            ["actual", "predicted"], axis=1))
        # Written in every case (empty with one class present): dvc.yaml declares them as plots.
        fpr = tpr = recall = precision = np.empty(0)
        if (curve := curve_inputs(y_true[kept], scores[kept])) is not None:
            fpr, tpr, _ = skm.roc_curve(*curve)
            precision, recall, _ = skm.precision_recall_curve(*curve)
        write_csv(out["plots"] / f"{prefix}roc.csv", pd.DataFrame({"fpr": fpr, "tpr": tpr}))
        write_csv(out["plots"] / f"{prefix}pr.csv", pd.DataFrame({"recall": recall, "precision": precision}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("features", "ignored", "model", "pretrained", "metrics", "predictions", "segments", "groups",
                 "plots", "run-id"):
        parser.add_argument(f"--{name}", type=Path, required=True)
    parser.add_argument("--raw", type=Path, help="the recordings (task enhance reads the waves; required there)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    out = {"metrics": args.metrics, "predictions": args.predictions, "segments": args.segments, "groups": args.groups,
           "plots": args.plots, "run_id": args.run_id}
    try:
        params = load_section("evaluate", EvaluateParams, args.params)
        args.plots.mkdir(parents=True, exist_ok=True)
        if load_task(args.params) == "enhance":
            if args.raw is None:
                raise ValueError("task enhance reads the waves: give --raw (the recordings folder)")
            report = run_enhance(args.raw, args.features, args.model, params, out)
            print("evaluate: " + ", ".join(
                f"{m} {report['model'][m]['mean']:.3f} vs spectral gating {report['baseline'][m]['mean']:.3f}"
                for m in ("si_snr_i", "pesq", "stoi")) + f" over {report['utterances']} test utterances")
            return
        metrics = run(args.features, args.ignored, args.model, args.pretrained, params, out)
    except (ValueError, FileNotFoundError, tracking.TrackingUnavailable, audio.AudioError) as err:
        sys.exit(f"evaluate: {err}")
    files, groups = metrics["files"], metrics["groups"]
    base = metrics["baseline"]["files"]["balanced_accuracy"]
    print(f"evaluate: files accuracy {files['accuracy']['value']:.3f} "
          f"[{files['accuracy']['ci_low']:.3f}, {files['accuracy']['ci_high']:.3f}], "
          f"groups accuracy {groups['accuracy']['value']:.3f} ({metrics['counts']}); balanced accuracy "
          f"{files['balanced_accuracy']['value']:.3f} vs the MFCC baseline's {base['value']:.3f} "
          f"(McNemar p={metrics['model_vs_baseline']['mcnemar']['p_value']:.3g})")


if __name__ == "__main__":
    main()
