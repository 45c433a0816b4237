"""Speech-enhancement training: paired (noisy, clean) waves and the LightningModule of a mask model.

The data comes from a paired ``metadata.csv`` (``path`` noisy, ``pair`` clean, both relative to
the corpus root; ``pipeline.data.enhance_corpus`` writes one). Training items are fixed-length
crops at offsets drawn from ``seed + epoch`` and the item, so a resumed run sees the crops an
uninterrupted one would; validation and test items are whole utterances, zero-padded per batch,
with their lengths so that padding is never scored.
"""
from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from pipeline import audio
from pipeline.enhancement import si_snr_torch
from pipeline.models.networks import build_network, make_unet_spec
from pipeline.training.config import EnhanceParams, TrainerParams
from pipeline.training.data import EpochSampler
from pipeline.training.kfold import fit_fold, seed_all
from pipeline.training.modules import _Base

Batch = tuple[Tensor, Tensor, Tensor]  # noisy (B, T), clean (B, T), lengths (B,) int64


class PairedWaveDataset(Dataset):
    """The (noisy, clean) waves of ``rows``, decoded once into RAM (a clean side shared by its mixes
    is decoded once).

    Item ``i`` (whole utterance) or ``(i, epoch_seed)`` (a ``crop_s`` crop, see :class:`CropSampler`):
    (noisy (T,) float32, clean (T,) float32). An utterance shorter than the crop is zero-padded.
    """

    def __init__(self, root: Path, rows: pd.DataFrame, rate: int, crop_s: float | None = None) -> None:
        clean = {rel: audio.load(Path(root) / rel, rate, name=rel) for rel in rows["pair"].unique()}
        self.pairs = [(audio.load(Path(root) / row.path, rate, name=row.path), clean[row.pair])
                      for row in rows.itertuples(index=False)]
        for (noisy, ref), name in zip(self.pairs, rows["path"]):
            if len(noisy) != len(ref):
                raise ValueError(f"{name}: {len(noisy)} samples but its clean reference has {len(ref)}")
        self.crop = None if crop_s is None else int(round(crop_s * rate))

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, Tensor]:
        index, epoch_seed = key if isinstance(key, tuple) else (key, None)
        noisy, clean = self.pairs[index]
        if self.crop is not None:
            if epoch_seed is None:
                raise ValueError("a cropping dataset needs (index, epoch_seed) keys: use CropSampler")
            spare = max(0, len(noisy) - self.crop)
            start = int(np.random.default_rng([epoch_seed, index]).integers(0, spare + 1))
            noisy, clean = (np.pad(w[start:start + self.crop], (0, max(0, self.crop - len(w)))) for w in (noisy, clean))
        return torch.from_numpy(np.ascontiguousarray(noisy)), torch.from_numpy(np.ascontiguousarray(clean))


class CropSampler(EpochSampler):
    """:class:`EpochSampler`'s permutation, each index paired with ``seed + epoch`` to seed its crop."""

    def __iter__(self):
        return ((i, self.seed + self.epoch) for i in super().__iter__())


def pad_collate(items: list[tuple[Tensor, Tensor]]) -> Batch:
    """Stack (noisy, clean) pairs, zero-padded to the longest: (B, T), (B, T), lengths (B,)."""
    lengths = torch.tensor([len(noisy) for noisy, _ in items])
    noisy = nn.utils.rnn.pad_sequence([n for n, _ in items], batch_first=True)
    clean = nn.utils.rnn.pad_sequence([c for _, c in items], batch_first=True)
    return noisy, clean, lengths


