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


def confusion(matrix: np.ndarray, classes: list[str]) -> Figure:
    """Confusion matrix with counts; rows are actual classes, columns predicted."""
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(classes), 1 + 0.6 * len(classes)))
    ax.imshow(matrix, cmap="Blues")
    for (r, c), count in np.ndenumerate(matrix):
        ax.text(c, r, str(count), ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(classes)), classes, rotation=45)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    fig.tight_layout()
    return fig


def roc_pr(y_true: np.ndarray, score: np.ndarray) -> Figure:
    """ROC and precision-recall curves of a binary score."""
    from sklearn.metrics import PrecisionRecallDisplay, RocCurveDisplay

    fig, (roc, pr) = plt.subplots(1, 2, figsize=(8, 3.5))
    RocCurveDisplay.from_predictions(y_true, score, ax=roc)
    PrecisionRecallDisplay.from_predictions(y_true, score, ax=pr)
    fig.tight_layout()
    return fig
