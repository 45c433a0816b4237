"""LightningModules: they wire a plain network to its loss, metrics and optimizer, nothing more.

Each mode implements one ``model_step(batch) -> dict`` used by the train, val and test steps.
"""
from __future__ import annotations

import math
import re

import lightning as L
import torch
import torchmetrics
from torch import Tensor, nn

from pipeline.features import BandNorm
from pipeline.training.augment import SpecAugment, add_noise_floor, axis_warp, mixup, random_eq, time_shift
from pipeline.training.config import AugmentParams, SpecAugmentParams, TrainerParams
from pipeline.training.losses import TripletLoss


_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")  # encoder blocks; decoder_blocks never match
_EMBEDDING = ("patch_embed", "cls_token", "pos_embed")


def layer_decay_groups(module: nn.Module, lr: float, decay: float) -> list[dict]:
    """AdamW parameter groups with layer-wise learning-rate decay (BEiT, MAE fine-tuning).

    With encoder depth D, block i learns at lr * decay**(D - i), the patch and position
    embeddings at lr * decay**(D + 1), everything else (head, final norm) at lr: a pretrained
    encoder's lower layers, which hold the most general features, move least. Each group keeps
    its ``lr_scale`` so warmup and schedulers scale it alike.
    """
    names = [name for name, _ in module.named_parameters()]
    blocks = {int(m.group(1)) for name in names if (m := _BLOCK.search(name))}
    if not blocks:
        raise ValueError("layer_decay < 1 needs a network with transformer `blocks` (arch: mae)")
    depth = max(blocks) + 1
    groups: dict[float, list[nn.Parameter]] = {}
    for name, param in module.named_parameters():
        block = _BLOCK.search(name)
        layer = int(block.group(1)) + 1 if block else 0 if any(e in name for e in _EMBEDDING) else depth + 1
        groups.setdefault(decay ** (depth + 1 - layer), []).append(param)
    return [{"params": params, "lr": lr * scale, "lr_scale": scale} for scale, params in sorted(groups.items())]


class _Base(L.LightningModule):
    """Shared steps, logging and optimizers; subclasses define ``model_step``.

    ``norm`` (the fold's per-band statistics, ``band_norm``) standardises every batch the
    network sees, after any augmentation, as ``ExportedModel`` does at inference.
    """

    def __init__(self, network: nn.Module, p: TrainerParams, norm: BandNorm | None = None) -> None:
        super().__init__()
        self.network, self.p = network, p
        self.metrics: nn.ModuleDict | None = None  # per stage, updated from model_step's probs/targets
        stats = None if norm is None else [torch.tensor(v, dtype=torch.float32)[:, None] for v in (norm.mean, norm.std)]
        self.register_buffer("band_mean", None if stats is None else stats[0])
        self.register_buffer("band_std", None if stats is None else stats[1])

    def normalized(self, specs: Tensor) -> Tensor:
        """(B, ..., n_mels, frames) -> the same, standardised per band (identity without ``norm``)."""
        return specs if self.band_mean is None else (specs - self.band_mean) / self.band_std

    def model_step(self, batch: tuple[Tensor, Tensor, Tensor], stage: str) -> dict[str, Tensor]:
        raise NotImplementedError

    def _step(self, batch: tuple[Tensor, Tensor, Tensor], stage: str) -> Tensor:
        out = self.model_step(batch, stage)
        for name, value in out.items():  # the loss and any other scalar a mode reports
            if name not in ("probs", "targets"):
                # sync_dist: the mean over every process of a multi-process run (a no-op in one process)
                self.log(f"{stage}/{name}", value, prog_bar=True, on_step=False, on_epoch=True,
                         batch_size=len(batch[0]), sync_dist=True)
        if self.metrics is not None:
            metrics = self.metrics[f"{stage}_metrics"]
            metrics.update(out["probs"], out["targets"])
            self.log_dict(metrics, on_step=False, on_epoch=True)
        return out["loss"]

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def on_train_batch_start(self, batch: object, batch_idx: int) -> None:
        # Linear warmup per optimizer step; the epoch-level scheduler takes over afterwards.
        if self.p.scheduler == "one_cycle" or self.p.warmup_epochs <= 0:
            return
        warmup_steps = max(1, math.ceil(self.p.warmup_epochs * self.trainer.num_training_batches
                                        / self.p.accumulate_grad_batches))
        step = self.trainer.global_step
        if step < warmup_steps:
            for group in self.optimizers().param_groups:
                group["lr"] = self.p.lr * group.get("lr_scale", 1.0) * (step + 1) / warmup_steps

    def configure_optimizers(self) -> dict:
        params = (layer_decay_groups(self, self.p.lr, self.p.layer_decay) if self.p.layer_decay < 1
                  else self.parameters())
        opt = torch.optim.AdamW(params, lr=self.p.lr, weight_decay=self.p.weight_decay)
        if self.p.scheduler == "none":
            return {"optimizer": opt}
        if self.p.scheduler == "cosine_restarts":
            sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=self.p.restart_epochs)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
        if self.p.scheduler == "plateau":
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode=self.p.monitor_mode,
                                                               patience=max(1, self.p.patience // 2))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": self.p.monitor}}
        steps = int(self.trainer.estimated_stepping_batches)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups],
                                                    total_steps=max(steps, 1))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class MAEModule(_Base):
    """Mode ``auto``: masked-autoencoder pretraining; the loss is MSE on masked patches."""

    def model_step(self, batch: tuple[Tensor, Tensor, Tensor], stage: str) -> dict[str, Tensor]:
        loss, _, _ = self.network(self.normalized(batch[0]))
        return {"loss": loss}


