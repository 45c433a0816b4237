"""Stage train: classifier or triplet training with stratified group k-fold on the filtered index.

Per fold: early stopping on ``trainer.monitor``, top-k checkpoints, the best weights exported
as safetensors, a nested MLflow run. Folds already complete are skipped on a rerun and an
interrupted fold resumes from its last checkpoint. The final model is the best fold's best
checkpoint by ``trainer.monitor`` (the documented selection rule); mean ± std over folds are
the reported cross-validation metrics.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
import yaml
from lightning.pytorch.utilities.model_summary import ModelSummary
from pydantic import Field, model_validator
from safetensors.torch import load_file, save_file

from pipeline import plots, tracking
from pipeline.config import Section, load_section
from pipeline.io import atomic_dir, write_csv, write_json
from pipeline.training.config import ModelParams, SpecAugmentParams, TrainerParams
from pipeline.training.data import FeatureDataModule, LabelCoder
from pipeline.training.inference import embeddings
from pipeline.training.kfold import data_version, fingerprint, fit_fold, prepare_workdir, read_history
from pipeline.training.losses import TripletLoss, build_loss
from pipeline.training.modules import ClassifierModule, TripletModule
from pipeline.training.networks import backbone_of, build_network, make_spec


class TripletParams(Section):
    margin: float = Field(0.2, ge=0)
    learnable_margin: bool = False
    mining: Literal["batch_hard", "batch_all"] = "batch_hard"
    recon: Literal["none", "mse", "logcosh"] = "none"  # needs model.arch: mae
    recon_weight: float = Field(0.0, ge=0)


class TrainParams(Section):
    mode: Literal["classifier", "triplet"] = "classifier"
    positive_class: str = "good"  # binary tasks: the class whose probability the model outputs
    model: ModelParams = ModelParams()
    init_from_pretrain: bool = False  # MAE only: start from the pretrain stage's encoder
    loss: Literal["who", "focal", "asymmetric", "auc", "bce"] = "who"
    class_weight: list[float] | Literal["balanced"] | None = "balanced"  # used by who and focal
    extend_bad: bool = False  # oversample the minority class
    specaugment: SpecAugmentParams | None = SpecAugmentParams()
    triplet: TripletParams = TripletParams()
    label_fraction: float = Field(1.0, gt=0, le=1)  # seeded, stratified share of training labels
    folds: list[int] | None = None  # None: every fold
    trainer: TrainerParams = TrainerParams()

    @model_validator(mode="after")
    def _check(self) -> TrainParams:
        if self.mode == "triplet" and self.triplet.recon != "none" and self.model.arch != "mae":
            raise ValueError("triplet.recon needs model.arch: mae (the reconstruction is the MAE's)")
        return self


def fold_rows(index: pd.DataFrame, ignored: set[str], fold: int, p: TrainParams) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train and val rows of ``fold``: filtered files dropped, label_fraction applied to train only."""
    pool = index[(index["split"] == "train") & ~index["path"].isin(ignored)]
    train, val = pool[pool["fold"] != fold], pool[pool["fold"] == fold]
    if p.label_fraction < 1:
        train = (train.groupby("label", group_keys=False)
                 .sample(frac=p.label_fraction, random_state=p.trainer.seed + fold))
    return train, val


def make_module(p: TrainParams, spec: dict, coder: LabelCoder, train: pd.DataFrame, pretrained: Path | None):
    network = build_network(spec)
    if pretrained is not None:
        backbone_of(network).load_state_dict(load_file(str(pretrained)))
    if p.mode == "triplet":
        return TripletModule(network, p.trainer, TripletLoss(**p.triplet.model_dump()))
    weight = p.class_weight if p.loss in ("who", "focal") else None
    loss = build_loss(p.loss, len(coder.classes), weight, labels=coder.encode(train["label"]))
    return ClassifierModule(network, p.trainer, loss, coder.num_outputs, p.specaugment)


def centroids(module, features: np.ndarray, train: pd.DataFrame, coder: LabelCoder) -> dict[str, np.ndarray]:
    """Triplet models classify by the nearest class centroid of normalized training embeddings."""
    emb = embeddings(module.network, features, train["row"].to_numpy())
    emb /= np.linalg.norm(emb, axis=1, keepdims=True).clip(1e-12)
    targets = coder.encode(train["label"])
    return {"centroids": np.stack([emb[targets == t].mean(axis=0) for t in range(len(coder.order))])}


def pretrained_weights(pretrained_dir: Path, spec: dict) -> Path:
    """The pretrain stage's encoder weights, after checking they fit the configured MAE."""
    if spec["arch"] != "mae":
        raise ValueError("train.init_from_pretrain needs train.model.arch: mae")
    pre = json.loads((pretrained_dir / "mae.json").read_text())["spec"]["kwargs"]

    def shape(kwargs: dict) -> dict:  # mask_ratio may differ: it does not change the weights
        return {k: v for k, v in kwargs.items() if k != "mask_ratio"}

    if shape(pre) != shape(spec["kwargs"]):
        raise ValueError(f"train.model {shape(spec['kwargs'])} does not match the pretrained MAE "
                         f"{shape(pre)}; align pretrain.model and train.model")
    return pretrained_dir / "mae.safetensors"


