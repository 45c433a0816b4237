"""Losses for imbalanced classification, plus a triplet loss for metric learning.

Binary convention: a binary task has ONE logit per sample, shape (B,) or (B, 1), whose sigmoid is
P(class 1), with targets (B,) in {0, 1} (float or long). ``build_loss(..., num_classes=2)`` returns
losses meant for that sigmoid form. Multi-class tasks use logits (B, K), K >= 2, with a softmax and
long targets (B,). Every classification loss picks its form from the logits' shape, so a (B, 2)
output is treated as a two-class softmax, not as binary.

Per-class weights always have one entry per class (two for binary: [w_neg, w_pos]).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.utils.class_weight import compute_class_weight
from torch import Tensor, nn

LOSSES = ("bce", "weighted_ce", "focal", "asymmetric", "auc")
LOSS_ALIASES = {"who": "weighted_ce"}  # seed-era names, still accepted
Weights = Sequence[float] | Tensor


def class_weights_from_labels(
    labels: Sequence[int] | np.ndarray | Tensor, num_classes: int, mode: str = "balanced"
) -> Tensor:
    """Per-class weights (num_classes,) from training labels (N,); "balanced" gives
    n_samples / (n_classes * count_c), so every class carries the same total weight."""
    if mode != "balanced":
        raise ValueError(f"unknown class-weight mode {mode!r}; only 'balanced' is supported")
    y = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    classes = np.arange(num_classes)
    if not np.isin(y, classes).all():
        raise ValueError(f"labels must be integers in [0, {num_classes}); got {np.unique(y)[:10]}")
    missing = np.setdiff1d(classes, y)
    if missing.size:
        # An absent class would need an infinite weight; better to fail than to train on nonsense.
        raise ValueError(f"classes {missing.tolist()} have no training labels; cannot balance them")
    weights = compute_class_weight("balanced", classes=classes, y=y.astype(np.int64))
    return torch.as_tensor(weights, dtype=torch.float32)


def _split(logits: Tensor, target: Tensor) -> tuple[bool, Tensor, Tensor]:
    """(is_binary, logits, target): binary logits flattened to (B,) with float targets."""
    if logits.ndim == 1 or (logits.ndim == 2 and logits.shape[1] == 1):
        return True, logits.reshape(-1), target.reshape(-1).to(logits.dtype)
    if logits.ndim == 2:
        return False, logits, target.reshape(-1).long()
    raise ValueError(f"logits must be (B,), (B, 1) or (B, K); got shape {tuple(logits.shape)}")


def _per_sample_ce(binary: bool, logits: Tensor, target: Tensor, smoothing: float = 0.0) -> Tensor:
    """Unreduced BCE-with-logits or cross-entropy, (B,); ``smoothing``: label smoothing."""
    if binary:
        return F.binary_cross_entropy_with_logits(logits, target * (1 - smoothing) + smoothing / 2, reduction="none")
    return F.cross_entropy(logits, target, reduction="none", label_smoothing=smoothing)


def _sample_weights(weight: Tensor, binary: bool, logits: Tensor, target: Tensor) -> Tensor:
    """Each sample's class weight, (B,)."""
    expected = 2 if binary else logits.shape[1]
    if weight.numel() != expected:
        raise ValueError(f"got {weight.numel()} class weights for a {expected}-class task")
    return weight[target.long()]


def _focus(base: Tensor, gamma: float) -> Tensor:
    """base**gamma for focusing weights; base >= 0, same shape."""
    # d/dx x**gamma is infinite at x = 0 for gamma < 1, and 0 * inf poisons the whole batch with
    # NaN when a sample is predicted with certainty; flooring at `tiny` keeps it finite.
    return base.clamp_min(torch.finfo(base.dtype).tiny).pow(gamma)


def _weight_tensor(weight: Weights) -> Tensor:
    return torch.as_tensor(weight, dtype=torch.float32).reshape(-1)


def _check_smoothing(value: float) -> float:
    if not 0 <= value < 1:
        raise ValueError(f"label_smoothing must be in [0, 1), got {value}")
    return value


