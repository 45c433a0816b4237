"""Loss values against hand-written formulas (plain math, not the code under test)."""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.training.losses import (
    LOSSES,
    AsymmetricLoss,
    CELoss,
    FocalLoss,
    PairwiseAUCLoss,
    TripletLoss,
    WeightedCELoss,
    build_loss,
    class_weights_from_labels,
    logcosh,
)

BIN_LOGITS = [0.5, -1.0, 2.0, 0.3]
BIN_TARGET = [1, 0, 0, 1]
MC_LOGITS = [[1.0, 2.0, 0.0], [0.5, 0.5, 3.0], [-1.0, 0.0, 1.0]]
MC_TARGET = [1, 2, 0]


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def softmax(row: list[float]) -> list[float]:
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def bce_terms() -> list[float]:
    return [-math.log(sigmoid(x)) if y else -math.log(1 - sigmoid(x))
            for x, y in zip(BIN_LOGITS, BIN_TARGET)]


def ce_terms() -> list[float]:
    return [-math.log(softmax(row)[t]) for row, t in zip(MC_LOGITS, MC_TARGET)]


def binary() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(BIN_LOGITS), torch.tensor(BIN_TARGET)


def multiclass() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(MC_LOGITS), torch.tensor(MC_TARGET)


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def test_bce_binary_and_multiclass():
    logits, target = binary()
    assert CELoss()(logits, target).item() == pytest.approx(mean(bce_terms()), rel=1e-5)
    # (B, 1) logits and float targets are the same binary task.
    assert CELoss()(logits[:, None], target.float()).item() == pytest.approx(mean(bce_terms()),
                                                                             rel=1e-5)
    assert CELoss()(*multiclass()).item() == pytest.approx(mean(ce_terms()), rel=1e-5)


def test_balanced_weights_match_formula():
    labels = [0, 0, 0, 1, 1, 2]
    # n_samples / (n_classes * count_c)
    expected = [6 / (3 * 3), 6 / (3 * 2), 6 / (3 * 1)]
    assert class_weights_from_labels(labels, 3).tolist() == pytest.approx(expected)
    with pytest.raises(ValueError, match="no training labels"):
        class_weights_from_labels([0, 0, 1], 3)
    with pytest.raises(ValueError, match="integers in"):
        class_weights_from_labels([0, 5], 3)


def test_who_balanced_is_manual_weighted_mean():
    train_labels = [0, 0, 0, 1]
    w = [4 / (2 * 3), 4 / (2 * 1)]
    loss = build_loss("who", 2, "balanced", labels=train_labels)
    sample_w = [w[y] for y in BIN_TARGET]
    expected = sum(a * b for a, b in zip(sample_w, bce_terms())) / sum(sample_w)
    assert loss(*binary()).item() == pytest.approx(expected, rel=1e-5)

    w_mc = [0.5, 2.0, 1.0]
    sample_w = [w_mc[t] for t in MC_TARGET]
    expected = sum(a * b for a, b in zip(sample_w, ce_terms())) / sum(sample_w)
    assert WeightedCELoss(w_mc)(*multiclass()).item() == pytest.approx(expected, rel=1e-5)


def test_focal_values():
    gamma = 2.0
    expected = []
    for x, y in zip(BIN_LOGITS, BIN_TARGET):
        p_t = sigmoid(x) if y else 1 - sigmoid(x)
        expected.append(-((1 - p_t) ** gamma) * math.log(p_t))
    assert FocalLoss(gamma)(*binary()).item() == pytest.approx(mean(expected), rel=1e-5)

    alpha = 0.25  # positives weighted 0.25, negatives 0.75
    weighted = [(alpha if y else 1 - alpha) * e for e, y in zip(expected, BIN_TARGET)]
    assert FocalLoss(gamma, alpha)(*binary()).item() == pytest.approx(mean(weighted), rel=1e-5)

    expected = []
    for row, t in zip(MC_LOGITS, MC_TARGET):
        p_t = softmax(row)[t]
        expected.append(-((1 - p_t) ** gamma) * math.log(p_t))
    assert FocalLoss(gamma)(*multiclass()).item() == pytest.approx(mean(expected), rel=1e-5)


