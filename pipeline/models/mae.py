"""Masked autoencoder ViT over log-mel spectrograms (Audio-MAE).

Follows facebookresearch/mae ``models_mae.py``: the encoder sees only the visible patches, a
light decoder reconstructs every patch from the latent plus mask tokens, and the loss counts
masked patches only. Differences from the image version: the grid is (n_mels / ph, frames / pw)
and need not be square, patches may be rectangular, and the transformer blocks are torch's own
pre-norm ``TransformerEncoderLayer`` so there is no timm dependency.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

_LN_EPS = 1e-6  # MAE builds every LayerNorm with eps=1e-6


def as_spec_batch(specs: Tensor, in_chans: int) -> Tensor:
    """Return ``specs`` as (B, C, n_mels, frames), C == ``in_chans``.

    A (B, n_mels, frames) batch is read as single-channel and gets a channel dim, so callers
    that only ever handle mono features can pass the feature stage's output unchanged.
    """
    if specs.ndim == 3:
        specs = specs.unsqueeze(1)
    if specs.ndim != 4 or specs.shape[1] != in_chans:
        raise ValueError(
            f"expected spectrograms shaped (B, {in_chans}, n_mels, frames)"
            f"{' or (B, n_mels, frames)' if in_chans == 1 else ''}, got {tuple(specs.shape)}"
        )
    return specs


def _check_mask_ratio(mask_ratio: float) -> None:
    # At 1.0 the encoder would see no patch at all.
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")


def _sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """(N,) positions -> (N, dim): first half sin, second half cos, geometric frequencies."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.double()[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_pos_embed_2d(embed_dim: int, grid_h: int, grid_w: int, cls_token: bool) -> Tensor:
    """Fixed 2-D sin-cos position table, (grid_h * grid_w [+ 1], embed_dim) float32.

    Rows are in patch order (row-major over (grid_h, grid_w)); with ``cls_token`` a zero row is
    prepended for it. The first half of the channels encodes the column (time) index and the
    second half the row (mel) index, the same layout as MAE's ``get_2d_sincos_pos_embed``.
    """
    if embed_dim % 4:
        raise ValueError(f"sin-cos position embedding needs a dim divisible by 4, got {embed_dim}")
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    half = embed_dim // 2
    table = torch.cat([_sincos_1d(half, cols.flatten()), _sincos_1d(half, rows.flatten())], dim=1)
    if cls_token:
        table = torch.cat([torch.zeros(1, embed_dim, dtype=table.dtype), table], dim=0)
    return table.float()


def _blocks(dim: int, depth: int, heads: int, mlp_ratio: float) -> nn.ModuleList:
    # A plain list (not nn.TransformerEncoder): that wrapper warns about nested tensors when
    # norm_first=True and adds nothing we use.
    return nn.ModuleList(
        nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=int(dim * mlp_ratio), dropout=0.0, activation="gelu",
            layer_norm_eps=_LN_EPS, batch_first=True, norm_first=True,
        )
        for _ in range(depth)
    )


