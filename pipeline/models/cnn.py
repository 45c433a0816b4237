"""Small supervised CNN over log-mel spectrograms: the baseline next to the MAE.

2-D conv blocks learn local time-frequency patterns; averaging over time then makes the
features independent of clip length, and a 1-D conv across the remaining frequency bins
mixes neighbouring bands before an MLP head produces the logits.
"""
from __future__ import annotations

from math import prod

from torch import Tensor, nn

from .mae import as_spec_batch


class AudioCNN(nn.Module):
    """Conv2d blocks -> mean over time -> Conv1d over frequency -> MLP head.

    Input (B, in_chans, n_mels, frames), or (B, n_mels, frames) when ``in_chans == 1``.
    Each block is Conv2d 3x3 (padding 1) - BatchNorm2d - ReLU - MaxPool2d(pool) - Dropout,
    with ``pools`` given as (freq, time) per block. F' = n_mels // prod(freq pools) is fixed by
    the head; the number of frames may vary at run time as long as pooling leaves one step.
    ``num_classes == 1`` gives a single logit for binary tasks.
    """

    def __init__(
        self, n_mels: int = 64, frames: int = 128, num_classes: int = 2, in_chans: int = 1,
        channels: tuple[int, ...] = (32, 64, 128), conv1d_channels: int = 64, hidden: int = 128,
        dropout: float = 0.3, pools: tuple[tuple[int, int], ...] = ((2, 2), (2, 2), (2, 4)),
    ) -> None:
        super().__init__()
        if len(pools) != len(channels):
            raise ValueError(f"need one pool per conv block: {len(channels)} channels given "
                             f"but {len(pools)} pools")
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.n_mels, self.in_chans = n_mels, in_chans
        self.freq_pool = prod(p[0] for p in pools)
        self.time_pool = prod(p[1] for p in pools)
        self._check_size("n_mels", n_mels, self.freq_pool)
        self._check_size("frames", frames, self.time_pool)
        # Successive floor divisions equal one floor division by the product.
        self.freq_bins = n_mels // self.freq_pool

        blocks: list[nn.Module] = []
        for c_in, c_out, pool in zip((in_chans, *channels[:-1]), channels, pools):
            blocks += [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1), nn.BatchNorm2d(c_out),
                       nn.ReLU(inplace=True), nn.MaxPool2d(pool), nn.Dropout(dropout)]
        self.features = nn.Sequential(*blocks)
        self.freq_conv = nn.Sequential(
            nn.Conv1d(channels[-1], conv1d_channels, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
        )
        # Split so that ``embed`` can return the penultimate activations without the classifier.
        self.embedding = nn.Sequential(
            nn.Flatten(), nn.Linear(conv1d_channels * self.freq_bins, hidden), nn.ReLU(inplace=True)
        )
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, num_classes))

    @staticmethod
    def _check_size(name: str, size: int, pool: int) -> None:
        if size < pool:
            raise ValueError(f"{name}={size} is too small: pooling shrinks that axis by {pool}, "
                             f"so it needs at least {pool}")

    def embed(self, specs: Tensor) -> Tensor:
        """(B, C, n_mels, frames) -> (B, hidden) activations feeding the final Linear."""
        specs = as_spec_batch(specs, self.in_chans)
        if specs.shape[-2] != self.n_mels:
            raise ValueError(f"expected {self.n_mels} mels, got {specs.shape[-2]}")
        self._check_size("frames", specs.shape[-1], self.time_pool)
        x = self.features(specs).mean(dim=-1)  # (B, channels[-1], F')
        return self.embedding(self.freq_conv(x))  # conv1d: (B, conv1d_channels, F')

    def forward(self, specs: Tensor) -> Tensor:
        """(B, C, n_mels, frames) -> logits (B, num_classes)."""
        return self.classifier(self.embed(specs))
