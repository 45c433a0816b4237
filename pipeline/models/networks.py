"""Build networks from a JSON-able spec, so an exported model can be rebuilt without its code path.

A spec is ``{"arch": "cnn"|"resnet"|"mae", "task": "classifier"|"embedder"|"mae", "kwargs": {...},
"num_outputs": int, "dropout": float}``, or ``{"arch": "unet", "task": "enhance", "kwargs": {...}}``
for an enhancer; it is saved next to the exported weights.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from torch import nn

from pipeline.config import Section
from pipeline.models.cnn import AudioCNN
from pipeline.models.heads import EmbeddingClassifier
from pipeline.models.mae import AudioMAEViT, build_mae
from pipeline.models.resnet import SpecResNet
from pipeline.models.unet import MaskUNet


class ModelParams(Section):
    """Which network: the CNN, or the MAE ViT by preset, with constructor overrides."""

    arch: Literal["cnn", "resnet", "mae"] = "cnn"
    mae_preset: str = "demo"
    patch_size: int | tuple[int, int] = 16
    mask_ratio: float = Field(0.8, ge=0, lt=1)
    norm_pix_loss: bool = False
    dropout: float = Field(0.3, ge=0, lt=1)
    overrides: dict[str, Any] = {}  # any other constructor argument of the chosen model


class UNetParams(Section):
    """The enhancer's MaskUNet (``params.yaml``: ``train.enhance.model``)."""

    n_fft: int = Field(512, gt=0)
    hop: int = Field(128, gt=0)
    depth: int = Field(3, ge=1)
    channels: int = Field(8, ge=1)
    mask: Literal["sigmoid", "bounded_relu"] = "sigmoid"


def make_unet_spec(p: UNetParams) -> dict[str, Any]:
    return {"arch": "unet", "task": "enhance", "kwargs": p.model_dump()}


def make_spec(p: ModelParams, n_mels: int, frames: int, task: str, num_outputs: int = 0) -> dict[str, Any]:
    if p.arch in ("cnn", "resnet") and task == "mae":
        raise ValueError("mode auto (MAE pretraining) needs model.arch: mae")
    if p.arch == "cnn":
        kwargs = {"n_mels": n_mels, "frames": frames, "num_classes": max(num_outputs, 1),
                  "dropout": p.dropout, **p.overrides}
    elif p.arch == "resnet":
        kwargs = {"num_classes": max(num_outputs, 1), "dropout": p.dropout, **p.overrides}
    else:
        kwargs = {"preset": p.mae_preset, "num_mels": n_mels, "mel_len": frames, "patch_size": p.patch_size,
                  "mask_ratio": p.mask_ratio, "norm_pix_loss": p.norm_pix_loss, **p.overrides}
    return {"arch": p.arch, "task": task, "kwargs": kwargs, "num_outputs": num_outputs, "dropout": p.dropout}


def build_mae_from(kwargs: dict[str, Any]) -> AudioMAEViT:
    kwargs = dict(kwargs)
    return build_mae(kwargs.pop("preset"), **kwargs)


def build_network(spec: dict[str, Any]) -> nn.Module:
    """The network a spec describes: an AudioCNN, a SpecResNet, an AudioMAEViT, an MAE with a
    head, or a MaskUNet."""
    if spec["arch"] == "unet":
        return MaskUNet(**spec["kwargs"])
    if spec["arch"] == "cnn":
        return AudioCNN(**spec["kwargs"])
    if spec["arch"] == "resnet":
        return SpecResNet(**spec["kwargs"])
    mae = build_mae_from(spec["kwargs"])
    if spec["task"] == "classifier":
        return EmbeddingClassifier(mae, mae.embed_dim, spec["num_outputs"], spec["dropout"])
    return mae


def backbone_of(network: nn.Module) -> nn.Module:
    """The part whose weights pretraining provides (the MAE inside a classifier)."""
    return network.backbone if isinstance(network, EmbeddingClassifier) else network
