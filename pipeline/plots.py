"""Figures logged as MLflow artifacts (matplotlib, headless)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no display on servers and in containers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def mae_reconstruction(inputs: np.ndarray, masked: np.ndarray, recon: np.ndarray) -> Figure:
    """Rows of (input, masked input, reconstruction) spectrograms, each (n_mels, frames)."""
    fig, axes = plt.subplots(len(inputs), 3, figsize=(9, 2.2 * len(inputs)), squeeze=False)
    for r, images in enumerate(zip(inputs, masked, recon)):
        for c, (image, title) in enumerate(zip(images, ("input", "masked", "reconstruction"))):
            axes[r, c].imshow(image, origin="lower", aspect="auto", cmap="magma")
            axes[r, c].set_title(title, fontsize=8)
            axes[r, c].axis("off")
    fig.tight_layout()
    return fig


def learning_curves(history: pd.DataFrame, metrics: list[str]) -> Figure:
    """One panel per metric, one line per fold, epochs on x."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for fold, rows in history.groupby("fold"):
            if metric in rows:
                ax.plot(rows["epoch"], rows[metric], marker=".", label=str(fold))
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("epoch")
    axes[0, -1].legend(fontsize=7, title="fold")
    fig.tight_layout()
    return fig