def test_focal_gamma_zero_is_ce():
    assert FocalLoss(0.0)(*binary()).item() == pytest.approx(mean(bce_terms()), rel=1e-5)
    assert FocalLoss(0.0)(*multiclass()).item() == pytest.approx(mean(ce_terms()), rel=1e-5)


def test_asymmetric_binary():
    gp, gn, clip = 1.0, 4.0, 0.05
    expected = []
    for x, y in zip(BIN_LOGITS, BIN_TARGET):
        p = sigmoid(x)
        if y:
            expected.append(-((1 - p) ** gp) * math.log(p))
        else:
            p_m = max(p - clip, 0.0)
            expected.append(-(p_m ** gn) * math.log(1 - p_m))
    loss = AsymmetricLoss(gamma_pos=gp, gamma_neg=gn, clip=clip)
    assert loss(*binary()).item() == pytest.approx(mean(expected), rel=1e-5)


def test_asymmetric_binary_discards_easy_negatives():
    # p = sigmoid(-5) < clip, so the shifted probability and the loss are exactly 0.
    loss = AsymmetricLoss(clip=0.05)(torch.tensor([-5.0]), torch.tensor([0]))
    assert loss.item() == 0.0


def test_asymmetric_multiclass():
    gp, gn, eps = 1.0, 4.0, 0.1
    expected = []
    for row, t in zip(MC_LOGITS, MC_TARGET):
        probs, k = softmax(row), len(row)
        total = 0.0
        for c, p in enumerate(probs):
            soft = (1 - eps) + eps / k if c == t else eps / k
            focus = (1 - p) ** gp if c == t else p ** gn
            total -= soft * focus * math.log(p)
        expected.append(total)
    loss = AsymmetricLoss(gamma_pos=gp, gamma_neg=gn, label_smoothing=eps)
    assert loss(*multiclass()).item() == pytest.approx(mean(expected), rel=1e-5)


def test_auc_value():
    # positives 2.0, 0.5; negatives 0.0, 1.0; margin 1.
    logits, target = torch.tensor([2.0, 0.0, 0.5, 1.0]), torch.tensor([1, 0, 1, 0])
    pairs = [(2.0, 0.0), (2.0, 1.0), (0.5, 0.0), (0.5, 1.0)]
    expected = mean([max(0.0, 1.0 - (sp - sn)) ** 2 for sp, sn in pairs])
    assert expected == pytest.approx(0.625)
    assert PairwiseAUCLoss()(logits, target).item() == pytest.approx(expected)


def test_auc_zero_when_positives_outscore_by_margin():
    logits, target = torch.tensor([3.0, 0.0, 4.0, 1.0]), torch.tensor([1, 0, 1, 0])
    assert PairwiseAUCLoss()(logits, target).item() == 0.0


def test_auc_falls_back_to_bce_without_pairs():
    logits = torch.tensor([0.5, -1.0], requires_grad=True)
    loss = PairwiseAUCLoss()(logits, torch.tensor([1.0, 1.0]))
    expected = mean([-math.log(sigmoid(0.5)), -math.log(sigmoid(-1.0))])
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert logits.grad.abs().sum() > 0


def test_auc_rejects_multiclass():
    with pytest.raises(ValueError, match="binary-only"):
        PairwiseAUCLoss()(*multiclass())
    with pytest.raises(ValueError, match="binary-only"):
        build_loss("auc", 3)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("scale", [1.0, 50.0])
