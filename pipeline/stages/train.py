"""Stage train: classifier or triplet training with stratified group k-fold on the filtered index.

Per fold: early stopping on ``trainer.monitor``, top-k checkpoints, the best weights exported
as safetensors, a nested MLflow run. Folds already complete are skipped on a rerun and an
interrupted fold resumes from its last checkpoint. The final model is the best fold's best
checkpoint by ``trainer.monitor`` (the documented selection rule); mean ± std over folds are
the reported cross-validation metrics.

Task enhance (params.yaml ``task``): one MaskUNet fit (``train.enhance``) on the training split
outside ``val_fold``, early stopping on validation SI-SNR over that fold's speakers, the best
epoch's weights exported with an EnhancerInfo; the classify settings are not read.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
import yaml
from lightning.pytorch.utilities.model_summary import ModelSummary
from pydantic import AliasChoices, Field, field_validator, model_validator
from safetensors.torch import save_file

from pipeline import plots, profile, tracking
from pipeline.config import Section, load_section, load_task
from pipeline.contracts import EnhancerInfo, FeaturesFolder, ModelFolder, ModelInfo
from pipeline.features import BandNorm
from pipeline.io import atomic_dir, file_digest, write_csv, write_json
from pipeline.models.inference import embeddings, load_weights, pretrained_weights
from pipeline.models.networks import ModelParams, backbone_of, build_network, make_spec, make_unet_spec
from pipeline.training.config import AugmentParams, EnhanceParams, SpecAugmentParams, TrainerParams
from pipeline.training.data import FeatureDataModule, LabelCoder
from pipeline.training.enhance import enhance_rows, fit_enhancer
from pipeline.training.kfold import (fingerprint, fit_fold, is_main_process, prepare_workdir, read_history, seed_all,
                                     summarize)
from pipeline.training.losses import LOSS_ALIASES, TripletLoss, build_loss
from pipeline.training.modules import ClassifierModule, TripletModule


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
    loss: Literal["weighted_ce", "focal", "asymmetric", "auc", "bce", "who"] = "weighted_ce"  # who: weighted_ce
    class_weight: list[float] | Literal["balanced"] | None = "balanced"  # used by weighted_ce and focal
    oversample_minority: bool = Field(False, validation_alias=AliasChoices("oversample_minority", "extend_bad"))
    specaugment: SpecAugmentParams | None = SpecAugmentParams()
    augment: AugmentParams = AugmentParams()  # the other training-batch augmentations
    label_smoothing: float = Field(0.0, ge=0, lt=1)  # weighted_ce and bce
    triplet: TripletParams = TripletParams()
    label_fraction: float = Field(1.0, gt=0, le=1)  # seeded, stratified share of training labels
    folds: list[int] | None = None  # None: every fold; [] with final: refit: no cross-validation
    # best_fold: export the best cross-validation fold's model; refit: then train once more on
    # every training row for max_epochs (no validation, no early stopping) and export that
    final: Literal["best_fold", "refit"] = "best_fold"
    trainer: TrainerParams = TrainerParams()
    enhance: EnhanceParams = EnhanceParams()  # task enhance: the enhancer's recipe (the rest is classify's)
    seed: int = 0  # params.yaml's top-level seed unless set here

    @field_validator("loss")
    @classmethod
    def _alias(cls, name: str) -> str:
        return LOSS_ALIASES.get(name, name)

    @model_validator(mode="after")
    def _check(self) -> TrainParams:
        if self.mode == "triplet" and self.triplet.recon != "none" and self.model.arch != "mae":
            raise ValueError("triplet.recon needs model.arch: mae (the reconstruction is the MAE's)")
        if self.folds == [] and self.final != "refit":
            raise ValueError("folds: [] trains no fold; it needs final: refit")
        if self.label_smoothing and self.loss not in ("weighted_ce", "bce"):
            raise ValueError(f"label_smoothing works with loss weighted_ce or bce, not {self.loss}")
        if self.trainer.layer_decay < 1 and self.model.arch != "mae":
            raise ValueError(f"trainer.layer_decay < 1 decays over transformer blocks: it needs model.arch: mae, "
                             f"not {self.model.arch}")
        return self


REFIT = "refit"  # the work folder and name of the final refit on every training row


def fold_rows(index: pd.DataFrame, ignored: set[str], fold: int | None, p: TrainParams) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train and val rows of ``fold`` (None: every training row, no val): filtered files dropped,
    label_fraction applied to train only."""
    pool = index[(index["split"] == "train") & ~index["path"].isin(ignored)]
    train, val = (pool, pool.iloc[:0]) if fold is None else (pool[pool["fold"] != fold], pool[pool["fold"] == fold])
    if p.label_fraction < 1:
        train = (train.groupby("label", group_keys=False)
                 .sample(frac=p.label_fraction, random_state=p.trainer.seed + (-1 if fold is None else fold)))
    return train, val