class CELoss(nn.Module):
    """Unweighted BCE-with-logits (binary) or cross-entropy (multi-class); the "bce" loss."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = _check_smoothing(label_smoothing)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """logits (B,) / (B, 1) / (B, K), target (B,) -> scalar mean loss."""
        return _per_sample_ce(*_split(logits, target), self.label_smoothing).mean()


class WeightedCELoss(nn.Module):
    """Class-weighted BCE / cross-entropy: the "weighted_ce" loss (seed-era name "who").

    Reduced as the weighted mean sum(w_i * l_i) / sum(w_i), which is what F.cross_entropy does with
    ``weight``; binary uses the same reduction so both forms scale alike.
    """

    def __init__(self, weight: Weights, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("weight", _weight_tensor(weight))
        self.label_smoothing = _check_smoothing(label_smoothing)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """logits (B,) / (B, 1) / (B, K), target (B,) -> scalar."""
        binary, logits, target = _split(logits, target)
        w = _sample_weights(self.weight, binary, logits, target).to(logits.dtype)
        return (w * _per_sample_ce(binary, logits, target, self.label_smoothing)).sum() / w.sum()


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017): mean of alpha_t * (1 - p_t)**gamma * CE_t.

    ``alpha`` is optional: per-class weights, or for binary a float a that weights positives a and
    negatives 1 - a as in the paper. Reduced by a plain mean (as the paper and torchvision do).
    gamma = 0 without alpha is exactly BCE / cross-entropy.
    """

    def __init__(self, gamma: float = 2.0, alpha: float | Weights | None = None) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.gamma = gamma
        if isinstance(alpha, float):
            alpha = [1.0 - alpha, alpha]
        self.register_buffer("alpha", None if alpha is None else _weight_tensor(alpha))

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """logits (B,) / (B, 1) / (B, K), target (B,) -> scalar."""
        binary, logits, target = _split(logits, target)
        ce = _per_sample_ce(binary, logits, target)
        # ce = -log p_t, so 1 - p_t = -expm1(-ce), precise even when p_t is close to 1.
        loss = _focus(-torch.expm1(-ce), self.gamma) * ce
        if self.alpha is not None:
            loss = loss * _sample_weights(self.alpha, binary, logits, target).to(loss.dtype)
        return loss.mean()


class AsymmetricLoss(nn.Module):
    """Asymmetric Loss (Ridnik et al. 2021, ASL).

    Binary (sigmoid): -[y (1-p)^gamma_pos log p + (1-y) p_m^gamma_neg log(1-p_m)] with the shifted
    probability p_m = max(p - clip, 0), which discards very easy negatives entirely.
    Multi-class: the authors' single-label variant (ASLSingleLabel): log-softmax, one-hot targets
    smoothed by ``label_smoothing``, the target class weighted (1-p_t)^gamma_pos and every other
    class p_k^gamma_neg. Non-target classes enter only through the smoothed targets, so with
    label_smoothing = 0 this is focal loss with gamma_pos. ``clip`` applies to binary only and
    ``label_smoothing`` to multi-class only, as in the reference implementations.
    """

    def __init__(self, gamma_pos: float = 0.0, gamma_neg: float = 4.0, clip: float = 0.05,
                 label_smoothing: float = 0.1) -> None:
        super().__init__()
        if not 0.0 <= clip < 1.0 or not 0.0 <= label_smoothing < 1.0:
            raise ValueError("clip and label_smoothing must be in [0, 1)")
        self.gamma_pos, self.gamma_neg = gamma_pos, gamma_neg
        self.clip, self.label_smoothing = clip, label_smoothing

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """logits (B,) / (B, 1) / (B, K), target (B,) -> scalar."""
        binary, logits, target = _split(logits, target)
        if binary:
            pos = _focus(torch.sigmoid(-logits), self.gamma_pos) * F.logsigmoid(logits)
            if self.clip > 0:
                p_neg = (torch.sigmoid(logits) - self.clip).clamp_min(0)
                log_not_neg = torch.log1p(-p_neg)  # 1 - p_neg >= clip, so the log is finite
            else:
                p_neg, log_not_neg = torch.sigmoid(logits), F.logsigmoid(-logits)
            neg = _focus(p_neg, self.gamma_neg) * log_not_neg
            return -(target * pos + (1 - target) * neg).mean()
        num_classes = logits.shape[1]
        log_p = F.log_softmax(logits, dim=1)
        p = log_p.exp()
        is_target = F.one_hot(target, num_classes).bool()
        focus = torch.where(is_target, _focus(1 - p, self.gamma_pos), _focus(p, self.gamma_neg))
        smooth = self.label_smoothing
        soft = is_target.to(logits.dtype) * (1 - smooth) + smooth / num_classes
        return -(soft * focus * log_p).sum(dim=1).mean()