def test_gradients_finite(name: str, scale: float):
    weights = {2: [1.0, 3.0], 3: [1.0, 2.0, 0.5]}
    cases = [(2, binary())] + ([] if name == "auc" else [(3, multiclass())])
    for num_classes, (logits, target) in cases:
        class_weight = weights[num_classes] if name == "weighted_ce" else None
        logits = (logits * scale).requires_grad_()
        loss = build_loss(name, num_classes, class_weight)(logits, target)
        loss.backward()
        assert torch.isfinite(loss)
        assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("loss", [
    FocalLoss(0.0), FocalLoss(0.5), AsymmetricLoss(gamma_pos=0.0, clip=0.0),
    AsymmetricLoss(gamma_pos=0.5, gamma_neg=0.5, clip=0.0), AsymmetricLoss(gamma_neg=0.5),
])
def test_small_exponents_have_finite_gradients_at_certainty(loss: torch.nn.Module):
    # Logits of +-200 make p_t exactly 1 in float32, where x**gamma has an infinite slope at 0.
    for logits, target in [(torch.tensor([200.0, -200.0, -1.0]), torch.tensor([1, 0, 0])),
                           (torch.tensor([[200.0, -200.0, 0.0]]), torch.tensor([0]))]:
        logits.requires_grad_()
        loss(logits, target).backward()
        assert torch.isfinite(logits.grad).all()


def test_build_loss_errors():
    with pytest.raises(ValueError, match=r"valid names: bce, weighted_ce, focal, asymmetric, auc \(aliases: who\)"):
        build_loss("hinge", 2)
    with pytest.raises(ValueError, match="needs class_weight"):
        build_loss("who", 2)
    with pytest.raises(ValueError, match="needs the training labels"):
        build_loss("who", 2, "balanced")
    with pytest.raises(ValueError, match="takes no class_weight"):
        build_loss("bce", 2, [1.0, 2.0])
    with pytest.raises(ValueError, match="2 entries for 3 classes"):
        build_loss("who", 3, [1.0, 2.0])


def test_seed_era_name_who_is_weighted_ce():
    weight = [1.0, 3.0]
    logits, target = binary()
    assert torch.equal(build_loss("who", 2, weight)(logits, target),
                       build_loss("weighted_ce", 2, weight)(logits, target))


def test_build_loss_focal_uses_class_weight_as_alpha():
    loss = build_loss("focal", 2, [0.75, 0.25], gamma=0.0)
    sample_w = [0.25 if y else 0.75 for y in BIN_TARGET]
    expected = mean([w * t for w, t in zip(sample_w, bce_terms())])
    assert loss(*binary()).item() == pytest.approx(expected, rel=1e-5)


def _unit(angle_deg: float, scale: float) -> list[float]:
    a = math.radians(angle_deg)
    return [scale * math.cos(a), scale * math.sin(a)]


def test_triplet_batch_hard_value():
    angles, labels = [0.0, 90.0, 45.0, 180.0], [0, 0, 1, 1]
    scales = [1.0, 3.0, 0.5, 2.0]  # the loss normalises, so scale must not matter
    units = [_unit(a, 1.0) for a in angles]
    margin, per_anchor = 0.2, []
    for i in range(4):
        pos = [math.dist(units[i], units[j]) for j in range(4) if j != i and labels[j] == labels[i]]
        neg = [math.dist(units[i], units[j]) for j in range(4) if labels[j] != labels[i]]
        per_anchor.append(max(0.0, max(pos) - min(neg) + margin))
    emb = torch.tensor([_unit(a, s) for a, s in zip(angles, scales)])
    loss = TripletLoss(margin=margin)(emb, torch.tensor(labels))
    assert loss.item() == pytest.approx(mean(per_anchor), abs=1e-5)
    # chords 2 sin(d/2): anchors lose 0.8488, 0.8488, 1.2824, 0.6336
    assert loss.item() == pytest.approx(0.9034, abs=1e-4)


def test_triplet_batch_all_value():
    angles, labels = [0.0, 60.0, 150.0, 200.0], [0, 0, 1, 1]
    units = [_unit(a, 1.0) for a in angles]
    margin, losses = 1.5, []
    for a in range(4):
        for p in range(4):
            for n in range(4):
                if p != a and labels[p] == labels[a] and labels[n] != labels[a]:
                    value = math.dist(units[a], units[p]) - math.dist(units[a], units[n]) + margin
                    losses.append(max(0.0, value))
    positive = [v for v in losses if v > 0]
    loss = TripletLoss(margin=margin, mining="batch_all")(torch.tensor(units), torch.tensor(labels))
    assert loss.item() == pytest.approx(mean(positive), abs=1e-5)


