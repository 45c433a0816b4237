"""A U-Net that enhances speech by masking the noisy short-time spectrum.

The network sees the log-compressed magnitude of the noisy STFT as a one-channel (freq, time)
image, predicts a real gain in [0, 1] per time-frequency bin, and multiplies it with the complex
noisy STFT; the inverse STFT gives the enhanced wave. Keeping the noisy phase and bounding the gain
makes the output never louder than the input in any bin, which is what keeps a small model safe
on noise it has not met: at worst it passes the noise through.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MaskKind = Literal["sigmoid", "bounded_relu"]


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """(B, c_in, F, N) -> (B, c_out, F, N): two 3x3 conv - BN - ReLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class MaskUNet(nn.Module):
    """STFT-mask U-Net: noisy (B, T) wave -> enhanced (B, T) wave.

    Args:
        n_fft: STFT size (hann window); ``n_fft // 2 + 1`` frequency bins.
        hop: STFT hop in samples; a hann window needs ``hop <= n_fft / 2`` to invert exactly.
        depth: number of 2x2 poolings; each halves freq and time and doubles the channels.
        channels: channels of the first level (the widest map, hence most of the cost).
        mask: ``sigmoid`` (smooth gain) or ``bounded_relu`` (``clamp(x, 0, 1)``: exact zeros and
            exact pass-through are reachable, at the cost of no gradient outside [0, 1]).
    """

    def __init__(self, n_fft: int = 512, hop: int = 128, depth: int = 3, channels: int = 16,
                 mask: MaskKind = "sigmoid") -> None:
        super().__init__()
        if depth < 1 or channels < 1:
            raise ValueError(f"depth and channels must be >= 1, got {depth} and {channels}")
        if not 0 < hop <= n_fft // 2:
            raise ValueError(f"hop must be in (0, n_fft / 2] for a hann window to invert, got {hop} (n_fft {n_fft})")
        if mask not in ("sigmoid", "bounded_relu"):
            raise ValueError(f"mask must be 'sigmoid' or 'bounded_relu', got {mask!r}")
        self.n_fft, self.hop, self.depth, self.mask_kind = n_fft, hop, depth, mask
        # A buffer: it follows the module to its device and dtype, and is not trained.
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        widths = [channels * 2 ** i for i in range(depth + 1)]
        self.down = nn.ModuleList(conv_block(c_in, c_out) for c_in, c_out in zip([1, *widths[:-2]], widths[:-1]))
        self.bottom = conv_block(widths[-2], widths[-1])
        self.up = nn.ModuleList(nn.ConvTranspose2d(c_in, c_out, 2, stride=2)
                                for c_in, c_out in zip(widths[:0:-1], widths[-2::-1]))
        self.merge = nn.ModuleList(conv_block(2 * c, c) for c in widths[-2::-1])
        self.head = nn.Conv2d(widths[0], 1, 1)

    def spectrum(self, wave: Tensor) -> Tensor:
        """(B, T) wave -> (B, F, N) complex STFT, F = n_fft // 2 + 1, N = T // hop + 1.

        Zero padding at the ends (not reflection): a clip zero-padded in a batch then gets the same
        frames as alone, and any T >= 1 has a spectrum.
        """
        return torch.stft(wave, self.n_fft, self.hop, window=self.window, center=True, pad_mode="constant",
                          return_complex=True)

    def apply_mask(self, spec: Tensor, mask: Tensor, length: int) -> Tensor:
        """(B, F, N) complex STFT times a (B, F, N) real gain -> (B, length) wave by inverse STFT."""
        return torch.istft(spec * mask, self.n_fft, self.hop, window=self.window, center=True, length=length)

    def mask(self, spec: Tensor) -> Tensor:
        """(B, F, N) complex noisy STFT -> (B, F, N) gain in [0, 1].

        The log1p magnitude is zero-padded up to multiples of ``2 ** depth`` in both axes, so every
        pooling halves an even size and the skips line up; the gain is cropped back.
        """
        bins, frames = spec.shape[-2:]
        x = torch.log1p(spec.abs()).unsqueeze(1)
        step = 2 ** self.depth
        x = F.pad(x, (0, -frames % step, 0, -bins % step))
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottom(x)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips)):
            x = merge(torch.cat([up(x), skip], dim=1))
        logits = self.head(x)[:, 0, :bins, :frames]
        return torch.sigmoid(logits) if self.mask_kind == "sigmoid" else logits.clamp(0.0, 1.0)

    def forward(self, noisy: Tensor) -> Tensor:
        """(B, T) noisy wave -> (B, T) enhanced wave."""
        if noisy.dim() != 2:
            raise ValueError(f"noisy must be (B, T), got shape {tuple(noisy.shape)}")
        spec = self.spectrum(noisy)
        return self.apply_mask(spec, self.mask(spec), noisy.shape[-1])