class ClassifierModule(_Base):
    """Mode ``classifier``: logits from any network, a class-imbalance loss, augmentation on train.

    Training batches: dB-domain augmentations (EQ, noise floor, time shift, warps), band
    normalisation, SpecAugment, then mixup (the loss mixes as the inputs do).
    """

    def __init__(self, network: nn.Module, p: TrainerParams, loss: nn.Module, num_outputs: int,
                 augment: SpecAugmentParams | None = None, extra: AugmentParams | None = None,
                 norm: BandNorm | None = None, top_db: float = 80.0) -> None:
        super().__init__(network, p, norm)
        self.loss_fn, self.binary = loss, num_outputs == 1
        self.augment = SpecAugment(**augment.model_dump()) if augment else None
        self.extra, self.top_db = extra or AugmentParams(), top_db
        task = {"task": "binary"} if self.binary else {"task": "multiclass", "num_classes": num_outputs}
        self.metrics = nn.ModuleDict({
            f"{stage}_metrics": torchmetrics.MetricCollection({
                "acc": torchmetrics.Accuracy(**task),
                "f1": torchmetrics.F1Score(**task, **({} if self.binary else {"average": "macro"})),
                "auroc": torchmetrics.AUROC(**task),
            }, prefix=f"{stage}/") for stage in ("train", "val", "test")
        })

    def probabilities(self, logits: Tensor) -> Tensor:
        """(B, K) or (B, 1) logits → (B,) P(positive) for binary, (B, K) softmax otherwise."""
        return torch.sigmoid(logits.squeeze(-1)) if self.binary else logits.softmax(-1)

    def augment_db(self, specs: Tensor) -> Tensor:
        """The dB-domain augmentations of a training batch, in order: level, then geometry."""
        a = self.extra
        if a.eq_db:
            specs = random_eq(specs, a.eq_db)
        if a.noise_db:
            specs = add_noise_floor(specs, *a.noise_db, top_db=self.top_db)
        if a.time_shift:
            specs = time_shift(specs, a.time_shift)
        if a.time_stretch:
            specs = axis_warp(specs, a.time_stretch, -1)
        if a.mel_stretch:
            specs = axis_warp(specs, a.mel_stretch, -2)
        return specs

    def model_step(self, batch: tuple[Tensor, Tensor, Tensor], stage: str) -> dict[str, Tensor]:
        specs, targets, _ = batch
        train = stage == "train"
        specs = self.normalized(self.augment_db(specs) if train else specs)
        if train and self.augment is not None:
            specs = self.augment(specs)
        partner, lam = None, 1.0
        if train and self.extra.mixup_alpha:
            specs, partner, lam = mixup(specs, self.extra.mixup_alpha)
        logits = self.network(specs)
        out = logits.squeeze(-1) if self.binary else logits
        loss = self.loss_fn(out, targets)
        if partner is not None:
            loss = lam * loss + (1.0 - lam) * self.loss_fn(out, targets[partner])
        return {"loss": loss, "probs": self.probabilities(logits.detach()), "targets": targets}


class TripletModule(_Base):
    """Mode ``triplet``: metric learning on backbone embeddings (optionally + MAE reconstruction)."""

    def __init__(self, network: nn.Module, p: TrainerParams, loss: TripletLoss, norm: BandNorm | None = None) -> None:
        super().__init__(network, p, norm)
        self.loss_fn = loss

    def model_step(self, batch: tuple[Tensor, Tensor, Tensor], stage: str) -> dict[str, Tensor]:
        specs, targets, _ = batch
        specs = self.normalized(specs)
        embeddings = self.network.embed(specs)
        if self.loss_fn.recon == "none":
            return {"loss": self.loss_fn(embeddings, targets)}
        _, pred, mask = self.network(specs)  # the MAE's own masked reconstruction
        target = self.network.patchify(specs)
        masked = mask.bool()
        return {"loss": self.loss_fn(embeddings, targets, pred[masked], target[masked])}