def test_learnable_margin():
    loss_fn = TripletLoss(margin=0.3, learnable_margin=True)
    assert loss_fn.raw_margin.requires_grad
    assert loss_fn.margin.item() == pytest.approx(0.3, rel=1e-6)
    assert [p for p in loss_fn.parameters()] == [loss_fn.raw_margin]
    emb = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    loss_fn(emb, torch.tensor([0, 1, 0, 1])).backward()  # hard labels: the hinge is active
    assert loss_fn.raw_margin.grad is not None and loss_fn.raw_margin.grad != 0
    assert list(TripletLoss().parameters()) == []


def test_logcosh():
    x = torch.linspace(-3, 3, 25, dtype=torch.float64)
    assert torch.allclose(logcosh(x), torch.log(torch.cosh(x)))
    big = torch.tensor([-1000.0, 1000.0], requires_grad=True)
    out = logcosh(big)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(big.grad).all()
    assert out.tolist() == pytest.approx([1000 - math.log(2)] * 2)


@pytest.mark.parametrize("mining", ["batch_hard", "batch_all"])
def test_triplet_without_valid_triplets_is_zero_with_grad(mining: str):
    emb = torch.randn(3, 4, requires_grad=True)
    loss = TripletLoss(mining=mining)(emb, torch.tensor([0, 1, 2]))  # no positives at all
    assert loss.item() == 0.0
    loss.backward()
    assert emb.grad is not None and torch.isfinite(emb.grad).all()


@pytest.mark.parametrize("mining", ["batch_hard", "batch_all"])
def test_triplet_gradients_finite_with_duplicates(mining: str):
    emb = torch.tensor([[1.0, 2.0], [1.0, 2.0], [-1.0, 0.5], [3.0, -1.0]], requires_grad=True)
    TripletLoss(mining=mining, margin=0.5)(emb, torch.tensor([0, 0, 1, 1])).backward()
    assert torch.isfinite(emb.grad).all()


@pytest.mark.parametrize("recon", ["mse", "logcosh"])
def test_triplet_reconstruction_term(recon: str):
    emb, labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])
    pred, target = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([0.0, 0.0, 0.0])
    diffs = [0.5, -1.0, 2.0]
    if recon == "mse":
        term = mean([d * d for d in diffs])
    else:
        term = mean([math.log(math.cosh(d)) for d in diffs])
    loss = TripletLoss(recon=recon, recon_weight=0.5)(emb, labels, pred, target)
    assert loss.item() == pytest.approx(0.5 * term, rel=1e-5)  # triplet part is 0: no positives
    with pytest.raises(ValueError, match="needs recon_pred"):
        TripletLoss(recon=recon)(emb, labels)


def test_label_smoothing_matches_torch_and_smooths_binary_targets():
    logits, target = multiclass()
    log_p = torch.log_softmax(logits, dim=1)  # smoothed target: 0.9 on the label, 0.1 spread evenly
    expected = -(0.9 * log_p[torch.arange(len(target)), target] + 0.1 * log_p.mean(dim=1)).mean()
    torch.testing.assert_close(build_loss("bce", 3, label_smoothing=0.1)(logits, target), expected)
    torch.testing.assert_close(build_loss("weighted_ce", 3, [1.0, 1.0, 1.0], label_smoothing=0.1)(logits, target),
                               expected)
    blogits, btarget = binary()
    y, z = btarget.float() * 0.8 + 0.1, blogits.reshape(-1)  # targets pulled 0.1 towards 0.5
    smoothed = -(y * torch.nn.functional.logsigmoid(z) + (1 - y) * torch.nn.functional.logsigmoid(-z)).mean()
    torch.testing.assert_close(build_loss("bce", 2, label_smoothing=0.2)(blogits, btarget), smoothed)
    with pytest.raises(ValueError, match="label_smoothing"):
        build_loss("bce", 2, label_smoothing=1.0)
