"""The one loader of exported models, and batched inference over rows of a feature array.

Evaluate, register, the baseline and the service load a model and score features through this
module, so a model is rebuilt and scored the same way everywhere. It needs no Lightning:
networks are rebuilt from their spec (``networks.build_network``) and weights come from
safetensors, never from a pickle.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from pipeline.contracts import ModelFolder, ModelInfo, PretrainFolder
from pipeline.features import BandNorm
from pipeline.models.mae import AudioMAEViT
from pipeline.models.networks import build_network

SIMILARITY_TEMPERATURE = 10.0  # triplet models: softmax(cosine similarity × T) over class centroids


def prepare_for_inference(network: nn.Module) -> nn.Module:
    """Eval mode, each BatchNorm folded into the convolution before it, conv weights channels-last.

    Why: on CPU, oneDNN runs channels-last convolutions without a layout reorder per call, and a
    folded BatchNorm is one op less per block; outputs agree with the unfolded network to float32
    rounding. For exported (frozen) networks: the BatchNorm layers become ``nn.Identity``.
    Modifies ``network`` in place and returns it.
    """
    network.eval()
    for seq in [m for m in network.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            if isinstance(seq[i], (nn.Conv1d, nn.Conv2d)) and isinstance(seq[i + 1], (nn.BatchNorm1d, nn.BatchNorm2d)):
                seq[i] = fuse_conv_bn_eval(seq[i], seq[i + 1])
                seq[i + 1] = nn.Identity()
    return network.to(memory_format=torch.channels_last)


def batches(features: np.ndarray, rows: np.ndarray, batch_size: int, norm: BandNorm | None = None) -> Iterator[Tensor]:
    """(B, 1, n_mels, frames) float32 tensors of ``features[rows]`` in order, standardised by ``norm``."""
    for start in range(0, len(rows), batch_size):
        x = np.asarray(features[rows[start:start + batch_size]], dtype=np.float32)
        yield torch.from_numpy(x if norm is None else norm.apply(x))[:, None]


@torch.no_grad()
def apply(fn: Callable[[Tensor], Tensor], model: nn.Module, features: np.ndarray, rows: np.ndarray,
          batch_size: int = 64, mc_dropout: bool = False, norm: BandNorm | None = None) -> np.ndarray:
    """Concatenate ``fn(batch)`` over all rows with ``model`` in eval mode.

    ``mc_dropout`` leaves dropout layers sampling (Monte-Carlo dropout); all else stays in eval.
    ``norm`` standardises each batch first (models trained with ``band_norm``).
    """
    model.eval()
    if mc_dropout:
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.train()
    if len(rows) == 0:
        return np.empty(0, np.float32)
    device = next(model.parameters()).device  # batches are built on the CPU, the network may not be
    return np.concatenate([fn(x.to(device, non_blocking=True)).float().cpu().numpy()
                           for x in batches(features, np.asarray(rows), batch_size, norm)])


def reconstruction_losses(mae: AudioMAEViT, features: np.ndarray, rows: np.ndarray, seed: int = 0,
                          batch_size: int = 64, norm: BandNorm | None = None) -> np.ndarray:
    """Per-clip masked-patch MSE (N,); masking is seeded, so a file always gets the same score."""
    generator = torch.Generator().manual_seed(seed)

    def loss(x: Tensor) -> Tensor:
        _, pred, mask = mae(x, generator=generator)
        return mae.per_sample_loss(x, pred, mask)

    return apply(loss, mae, features, rows, batch_size, norm=norm)


def probabilities(network: nn.Module, features: np.ndarray, rows: np.ndarray, binary: bool,
                  batch_size: int = 64, mc_dropout: bool = False, norm: BandNorm | None = None) -> np.ndarray:
    """(N,) P(positive) for a single-logit binary network, (N, K) softmax otherwise."""
    def probs(x: Tensor) -> Tensor:
        logits = network(x)
        return torch.sigmoid(logits.squeeze(-1)) if binary else logits.softmax(-1)

    return apply(probs, network, features, rows, batch_size, mc_dropout, norm)


def embeddings(network: nn.Module, features: np.ndarray, rows: np.ndarray, batch_size: int = 64,
               norm: BandNorm | None = None) -> np.ndarray:
    """(N, D) backbone embeddings."""
    return apply(network.embed, network, features, rows, batch_size, norm=norm)


def load_weights(network: nn.Module, path: Path) -> nn.Module:
    """Load safetensors weights into ``network``; a missing file is named in the error."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: weights not found")
    network.load_state_dict(load_file(str(path)))
    return network


