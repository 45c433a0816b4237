"""Augmentation of spectrogram batches: SpecAugment (Park et al. 2019), time shift, mel-axis and
time warps, random EQ, a random noise floor, mixup.

Augmentation belongs to training batches only: the LightningModule applies it in its training
step and nowhere else. As a safety net the module is also the identity in eval mode, so a stray call
during validation, testing or export cannot change metrics or predictions.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
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


# --- augmentation of dB log-mel batches: pure functions of a batch (and torch's RNG) -------------
# Every function takes (B, ..., F, T) specs and returns the same shape; randomness comes from
# ``generator`` or torch's global generator (which the training loop reseeds every epoch).

def time_shift(specs: Tensor, max_shift: int, generator: torch.Generator | None = None) -> Tensor:
    """Shift each sample along time by a whole number of frames in [-max_shift, max_shift].

    Frames shifted in from outside repeat the first or last frame (for a zero-padded clip, the
    silence floor), so nothing wraps around.
    """
    batch, n_time = specs.shape[0], specs.shape[-1]
    shift = torch.randint(-max_shift, max_shift + 1, (batch, 1), generator=generator)
    index = (torch.arange(n_time)[None, :] - shift).clamp_(0, n_time - 1).to(specs.device)  # (B, T)
    index = index.view(batch, *([1] * (specs.ndim - 2)), n_time).expand_as(specs)
    return torch.gather(specs, -1, index)


def axis_warp(specs: Tensor, max_stretch: float, axis: int, generator: torch.Generator | None = None) -> Tensor:
    """Stretch axis ``axis`` (-2: mel, -1: time) of each sample by a factor in [1 - s, 1 + s].

    Output bin i reads input bin i / alpha (linear interpolation, anchored at bin 0, clamped at
    the last bin). On the mel axis, alpha > 1 moves formants up, like a shorter vocal tract
    (a VTLP-like speaker perturbation); on the time axis it changes the speaking rate.
    """
    batch, size = specs.shape[0], specs.shape[axis]
    alpha = 1.0 + (torch.rand((batch, 1), generator=generator) * 2.0 - 1.0) * max_stretch
    pos = (torch.arange(size, dtype=torch.float32)[None, :] / alpha).clamp_(0, size - 1)  # (B, size)
    low = pos.floor().long().clamp_(max=size - 2)
    weight = (pos - low).to(specs)
    shape = [batch] + [1] * (specs.ndim - 1)
    shape[axis] = size
    low, weight = low.view(shape).to(specs.device), weight.view(shape)
    take = lambda index: torch.gather(specs, axis, index.expand_as(specs))  # noqa: E731
    return take(low) * (1.0 - weight) + take(low + 1) * weight


def random_eq(db: Tensor, max_db: float, generator: torch.Generator | None = None) -> Tensor:
    """Add a smooth random curve (dB) across the mel axis: a1 cos(pi f/F) + a2 cos(2 pi f/F),
    a_i uniform in [-max_db, max_db]: a tilt and a mid-band bump, as microphones and rooms colour."""
    batch, n_freq = db.shape[0], db.shape[-2]
    coef = (torch.rand((batch, 2), generator=generator) * 2.0 - 1.0) * max_db
    f = torch.arange(n_freq, dtype=torch.float32) / n_freq
    basis = torch.stack([torch.cos(torch.pi * f), torch.cos(2 * torch.pi * f)])  # (2, F)
    curve = (coef @ basis).view(batch, *([1] * (db.ndim - 3)), n_freq, 1)
    return db + curve.to(db)


def add_noise_floor(db: Tensor, low_db: float, high_db: float, top_db: float, tilt_db: float = 10.0,
                    generator: torch.Generator | None = None) -> Tensor:
    """Add background noise in the power domain to dB features referenced to each clip's peak.

    Per sample the noise sits at a level uniform in [low_db, high_db] dB re peak with a random
    spectral tilt of up to ±tilt_db, and every bin fluctuates with an exponential power draw,
    as the periodogram of white noise does; the result is floored again at -top_db. Recordings'
    noise floors differ widely between speakers; this teaches a network to ignore them.
    """
    batch, n_freq, n_time = db.shape[0], db.shape[-2], db.shape[-1]
    lead = [1] * (db.ndim - 3)
    level = low_db + (high_db - low_db) * torch.rand((batch, *lead, 1, 1), generator=generator)
    tilt = (torch.rand((batch, *lead, 1, 1), generator=generator) * 2.0 - 1.0) * tilt_db
    slope = torch.linspace(-0.5, 0.5, n_freq)[:, None]
    fluctuation = -torch.log(torch.rand((batch, *lead, n_freq, n_time), generator=generator).clamp_min(1e-6))
    noise = torch.pow(10.0, (level + tilt * slope) / 10.0) * fluctuation
    power = torch.pow(10.0, db.float() / 10.0) + noise.to(db.device)
    return (10.0 * torch.log10(power)).clamp_min(-top_db).to(db)


def mixup(specs: Tensor, alpha: float, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, float]:
    """Mix the batch with a shuffled copy of itself (Zhang et al. 2018): (mixed, partner index, lam).

    One lam ~ Beta(alpha, alpha) per batch, so any loss of hard targets mixes as
    lam * loss(y) + (1 - lam) * loss(y[partner]). torch's Beta sampler takes no generator, so
    lam is drawn by NumPy from a seed drawn from torch: both follow torch's seeding.
    """
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    partner = torch.randperm(specs.shape[0], generator=generator).to(specs.device)
    return specs * lam + specs[partner] * (1.0 - lam), partner, lam
