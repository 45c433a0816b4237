"""Stage pretrain (mode ``auto``): masked-autoencoder pretraining, then per-file reconstruction loss.

The MAE trains on the training split (by default the positive class only, so that high
reconstruction loss marks what does not look like a good recording); fold ``val_fold`` is
its validation set (null: every training clip trains it, for a fixed number of epochs). Every clip then gets a seeded reconstruction loss and its signal energy:
``train_recon.csv`` (clips the MAE trained on), ``val_recon.csv`` (the rest of the training
split) and ``test_recon.csv`` (held-out), which the filter stage reads.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from lightning.pytorch.utilities.model_summary import ModelSummary
from pydantic import Field
from safetensors.torch import save_file

from pipeline import plots, tracking
from pipeline.config import Section, load_section, load_task
from pipeline.contracts import FeaturesFolder, PretrainFolder, PretrainInfo
from pipeline.io import atomic_dir, write_json
from pipeline.models.inference import load_weights, reconstruction_losses
from pipeline.models.networks import ModelParams, build_network, make_spec
from pipeline.training.config import TrainerParams
from pipeline.training.data import FeatureDataModule, LabelCoder
from pipeline.training.kfold import fingerprint, fit_fold, prepare_workdir, read_history, seed_all
from pipeline.training.modules import MAEModule


class PretrainParams(Section):
    train_classes: list[str] = []  # classes the MAE sees; [] = all
    val_fold: int | None = Field(0, ge=0)  # None: no validation, every training clip trains the MAE
    model: ModelParams = ModelParams(arch="mae")
    trainer: TrainerParams = TrainerParams()
    seed: int = 0  # training and the reconstruction pass (params.yaml's top-level seed unless set here)
    histogram_bins: int = Field(20, ge=2)


def recon_summary(table: pd.DataFrame, bins: int) -> dict:
    """Mean, std and histogram of both per-file quantities."""
    out = {}
    for column in ("reconstruction_loss", "signal_energy"):
        values = table[column].to_numpy(dtype=float)
        counts, edges = np.histogram(values, bins=bins)
        out[column] = {"mean": float(values.mean()), "std": float(values.std()),
                       "bins": edges.tolist(), "counts": counts.tolist()}
    return out


def log_reconstructions(run: tracking.StageRun, mae: torch.nn.Module, clips: np.ndarray) -> None:
    """PNG of input / masked / reconstruction for a few (n_mels, frames) clips, as the MAE sees them."""
    x = torch.from_numpy(np.asarray(clips, dtype=np.float32))[:, None]
    mae.eval()
    with torch.no_grad():
        _, pred, mask = mae(x)
        masked = mae.unpatchify(mae.patchify(x) * (1 - mask[..., None]))
        recon = mae.unpatchify(pred)
    fig = plots.mae_reconstruction(x[:, 0].numpy(), masked[:, 0].numpy(), recon[:, 0].numpy())
    run.log_figure(fig, "plots/mae_reconstruction.png")


def run(features_dir: Path, p: PretrainParams, work: Path, model_dir: Path, recon_dir: Path,
        run_file: Path) -> dict:
    folder = FeaturesFolder(features_dir)
    index, meta = folder.index(), folder.meta()
    pool = index[index["split"] == "train"]
    if p.train_classes:
        unknown = set(p.train_classes) - set(meta.classes)
        if unknown:
            raise ValueError(f"pretrain.train_classes {sorted(unknown)} not among classes {meta.classes}")
        pool = pool[pool["label"].isin(p.train_classes)]
    train, val = pool[pool["fold"] != p.val_fold], pool[pool["fold"] == p.val_fold]  # fold None: no val
    spec = make_spec(p.model, meta.n_mels, meta.frames, task="mae")
    seed_all(p.seed)
    network = build_network(spec)
    prepare_workdir(work, fingerprint(p.model_dump(), folder.content_id(),
                                      train["path"].tolist(), val["path"].tolist()))
    coder = LabelCoder(meta.classes, meta.classes[0])  # targets are unused by the MAE loss
    norm = meta.fold_norm("train" if p.val_fold is None else f"fold_{p.val_fold}")
    datamodule = FeatureDataModule(folder.array_path, coder, train, val, None, p.trainer)
    with tracking.stage_run("pretrain", p) as stage:
        tracking.write_run_id(run_file, stage)
        module = MAEModule(network, p.trainer, norm)
        result = fit_fold("pretrain", module, datamodule, p.trainer, work / "pretrain",
                          tracking.lightning_logger(stage), validate=p.val_fold is not None)
        load_weights(network, work / "pretrain" / "model.safetensors")
        features = folder.array()
        losses = reconstruction_losses(network, features, index["row"].to_numpy(), p.seed,
                                       p.trainer.batch_size, norm)
        table = pd.DataFrame({"filename": index["path"], "file": index["file"], "reconstruction_loss": losses,
                              "signal_energy": index["energy"]})
        in_train = index["path"].isin(train["path"])
        parts = {"train": table[in_train], "val": table[~in_train & (index["split"] == "train")],
                 "test": table[index["split"] == "test"]}
        summary = {name: recon_summary(part, p.histogram_bins) for name, part in parts.items() if len(part)}
        with atomic_dir(recon_dir) as tmp:
            for name, part in parts.items():
                part.to_csv(tmp / f"{name}_recon.csv", index=False, lineterminator="\n")
            write_json(tmp / "recon_summary.json", summary)
        with atomic_dir(model_dir) as tmp:
            out = PretrainFolder(tmp)
            save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(out.weights_path))
            out.write_info(PretrainInfo(spec=spec, features=meta.features, input_norm=norm))
            (tmp / "model_summary.txt").write_text(str(ModelSummary(module, max_depth=2)))
            (tmp / "config_used.yaml").write_text(yaml.safe_dump(p.model_dump(mode="json"), sort_keys=False))
        stage.log_metrics({f"final/{k}": v for k, v in result["metrics"].items()})
        stage.log_metrics({f"recon/{name}_mean": s["reconstruction_loss"]["mean"] for name, s in summary.items()})
        stage.log_artifact(model_dir / "model_summary.txt")
        stage.log_artifact(model_dir / "config_used.yaml")
        stage.log_artifact(recon_dir)
        clips = features[np.sort(val["row"].to_numpy()[:4] if len(val) else train["row"].to_numpy()[:4])]
        log_reconstructions(stage, network, clips if norm is None else norm.apply(clips))
        history = read_history(work / "pretrain" / "history.csv")
        if not history.empty:
            stage.log_figure(plots.learning_curves(history, ["train/loss", "val/loss"]), "plots/learning_curves.png")
    return {"val_loss": result["metrics"].get("val/loss"), "epochs": result["epochs"],
            "train_files": len(train), "val_files": len(val)}


def skip(model_dir: Path, recon_dir: Path, work: Path, run_file: Path) -> dict:
    """Task enhance pretrains nothing: each declared output says so, so DVC has its outs and
    nothing downstream can mistake them for a trained MAE (PretrainFolder.exists() is False)."""
    note = {"skipped": "task: enhance has no masked-autoencoder pretraining"}
    for folder in (model_dir, recon_dir, work):
        with atomic_dir(folder) as tmp:
            write_json(tmp / "skipped.json", note)
    write_json(run_file, note)
    return note


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True, help="checkpoints (persisted for resume)")
    parser.add_argument("--model", type=Path, required=True, help="exported MAE folder")
    parser.add_argument("--recon", type=Path, required=True, help="per-file reconstruction CSVs")
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--run-id", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    try:
        params = load_section("pretrain", PretrainParams, args.params)
        if load_task(args.params) == "enhance":
            metrics = skip(args.model, args.recon, args.work, args.run_id)
        else:
            metrics = run(args.features, params, args.work, args.model, args.recon, args.run_id)
    except (ValueError, FileNotFoundError, tracking.TrackingUnavailable) as err:
        sys.exit(f"pretrain: {err}")
    write_json(args.metrics, metrics)
    print(f"pretrain: {metrics}")


if __name__ == "__main__":
    main()