class PairwiseAUCLoss(nn.Module):
    """Binary-only AUC surrogate: mean over (pos, neg) pairs of max(0, margin - (s_pos - s_neg))**2
    on the logits. A batch lacking positives or negatives has no pairs and falls back to its BCE,
    so training still gets a finite, non-zero gradient (on a different scale from the hinge)."""

    def __init__(self, margin: float = 1.0) -> None:
        super().__init__()
        self.margin = margin

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """logits (B,) / (B, 1), target (B,) in {0, 1} -> scalar."""
        binary, logits, target = _split(logits, target)
        if not binary:
            raise ValueError("the 'auc' loss is binary-only: it needs one logit per sample, (B,) "
                             f"or (B, 1); got logits of shape {tuple(logits.shape)}")
        positive = target > 0.5
        s_pos, s_neg = logits[positive], logits[~positive]
        if s_pos.numel() == 0 or s_neg.numel() == 0:
            return F.binary_cross_entropy_with_logits(logits, target)
        gap = s_pos[:, None] - s_neg[None, :]  # (P, N)
        return F.relu(self.margin - gap).pow(2).mean()


def _resolve_weights(
    class_weight: Weights | str | None, num_classes: int, labels: Sequence[int] | Tensor | None
) -> Tensor | None:
    if class_weight is None:
        return None
    if isinstance(class_weight, str):
        if labels is None:
            raise ValueError(f"class_weight={class_weight!r} needs the training labels: labels=")
        return class_weights_from_labels(labels, num_classes, class_weight)
    weight = _weight_tensor(class_weight)
    if weight.numel() != num_classes:
        raise ValueError(f"class_weight has {weight.numel()} entries for {num_classes} classes")
    return weight


def build_loss(
    name: str, num_classes: int, class_weight: Weights | str | None = None, *,
    labels: Sequence[int] | np.ndarray | Tensor | None = None, **kwargs: float,
) -> nn.Module:
    """Classification loss by name (one of LOSSES); num_classes=2 means one binary logit.

    class_weight: per-class weights, or "balanced" computed from ``labels`` (the training labels,
    (N,)). "weighted_ce" (alias "who") requires it, "focal" uses it as alpha, the other losses
    reject it rather than silently ignore it. kwargs go to the loss class (gamma, gamma_pos,
    gamma_neg, clip, margin).
    """
    name = LOSS_ALIASES.get(name, name)
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(LOSSES)} "
                         f"(aliases: {', '.join(LOSS_ALIASES)})")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if name == "auc" and num_classes > 2:
        raise ValueError(f"the 'auc' loss is binary-only; got num_classes={num_classes}")
    weight = _resolve_weights(class_weight, num_classes, labels)
    if name == "weighted_ce":
        if weight is None:
            raise ValueError("loss 'weighted_ce' needs class_weight (a list of weights or 'balanced')")
        return WeightedCELoss(weight, **kwargs)
    if name == "focal":
        return FocalLoss(alpha=weight, **kwargs)
    if weight is not None:
        raise ValueError(f"loss {name!r} takes no class_weight; only 'weighted_ce' and 'focal' do")
    return {"bce": CELoss, "asymmetric": AsymmetricLoss, "auc": PairwiseAUCLoss}[name](**kwargs)


def logcosh(x: Tensor) -> Tensor:
    """Elementwise log(cosh(x)), same shape; written as x + softplus(-2x) - log 2 because cosh
    overflows float32 for |x| > ~89 while this form stays finite."""
    return x + F.softplus(-2.0 * x) - math.log(2.0)


