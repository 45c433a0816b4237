"""Fit one fold with checkpoints, early stopping and crash-safe resume.

A fold's folder holds ``checkpoints/`` (top-k + ``last.ckpt``), ``history.csv`` (one row per
epoch) and, once the fold is complete, ``model.safetensors`` and ``result.json``. On a rerun a
fold with ``result.json`` is not redone, and an unfinished fold resumes from ``last.ckpt``.
A work folder is tied to a fingerprint of everything that shapes training (params, index,
features), so stale folds from other settings are never reused.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint, RichProgressBar
from safetensors.torch import save_file

from pipeline.io import write_json
from pipeline.training.config import TrainerParams


# Lightning's informational lines that say nothing about this run (an advert, absent hardware,
# the checkpoint reload that fit_fold does on purpose); everything else it logs still shows.
_LIGHTNING_NOISE = ("💡 Tip:", "GPU available: False", "TPU available: False", "HPU available: False",
                    "Restoring states from the checkpoint path", "Loaded model weights from the checkpoint")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_LIGHTNING_NOISE)


def quiet_lightning() -> None:
    """Drop Lightning's known-harmless lines and one deprecation inside Lightning itself."""
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropNoise) for f in logger.filters):
        logger.addFilter(_DropNoise())
    # lightning 2.6's own _pytree calls torch's deprecated LeafSpec; nothing a user can change
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


def fingerprint(*parts: Any) -> str:
    """Stable hash of JSON-able parts (params dumps, file digests)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepare_workdir(work: Path, key: str) -> None:
    """Keep ``work`` only if it was made for ``key``; otherwise start it afresh."""
    stamp = work / "fingerprint.txt"
    if work.exists() and (not stamp.exists() or stamp.read_text().strip() != key):
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    stamp.write_text(key + "\n")


def is_main_process() -> bool:
    """False in the extra processes of a multi-process (DDP) run, which must not write outputs.

    Lightning reads the rank from the launcher's environment when it is imported.
    """
    from lightning.pytorch.utilities import rank_zero_only

    return rank_zero_only.rank == 0


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch (and DataLoader workers): call before building a network, so
    its initial weights follow from the seed."""
    L.seed_everything(seed, workers=True, verbose=False)


class ReseedEachEpoch(Callback):
    """Seed every training epoch with ``seed + epoch`` at its first batch.

    Masking and augmentation of an epoch then follow from the seed and the epoch alone (the
    batches' order does too: ``EpochSampler``), so a fold resumed from its last checkpoint
    continues exactly as an uninterrupted run. The first batch, not the epoch's start: Lightning
    skips on_train_epoch_start for the epoch a run resumes with.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:
            seed_all(self.seed + trainer.current_epoch)


class ProgressBar(RichProgressBar):
    """Lightning's rich bar without the logger's run id (``v_num``), which says nothing here."""

    def get_metrics(self, trainer: L.Trainer, module: L.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, module)
        metrics.pop("v_num", None)
        return metrics


class EpochHistory(Callback):
    """Append the epoch's logged metrics to a CSV (kept across resumes; learning curves)."""

    def __init__(self, path: Path, fold: str) -> None:
        self.path, self.fold = path, fold

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run or not trainer.is_global_zero:
            return
        row = {"fold": self.fold, "epoch": trainer.current_epoch,
               **{k: float(v) for k, v in sorted(trainer.callback_metrics.items()) if v.numel() == 1}}
        new = not self.path.exists()
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)


def read_history(path: Path) -> pd.DataFrame:
    """Epoch rows of a fold; an epoch repeated by a resume keeps its last row."""
    if not path.exists():
        return pd.DataFrame()
    return pd.read_csv(path).drop_duplicates(subset=["fold", "epoch"], keep="last")


def fit_fold(name: str, module: L.LightningModule, datamodule: L.LightningDataModule,
             p: TrainerParams, fold_dir: Path, logger: Any = None, validate: bool = True) -> dict[str, Any]:
    """Train (or resume, or skip if done) one fold; return its result record.

    ``validate=False`` (a refit on every training row): no validation, no early stopping, the
    weights of the last epoch, the last epoch's training metrics.
    """
    result_file = fold_dir / "result.json"
    if result_file.exists():
        return {**json.loads(result_file.read_text()), "skipped": True}
    fold_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = fold_dir / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="epoch{epoch:03d}", monitor=p.monitor if validate else None,
                                 mode=p.monitor_mode, save_top_k=p.save_top_k if validate else 0, save_last=True,
                                 auto_insert_metric_name=False)
    callbacks: list[Callback] = [checkpoint, EpochHistory(fold_dir / "history.csv", name), ReseedEachEpoch(p.seed)]
    if validate:
        callbacks.append(EarlyStopping(monitor=p.monitor, mode=p.monitor_mode, patience=p.patience))
    if p.progress_bar:
        callbacks.append(ProgressBar())
    quiet_lightning()
    # Metrics are logged per epoch only, so the step logging interval changes nothing but
    # Lightning's warning that small datasets have fewer batches than it.
    trainer = L.Trainer(default_root_dir=fold_dir, callbacks=callbacks, logger=logger or False,
                        enable_progress_bar=p.progress_bar, enable_model_summary=False,
                        num_sanity_val_steps=0, log_every_n_steps=1, limit_val_batches=None if validate else 0,
                        **p.trainer_kwargs())
    resumed = last.exists()
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(last) if resumed else None)
    best = (checkpoint.best_model_path or None) if validate else None  # None under fast_dev_run
    if validate:
        metrics = trainer.validate(module, datamodule=datamodule, ckpt_path=best, verbose=False)[0]
    else:
        metrics = {k: v for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    score = metrics.get(p.monitor)
    result = {"fold": name, "monitor": p.monitor, "score": None if score is None else float(score),
              "best_checkpoint": best, "epochs": trainer.current_epoch, "resumed": resumed,
              "metrics": {k: float(v) for k, v in metrics.items()}}
    if trainer.is_global_zero:  # under DDP every process gets here; one writes
        save_file({k: v.contiguous() for k, v in module.network.state_dict().items()},
                  str(fold_dir / "model.safetensors"))
        write_json(result_file, result)  # written last: its presence marks the fold complete
    return {**result, "skipped": False}


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