def make_module(p: TrainParams, spec: dict, coder: LabelCoder, train: pd.DataFrame, pretrained: Path | None,
                norm: BandNorm | None = None, top_db: float | None = 80.0):
    network = build_network(spec)
    if pretrained is not None:
        load_weights(backbone_of(network), pretrained)
    if p.mode == "triplet":
        return TripletModule(network, p.trainer, TripletLoss(**p.triplet.model_dump()), norm)
    weight = p.class_weight if p.loss in ("weighted_ce", "focal") else None
    smoothing = {"label_smoothing": p.label_smoothing} if p.label_smoothing else {}
    loss = build_loss(p.loss, len(coder.classes), weight, labels=coder.encode(train["label"]), **smoothing)
    return ClassifierModule(network, p.trainer, loss, coder.num_outputs, p.specaugment, p.augment, norm,
                            top_db or 80.0)


def centroids(module, features: np.ndarray, train: pd.DataFrame, coder: LabelCoder,
              norm: BandNorm | None) -> dict[str, np.ndarray]:
    """Triplet models classify by the nearest class centroid of normalized training embeddings."""
    emb = embeddings(module.network, features, train["row"].to_numpy(), norm=norm)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True).clip(1e-12)
    targets = coder.encode(train["label"])
    return {"centroids": np.stack([emb[targets == t].mean(axis=0) for t in range(len(coder.order))])}


def train_one(name: str, fold: int | None, index: pd.DataFrame, ignored: set[str], p: TrainParams, spec: dict,
              coder: LabelCoder, folder: FeaturesFolder, pretrained: Path | None, work: Path,
              stage: tracking.StageRun) -> tuple[dict, object]:
    """Fit one cross-validation fold (or the refit, ``fold`` None) in ``work/name``; (result, module)."""
    meta = folder.meta()
    train, val = fold_rows(index, ignored, fold, p)
    norm = meta.fold_norm(name if fold is not None else "train")
    seed_all(p.seed)
    module = make_module(p, spec, coder, train, pretrained, norm, meta.features.top_db)
    datamodule = FeatureDataModule(folder.array_path, coder, train, val, None, p.trainer,
                                   oversample=p.oversample_minority)
    with stage.child(name, {"fold": REFIT if fold is None else fold, "train_files": len(train),
                            "val_files": len(val)}) as child:
        result = fit_fold(name, module, datamodule, p.trainer, work / name, tracking.lightning_logger(child),
                          validate=fold is not None)
        child.log_metrics({f"best/{k}": v for k, v in result["metrics"].items()})
    if p.mode == "triplet" and is_main_process() and not (work / name / "centroids.safetensors").exists():
        load_weights(module.network, work / name / "model.safetensors")
        save_file({k: torch.from_numpy(v) for k, v in centroids(module, folder.array(), train, coder, norm).items()},
                  str(work / name / "centroids.safetensors"))
    return result, module


