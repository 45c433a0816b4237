"""Features for training: a Dataset over the memory-mapped array and a LightningDataModule.

No per-file tensor files: every clip is a row of ``features.npy``; the index says which rows
belong to train / val / test and what their labels are.
"""
from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from pipeline.training.config import TrainerParams


class LabelCoder:
    """Class names ↔ integer targets. Binary tasks use one logit: positive class → 1."""

    def __init__(self, classes: list[str], positive_class: str | None = None) -> None:
        self.classes = sorted(classes)
        self.binary = len(self.classes) == 2
        if self.binary:
            if positive_class not in self.classes:
                raise ValueError(f"positive_class {positive_class!r} is not one of the classes {self.classes}")
            negative = next(c for c in self.classes if c != positive_class)
            self.order = [negative, positive_class]  # position = target value
        else:
            self.order = self.classes
        self.num_outputs = 1 if self.binary else len(self.classes)

    def encode(self, labels: pd.Series | list[str]) -> np.ndarray:
        lookup = {c: i for i, c in enumerate(self.order)}
        unknown = sorted(set(labels) - set(lookup))
        if unknown:
            raise ValueError(f"labels {unknown} are not among the classes {self.order}")
        return np.array([lookup[x] for x in labels], dtype=np.int64)


class FeatureDataset(Dataset):
    """Rows of the feature array with their targets.

    Item: (spec (1, n_mels, frames) float32, target int64, row int64), as stored (the
    LightningModule augments, then standardises).
    ``memory_efficient`` reads each item from the memmap (RAM ~ one batch); otherwise the rows
    are copied into RAM once, which is faster when they fit.
    """

    def __init__(self, features: Path, rows: np.ndarray, targets: np.ndarray, memory_efficient: bool) -> None:
        self.path, self.rows, self.targets = Path(features), np.asarray(rows), np.asarray(targets)
        self.memory_efficient = memory_efficient
        self._array: np.ndarray | None = None if memory_efficient else np.load(self.path, mmap_mode="r")[self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def _memmap(self) -> np.ndarray:
        # Opened lazily so each DataLoader worker maps the file itself instead of pickling it.
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r")
        return self._array

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        source = self._memmap()
        spec = source[self.rows[i]] if self.memory_efficient else source[i]
        return torch.from_numpy(np.array(spec, dtype=np.float32))[None], torch.tensor(self.targets[i]), torch.tensor(self.rows[i])


class FeatureDataModule(L.LightningDataModule):
    """Train/val/test loaders for one fold of the index.

    ``train``/``val``/``test`` are index frames (rows already chosen by the caller: fold,
    filtering, label fraction); ``oversample`` draws each class equally often (oversample_minority).
    """

    def __init__(self, features: Path, coder: LabelCoder, train: pd.DataFrame, val: pd.DataFrame,
                 test: pd.DataFrame | None, p: TrainerParams, oversample: bool = False) -> None:
        super().__init__()
        self.features, self.coder, self.p, self.oversample = Path(features), coder, p, oversample
        self.frames = {"train": train, "val": val, "test": test}

    def dataset(self, split: str) -> FeatureDataset:
        frame = self.frames[split]
        if frame is None or frame.empty:
            raise ValueError(f"no {split} rows for this fold")
        return FeatureDataset(self.features, frame["row"].to_numpy(), self.coder.encode(frame["label"]),
                              self.p.memory_efficient)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        data = self.dataset(split)
        sampler = None
        if split == "train":
            weights = balanced_weights(data.targets) if self.oversample else None
            sampler, shuffle = EpochSampler(len(data), self.p.seed, weights), False
        workers = self.p.num_workers
        return DataLoader(data, batch_size=self.p.batch_size, shuffle=shuffle, sampler=sampler,
                          num_workers=workers, pin_memory=self.p.pin_memory,
                          persistent_workers=self.p.persistent_workers and workers > 0,
                          drop_last=split == "train" and len(data) > self.p.batch_size)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        val = self.frames["val"]  # none: a refit on every training row, which never validates
        return [] if val is None or val.empty else self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


def balanced_weights(targets: np.ndarray) -> np.ndarray:
    """oversample_minority: per-row weights that draw each class equally often."""
    counts = np.bincount(targets)
    return 1.0 / counts[targets]


class EpochSampler(torch.utils.data.Sampler[int]):
    """The training rows of one epoch: a permutation, or ``weights``-proportional draws with
    replacement (oversampling), from a generator seeded with ``seed + epoch``.

    The order follows from the seed and the epoch alone (Lightning sets the epoch before every
    epoch, a resumed one included), so a run resumed from a checkpoint sees the batches an
    uninterrupted run would have seen.
    """

    def __init__(self, n: int, seed: int, weights: np.ndarray | None = None) -> None:
        self.n, self.seed, self.epoch = n, seed, 0
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.weights is None:
            return iter(torch.randperm(self.n, generator=generator).tolist())
        return iter(torch.multinomial(self.weights, self.n, replacement=True, generator=generator).tolist())
