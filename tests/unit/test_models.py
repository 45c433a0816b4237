"""Unit tests for the plain PyTorch models (small sizes, CPU, a few seconds in all)."""
from __future__ import annotations

import pytest
import torch

from pipeline.models import MAE_PRESETS, AudioCNN, AudioMAEViT, build_mae, mae_demo
from pipeline.models.mae import sincos_pos_embed_2d

# Non-square, rectangular patches and two channels catch axis mix-ups that 1-channel square
# inputs would hide: grid (4, 6), L = 24, patch_dim = 8 * 4 * 2 = 64.
SMALL = dict(num_mels=32, mel_len=24, patch_size=(8, 4), in_chans=2)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def mae() -> AudioMAEViT:
    return mae_demo(**SMALL)


@pytest.fixture
def specs() -> torch.Tensor:
    return torch.randn(3, 2, 32, 24)


def _len_keep(length: int, ratio: float) -> int:
    return int(length * (1 - ratio))


# --- AudioMAEViT -------------------------------------------------------------------------

@pytest.mark.parametrize("patch_size, in_chans", [(8, 1), ((8, 4), 2), ((4, 8), 3)])
def test_patchify_unpatchify_round_trip(patch_size, in_chans) -> None:
    model = mae_demo(num_mels=32, mel_len=24, patch_size=patch_size, in_chans=in_chans)
    x = torch.randn(2, in_chans, 32, 24)
    patches = model.patchify(x)
    ph, pw = model.patch_size
    assert patches.shape == (2, model.num_patches, ph * pw * in_chans)
    assert torch.equal(model.unpatchify(patches), x)
    # Patch order is row-major over the grid: patch 1 is the second patch along time.
    expected = x[:, :, :ph, pw:2 * pw].permute(0, 2, 3, 1).reshape(2, -1)
    assert torch.equal(patches[:, 1], expected)


def test_method_shapes(mae: AudioMAEViT, specs: torch.Tensor) -> None:
    length, dim, patch_dim = 24, 64, 64
    assert (mae.grid_size, mae.num_patches, mae.embed_dim) == ((4, 6), length, dim)
    keep = _len_keep(length, 0.5)
    latent, mask, ids_restore = mae.forward_encoder(specs, 0.5)
    assert latent.shape == (3, 1 + keep, dim)
    assert mask.shape == ids_restore.shape == (3, length)
    pred = mae.forward_decoder(latent, ids_restore)
    assert pred.shape == (3, length, patch_dim)
    assert mae.forward_loss(specs, pred, mask).shape == ()
    assert mae.per_sample_loss(specs, pred, mask).shape == (3,)
    loss, pred, mask = mae(specs)
    assert loss.shape == () and pred.shape == (3, length, patch_dim) and mask.shape == (3, length)
    assert mae.embed(specs).shape == (3, dim)


def test_forward_uses_model_mask_ratio_by_default(specs: torch.Tensor) -> None:
    model = mae_demo(**SMALL, mask_ratio=0.25)
    _, _, mask = model(specs)
    assert (mask.sum(dim=1) == 24 - _len_keep(24, 0.25)).all()
    _, _, mask = model(specs, mask_ratio=0.75)
    assert (mask.sum(dim=1) == 24 - _len_keep(24, 0.75)).all()


def test_three_dim_input_gets_a_channel_dim() -> None:
    model = mae_demo(num_mels=16, mel_len=32, patch_size=8)
    x = torch.randn(2, 16, 32)
    assert torch.equal(model.patchify(x), model.patchify(x.unsqueeze(1)))
    assert torch.allclose(model.embed(x), model.embed(x.unsqueeze(1)))


def test_wrong_input_shape_is_rejected(mae: AudioMAEViT) -> None:
    with pytest.raises(ValueError, match=r"\(B, 2, n_mels, frames\)"):
        mae.embed(torch.randn(2, 32, 24))  # 3-D means one channel, model wants two
    with pytest.raises(ValueError, match="32 mels x 24 frames"):
        mae.embed(torch.randn(2, 2, 32, 16))


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.75, 0.8, 0.9])
def test_random_masking_keeps_the_right_tokens(mae: AudioMAEViT, ratio: float) -> None:
    batch, length = 4, 24
    # Token i carries the value i, so kept rows can be traced back to their positions.
    x = torch.arange(length, dtype=torch.float32).repeat(batch, 1).unsqueeze(-1).expand(-1, -1, 5)
    kept, mask, ids_restore = mae.random_masking(x, ratio)
    keep = _len_keep(length, ratio)
    assert kept.shape == (batch, keep, 5)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert (mask.sum(dim=1) == length - keep).all()
    for b in range(batch):
        visible = torch.nonzero(mask[b] == 0).flatten()
        assert sorted(kept[b, :, 0].long().tolist()) == visible.tolist()
    # ids_restore undoes the shuffle: restoring kept + placeholders puts kept tokens in place.
    placeholders = torch.full((batch, length - keep, 5), -1.0)
    restored = torch.gather(torch.cat([kept, placeholders], 1), 1,
                            ids_restore.unsqueeze(-1).expand(-1, -1, 5))
    assert torch.equal(restored[mask == 0], x[mask == 0])