def export(model_dir: Path, work: Path, final: str, p: TrainParams, spec: dict, coder: LabelCoder,
           folder: FeaturesFolder, manifest: pd.DataFrame | None, trained_on: pd.DataFrame, module: object) -> None:
    """The final model's folder: weights (and centroids), model.json, its training files, the
    profile of its training data (the service's drift guard; needs the manifest), config."""
    meta = folder.meta()
    selection = (f"refit on every training row for {p.trainer.max_epochs} epochs" if final == REFIT
                 else f"best fold by {p.trainer.monitor} ({p.trainer.monitor_mode})")
    with atomic_dir(model_dir) as tmp:
        out = ModelFolder(tmp)
        for name in (out.weights_path.name, out.centroids_path.name):
            if (work / final / name).exists():
                shutil.copy2(work / final / name, tmp / name)
        out.write_info(ModelInfo(
            spec=spec, mode=p.mode, classes=coder.order, binary=coder.binary, positive_class=p.positive_class,
            features=meta.features, label_column=meta.label_column, fold=final, selection=selection, seed=p.seed,
            input_norm=meta.fold_norm("train" if final == REFIT else final), segment=meta.segment))
        trained_on[["path", "label"]].to_csv(out.training_files_path, index=False, lineterminator="\n")
        if manifest is not None:
            files = manifest[manifest["path"].isin(trained_on["file"])]
            write_json(out.profile_path, profile.build(files, folder.array(), trained_on["row"].to_numpy()).model_dump())
        (tmp / "config_used.yaml").write_text(yaml.safe_dump(p.model_dump(mode="json"), sort_keys=False))
        (tmp / "model_summary.txt").write_text(str(ModelSummary(module, max_depth=2)))


def run(features_dir: Path, ignored_csv: Path, pretrained_dir: Path, p: TrainParams, work: Path,
        model_dir: Path, curves_out: Path, run_file: Path, manifest_file: Path | None = None) -> dict:
    folder = FeaturesFolder(features_dir)
    index, meta = folder.index(), folder.meta()
    if p.augment.noise_db and meta.features.normalize != "peak":
        raise ValueError("train.augment.noise_db adds noise relative to each clip's peak: it needs "
                         "featurize.features.normalize: peak")
    ignored = set(pd.read_csv(ignored_csv)["filename"])
    coder = LabelCoder(meta.classes, p.positive_class)
    task = "classifier" if p.mode == "classifier" else ("mae" if p.model.arch == "mae" else "embedder")
    spec = make_spec(p.model, meta.n_mels, meta.frames, task, coder.num_outputs)
    pretrained = pretrained_weights(pretrained_dir, spec) if p.init_from_pretrain else None
    folds = p.folds if p.folds is not None else sorted(index.loc[index["split"] == "train", "fold"].unique())
    # Under DDP (trainer.strategy: ddp) Lightning runs this stage once per process; every process
    # takes part in the fits, the main one alone prepares, records and exports.
    main_process = is_main_process()
    if main_process:
        prepare_workdir(work, fingerprint(p.model_dump(), sorted(ignored), folder.content_id(),
                                          None if pretrained is None else file_digest(pretrained)))
    with tracking.stage_run("train", p, record=main_process) as stage:
        if main_process:
            tracking.write_run_id(run_file, stage)
        runs = {f"fold_{f}": train_one(f"fold_{f}", int(f), index, ignored, p, spec, coder, folder, pretrained,
                                       work, stage) for f in folds}
        if p.final == REFIT:
            runs[REFIT] = train_one(REFIT, None, index, ignored, p, spec, coder, folder, pretrained, work, stage)
        if not main_process:
            return {}
        cv = [result for name, (result, _) in runs.items() if name != REFIT]
        summary = summarize(cv, p.trainer) if cv else {"folds": 0}
        if p.final == REFIT:
            summary["final_fold"] = REFIT
        # A partial run must never reach the registry's champion (see the register stage).
        summary["partial"] = bool(p.trainer.fast_dev_run or p.trainer.overfit_batches
                                  or (p.folds is not None and p.final != REFIT))
        final = summary["final_fold"]
        trained_on = fold_rows(index, ignored, None if final == REFIT else int(final.removeprefix("fold_")), p)[0]
        manifest = None if manifest_file is None else pd.read_parquet(manifest_file)
        export(model_dir, work, final, p, spec, coder, folder, manifest, trained_on, runs[final][1])
        history = pd.concat([read_history(work / name / "history.csv") for name in runs], ignore_index=True)
        write_csv(curves_out, history)
        stage.log_metrics({k: v for k, v in summary.items() if isinstance(v, float)})
        for name in ("config_used.yaml", "model_summary.txt", ModelFolder(model_dir).info_path.name):
            stage.log_artifact(model_dir / name)
        if not history.empty:
            metrics = [m for m in ("train/loss", "val/loss", p.trainer.monitor) if m in history]
            stage.log_figure(plots.learning_curves(history, list(dict.fromkeys(metrics))), "plots/learning_curves.png")
    return summary