def _pairwise_distances(e: Tensor) -> Tensor:
    """Euclidean distances (B, B) between the rows of e (B, D)."""
    sq = e.pow(2).sum(dim=1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * e @ e.T
    # Rounding can push d2 below 0, and sqrt has an infinite gradient at 0 (duplicate embeddings).
    return d2.clamp_min(1e-12).sqrt()


class TripletLoss(nn.Module):
    """Triplet margin loss with in-batch mining on L2-normalised embeddings.

    batch_hard: per anchor, hardest positive vs hardest negative; anchors lacking either are
    skipped and the loss is the mean over the rest. batch_all: mean over all valid (a, p, n)
    triplets whose loss is positive. With no valid anchor/triplet the loss is 0 but still attached
    to the graph, so backward() works. Optional reconstruction term: recon_weight * mse / log-cosh
    between recon_pred and recon_target (ignored when recon="none").

    A learnable margin is softplus(raw) so it stays positive whatever the optimiser does to raw.
    Note the hinge alone always pushes a learnable margin down; it needs a reason to grow.
    """

    def __init__(
        self, margin: float = 0.2, learnable_margin: bool = False,
        mining: Literal["batch_hard", "batch_all"] = "batch_hard",
        recon: Literal["none", "mse", "logcosh"] = "none", recon_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if mining not in ("batch_hard", "batch_all"):
            raise ValueError(f"mining must be 'batch_hard' or 'batch_all', got {mining!r}")
        if recon not in ("none", "mse", "logcosh"):
            raise ValueError(f"recon must be 'none', 'mse' or 'logcosh', got {recon!r}")
        if margin < 0 or (learnable_margin and margin == 0):
            raise ValueError(f"margin must be >= 0 (> 0 when learnable), got {margin}")
        self.mining, self.recon, self.recon_weight = mining, recon, recon_weight
        self.fixed_margin = margin
        # Inverse softplus, log(expm1(m)), makes the initial learnable margin exactly `margin`.
        raw = nn.Parameter(torch.tensor(math.log(math.expm1(margin)))) if learnable_margin else None
        self.register_parameter("raw_margin", raw)

    @property
    def margin(self) -> Tensor | float:
        """The current margin: a scalar tensor when learnable, else the fixed float."""
        return self.fixed_margin if self.raw_margin is None else F.softplus(self.raw_margin)

    def forward(
        self, embeddings: Tensor, labels: Tensor,
        recon_pred: Tensor | None = None, recon_target: Tensor | None = None,
    ) -> Tensor:
        """embeddings (B, D), labels (B,), recon_pred / recon_target (same shape) -> scalar."""
        dist = _pairwise_distances(F.normalize(embeddings, dim=1))
        same = labels[:, None] == labels[None, :]
        eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        pos_mask, neg_mask = same & ~eye, ~same
        if self.mining == "batch_hard":
            # Distances are >= 0, so a filled 0 never beats a real positive, nor inf a negative.
            hardest_pos = dist.masked_fill(~pos_mask, 0.0).amax(dim=1)
            hardest_neg = dist.masked_fill(~neg_mask, math.inf).amin(dim=1)
            valid = pos_mask.any(dim=1) & neg_mask.any(dim=1)
            hinge = F.relu(hardest_pos - hardest_neg + self.margin)[valid]
            loss = hinge.sum() / valid.sum().clamp_min(1)
        else:
            valid = pos_mask[:, :, None] & neg_mask[:, None, :]  # (a, p, n)
            hinge = F.relu(dist[:, :, None] - dist[:, None, :] + self.margin) * valid
            loss = hinge.sum() / (hinge > 0).sum().clamp_min(1)
        if self.recon != "none":
            if recon_pred is None or recon_target is None:
                raise ValueError(f"recon={self.recon!r} needs recon_pred and recon_target")
            diff = recon_pred - recon_target
            term = diff.pow(2).mean() if self.recon == "mse" else logcosh(diff).mean()
            loss = loss + self.recon_weight * term
        return loss