def test_masking_is_random_per_sample_and_seeded(mae: AudioMAEViT, specs: torch.Tensor) -> None:
    torch.manual_seed(7)
    loss_a, _, mask_a = mae(specs)
    torch.manual_seed(7)
    loss_b, _, mask_b = mae(specs)
    assert torch.equal(mask_a, mask_b) and torch.equal(loss_a, loss_b)
    assert not torch.equal(mask_a[0], mask_a[1])  # each sample gets its own permutation
    torch.manual_seed(8)
    assert not torch.equal(mae(specs)[2], mask_a)


@pytest.mark.parametrize("ratio", [1.0, -0.1])
def test_invalid_mask_ratio(mae: AudioMAEViT, specs: torch.Tensor, ratio: float) -> None:
    with pytest.raises(ValueError, match="mask_ratio"):
        mae(specs, mask_ratio=ratio)


def test_loss_counts_only_masked_patches(mae: AudioMAEViT, specs: torch.Tensor) -> None:
    _, _, mask = mae(specs)
    target = mae.patchify(specs)
    masked = mask.bool().unsqueeze(-1)
    right_where_masked = torch.where(masked, target, target + 5.0)
    assert mae.forward_loss(specs, right_where_masked, mask).item() == 0.0
    wrong_where_masked = torch.where(masked, target + 2.0, target)
    per_sample = mae.per_sample_loss(specs, wrong_where_masked, mask)
    assert torch.allclose(per_sample, torch.full((3,), 4.0))
    assert torch.allclose(mae.forward_loss(specs, wrong_where_masked, mask), per_sample.mean())


def test_norm_pix_loss_uses_normalised_target(mae: AudioMAEViT, specs: torch.Tensor) -> None:
    specs = specs * 3.0 + 1.0  # far from zero mean / unit variance, so the two targets differ
    _, pred, mask = mae(specs)
    plain = mae.forward_loss(specs, pred, mask)
    mae.norm_pix_loss = True
    normed = mae.forward_loss(specs, pred, mask)
    assert not torch.allclose(plain, normed)
    target = mae.patchify(specs)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    assert mae.forward_loss(specs, target, mask).item() == pytest.approx(0.0, abs=1e-10)


def test_embed_is_deterministic_and_draws_no_random_numbers(
    mae: AudioMAEViT, specs: torch.Tensor
) -> None:
    state = torch.get_rng_state()
    first = mae.embed(specs)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(mae.embed(specs), first)


def test_position_embeddings_are_fixed(mae: AudioMAEViT) -> None:
    table = sincos_pos_embed_2d(16, 3, 5, cls_token=True)
    assert table.shape == (16, 16) and table.dtype == torch.float32
    assert torch.equal(table[0], torch.zeros(16))
    assert torch.unique(table[1:], dim=0).shape[0] == 15  # every patch position is distinct
    assert sincos_pos_embed_2d(16, 3, 5, cls_token=False).shape == (15, 16)
    assert mae.pos_embed.shape == (1, 1 + 24, 64)
    names = {name for name, _ in mae.named_parameters()}
    assert "pos_embed" not in names and "decoder_pos_embed" not in names
    assert {"cls_token", "mask_token"} <= names


PRESETS = {  # embed_dim, encoder depth, heads, decoder dim, decoder depth, decoder heads
    "tiny": (192, 12, 3, 512, 8, 16), "small": (384, 12, 6, 512, 8, 16),
    "base": (768, 12, 12, 512, 8, 16), "medium": (512, 16, 16, 512, 8, 16),
    "large": (1024, 24, 16, 512, 8, 16), "huge": (1280, 32, 16, 512, 8, 16),
    "demo": (64, 2, 4, 64, 1, 4),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_the_documented_architecture(name: str) -> None:
    assert set(MAE_PRESETS) == set(PRESETS)
    # The meta device allocates no memory, so even the ~650M-parameter preset builds instantly.
    with torch.device("meta"):
        model = build_mae(name, num_mels=32, mel_len=64, patch_size=(16, 8))
    dim, depth, heads, dec_dim, dec_depth, dec_heads = PRESETS[name]
    assert model.embed_dim == dim and len(model.blocks) == depth
    assert model.blocks[0].self_attn.num_heads == heads
    assert model.blocks[0].linear1.out_features == 4 * dim  # mlp_ratio 4
    assert model.decoder_embed.out_features == dec_dim and len(model.decoder_blocks) == dec_depth
    assert model.decoder_blocks[0].self_attn.num_heads == dec_heads
    assert model.grid_size == (2, 8) and model.decoder_pred.out_features == 16 * 8


def test_preset_overrides_reach_the_model() -> None:
    model = MAE_PRESETS["demo"](num_mels=16, mel_len=16, patch_size=4, in_chans=3,
                                mask_ratio=0.5, norm_pix_loss=True, encoder_depth=1)
    assert (model.in_chans, model.mask_ratio, model.norm_pix_loss) == (3, 0.5, True)
    assert len(model.blocks) == 1 and model.num_patches == 16


def test_unknown_preset_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="'gigantic'") as err:
        build_mae("gigantic")
    assert all(name in str(err.value) for name in MAE_PRESETS)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_mels=30), "num_mels=30"),
    (dict(mel_len=20, patch_size=(8, 8)), "mel_len=20"),
    (dict(patch_size=0), "positive"),
    (dict(embed_dim=64, num_heads=3), "embed_dim=64 is not divisible"),
    (dict(decoder_embed_dim=64, decoder_num_heads=5), "decoder_embed_dim=64"),
    (dict(embed_dim=6, num_heads=3), "divisible by 4"),
    (dict(mask_ratio=1.0), "mask_ratio"),
])
def test_invalid_config_is_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        mae_demo(**{**dict(num_mels=32, mel_len=32, patch_size=8), **kwargs})


