"""pipeline.training.enhance: paired crops, padded batches, and a few steps that learn to denoise."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import audio
from pipeline.enhancement import si_snr_torch
from pipeline.models.unet import MaskUNet
from pipeline.training.config import TrainerParams
from pipeline.training.enhance import (CropSampler, EnhanceModule, PairedWaveDataModule, PairedWaveDataset,
                                       pad_collate, per_item_si_snr)
from pipeline.training.kfold import quiet_lightning

RATE = 8000


def _voiced(n: int, pitch: float, rng: np.random.Generator) -> np.ndarray:
    """(n,) harmonics of ``pitch`` Hz under a syllable-rate envelope: speech-like, easy to mask."""
    t = np.arange(n) / RATE
    wave = sum(np.sin(2 * np.pi * k * pitch * t + rng.uniform(0, 6.3)) / k for k in range(1, 12))
    return 0.2 * wave * np.clip(np.sin(2 * np.pi * 3 * t), 0, None) / 3


@pytest.fixture(scope="module")
def paired(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    """Eight clean clips of different lengths, each in white noise at 0 dB."""
    root = tmp_path_factory.mktemp("paired")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        n = 4000 + 500 * i
        clean = _voiced(n, 110 + 15 * i, rng)
        noise = rng.standard_normal(n) * np.sqrt(np.mean(clean ** 2))
        for kind, wave in (("clean", clean), ("noisy", clean + noise)):
            audio.write_wav(root / f"{kind}{i}.wav", wave.astype(np.float32), RATE)
        rows.append({"path": f"noisy{i}.wav", "pair": f"clean{i}.wav", "group": f"g{i % 2}"})
    return root, pd.DataFrame(rows)


def test_crops_follow_the_epoch_seed_and_whole_items_keep_their_length(paired) -> None:
    root, rows = paired
    crops = PairedWaveDataset(root, rows, RATE, crop_s=0.25)
    first, again, other = crops[3, 10], crops[3, 10], crops[3, 11]
    assert first[0].shape == (2000,) and torch.equal(first[0], again[0])
    assert not torch.equal(first[0], other[0])
    whole = PairedWaveDataset(root, rows, RATE)
    assert whole[3][0].shape == whole[3][1].shape == (5500,)
    with pytest.raises(ValueError, match="CropSampler"):
        crops[3]


def test_crops_longer_than_the_utterance_are_zero_padded(paired) -> None:
    root, rows = paired
    noisy, clean = PairedWaveDataset(root, rows, RATE, crop_s=1.0)[0, 0]
    assert noisy.shape == clean.shape == (8000,)
    assert noisy[4000:].abs().max() == 0


def test_the_crop_sampler_pairs_a_permutation_with_the_epoch_seed() -> None:
    sampler = CropSampler(5, seed=7)
    sampler.set_epoch(2)
    keys = list(sampler)
    assert sorted(i for i, _ in keys) == list(range(5)) and {s for _, s in keys} == {9}


def test_padding_is_not_scored(paired) -> None:
    root, rows = paired
    data = PairedWaveDataset(root, rows, RATE)
    noisy, clean, lengths = pad_collate([data[0], data[5]])
    assert noisy.shape == (2, 6500) and lengths.tolist() == [4000, 6500]
    alone = si_snr_torch(noisy[:1, :4000], clean[:1, :4000])
    assert torch.allclose(per_item_si_snr(noisy, clean, lengths)[0], alone[0])


def _module(spectral_weight: float = 0.0, lr: float = 1e-2) -> EnhanceModule:
    torch.manual_seed(0)
    p = TrainerParams(lr=lr, scheduler="none", batch_size=4, max_epochs=1, accelerator="cpu", devices=1,
                      progress_bar=False)
    return EnhanceModule(MaskUNet(n_fft=256, hop=64, depth=2, channels=4), p, spectral_weight)


@pytest.mark.parametrize("stage", ["train", "val", "test"])
@pytest.mark.parametrize("spectral_weight", [0.0, 1.0])
def test_model_step_returns_the_loss_in_every_stage(paired, stage: str, spectral_weight: float) -> None:
    root, rows = paired
    batch = pad_collate([PairedWaveDataset(root, rows, RATE)[i] for i in (1, 2)])
    out = _module(spectral_weight).model_step(batch, stage)
    assert out["loss"].dim() == 0 and out["loss"].requires_grad and torch.isfinite(out["loss"])
    if spectral_weight == 0:
        assert torch.allclose(out["loss"], -out["si_snr"])
    else:
        assert out["loss"] > -out["si_snr"]


def test_a_few_steps_raise_val_si_snr(paired) -> None:
    root, rows = paired
    module = _module()
    p = module.p.model_copy(update={"max_epochs": 12})
    data = PairedWaveDataModule(root, rows, rows, rows, p, RATE, crop_s=0.4)
    quiet_lightning()
    kwargs = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                  num_sanity_val_steps=0, log_every_n_steps=1)
    before = L.Trainer(**kwargs, **p.trainer_kwargs()).validate(module, datamodule=data, verbose=False)[0]
    trainer = L.Trainer(**kwargs, **p.trainer_kwargs())
    trainer.fit(module, datamodule=data)
    after = trainer.validate(module, datamodule=data, verbose=False)[0]
    assert after["val/si_snr"] > before["val/si_snr"] + 1.0
    assert after["val/loss"] < before["val/loss"]
    test = trainer.test(module, datamodule=data, verbose=False)[0]
    assert test["test/si_snr"] == pytest.approx(after["val/si_snr"], abs=1e-4)


def test_a_negative_spectral_weight_is_refused() -> None:
    with pytest.raises(ValueError, match="spectral_weight"):
        _module(-1.0)
