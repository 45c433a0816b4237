"""A small residual CNN over log-mel spectrograms, sized for CPUs.

A strided stem shrinks the time-frequency map before anything else sees it (where most of the
CPU saving comes from), residual stages of basic blocks follow, and a global average pool makes
the head independent of the number of mel bands and frames.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .mae import as_spec_batch

BlockKind = Literal["basic", "separable"]


class BasicBlock(nn.Module):
    """Residual block: (B, C_in, F, T) -> (B, C_out, F / stride, T / stride).

    ``basic``: Conv3x3(stride) - BN - ReLU - Conv3x3 - BN, plus the shortcut, then ReLU.
    ``separable``: each 3x3 conv is a depthwise 3x3 then a pointwise 1x1 (MobileNet style).
    The shortcut is the identity, or a strided 1x1 conv + BN when the shape changes.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1, kind: BlockKind = "basic") -> None:
        super().__init__()
        self.body = nn.Sequential(*self._conv(c_in, c_out, stride, kind), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                                  *self._conv(c_out, c_out, 1, kind), nn.BatchNorm2d(c_out))
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    @staticmethod
    def _conv(c_in: int, c_out: int, stride: int, kind: BlockKind) -> list[nn.Module]:
        if kind == "basic":
            return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)]
        if kind == "separable":
            return [nn.Conv2d(c_in, c_in, 3, stride=stride, padding=1, groups=c_in, bias=False),
                    nn.Conv2d(c_in, c_out, 1, bias=False)]
        raise ValueError(f"unknown block kind {kind!r}; valid: basic, separable")

    def forward(self, x: Tensor) -> Tensor:
        """(B, C_in, F, T) -> (B, C_out, F', T')."""
        return F.relu(self.body(x) + self.shortcut(x), inplace=True)


class SpecResNet(nn.Module):
    """Strided stem -> residual stages -> global average pool -> dropout -> linear.

    Input (B, in_chans, n_mels, frames), or (B, n_mels, frames) when ``in_chans == 1``. The stem
    is Conv3x3 with ``stem_stride`` (freq, time) - BN - ReLU, then MaxPool ``stem_pool``. Stage
    ``i`` has ``blocks[i]`` residual blocks of width ``widths[i]``; every stage after the first
    halves both axes in its first block. ``pool``: ``mean`` (global average) or ``meanstd``
    (mean and standard deviation of each channel over the map: statistics pooling, which keeps
    how much a pattern varies, e.g. dropouts or clipping that come and go). ``num_classes == 1``
    gives one logit (binary tasks).
    """

    def __init__(self, num_classes: int = 2, in_chans: int = 1, stem_channels: int = 32,
                 stem_stride: tuple[int, int] = (2, 2), stem_pool: tuple[int, int] = (2, 2),
                 widths: tuple[int, ...] = (32, 64, 128), blocks: tuple[int, ...] = (2, 2, 2),
                 kind: BlockKind = "basic", dropout: float = 0.2, pool: Literal["mean", "meanstd"] = "mean") -> None:
        super().__init__()
        if len(widths) != len(blocks):
            raise ValueError(f"need one block count per stage: {len(widths)} widths, {len(blocks)} blocks")
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        if pool not in ("mean", "meanstd"):
            raise ValueError(f"unknown pool {pool!r}; valid: mean, meanstd")
        self.in_chans, self.pool = in_chans, pool
        stem: list[nn.Module] = [nn.Conv2d(in_chans, stem_channels, 3, stride=tuple(stem_stride), padding=1, bias=False),
                                 nn.BatchNorm2d(stem_channels), nn.ReLU(inplace=True)]
        if tuple(stem_pool) != (1, 1):
            stem.append(nn.MaxPool2d(tuple(stem_pool)))
        self.stem = nn.Sequential(*stem)
        layers: list[nn.Module] = []
        c_in = stem_channels
        for i, (width, count) in enumerate(zip(widths, blocks)):
            for j in range(count):
                layers.append(BasicBlock(c_in, width, stride=2 if i > 0 and j == 0 else 1, kind=kind))
                c_in = width
        self.stages = nn.Sequential(*layers)
        self.embed_dim = c_in * (2 if pool == "meanstd" else 1)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.embed_dim, num_classes))
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, BasicBlock):
                nn.init.zeros_(module.body[-1].weight)  # every block starts as the identity

    def embed(self, specs: Tensor) -> Tensor:
        """(B, C, n_mels, frames) -> (B, embed_dim) pooled features (widths[-1], twice with meanstd)."""
        x = self.stages(self.stem(as_spec_batch(specs, self.in_chans))).flatten(2)  # (B, C, F' T')
        return x.mean(dim=-1) if self.pool == "mean" else torch.cat([x.mean(dim=-1), x.std(dim=-1)], dim=1)

    def forward(self, specs: Tensor) -> Tensor:
        """(B, C, n_mels, frames) -> logits (B, num_classes)."""
        return self.head(self.embed(specs))
