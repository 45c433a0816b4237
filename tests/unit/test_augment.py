"""SpecAugment: shapes, eval identity, band structure, randomness and reproducibility."""
from __future__ import annotations

import pytest
import torch

from pipeline.training.augment import SpecAugment, add_noise_floor, axis_warp, mixup, random_eq, time_shift


def spectrograms(*shape: int) -> torch.Tensor:
    # Strictly positive, so a 0 in the output can only come from a mask.
    return torch.rand(*shape, generator=torch.Generator().manual_seed(1)) + 1.0


def masked_rows_and_cols(out: torch.Tensor, mask_value: float = 0.0):
    """(masked (F, T), freq rows fully masked (F,), time cols fully masked (T,)) of one (F, T)."""
    masked = out == mask_value
    return masked, masked.all(dim=1), masked.all(dim=0)


def contiguous(flags: torch.Tensor) -> bool:
    idx = flags.nonzero().flatten()
    return idx.numel() == 0 or int(idx[-1] - idx[0] + 1) == idx.numel()


@pytest.mark.parametrize("shape", [(4, 2, 32, 50), (4, 32, 50)])
def test_shape_preserved_and_input_untouched(shape: tuple[int, ...]):
    x = spectrograms(*shape)
    before = x.clone()
    out = SpecAugment()(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(x, before)


def test_eval_mode_is_identity():
    x = spectrograms(4, 1, 32, 50)
    aug = SpecAugment(freq_mask_param=30, time_mask_param=40).eval()
    assert aug(x) is x


def test_zero_params_are_identity():
    x = spectrograms(4, 1, 32, 50)
    assert torch.equal(SpecAugment(freq_mask_param=0, time_mask_param=0)(x), x)
    assert torch.equal(SpecAugment(num_freq_masks=0, num_time_masks=0)(x), x)


def test_masks_are_bands_along_the_right_axes():
    torch.manual_seed(0)
    x = spectrograms(16, 2, 32, 50)
    out = SpecAugment(freq_mask_param=8, time_mask_param=16, num_freq_masks=1,
                      num_time_masks=1)(x)
    saw_freq = saw_time = False
    for sample in out:
        assert torch.equal(sample[0] == 0, sample[1] == 0)  # one mask for all channels
        masked, rows, cols = masked_rows_and_cols(sample[0])
        # Every masked entry lies in a fully masked frequency row or time column...
        assert torch.equal(masked, rows[:, None] | cols[None, :])
        # ...and with one mask per axis those form a single band no wider than its param.
        assert contiguous(rows) and contiguous(cols)
        assert rows.sum() <= 8 and cols.sum() <= 16
        saw_freq |= bool(rows.any())
        saw_time |= bool(cols.any())
    assert saw_freq and saw_time
    unmasked = out != 0
    assert torch.equal(out[unmasked], x[unmasked])


def test_mask_widths_never_exceed_params():
    torch.manual_seed(0)
    x = spectrograms(64, 20, 30)
    out = SpecAugment(freq_mask_param=3, time_mask_param=5, num_freq_masks=2,
                      num_time_masks=3)(x)
    for sample in out:
        _, rows, cols = masked_rows_and_cols(sample)
        assert rows.sum() <= 2 * 3 and cols.sum() <= 3 * 5


def test_params_larger_than_axis_are_capped():
    torch.manual_seed(0)
    x = spectrograms(32, 4, 6)
    out = SpecAugment(freq_mask_param=100, time_mask_param=100, num_freq_masks=1,
                      num_time_masks=1)(x)
    assert out.shape == x.shape
    # Widths are drawn from [0, axis size], so some samples lose a whole axis (seeded).
    assert any(bool((sample == 0).all()) for sample in out)


def test_samples_get_different_masks():
    torch.manual_seed(0)
    x = spectrograms(1, 1, 32, 50).expand(8, 1, 32, 50)
    masks = SpecAugment()(x) == 0
    assert any(not torch.equal(masks[0], masks[i]) for i in range(1, 8))


def test_mean_mask_value_fills_with_sample_mean():
    torch.manual_seed(0)
    x = spectrograms(4, 32, 50)
    x[1] += 10.0  # per-sample means differ
    out = SpecAugment(freq_mask_param=8, time_mask_param=16, mask_value="mean")(x)
    for sample, original in zip(out, x):
        changed = sample != original
        assert changed.any()
        assert torch.allclose(sample[changed], original.mean().expand(int(changed.sum())))


def test_reproducible_with_seed_and_generator():
    x = spectrograms(8, 1, 32, 50)
    aug = SpecAugment()
    torch.manual_seed(123)
    first = aug(x)
    torch.manual_seed(123)
    assert torch.equal(aug(x), first)
    a = aug(x, generator=torch.Generator().manual_seed(7))
    b = aug(x, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="freq_mask_param"):
        SpecAugment(freq_mask_param=-1)
    with pytest.raises(ValueError, match="mask_value"):
        SpecAugment(mask_value="median")
    with pytest.raises(ValueError, match="expected"):
        SpecAugment()(torch.zeros(32, 50))


# --- dB-domain augmentations, warps and mixup ------------------------------------------------------



def _batch(seed: int = 0) -> torch.Tensor:
    return -80 * torch.rand((4, 1, 16, 20), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fn", [
    lambda x, g: time_shift(x, 3, g), lambda x, g: axis_warp(x, 0.1, -2, g), lambda x, g: axis_warp(x, 0.1, -1, g),
    lambda x, g: random_eq(x, 6.0, g), lambda x, g: add_noise_floor(x, -60.0, -30.0, top_db=80.0, generator=g),
    lambda x, g: mixup(x, 0.2, g)[0],
], ids=["time_shift", "mel_warp", "time_warp", "eq", "noise", "mixup"])
def test_augmentations_keep_shape_and_follow_the_generator(fn) -> None:
    x = _batch()
    a, b = fn(x, torch.Generator().manual_seed(3)), fn(x, torch.Generator().manual_seed(3))
    assert a.shape == x.shape and a.dtype == x.dtype and torch.isfinite(a).all()
    assert torch.equal(a, b)  # same generator state, same output
    assert not torch.equal(a, fn(x, torch.Generator().manual_seed(4)))


def test_time_shift_replicates_the_edge_frames() -> None:
    x = torch.arange(6.0).view(1, 1, 1, 6).expand(2, 1, 2, 6).contiguous()
    shifted = time_shift(x, 2, torch.Generator().manual_seed(0))
    for sample in shifted:
        row = sample[0, 0].tolist()
        assert row == sorted(row) and set(row) <= set(range(6))  # a shift with repeated edges, no wrap


def test_mel_warp_of_one_is_the_identity_and_noise_respects_the_floor() -> None:
    x = _batch()
    assert torch.allclose(axis_warp(x, 0.0, -2), x)
    noisy = add_noise_floor(x, -40.0, -40.0, top_db=80.0, generator=torch.Generator().manual_seed(0))
    assert noisy.min() >= -80.0 and (noisy >= x - 1e-4).all()  # noise only adds power


def test_mixup_mixes_the_batch_with_one_lambda() -> None:
    x = _batch()
    mixed, partner, lam = mixup(x, 0.4, torch.Generator().manual_seed(1))
    assert 0 <= lam <= 1 and sorted(partner.tolist()) == list(range(4))
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x[partner])
