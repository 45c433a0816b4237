"""SpecAugment (Park et al. 2019): random frequency and time masking of spectrogram batches.

Augmentation belongs to training batches only: the LightningModule calls it in ``training_step``
and nowhere else. As a safety net the module is also the identity in eval mode, so a stray call
during validation, testing or export cannot change metrics or predictions.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn


def _band_mask(
    batch: int, size: int, param: int, count: int,
    generator: torch.Generator | None, device: torch.device,
) -> Tensor:
    """(batch, size) bool: per row, the union of ``count`` random bands along an axis of ``size``.

    Each band's width is uniform in [0, min(param, size)] and its start uniform over the positions
    where it fits, so a band never leaves the axis.
    """
    # Draw on the generator's device (a CPU generator cannot feed CUDA sampling), then move.
    draw_on = generator.device if generator is not None else device
    width = torch.randint(0, min(param, size) + 1, (batch, count, 1), generator=generator,
                          device=draw_on)
    # rand is in [0, 1), so floor(rand * (size - width + 1)) is in [0, size - width].
    start = (torch.rand((batch, count, 1), generator=generator, device=draw_on)
             * (size - width + 1)).long()
    position = torch.arange(size, device=draw_on)
    bands = (position >= start) & (position < start + width)  # (batch, count, size)
    return bands.any(dim=1).to(device)


class SpecAugment(nn.Module):
    """Frequency and time masks drawn independently for every sample of a batch, vectorised.

    ``num_freq_masks`` bands of consecutive frequency bins, each of width uniform in
    [0, freq_mask_param] (capped at the number of bins), are set to ``mask_value``; likewise
    ``num_time_masks`` bands of frames up to ``time_mask_param``. Bands may overlap. For
    (B, C, F, T) inputs a sample's mask covers all its channels, so stacked views of one recording
    (e.g. deltas) lose the same band. ``mask_value="mean"`` fills with each sample's own mean,
    which suits log spectrograms where 0 is not a neutral value. Randomness comes from torch (or
    ``generator``), so torch.manual_seed makes it reproducible.
    """

    def __init__(
        self, freq_mask_param: int = 8, time_mask_param: int = 16, num_freq_masks: int = 2,
        num_time_masks: int = 2, mask_value: float | Literal["mean"] = 0.0,
    ) -> None:
        super().__init__()
        counts = {"freq_mask_param": freq_mask_param, "time_mask_param": time_mask_param,
                  "num_freq_masks": num_freq_masks, "num_time_masks": num_time_masks}
        for name, value in counts.items():
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if isinstance(mask_value, str) and mask_value != "mean":
            raise ValueError(f"mask_value must be a number or 'mean', got {mask_value!r}")
        self.freq_mask_param, self.time_mask_param = freq_mask_param, time_mask_param
        self.num_freq_masks, self.num_time_masks = num_freq_masks, num_time_masks
        self.mask_value = mask_value

    def forward(self, spec: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """spec (B, C, F, T) or (B, F, T) -> masked copy, same shape; identity in eval mode."""
        if spec.ndim not in (3, 4):
            raise ValueError(f"expected (B, C, F, T) or (B, F, T), got shape {tuple(spec.shape)}")
        if not self.training:
            return spec
        batch, n_freq, n_time = spec.shape[0], spec.shape[-2], spec.shape[-1]
        freq = _band_mask(batch, n_freq, self.freq_mask_param, self.num_freq_masks,
                          generator, spec.device)
        time = _band_mask(batch, n_time, self.time_mask_param, self.num_time_masks,
                          generator, spec.device)
        mask = freq[:, :, None] | time[:, None, :]  # (B, F, T)
        if spec.ndim == 4:
            mask = mask[:, None]  # shared by all channels
        if self.mask_value == "mean":
            fill = spec.mean(dim=tuple(range(1, spec.ndim)), keepdim=True)
            return torch.where(mask, fill, spec)
        return spec.masked_fill(mask, float(self.mask_value))