def pretrained_weights(pretrained_dir: Path, spec: dict) -> Path:
    """The pretrain stage's encoder weights, after checking they fit the configured MAE."""
    if spec["arch"] != "mae":
        raise ValueError("train.init_from_pretrain needs train.model.arch: mae")
    folder = PretrainFolder(pretrained_dir)
    pre = folder.info().spec["kwargs"]

    def shape(kwargs: dict) -> dict:  # mask_ratio may differ: it does not change the weights
        # through JSON, as the pretrain stage stored it: a (16, 16) patch equals its [16, 16]
        return json.loads(json.dumps({k: v for k, v in kwargs.items() if k != "mask_ratio"}))

    if shape(pre) != shape(spec["kwargs"]):
        raise ValueError(f"train.model {shape(spec['kwargs'])} does not match the pretrained MAE "
                         f"{shape(pre)}; align pretrain.model and train.model")
    return folder.weights_path


def load_pretrained_mae(folder: Path) -> tuple[AudioMAEViT, BandNorm | None]:
    """The pretrain stage's masked autoencoder, as trained, and its input statistics."""
    pretrained = PretrainFolder(folder)
    info = pretrained.info()
    return load_weights(build_network(info.spec), pretrained.weights_path), info.input_norm


@dataclass
class ExportedModel:
    """A trained model as the train stage exports it: network, classes, feature params."""

    network: nn.Module
    info: ModelInfo
    centroids: torch.Tensor | None

    @property
    def classes(self) -> list[str]:
        return self.info.classes  # position = target value; binary: [negative, positive]

    @property
    def binary(self) -> bool:
        return self.info.binary

    @classmethod
    def load(cls, folder: Path, inference: bool = True, device: str = "cpu") -> ExportedModel:
        """``inference``: fold BatchNorm and go channels-last (faster, same outputs); False keeps
        the network as trained (BatchNorm layers intact), e.g. to log it for fine-tuning.
        ``device``: where the network runs (``auto``: CUDA when present)."""
        model = ModelFolder(folder)
        info = model.info()
        network = load_weights(build_network(info.spec), model.weights_path).eval()
        if inference:
            prepare_for_inference(network)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        cents = load_file(str(model.centroids_path))["centroids"] if model.centroids_path.exists() else None
        return cls(network.to(device), info, None if cents is None else cents.to(device))

    def class_probabilities(self, features: np.ndarray, rows: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """(N, K) probabilities over ``classes`` (binary: columns [negative, positive]) of feature
        rows as the features folder or ``log_mel_batch`` hold them (standardised here if need be)."""
        if self.centroids is not None:
            emb = torch.from_numpy(embeddings(self.network, features, rows, batch_size, self.info.input_norm))
            sims = torch.nn.functional.normalize(emb, dim=1) @ self.centroids.cpu().T
            return (sims * SIMILARITY_TEMPERATURE).softmax(-1).numpy()
        probs = probabilities(self.network, features, rows, self.binary, batch_size, norm=self.info.input_norm)
        return np.stack([1 - probs, probs], axis=1) if self.binary else probs

    def embeddings(self, features: np.ndarray, rows: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """(N, D) backbone embeddings of feature rows (standardised here if need be)."""
        return embeddings(self.network, features, rows, batch_size, self.info.input_norm)

    def mc_dropout_probabilities(self, features: np.ndarray, rows: np.ndarray, passes: int,
                                 seed: int = 0) -> np.ndarray:
        """(passes, N, K) probabilities with dropout sampling (Monte-Carlo dropout)."""
        if self.centroids is not None:
            raise ValueError("MC dropout intervals need a classifier; triplet models have no head")
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            runs = [probabilities(self.network, features, rows, self.binary, mc_dropout=True,
                                  norm=self.info.input_norm) for _ in range(passes)]
        self.network.eval()
        return np.stack([np.stack([1 - p, p], axis=1) if self.binary else p for p in runs])


def fastest_batch_size(call: Callable[[np.ndarray], object], clip_samples: int, limit: int,
                       budget_s: float = 3.0) -> int:
    """The batch size (a power of two <= ``limit``) at which ``call(waves)`` costs least per clip.

    ``call`` takes (n, clip_samples) waves; it is timed on zeros, over the same number of clips
    for every size, smallest first; sizes left when ``budget_s`` is spent are not tried (a large
    model would otherwise take minutes to start, and gains little from batching anyway). The
    answer depends on the model and the CPU: a convolution's activations can fall out of cache
    at large batches, so bigger is not always cheaper per clip.
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
