"""Typed training settings shared by the pretrain and train sections of ``params.yaml``."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from pipeline.config import Section
from pipeline.models.networks import UNetParams


class TrainerParams(Section):
    """Lightning Trainer, optimizer and DataLoader knobs, passed through as named."""

    max_epochs: int = Field(20, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    layer_decay: float = Field(1.0, gt=0, le=1)  # < 1: layer-wise lr decay over transformer blocks
    scheduler: Literal["none", "cosine_restarts", "one_cycle", "plateau"] = "cosine_restarts"
    warmup_epochs: float = Field(1.0, ge=0)  # linear warmup (not with one_cycle, which has its own)
    restart_epochs: int = Field(10, ge=1)  # cosine_restarts: epochs of the first cycle
    monitor: str = "val/loss"
    monitor_mode: Literal["min", "max"] = "min"
    patience: int = Field(5, ge=1)  # early stopping on `monitor`
    save_top_k: int = Field(2, ge=1)
    precision: Literal["32", "16-mixed", "bf16-mixed"] = "32"
    accumulate_grad_batches: int = Field(1, ge=1)
    gradient_clip_val: float | None = None
    fast_dev_run: int | bool = False
    overfit_batches: float = Field(0.0, ge=0)
    accelerator: str = "auto"
    devices: int | str | list[int] = "auto"
    strategy: str = "auto"  # e.g. ddp for several GPUs or nodes
    num_nodes: int = Field(1, ge=1)
    num_workers: int = Field(0, ge=0)
    pin_memory: bool = False
    persistent_workers: bool = False
    memory_efficient: bool = False  # True: read features from the memmap per batch instead of RAM
    seed: int = 0
    deterministic: bool = False
    progress_bar: bool = True

    def trainer_kwargs(self) -> dict[str, Any]:
        """Arguments for ``lightning.Trainer`` that come straight from these params."""
        return dict(max_epochs=self.max_epochs, precision=self.precision,
                    accumulate_grad_batches=self.accumulate_grad_batches,
                    gradient_clip_val=self.gradient_clip_val, fast_dev_run=self.fast_dev_run,
                    overfit_batches=self.overfit_batches, accelerator=self.accelerator,
                    devices=self.devices, strategy=self.strategy, num_nodes=self.num_nodes,
                    deterministic=self.deterministic)


class AugmentParams(Section):
    """Training-batch augmentations of the dB features (before band normalisation); 0 turns one off."""

    time_shift: int = Field(0, ge=0)  # frames, either way
    mel_stretch: float = Field(0.0, ge=0, lt=1)  # mel-axis warp (VTLP-like), relative
    time_stretch: float = Field(0.0, ge=0, lt=1)  # speaking rate, relative
    eq_db: float = Field(0.0, ge=0)  # random smooth EQ amplitude
    noise_db: tuple[float, float] | None = None  # noise floor level range re peak (needs normalize: peak)
    mixup_alpha: float = Field(0.0, ge=0)  # > 0: mixup with lam ~ Beta(alpha, alpha)


class SpecAugmentParams(Section):
    freq_mask_param: int = Field(8, ge=0)
    time_mask_param: int = Field(16, ge=0)
    num_freq_masks: int = Field(2, ge=0)
    num_time_masks: int = Field(2, ge=0)


class EnhanceParams(Section):
    """Task enhance: the MaskUNet recipe (``params.yaml``: ``train.enhance``)."""

    model: UNetParams = UNetParams()
    crop_s: float = Field(1.0, gt=0)  # training crops; validation and test utterances are whole
    spectral_weight: float = Field(0.0, ge=0)  # loss = -SI-SNR + weight x log-magnitude L1
    val_fold: int = Field(0, ge=0)  # early stopping on this fold's speakers
    # how the exported enhancer runs in evaluate and the service (the same call, so they agree):
    # bf16 autocast is several times faster where the CPU has bf16 units (AMX, AVX-512 BF16)
    inference_precision: Literal["32", "bf16"] = "bf16"
    trainer: TrainerParams = TrainerParams(max_epochs=24, batch_size=8, lr=3e-3, scheduler="one_cycle",
                                           monitor="val/si_snr", monitor_mode="max", patience=6, save_top_k=1)