def run_enhance(raw_dir: Path, features_dir: Path, p: TrainParams, work: Path, model_dir: Path,
                curves_out: Path, run_file: Path) -> dict:
    """Task enhance: fit the enhancer, export it (see the module docstring); the summary."""
    folder, e = FeaturesFolder(features_dir), p.enhance
    index, meta = folder.enhance_index(), folder.enhance_meta()
    prepare_workdir(work, fingerprint(e.model_dump(), folder.content_id()))
    with tracking.stage_run("train", p) as stage:
        tracking.write_run_id(run_file, stage)
        train, val = enhance_rows(index, e.val_fold)
        with stage.child("enhance", {"train_pairs": len(train), "val_pairs": len(val)}) as child:
            result, module = fit_enhancer(raw_dir, train, val, e, meta.sample_rate, work / "enhance",
                                          tracking.lightning_logger(child))
        with atomic_dir(model_dir) as tmp:
            shutil.copy2(work / "enhance" / "model.safetensors", tmp / "model.safetensors")
            ModelFolder(tmp).write_info(EnhancerInfo(
                spec=make_unet_spec(e.model), sample_rate=meta.sample_rate, precision=e.inference_precision,
                seed=e.trainer.seed, fold="enhance",
                selection=f"best epoch by {e.trainer.monitor} ({e.trainer.monitor_mode})"))
            train[["path", "pair"]].to_csv(ModelFolder(tmp).training_files_path, index=False, lineterminator="\n")
            (tmp / "config_used.yaml").write_text(yaml.safe_dump(e.model_dump(mode="json"), sort_keys=False))
            (tmp / "model_summary.txt").write_text(str(ModelSummary(module, max_depth=2)))
        history = read_history(work / "enhance" / "history.csv")
        write_csv(curves_out, history)
        summary = {"task": "enhance", "final_fold": "enhance", "epochs": result["epochs"],
                   "train_pairs": len(train), "val_pairs": len(val), "resumed": result["resumed"],
                   **{f"best/{k}": v for k, v in result["metrics"].items()},
                   "partial": bool(e.trainer.fast_dev_run or e.trainer.overfit_batches)}
        stage.log_metrics({k: v for k, v in summary.items() if k.startswith("best/")})
        stage.log_artifact(model_dir / "config_used.yaml")
        if not history.empty:
            metrics = [m for m in ("train/loss", "val/loss", e.trainer.monitor) if m in history]
            stage.log_figure(plots.learning_curves(history, list(dict.fromkeys(metrics))), "plots/learning_curves.png")
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=Path, required=True)
    parser.add_argument("--raw", type=Path, help="the recordings (task enhance reads the waves; required there)")
    parser.add_argument("--manifest", type=Path, help="validate_raw's manifest: the model's drift profile")
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
        if load_task(args.params) == "enhance":
            if args.raw is None:
                raise ValueError("task enhance reads the waves: give --raw (the recordings folder)")
            summary = run_enhance(args.raw, args.features, params, args.work, args.model, args.curves, args.run_id)
        else:
            summary = run(args.features, args.ignored, args.pretrained, params, args.work, args.model,
                          args.curves, args.run_id, args.manifest)
    except (ValueError, FileNotFoundError, tracking.TrackingUnavailable) as err:
        sys.exit(f"train: {err}")
    if not summary:  # an extra process of a multi-process run: the main one writes
        return
    write_json(args.metrics, summary)
    print(f"train: final fold {summary['final_fold']}; " + ", ".join(
        f"{k}={v:.4f}" for k, v in summary.items() if k.endswith("_mean") or k.startswith("best/")))


if __name__ == "__main__":
    main()
