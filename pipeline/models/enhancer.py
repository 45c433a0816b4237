"""The one loader of exported enhancers, and the one way a wave is enhanced.

Evaluate, register, the service and ``pipeline.predict`` enhance through :class:`ExportedEnhancer`,
so the served output of a file equals the one evaluate scored (the parity test holds them to it).
No Lightning: the MaskUNet is rebuilt from its spec and weights come from safetensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from pipeline import audio
from pipeline.contracts import EnhancerInfo, ModelFolder
from pipeline.models.inference import load_weights, prepare_for_inference
from pipeline.models.networks import build_network


@dataclass
class ExportedEnhancer:
    """A trained enhancer as the train stage exports it (task ``enhance``)."""

    network: nn.Module
    info: EnhancerInfo

    @property
    def sample_rate(self) -> int:
        return self.info.sample_rate

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @classmethod
    def load(cls, folder: Path, device: str = "cpu", inference: bool = True) -> ExportedEnhancer:
        """``device``: where the network runs (``auto``: CUDA when present). ``inference``: fold
        BatchNorm and go channels-last (``prepare_for_inference``: faster, same outputs to float
        rounding); False keeps the network as trained, e.g. to log it to the registry."""
        info = ModelFolder(folder).enhancer_info()
        network = load_weights(build_network(info.spec), ModelFolder(folder).weights_path).eval()
        if inference:
            prepare_for_inference(network)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return cls(network.to(device), info)

    def enhance(self, wave: np.ndarray, rate: int) -> np.ndarray:
        """(T,) mono float wave at ``rate`` Hz -> (T,) float32 enhanced wave at ``rate`` Hz.

        A wave at another rate than the network's is resampled to it and back (the same soxr
        resampler as every decode), then cut or padded to the input's length. One wave per
        forward: zero-padding a shorter wave into a batch moves its output at the edges (the
        U-Net's padded maps are not zero past the first layer), and served output must equal
        evaluate's.
        """
        if wave.ndim != 1:
            raise ValueError(f"enhance takes a mono (T,) wave, got shape {wave.shape}")
        if len(wave) == 0:
            raise ValueError("enhance got an empty wave")
        x = audio.resample(np.asarray(wave, dtype=np.float32), rate, self.sample_rate)
        # bf16 (model.json ``precision``): autocast runs the convolutions in bf16 and keeps the
        # STFT, its inverse and the mask product in float32
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16,
                                                    enabled=self.info.precision == "bf16"):
            out = self.network(torch.from_numpy(np.ascontiguousarray(x))[None].to(self.device))[0]
        out = audio.resample(out.float().cpu().numpy(), self.sample_rate, rate)
        return out[:len(wave)] if len(out) >= len(wave) else np.pad(out, (0, len(wave) - len(out)))


def export_enhancer(folder: Path, network: nn.Module, info: EnhancerInfo) -> None:
    """Write ``network``'s weights and ``info`` as a model folder (the train stage's export; tests)."""
    folder.mkdir(parents=True, exist_ok=True)
    model = ModelFolder(folder)
    save_file({k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}, str(model.weights_path))
    model.write_info(info)