class AudioMAEViT(nn.Module):
    """Masked autoencoder with a ViT encoder/decoder over (n_mels x frames) spectrograms.

    Every method taking ``specs`` accepts (B, in_chans, num_mels, mel_len) or, for
    ``in_chans == 1``, (B, num_mels, mel_len). L = ``num_patches``, D = ``embed_dim``,
    patch_dim = ph * pw * in_chans.
    """

    def __init__(
        self, num_mels: int = 64, mel_len: int = 128, patch_size: int | tuple[int, int] = 16,
        in_chans: int = 1, embed_dim: int = 768, encoder_depth: int = 12, num_heads: int = 12,
        decoder_embed_dim: int = 512, decoder_depth: int = 8, decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0, norm_pix_loss: bool = False, mask_ratio: float = 0.8,
    ) -> None:
        super().__init__()
        ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
        if ph <= 0 or pw <= 0 or num_mels % ph or mel_len % pw:
            raise ValueError(
                f"patch size ({ph}, {pw}) must be positive and divide the spectrogram "
                f"(num_mels={num_mels}, mel_len={mel_len})"
            )
        for name, dim, heads in (("embed_dim", embed_dim, num_heads),
                                 ("decoder_embed_dim", decoder_embed_dim, decoder_num_heads)):
            if dim % heads:
                raise ValueError(f"{name}={dim} is not divisible by its number of heads ({heads})")
        _check_mask_ratio(mask_ratio)

        self.num_mels, self.mel_len, self.in_chans = num_mels, mel_len, in_chans
        self.patch_size = (ph, pw)
        self.grid_size = (num_mels // ph, mel_len // pw)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.embed_dim = embed_dim
        self.norm_pix_loss = norm_pix_loss
        self.mask_ratio = mask_ratio

        self.patch_embed = nn.Conv2d(in_chans, embed_dim, kernel_size=(ph, pw), stride=(ph, pw))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.blocks = _blocks(embed_dim, encoder_depth, num_heads, mlp_ratio)
        self.norm = nn.LayerNorm(embed_dim, eps=_LN_EPS)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_blocks = _blocks(
            decoder_embed_dim, decoder_depth, decoder_num_heads, mlp_ratio)
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=_LN_EPS)
        self.decoder_pred = nn.Linear(decoder_embed_dim, ph * pw * in_chans)

        # Fixed tables are recomputed from the config, so they are kept out of the state dict.
        self.register_buffer("pos_embed", sincos_pos_embed_2d(
            embed_dim, *self.grid_size, cls_token=True).unsqueeze(0), persistent=False)
        self.register_buffer("decoder_pos_embed", sincos_pos_embed_2d(
            decoder_embed_dim, *self.grid_size, cls_token=True).unsqueeze(0), persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        # As MAE: the patch projection is initialised like a Linear layer on its flattened view.
        w = self.patch_embed.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        # The attention in-projection is a bare Parameter that torch already initialises with
        # xavier_uniform over the stacked (3D, D) qkv matrix and a zero bias, as MAE/timm do.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _spec_batch(self, specs: Tensor) -> Tensor:
        specs = as_spec_batch(specs, self.in_chans)
        if specs.shape[-2:] != (self.num_mels, self.mel_len):
            raise ValueError(f"expected {self.num_mels} mels x {self.mel_len} frames, "
                             f"got {tuple(specs.shape[-2:])}")
        return specs

    def patchify(self, specs: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, L, ph*pw*C); each row is (ph, pw, C) flattened, row-major patches."""
        specs = self._spec_batch(specs)
        (gh, gw), (ph, pw) = self.grid_size, self.patch_size
        x = specs.reshape(specs.shape[0], self.in_chans, gh, ph, gw, pw)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(specs.shape[0], gh * gw, -1)

    def unpatchify(self, patches: Tensor) -> Tensor:
        """(B, L, ph*pw*C) -> (B, C, H, W); the exact inverse of ``patchify``."""
        (gh, gw), (ph, pw) = self.grid_size, self.patch_size
        x = patches.reshape(patches.shape[0], gh, gw, ph, pw, self.in_chans)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(
            patches.shape[0], self.in_chans, gh * ph, gw * pw)

    def random_masking(self, x: Tensor, mask_ratio: float,
                       generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Keep a random int(L * (1 - mask_ratio)) tokens per sample.

        ``generator`` (on x's device) draws the masks; None uses torch's global generator.

        x: (B, L, D) -> x_kept (B, L_keep, D), mask (B, L) with 1 = removed, in original patch
        order, and ids_restore (B, L) that un-shuffles kept + mask tokens back to patch order.
        """
        _check_mask_ratio(mask_ratio)
        batch, length, dim = x.shape
        len_keep = int(length * (1 - mask_ratio))
        # Sorting uniform noise gives an independent random permutation per sample.
        noise = torch.rand(batch, length, device=x.device, generator=generator)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
        mask = torch.ones(batch, length, device=x.device)
        mask[:, :len_keep] = 0
        return x_kept, torch.gather(mask, 1, ids_restore), ids_restore

    def _tokens(self, specs: Tensor) -> Tensor:
        """(B, C, H, W) -> position-embedded patch tokens (B, L, D), no cls token."""
        x = self.patch_embed(self._spec_batch(specs)).flatten(2).transpose(1, 2)
        return x + self.pos_embed[:, 1:, :]

    def _encode(self, tokens: Tensor) -> Tensor:
        """(B, N, D) patch tokens -> (B, N + 1, D) normalised encoder output, cls token first."""
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_encoder(self, specs: Tensor, mask_ratio: float,
                        generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(B, C, H, W) -> latent (B, 1 + L_keep, D), mask (B, L), ids_restore (B, L)."""
        x, mask, ids_restore = self.random_masking(self._tokens(specs), mask_ratio, generator)
        return self._encode(x), mask, ids_restore

    def forward_decoder(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """latent (B, 1 + L_keep, D), ids_restore (B, L) -> pred (B, L, patch_dim)."""
        x = self.decoder_embed(latent)
        batch, length = ids_restore.shape
        masked = self.mask_token.expand(batch, length + 1 - x.shape[1], -1)
        patches = torch.cat([x[:, 1:, :], masked], dim=1)
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1, :], patches], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]

    def per_sample_loss(self, specs: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """Mean squared error over each sample's masked patches, (B,).

        specs (B, C, H, W), pred (B, L, patch_dim), mask (B, L) with 1 = masked. With
        ``norm_pix_loss`` the target is each patch normalised by its own mean and variance.
        A sample with no masked patch scores 0 rather than NaN.
        """
        target = self.patchify(specs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        per_patch = ((pred - target) ** 2).mean(dim=-1)
        return (per_patch * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)

    def forward_loss(self, specs: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """Scalar masked-patch MSE: the batch mean of ``per_sample_loss``.

        Random masking removes the same number of patches from every sample, so this equals
        MAE's mean over all masked patches of the batch.
        """
        return self.per_sample_loss(specs, pred, mask).mean()

    def forward(
        self, specs: Tensor, mask_ratio: float | None = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(B, C, H, W) -> loss (), pred (B, L, patch_dim), mask (B, L).

        ``mask_ratio`` None uses the ratio the model was built with; ``generator`` draws the
        masks (None: torch's global generator).
        """
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.forward_encoder(specs, ratio, generator)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(specs, pred, mask), pred, mask

    def embed(self, specs: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, D): mean of the normalised patch tokens of the unmasked encoder.

        Nothing is masked or shuffled, so it is deterministic and draws no random numbers.
        """
        return self._encode(self._tokens(specs))[:, 1:, :].mean(dim=1)


# Every full-size preset shares MAE's decoder; only the encoder differs.
_DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0)


def _preset(config: dict[str, Any], overrides: dict[str, Any]) -> AudioMAEViT:
    return AudioMAEViT(**{**_DECODER, **config, **overrides})


def mae_tiny(**overrides: Any) -> AudioMAEViT:
    """ViT-Tiny encoder (192 dim, 12 blocks, 3 heads); any constructor kwarg can be overridden."""
    return _preset(dict(embed_dim=192, encoder_depth=12, num_heads=3), overrides)


def mae_small(**overrides: Any) -> AudioMAEViT:
    """ViT-Small encoder (384 dim, 12 blocks, 6 heads)."""
    return _preset(dict(embed_dim=384, encoder_depth=12, num_heads=6), overrides)


def mae_base(**overrides: Any) -> AudioMAEViT:
    """ViT-Base encoder (768 dim, 12 blocks, 12 heads)."""
    return _preset(dict(embed_dim=768, encoder_depth=12, num_heads=12), overrides)


def mae_medium(**overrides: Any) -> AudioMAEViT:
    """Narrower, deeper encoder (512 dim, 16 blocks, 16 heads)."""
    return _preset(dict(embed_dim=512, encoder_depth=16, num_heads=16), overrides)


def mae_large(**overrides: Any) -> AudioMAEViT:
    """ViT-Large encoder (1024 dim, 24 blocks, 16 heads)."""
    return _preset(dict(embed_dim=1024, encoder_depth=24, num_heads=16), overrides)


def mae_huge(**overrides: Any) -> AudioMAEViT:
    """ViT-Huge encoder (1280 dim, 32 blocks, 16 heads)."""
    return _preset(dict(embed_dim=1280, encoder_depth=32, num_heads=16), overrides)


def mae_demo(**overrides: Any) -> AudioMAEViT:
    """Small enough to train on a laptop CPU: 64 dim, 2 encoder + 1 decoder block, 4 heads."""
    return _preset(dict(embed_dim=64, encoder_depth=2, num_heads=4, decoder_embed_dim=64,
                        decoder_depth=1, decoder_num_heads=4), overrides)


MAE_PRESETS: dict[str, Callable[..., AudioMAEViT]] = {
    "tiny": mae_tiny, "small": mae_small, "base": mae_base, "medium": mae_medium,
    "large": mae_large, "huge": mae_huge, "demo": mae_demo,
}


def build_mae(preset: str, **overrides: Any) -> AudioMAEViT:
    """Build the named preset (a key of ``MAE_PRESETS``) with constructor kwargs overridden."""
    if preset not in MAE_PRESETS:
        raise ValueError(f"unknown MAE preset {preset!r}; valid presets: {', '.join(MAE_PRESETS)}")
    return MAE_PRESETS[preset](**overrides)
