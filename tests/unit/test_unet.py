"""MaskUNet: shapes for any length, the STFT round trip, batch independence, variants."""
from __future__ import annotations

import pytest
import torch

from pipeline.models.unet import MaskUNet


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("batch,length", [(1, 1), (2, 100), (1, 512), (3, 4000), (2, 16001)])
def test_output_has_the_input_shape(batch: int, length: int) -> None:
    net = MaskUNet(channels=4).eval()
    with torch.no_grad():
        out = net(torch.randn(batch, length))
    assert out.shape == (batch, length)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("length", [300, 4000, 8191])
def test_a_mask_of_ones_gives_the_input_back(length: int) -> None:
    net = MaskUNet(channels=4)
    wave = 0.1 * torch.randn(2, length)
    spec = net.spectrum(wave)
    assert torch.allclose(net.apply_mask(spec, torch.ones(spec.shape), length), wave, atol=1e-5)


def test_a_mask_of_zeros_silences() -> None:
    net = MaskUNet(channels=4)
    spec = net.spectrum(torch.randn(1, 2000))
    assert net.apply_mask(spec, torch.zeros(spec.shape), 2000).abs().max() == 0


def test_the_mask_lies_in_zero_one_and_matches_the_spectrum() -> None:
    net = MaskUNet(channels=4, depth=2)
    spec = net.spectrum(torch.randn(2, 3000))
    mask = net.mask(spec)
    assert mask.shape == spec.shape
    assert mask.min() >= 0 and mask.max() <= 1


def test_a_clip_alone_and_in_a_batch_is_enhanced_the_same() -> None:
    net = MaskUNet(channels=4).eval()
    batch = torch.randn(4, 5000)
    with torch.no_grad():
        together = net(batch)
        alone = net(batch[2:3])
    assert torch.allclose(together[2:3], alone, atol=1e-5)


@pytest.mark.parametrize("depth,channels,mask", [(1, 2, "sigmoid"), (2, 8, "bounded_relu"), (4, 4, "sigmoid")])
def test_variants_build_and_run(depth: int, channels: int, mask: str) -> None:
    net = MaskUNet(n_fft=256, hop=64, depth=depth, channels=channels, mask=mask).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 1234)).shape == (2, 1234)
    assert len(net.down) == depth


@pytest.mark.parametrize("kwargs", [{"depth": 0}, {"channels": 0}, {"hop": 300}, {"mask": "relu"}])
def test_bad_settings_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        MaskUNet(**kwargs)


def test_it_refuses_a_wave_without_a_batch_axis() -> None:
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        MaskUNet(channels=2)(torch.randn(1000))


def test_the_window_moves_with_the_module_but_is_not_saved() -> None:
    net = MaskUNet(channels=2).double()
    assert net.window.dtype == torch.float64
    assert "window" not in net.state_dict()