# --- AudioCNN ----------------------------------------------------------------------------

@pytest.mark.parametrize("n_mels, frames, in_chans, num_classes", [
    (64, 128, 1, 2), (40, 101, 1, 1), (80, 300, 2, 5), (8, 16, 1, 3), (13, 17, 1, 2),
])
def test_cnn_output_shapes(n_mels: int, frames: int, in_chans: int, num_classes: int) -> None:
    model = AudioCNN(n_mels=n_mels, frames=frames, num_classes=num_classes, in_chans=in_chans,
                     channels=(4, 8, 16), conv1d_channels=8, hidden=12).eval()
    x = torch.randn(2, in_chans, n_mels, frames)
    assert model.freq_bins == n_mels // 8
    assert model(x).shape == (2, num_classes)
    assert model.embed(x).shape == (2, 12)
    if in_chans == 1:
        assert torch.allclose(model(x[:, 0]), model(x))


def test_cnn_accepts_other_clip_lengths() -> None:
    # Averaging over time makes the head independent of the number of frames.
    model = AudioCNN(n_mels=32, frames=64).eval()
    assert model(torch.randn(2, 1, 32, 50)).shape == (2, 2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_mels=7), "n_mels=7 is too small"),
    (dict(frames=15), "frames=15 is too small"),
    (dict(channels=(8, 16)), "one pool per conv block"),
    (dict(num_classes=0), "num_classes"),
])
def test_cnn_invalid_config_is_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AudioCNN(**kwargs)


def test_cnn_rejects_inputs_it_cannot_pool() -> None:
    model = AudioCNN(n_mels=32, frames=64)
    with pytest.raises(ValueError, match="expected 32 mels"):
        model(torch.randn(2, 1, 40, 64))
    with pytest.raises(ValueError, match="frames=8 is too small"):
        model(torch.randn(2, 1, 32, 8))


# --- gradients flow: both models overfit one fixed batch ---------------------------------

def _train(model: torch.nn.Module, loss_fn, steps: int = 50, lr: float = 1e-3) -> list[float]:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_mae_overfits_one_batch() -> None:
    model = mae_demo(num_mels=32, mel_len=32, patch_size=8, mask_ratio=0.75)
    # One pattern shared by the batch is learnable from position alone, whatever the mask.
    x = torch.randn(1, 1, 32, 32) + 0.1 * torch.randn(4, 1, 32, 32)
    losses = _train(model, lambda: model(x)[0], lr=3e-3)
    assert losses[-1] < 0.5 * losses[0], losses


def test_cnn_overfits_one_batch() -> None:
    # No dropout: on a net this small its noise would hide the descent within 50 steps.
    model = AudioCNN(n_mels=32, frames=32, channels=(8, 16, 16), conv1d_channels=16, hidden=32,
                     dropout=0.0)
    x, y = torch.randn(8, 1, 32, 32), torch.tensor([0, 1] * 4)
    losses = _train(model, lambda: torch.nn.functional.cross_entropy(model(x), y))
    assert losses[-1] < 0.5 * losses[0], losses


# --- SpecResNet ------------------------------------------------------------------------------------

def test_spec_resnet_shapes_batch_consistency_and_inference_folding() -> None:
    from pipeline.models import SpecResNet
    from pipeline.models.inference import prepare_for_inference

    torch.manual_seed(0)
    net = SpecResNet(num_classes=10, widths=(8, 16), blocks=(1, 1), stem_channels=8)
    for module in net.modules():  # trained-looking BatchNorm statistics
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.normal_()
    net.eval()
    x = torch.randn(5, 1, 32, 40)
    out = net(x)
    assert out.shape == (5, 10) and net.embed(x).shape == (5, 16)
    torch.testing.assert_close(net(x[2:3]), out[2:3], atol=1e-5, rtol=0)  # a sample does not see its batch
    torch.testing.assert_close(net(x[:, 0]), out)  # (B, F, T) is read as one channel
    assert SpecResNet(num_classes=1)(torch.randn(2, 64, 128)).shape == (2, 1)
    prepare_for_inference(net)
    torch.testing.assert_close(net(x), out, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="one block count per stage"):
        SpecResNet(widths=(8, 16), blocks=(1,))
