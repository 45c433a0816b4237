"""Pure evaluation helpers: predictions from an exported model, metrics with bootstrap CIs.

Used by the evaluate stage (held-out test split), the register stage's champion gate and
serving, so a model is loaded and scored the same way everywhere. Weights are read from
safetensors, never unpickled.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file
from sklearn import metrics as skm
from torch import nn

from pipeline.stats import bootstrap_ci
from pipeline.training.inference import embeddings, prepare_for_inference, probabilities
from pipeline.training.networks import build_network

SIMILARITY_TEMPERATURE = 10.0  # triplet models: softmax(cosine similarity × T) over class centroids


@dataclass
class ExportedModel:
    """A trained model as the train stage exports it: network, classes, feature params."""

    network: nn.Module
    info: dict
    centroids: torch.Tensor | None

    @property
    def classes(self) -> list[str]:
        return self.info["classes"]  # position = target value; binary: [negative, positive]

    @property
    def binary(self) -> bool:
        return self.info["binary"]

    @classmethod
    def load(cls, folder: Path, inference: bool = True) -> ExportedModel:
        """``inference``: fold BatchNorm and go channels-last (faster, same outputs); False keeps
        the network as trained (BatchNorm layers intact), e.g. to log it for fine-tuning."""
        info = json.loads((folder / "model.json").read_text())
        network = build_network(info["spec"])
        network.load_state_dict(load_file(str(folder / "model.safetensors")))
        network.eval()
        if inference:
            prepare_for_inference(network)
        cents = folder / "centroids.safetensors"
        return cls(network, info, load_file(str(cents))["centroids"] if cents.exists() else None)

    def class_probabilities(self, features: np.ndarray, rows: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """(N, K) probabilities over ``classes`` (binary: columns [negative, positive])."""
        if self.centroids is not None:
            emb = torch.from_numpy(embeddings(self.network, features, rows, batch_size))
            sims = torch.nn.functional.normalize(emb, dim=1) @ self.centroids.T
            return (sims * SIMILARITY_TEMPERATURE).softmax(-1).numpy()
        probs = probabilities(self.network, features, rows, self.binary, batch_size)
        return np.stack([1 - probs, probs], axis=1) if self.binary else probs


def mc_dropout_probabilities(model: ExportedModel, features: np.ndarray, rows: np.ndarray, passes: int,
                             seed: int = 0) -> np.ndarray:
    """(passes, N, K) probabilities with dropout sampling (Monte-Carlo dropout)."""
    if model.centroids is not None:
        raise ValueError("MC dropout intervals need a classifier; triplet models have no head")
    torch.manual_seed(seed)
    runs = [probabilities(model.network, features, rows, model.binary, mc_dropout=True) for _ in range(passes)]
    model.network.eval()
    return np.stack([np.stack([1 - p, p], axis=1) if model.binary else p for p in runs])


def _auc(y_true: np.ndarray, probs: np.ndarray) -> float:
    if probs.shape[1] == 2:
        return skm.roc_auc_score(y_true, probs[:, 1])
    return skm.roc_auc_score(y_true, probs, multi_class="ovr", labels=np.arange(probs.shape[1]))


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, classes: list[str],
                           n_resamples: int = 1000, seed: int = 0) -> dict:
    """Accuracy, balanced accuracy, macro/weighted F1, per-class precision/recall, ROC-AUC,
    each as {value, ci_low, ci_high} (percentile bootstrap, 95%), and the confusion matrix."""
    y_pred = probs.argmax(axis=1)
    labels = np.arange(len(classes))
    scorers = {
        "accuracy": skm.accuracy_score,
        "balanced_accuracy": skm.balanced_accuracy_score,
        "f1_macro": partial(skm.f1_score, average="macro", labels=labels, zero_division=0),
        "f1_weighted": partial(skm.f1_score, average="weighted", labels=labels, zero_division=0),
    }
    for i, name in enumerate(classes):
        scorers[f"precision/{name}"] = partial(_per_class, skm.precision_score, i)
        scorers[f"recall/{name}"] = partial(_per_class, skm.recall_score, i)
    out = {}
    for name, fn in scorers.items():
        value, low, high = bootstrap_ci(fn, y_true, y_pred, n_resamples=n_resamples, seed=seed)
        out[name] = {"value": value, "ci_low": low, "ci_high": high}
    if len(np.unique(y_true)) > 1:
        value, low, high = bootstrap_ci(_auc, y_true, probs, n_resamples=n_resamples, seed=seed)
        out["roc_auc"] = {"value": value, "ci_low": low, "ci_high": high}
    out["confusion_matrix"] = skm.confusion_matrix(y_true, y_pred, labels=labels).tolist()
    return out


def _per_class(score, cls: int, y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return score(y_true, y_pred, labels=[cls], average="macro", zero_division=0)


def psnr(mse: np.ndarray, peak: float) -> np.ndarray:
    """Peak signal-to-noise ratio in dB of per-clip MSEs for a signal of range ``peak``."""
    return 10.0 * np.log10(peak ** 2 / np.maximum(mse, 1e-12))


def fastest_batch_size(call: Callable[[np.ndarray], object], clip_samples: int, limit: int,
                       budget_s: float = 3.0) -> int:
    """The batch size (a power of two <= ``limit``) at which ``call(waves)`` costs least per clip.

    ``call`` takes (n, clip_samples) waves; it is timed on zeros, over the same number of clips
    for every size, smallest first; sizes left when ``budget_s`` is spent are not tried (a large
    model would otherwise take minutes to start, and gains little from batching anyway). The
    answer depends on the model and the CPU: on 2 cores the demo MAE-ViT costs least per clip at
    32, MAE tiny and the CNN at 8-16; the CNN ran ~50% slower per clip at 32 than at 8 (its
    activations fall out of cache).
    """
    sizes = [2 ** i for i in range(limit.bit_length())]
    waves = np.zeros((sizes[-1], clip_samples), np.float32)
    per_clip: dict[int, float] = {}
    deadline = time.perf_counter() + budget_s
    for n in sizes:
        if per_clip and time.perf_counter() > deadline:
            break
        call(waves[:n])  # the first call of a shape builds its kernels
        repeats = max(2, sizes[-1] // n)
        t0 = time.perf_counter()
        for _ in range(repeats):
            call(waves[:n])
        per_clip[n] = (time.perf_counter() - t0) / (repeats * n)
    return min(per_clip, key=per_clip.get)