def run(features_dir: Path, ignored_csv: Path, pretrained_dir: Path, p: TrainParams, work: Path,
        model_dir: Path, curves_out: Path, run_file: Path) -> dict:
    index = pd.read_parquet(features_dir / "index.parquet")
    meta = json.loads((features_dir / "meta.json").read_text())
    ignored = set(pd.read_csv(ignored_csv)["filename"])
    _, n_mels, frames = meta["shape"]
    coder = LabelCoder(meta["classes"], p.positive_class)
    task = "classifier" if p.mode == "classifier" else ("mae" if p.model.arch == "mae" else "embedder")
    spec = make_spec(p.model, n_mels, frames, task, coder.num_outputs)
    pretrained = pretrained_weights(pretrained_dir, spec) if p.init_from_pretrain else None
    folds = p.folds if p.folds is not None else sorted(index.loc[index["split"] == "train", "fold"].unique())
    prepare_workdir(work, fingerprint(p.model_dump(), meta, sorted(ignored), data_version(features_dir),
                                      None if pretrained is None else pretrained.stat().st_mtime_ns))
    features = np.load(features_dir / "features.npy", mmap_mode="r")
    results = []
    with tracking.stage_run("train", p) as stage:
        tracking.write_run_id(run_file, stage)
        for fold in folds:
            train, val = fold_rows(index, ignored, int(fold), p)
            module = make_module(p, spec, coder, train, pretrained)
            datamodule = FeatureDataModule(features_dir / "features.npy", coder, train, val, None, p.trainer,
                                           oversample=p.extend_bad)
            with stage.child(f"fold_{fold}", {"fold": int(fold), "train_files": len(train), "val_files": len(val)}) as child:
                result = fit_fold(f"fold_{fold}", module, datamodule, p.trainer, work / f"fold_{fold}",
                                  tracking.lightning_logger(child))
                child.log_metrics({f"best/{k}": v for k, v in result["metrics"].items()})
            if p.mode == "triplet" and not (work / f"fold_{fold}" / "centroids.safetensors").exists():
                module.network.load_state_dict(load_file(str(work / f"fold_{fold}" / "model.safetensors")))
                save_file({k: torch.from_numpy(v) for k, v in
                           centroids(module, features, train, coder).items()},
                          str(work / f"fold_{fold}" / "centroids.safetensors"))
            results.append(result)
        summary = summarize(results, p.trainer)
        # A partial run must never reach the registry's champion (see the register stage).
        summary["partial"] = bool(p.trainer.fast_dev_run or p.trainer.overfit_batches or p.folds is not None)
        best = summary["final_fold"]
        history = pd.concat([read_history(work / f"fold_{f}" / "history.csv") for f in folds], ignore_index=True)
        with atomic_dir(model_dir) as tmp:
            for name in ("model.safetensors", "centroids.safetensors"):
                if (work / best / name).exists():
                    shutil.copy2(work / best / name, tmp / name)
            write_json(tmp / "model.json", {"spec": spec, "mode": p.mode, "classes": coder.order,
                                            "binary": coder.binary, "positive_class": p.positive_class,
                                            "features": meta["features"], "fold": best,
                                            "selection": f"best fold by {p.trainer.monitor} ({p.trainer.monitor_mode})"})
            (tmp / "config_used.yaml").write_text(yaml.safe_dump(p.model_dump(mode="json"), sort_keys=False))
            (tmp / "model_summary.txt").write_text(str(ModelSummary(module, max_depth=2)))
        write_csv(curves_out, history)
        stage.log_metrics({k: v for k, v in summary.items() if isinstance(v, float)})
        for name in ("config_used.yaml", "model_summary.txt", "model.json"):
            stage.log_artifact(model_dir / name)
        if not history.empty:
            metrics = [m for m in ("train/loss", "val/loss", p.trainer.monitor) if m in history]
            stage.log_figure(plots.learning_curves(history, list(dict.fromkeys(metrics))), "plots/learning_curves.png")
    return summary


def summarize(results: list[dict], p: TrainerParams) -> dict:
    """Mean ± std of every fold metric, and the final fold by the selection rule."""
    frame = pd.DataFrame([r["metrics"] for r in results])
    summary: dict = {"folds": len(results), "resumed_folds": sum(r["resumed"] for r in results),
                     "skipped_folds": sum(r["skipped"] for r in results)}
    for column in frame:
        summary[f"cv/{column}_mean"] = float(frame[column].mean())
        summary[f"cv/{column}_std"] = float(frame[column].std(ddof=0))
    scores = [(r["score"] if r["score"] is not None else np.nan) for r in results]
    pick = np.nanargmin if p.monitor_mode == "min" else np.nanargmax
    summary["final_fold"] = results[int(pick(scores))]["fold"] if not np.all(np.isnan(scores)) else results[0]["fold"]
    summary["per_fold"] = {r["fold"]: r["metrics"] for r in results}
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=Path, required=True)
    parser.add_argument("--ignored", type=Path, required=True, help="filter stage output")
    parser.add_argument("--pretrained", type=Path, required=True, help="pretrain stage model folder")
    parser.add_argument("--work", type=Path, required=True, help="fold checkpoints (persisted for resume)")
    parser.add_argument("--model", type=Path, required=True, help="exported final model folder")
    parser.add_argument("--curves", type=Path, required=True, help="learning curves CSV (DVC plots)")
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--run-id", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    try:
        params = load_section("train", TrainParams, args.params)
        summary = run(args.features, args.ignored, args.pretrained, params, args.work, args.model,
                      args.curves, args.run_id)
    except (ValueError, FileNotFoundError, tracking.TrackingUnavailable) as err:
        sys.exit(f"train: {err}")
    write_json(args.metrics, summary)
    print(f"train: final fold {summary['final_fold']}; " + ", ".join(
        f"{k}={v:.4f}" for k, v in summary.items() if k.endswith("_mean")))


if __name__ == "__main__":
    main()