class PairedWaveDataModule(L.LightningDataModule):
    """Train / val / test rows of one paired metadata table, read from ``root`` at ``rate`` Hz."""

    def __init__(self, root: Path, train: pd.DataFrame, val: pd.DataFrame, test: pd.DataFrame | None,
                 p: TrainerParams, rate: int, crop_s: float) -> None:
        super().__init__()
        self.root, self.p, self.rate, self.crop_s = Path(root), p, rate, crop_s
        self.rows = {"train": train, "val": val, "test": test}
        self.datasets: dict[str, PairedWaveDataset] = {}

    def dataset(self, split: str) -> PairedWaveDataset:
        if self.rows[split] is None:
            raise ValueError(f"no {split} rows were given to this data module")
        if split not in self.datasets:
            crop = self.crop_s if split == "train" else None
            self.datasets[split] = PairedWaveDataset(self.root, self.rows[split], self.rate, crop)
        return self.datasets[split]

    def _loader(self, split: str) -> DataLoader:
        data = self.dataset(split)
        sampler = CropSampler(len(data), self.p.seed) if split == "train" else None
        workers = self.p.num_workers
        return DataLoader(data, batch_size=self.p.batch_size, sampler=sampler, collate_fn=pad_collate,
                          num_workers=workers, persistent_workers=self.p.persistent_workers and workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")


def per_item_si_snr(estimate: Tensor, reference: Tensor, lengths: Tensor) -> Tensor:
    """(B,) SI-SNR dB of (B, T) estimates on each item's first ``lengths[i]`` samples (padding unscored)."""
    if bool((lengths == estimate.shape[-1]).all()):
        return si_snr_torch(estimate, reference)
    return torch.cat([si_snr_torch(estimate[i:i + 1, :n], reference[i:i + 1, :n])
                      for i, n in enumerate(lengths.tolist())])


class EnhanceModule(_Base):
    """A (B, T) -> (B, T) enhancer trained on negative SI-SNR, optionally plus a spectral L1 term.

    The spectral term is the L1 distance of the log1p STFT magnitudes (through the network's own
    ``spectrum``): SI-SNR is blind to the output's scale, this term is not, so it also pins the gain.
    Logged per stage: ``loss`` and ``si_snr`` (dB, higher is better: the early-stopping monitor).
    """

    def __init__(self, network: nn.Module, p: TrainerParams, spectral_weight: float = 0.0) -> None:
        super().__init__(network, p)
        if spectral_weight < 0:
            raise ValueError(f"spectral_weight must be >= 0, got {spectral_weight}")
        self.spectral_weight = spectral_weight

    def spectral_l1(self, estimate: Tensor, reference: Tensor) -> Tensor:
        """Mean |log1p|STFT(estimate)| - log1p|STFT(reference)|| over (B, F, N); padding scores 0 - 0."""
        est, ref = (torch.log1p(self.network.spectrum(w).abs()) for w in (estimate, reference))
        return (est - ref).abs().mean()

    def model_step(self, batch: Batch, stage: str) -> dict[str, Tensor]:
        noisy, clean, lengths = batch
        enhanced = self.network(noisy)
        scores = per_item_si_snr(enhanced, clean, lengths)
        loss = -scores.mean()
        if self.spectral_weight:
            loss = loss + self.spectral_weight * self.spectral_l1(enhanced, clean)
        return {"loss": loss, "si_snr": scores.detach().mean()}


def enhance_rows(index: pd.DataFrame, val_fold: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train and validation rows of a paired index: the training split outside / inside ``val_fold``."""
    pool = index[index["split"] == "train"]
    folds = sorted(pool["fold"].unique())
    if val_fold not in folds:
        raise ValueError(f"train.enhance.val_fold {val_fold} is not a fold of the training split {folds}")
    return pool[pool["fold"] != val_fold], pool[pool["fold"] == val_fold]


def fit_enhancer(raw_dir: Path, train: pd.DataFrame, val: pd.DataFrame, p: EnhanceParams, rate: int, work: Path,
                 logger: object = None) -> tuple[dict, EnhanceModule]:
    """Fit (or resume, or skip when done) the MaskUNet recipe on ``train`` in ``work`` (rows of
    ``enhance_rows``): early stopping on ``p.trainer.monitor`` over ``val``, the best weights in
    ``work/model.safetensors`` (see ``fit_fold``)."""
    seed_all(p.trainer.seed)
    module = EnhanceModule(build_network(make_unet_spec(p.model)), p.trainer, p.spectral_weight)
    data = PairedWaveDataModule(raw_dir, train, val, None, p.trainer, rate, p.crop_s)
    return fit_fold("enhance", module, data, p.trainer, work, logger), module
