"""pipeline.evaluation (metrics, exported models, MC dropout) and the evaluate stage's pieces.

Metric values are hand-computed from the confusion matrices written in the comments; the
models are written to tmp_path exactly as the train stage exports them (model.json with a
spec from make_spec, model.safetensors, centroids.safetensors for triplet models).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from pipeline.stages import evaluate
from pipeline.evaluation import classification_metrics, flat_metrics, predictions_table, psnr
from pipeline.models.inference import SIMILARITY_TEMPERATURE, ExportedModel, fastest_batch_size
from pipeline import baseline
from pipeline.contracts import ModelFolder
from pipeline.models.networks import ModelParams, build_network, make_spec

N_MELS, FRAMES = 16, 16  # the smallest input the default CNN pools (8 x 16) accept

# --- classification_metrics ------------------------------------------------------------------

# Binary, classes [bad, good]. P(good) per file; argmax predictions give
#   true bad  (4): 0.1 0.2 0.3 -> bad, 0.6 -> good          (3 right, 1 wrong)
#   true good (6): 0.9 0.8 0.7 0.55 -> good, 0.4 0.35 -> bad (4 right, 2 wrong)
# confusion [[3, 1], [2, 4]]; accuracy 7/10; recall bad 3/4, good 4/6; precision bad 3/5,
# good 4/5; F1 bad 2/3, good 8/11; ROC AUC: 21 of the 24 (good, bad) pairs ordered right.
BINARY_TRUE = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
BINARY_P_GOOD = np.array([0.1, 0.2, 0.3, 0.6, 0.9, 0.8, 0.7, 0.55, 0.4, 0.35])
BINARY_EXPECTED = {
    "accuracy": 0.7,
    "balanced_accuracy": (0.75 + 4 / 6) / 2,  # 0.708333
    "f1_macro": (2 / 3 + 8 / 11) / 2,  # 0.696970
    "f1_weighted": 0.4 * 2 / 3 + 0.6 * 8 / 11,  # 0.703030
    "precision/bad": 0.6,
    "precision/good": 0.8,
    "recall/bad": 0.75,
    "recall/good": 4 / 6,
    "roc_auc": 21 / 24,  # 0.875
}

# Three classes [a, b, c]: predictions [a a a | b b c | c c c a] for truth [a a a | b b b | c c c c]
# confusion [[3, 0, 0], [0, 2, 1], [1, 0, 3]]; accuracy 8/10
# precision a 3/4, b 2/2, c 3/4; recall a 3/3, b 2/3, c 3/4; F1 a 6/7, b 4/5, c 3/4
MULTI_TRUE = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
MULTI_PRED = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 0])
MULTI_EXPECTED = {
    "accuracy": 0.8,
    "balanced_accuracy": (1 + 2 / 3 + 0.75) / 3,  # 0.805556
    "f1_macro": (6 / 7 + 0.8 + 0.75) / 3,  # 0.802381
    "precision/a": 0.75,
    "precision/b": 1.0,
    "precision/c": 0.75,
    "recall/a": 1.0,
    "recall/b": 2 / 3,
    "recall/c": 0.75,
}


def binary_probs() -> np.ndarray:
    return np.stack([1 - BINARY_P_GOOD, BINARY_P_GOOD], axis=1)


def multi_probs() -> np.ndarray:
    probs = np.full((len(MULTI_PRED), 3), 0.2)
    probs[np.arange(len(MULTI_PRED)), MULTI_PRED] = 0.6
    return probs


def test_binary_metrics_match_hand_computed_values() -> None:
    out = classification_metrics(BINARY_TRUE, binary_probs(), ["bad", "good"], n_resamples=100, seed=0)
    for name, expected in BINARY_EXPECTED.items():
        assert out[name]["value"] == pytest.approx(expected, abs=1e-9), name
    assert out["confusion_matrix"] == [[3, 1], [2, 4]]


def test_multiclass_metrics_match_hand_computed_values() -> None:
    out = classification_metrics(MULTI_TRUE, multi_probs(), ["a", "b", "c"], n_resamples=100, seed=0)
    for name, expected in MULTI_EXPECTED.items():
        assert out[name]["value"] == pytest.approx(expected, abs=1e-9), name
    assert out["confusion_matrix"] == [[3, 0, 0], [0, 2, 1], [1, 0, 3]]
    assert 0.5 < out["roc_auc"]["value"] <= 1.0


@pytest.mark.parametrize("case", ["binary", "multiclass"])
def test_bootstrap_intervals_contain_the_point_value(case: str) -> None:
    if case == "binary":
        out = classification_metrics(BINARY_TRUE, binary_probs(), ["bad", "good"], n_resamples=200, seed=1)
    else:
        out = classification_metrics(MULTI_TRUE, multi_probs(), ["a", "b", "c"], n_resamples=200, seed=1)
    scored = {k: v for k, v in out.items() if k != "confusion_matrix"}
    assert "accuracy" in scored and "roc_auc" in scored
    for name, m in scored.items():
        assert set(m) == {"value", "ci_low", "ci_high"}
        assert m["ci_low"] <= m["value"] <= m["ci_high"], name
    assert scored["accuracy"]["ci_low"] < scored["accuracy"]["ci_high"]  # 10 items: a real spread


def test_single_class_truth_has_no_roc_auc() -> None:
    y = np.zeros(4, dtype=int)
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    out = classification_metrics(y, probs, ["bad", "good"], n_resamples=100)
    assert "roc_auc" not in out
    assert out["accuracy"]["value"] == pytest.approx(0.75)
    assert out["confusion_matrix"] == [[3, 1], [0, 0]]


def test_psnr_hand_values() -> None:
    np.testing.assert_allclose(psnr(np.array([0.01, 1.0, 0.1]), peak=1.0), [20.0, 0.0, 10.0])
    np.testing.assert_allclose(psnr(np.array([4.0, 0.04]), peak=2.0), [0.0, 20.0])
    # a perfect reconstruction is capped by the 1e-12 floor instead of dividing by zero
    np.testing.assert_allclose(psnr(np.array([0.0]), peak=1.0), [120.0])


# --- exported models --------------------------------------------------------------------------

def write_model(folder: Path, network: torch.nn.Module, spec: dict, *, classes: list[str], mode: str,
                positive_class: str = "good", centroids: torch.Tensor | None = None) -> Path:
    """A model folder as the train stage exports it."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(folder / "model.safetensors"))
    if centroids is not None:
        save_file({"centroids": centroids.contiguous()}, str(folder / "centroids.safetensors"))
    info = {"spec": spec, "mode": mode, "classes": classes, "binary": len(classes) == 2,
            "positive_class": positive_class, "features": {"n_mels": N_MELS, "frames": FRAMES},
            "fold": "fold_0", "selection": "best fold by val/loss (min)"}
    (folder / "model.json").write_text(json.dumps(info))
    return folder


def cnn_classifier(num_outputs: int, dropout: float = 0.3, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    spec = make_spec(ModelParams(arch="cnn", dropout=dropout), N_MELS, FRAMES, "classifier", num_outputs)
    torch.manual_seed(seed)
    network = build_network(spec)
    return network, spec


def random_features(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, N_MELS, FRAMES)).astype(np.float32)


def test_binary_cnn_round_trip(tmp_path: Path) -> None:
    network, spec = cnn_classifier(num_outputs=1)
    folder = write_model(tmp_path / "model", network, spec, classes=["bad", "good"], mode="classifier")
    features = random_features(7)
    rows = np.array([6, 0, 3, 2])  # any order, not all rows

    model = ExportedModel.load(folder)
    assert model.classes == ["bad", "good"] and model.binary and model.centroids is None
    probs = model.class_probabilities(features, rows, batch_size=3)  # several batches
    assert probs.shape == (4, 2)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    network.eval()
    with torch.no_grad():
        expected = torch.sigmoid(network(torch.from_numpy(features[rows])[:, None])).squeeze(-1).numpy()
    np.testing.assert_allclose(probs[:, 1], expected, atol=1e-6)  # column 1 is the positive class
    assert not model.network.training


def test_multiclass_cnn_round_trip(tmp_path: Path) -> None:
    network, spec = cnn_classifier(num_outputs=3)
    folder = write_model(tmp_path / "model", network, spec, classes=["a", "b", "c"], mode="classifier")
    features = random_features(5)
    model = ExportedModel.load(folder)
    assert not model.binary
    probs = model.class_probabilities(features, np.arange(5))
    network.eval()
    with torch.no_grad():
        expected = network(torch.from_numpy(features)[:, None]).softmax(-1).numpy()
    assert probs.shape == (5, 3)
    np.testing.assert_allclose(probs, expected, atol=1e-6)


def test_exported_cnn_folds_batchnorm_with_trained_statistics(tmp_path: Path) -> None:
    """Loading folds each BatchNorm into its conv; with non-trivial running statistics and
    affine parameters (as after training, unlike a fresh init) the outputs stay the same."""
    network, spec = cnn_classifier(num_outputs=3)
    gen = torch.Generator().manual_seed(5)
    for bn in [m for m in network.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]:
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=gen))
        bn.running_var.copy_(torch.rand(bn.num_features, generator=gen) * 3 + 0.1)
        bn.weight.data.copy_(torch.randn(bn.num_features, generator=gen))
        bn.bias.data.copy_(torch.randn(bn.num_features, generator=gen))
    folder = write_model(tmp_path / "model", network, spec, classes=["a", "b", "c"], mode="classifier")
    features = random_features(6)

    model = ExportedModel.load(folder)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.network.modules())
    convs = [m for m in model.network.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    network.eval()
    with torch.no_grad():
        expected = network(torch.from_numpy(features)[:, None]).softmax(-1).numpy()
    np.testing.assert_allclose(model.class_probabilities(features, np.arange(6), batch_size=4), expected, atol=1e-5)
    with torch.no_grad():  # embeddings (the service's /embed) too
        np.testing.assert_allclose(model.network.embed(torch.from_numpy(features)[:, None]).numpy(),
                                   network.embed(torch.from_numpy(features)[:, None]).numpy(), rtol=1e-4, atol=1e-4)
    as_trained = ExportedModel.load(folder, inference=False).network  # what register logs to MLflow
    assert sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in as_trained.modules()) == 3


def test_triplet_model_classifies_by_nearest_centroid(tmp_path: Path) -> None:
    spec = make_spec(ModelParams(arch="cnn"), N_MELS, FRAMES, "embedder", 1)
    torch.manual_seed(1)
    network = build_network(spec).eval()
    features = random_features(6, seed=3)
    with torch.no_grad():
        emb = torch.nn.functional.normalize(network.embed(torch.from_numpy(features)[:, None]), dim=1)
    cents = emb[[4, 1]]  # class 0 ("bad") centroid = row 4's embedding, class 1 = row 1's
    folder = write_model(tmp_path / "triplet", network, spec, classes=["bad", "good"], mode="triplet",
                         centroids=cents)

    model = ExportedModel.load(folder)
    assert model.centroids is not None and model.centroids.shape == cents.shape
    probs = model.class_probabilities(features, np.arange(6))
    assert probs.shape == (6, 2)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(probs, ((emb @ cents.T) * SIMILARITY_TEMPERATURE).softmax(-1).numpy(), atol=1e-5)
    assert probs[4].argmax() == 0 and probs[1].argmax() == 1  # each centroid's own row

    with pytest.raises(ValueError, match="triplet"):
        model.mc_dropout_probabilities(features, np.arange(6), passes=3)


def test_mc_dropout_samples_vary_with_dropout(tmp_path: Path) -> None:
    network, spec = cnn_classifier(num_outputs=1, dropout=0.5)
    model = ExportedModel.load(write_model(tmp_path / "m", network, spec, classes=["bad", "good"], mode="classifier"))
    features, rows = random_features(4), np.arange(4)
    samples = model.mc_dropout_probabilities(features, rows, passes=5, seed=0)
    assert samples.shape == (5, 4, 2)
    np.testing.assert_allclose(samples.sum(axis=2), 1.0, atol=1e-6)
    assert samples[:, :, 1].std(axis=0).min() > 0, "dropout sampling must change every file's probability"
    np.testing.assert_allclose(samples, model.mc_dropout_probabilities(features, rows, passes=5, seed=0))
    assert not any(m.training for m in model.network.modules()), "the network is left in eval mode"
    # deterministic predictions are unaffected by a preceding MC-dropout call
    np.testing.assert_allclose(model.class_probabilities(features, rows), model.class_probabilities(features, rows))


def test_mc_dropout_without_dropout_is_deterministic(tmp_path: Path) -> None:
    network, spec = cnn_classifier(num_outputs=3, dropout=0.0)
    model = ExportedModel.load(write_model(tmp_path / "m", network, spec, classes=["a", "b", "c"], mode="classifier"))
    features, rows = random_features(3), np.arange(3)
    samples = model.mc_dropout_probabilities(features, rows, passes=3)
    assert samples.shape == (3, 3, 3)
    np.testing.assert_allclose(samples.std(axis=0), 0.0, atol=1e-7)
    np.testing.assert_allclose(samples[0], model.class_probabilities(features, rows), atol=1e-6)


# --- evaluate stage pieces ----------------------------------------------------------------------

def test_predictions_table_columns_and_values() -> None:
    test = pd.DataFrame({"row": [5, 6, 7], "path": ["g0/a.wav", "g0/b.wav", "g1/c.wav"],
                         "label": ["good", "bad", "bad"], "group": ["g0", "g0", "g1"],
                         "split": "test", "fold": -1}, index=[10, 11, 12])
    probs = np.array([[0.2, 0.8], [0.3, 0.7], [0.9, 0.1]])
    table = predictions_table(test, probs, ["bad", "good"], np.array([True, False, True]))
    assert list(table.columns) == ["path", "group", "label", "predicted", "prob_bad", "prob_good", "kept", "correct"]
    assert list(table.index) == [0, 1, 2]
    assert table["predicted"].tolist() == ["good", "good", "bad"]
    assert table["correct"].tolist() == [True, False, True]
    assert table["kept"].tolist() == [True, False, True]
    np.testing.assert_allclose(table["prob_good"], [0.8, 0.7, 0.1])
    base = predictions_table(test, probs[::-1], ["bad", "good"], np.array([True, False, True]), prefix="baseline_")
    assert list(base.columns) == ["baseline_predicted", "baseline_prob_bad", "baseline_prob_good", "baseline_correct"]
    assert base["baseline_correct"].tolist() == [False, False, False]


def test_flat_metrics_names_and_drops_non_finite() -> None:
    metrics = {
        "files": {"accuracy": {"value": 0.5, "ci_low": float("nan"), "ci_high": 0.75},
                  "roc_auc": {"value": float("inf"), "ci_low": 0.1, "ci_high": 0.9},
                  "confusion_matrix": [[1, 0], [1, 0]]},
        "groups": {"accuracy": {"value": 1.0, "ci_low": 1.0, "ci_high": 1.0}},
        "baseline": {"files": {"accuracy": {"value": 0.25, "ci_low": 0.0, "ci_high": 0.5}}},
        "model_minus_baseline": {"files": {"accuracy": 0.25}},
        "mae": {"mae_mse": 0.25, "mae_psnr_db": float("-inf")},
    }
    assert flat_metrics(metrics) == {
        "test/files/accuracy": 0.5, "test/files/accuracy_ci_high": 0.75,
        "test/files/roc_auc_ci_low": 0.1, "test/files/roc_auc_ci_high": 0.9,
        "test/groups/accuracy": 1.0, "test/groups/accuracy_ci_low": 1.0, "test/groups/accuracy_ci_high": 1.0,
        "test/baseline/files/accuracy": 0.25, "test/baseline/files/accuracy_ci_low": 0.0,
        "test/baseline/files/accuracy_ci_high": 0.5, "test/model_minus_baseline/files/accuracy": 0.25,
        "test/mae/mae_mse": 0.25,
    }


# --- the evaluate stage: group vote with an all-filtered group ---------------------------------

def write_features(folder: Path) -> Path:
    """Test split: g0 (good, 3 files), g1 (bad, 3 files), g2 (bad, 3 files); plus 4 train files."""
    folder.mkdir(parents=True)
    groups = ["g0"] * 3 + ["g1"] * 3 + ["g2"] * 3 + ["t0", "t0", "t1", "t1"]
    labels = ["good"] * 3 + ["bad"] * 6 + ["good", "good", "bad", "bad"]
    n = len(groups)
    index = pd.DataFrame({"row": np.arange(n), "path": [f"{g}/{g}_{i}.wav" for i, g in enumerate(groups)],
                          "label": labels, "group": groups, "duration_s": 1.0,
                          "split": ["test"] * 9 + ["train"] * 4, "fold": [-1] * 9 + [0, 0, 1, 1],
                          "energy": np.float32(0.05)})
    index[["file", "segment", "start_s"]] = index[["path"]].assign(segment=0, start_s=0.0)
    index.to_parquet(folder / "index.parquet", index=False)
    np.save(folder / "features.npy", random_features(n, seed=7))
    return folder


def constant_binary_model(folder: Path, logit: float) -> Path:
    """A CNN whose single logit is ``logit`` for every input (last layer: zero weights, bias)."""
    network, spec = cnn_classifier(num_outputs=1)
    with torch.no_grad():
        network.classifier[-1].weight.zero_()
        network.classifier[-1].bias.fill_(logit)
    return write_model(folder, network, spec, classes=["bad", "good"], mode="classifier", positive_class="good")


@pytest.fixture(scope="module")
def tracking_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("evaluate_mlflow")


@pytest.mark.parametrize(("logit", "configured", "expected"), [
    (-20.0, None, "good"),  # every file predicted bad; the fallback is the positive class
    (20.0, "bad", "bad"),  # every file predicted good; the configured class wins
])
def test_all_filtered_group_gets_the_configured_class(tmp_path: Path, tracking_db: Path,
                                                       monkeypatch: pytest.MonkeyPatch, logit: float,
                                                       configured: str | None, expected: str) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tracking_db / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "evaluate-unit")
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.chdir(tracking_db)  # mlflow's ./mlruns artifact folder lands in tmp
    features = write_features(tmp_path / "features")
    model = constant_binary_model(tmp_path / "model", logit)
    index = pd.read_parquet(features / "index.parquet")
    index.loc[index["split"] == "train", ["path", "label"]].to_csv(ModelFolder(model).training_files_path, index=False)
    ignored = tmp_path / "ignored.csv"
    # every file of g2 plus one file of g0; g1 is whole
    dropped = index.loc[index["group"].eq("g2"), "path"].tolist() + [index.loc[0, "path"]]
    pd.DataFrame({"filename": dropped, "reason": "reconstruction"}).to_csv(ignored, index=False)
    reports = tmp_path / "reports"
    out = {"metrics": reports / "evaluate.json", "predictions": reports / "predictions.csv",
           "segments": reports / "segment_predictions.csv", "groups": reports / "group_predictions.csv",
           "plots": reports / "plots",
           "run_id": reports / "evaluate_run.json"}
    params = evaluate.EvaluateParams(all_filtered_class=configured, bootstrap_resamples=100)

    metrics = evaluate.run(features, ignored, model, tmp_path / "no_pretrain", params, out)

    groups = pd.read_csv(out["groups"]).set_index("group")
    assert list(groups.index) == ["g0", "g1", "g2"]  # test groups only
    other = "bad" if logit < 0 else "good"
    assert groups.loc["g2", "predicted"] == expected != other
    assert bool(groups.loc["g2", "all_filtered"]) is True
    assert groups.loc["g2", "n_kept"] == 0 and groups.loc["g2", "n_files"] == 3
    assert groups.loc[["g0", "g1"], "predicted"].tolist() == [other, other]
    assert groups.loc[["g0", "g1"], "all_filtered"].tolist() == [False, False]
    assert groups.loc["g0", "n_kept"] == 2
    assert metrics["counts"] == {"test_files": 9, "kept_files": 5, "groups": 3, "all_filtered_groups": 1}

    predictions = pd.read_csv(out["predictions"])
    assert len(predictions) == 9 and predictions["kept"].sum() == 5
    assert set(predictions["predicted"]) == {other}
    # file metrics use kept files only: 2 good (g0) + 3 bad (g1)
    assert metrics["files"]["confusion_matrix"] == ([[3, 0], [2, 0]] if other == "bad" else [[0, 3], [0, 2]])
    assert json.loads(out["metrics"].read_text())["counts"]["all_filtered_groups"] == 1
    assert json.loads(out["run_id"].read_text())["stage"] == "evaluate"


def test_baseline_is_fitted_on_exactly_the_models_training_files(tmp_path: Path, tracking_db: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tracking_db / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "evaluate-unit")
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.chdir(tracking_db)
    features = write_features(tmp_path / "features")
    model = constant_binary_model(tmp_path / "model", 20.0)
    index = pd.read_parquet(features / "index.parquet")
    trained_on = index[index["split"] == "train"].iloc[[0, 3]]  # one good, one bad: not every train file
    trained_on[["path", "label"]].to_csv(ModelFolder(model).training_files_path, index=False)
    ignored = tmp_path / "ignored.csv"
    pd.DataFrame({"filename": [], "reason": []}).to_csv(ignored, index=False)
    seen = []
    real_fit = baseline.fit
    monkeypatch.setattr(baseline, "fit", lambda f, rows, targets, seed=0: seen.append((rows, targets))
                        or real_fit(f, rows, targets, seed))
    reports = tmp_path / "reports"
    out = {"metrics": reports / "evaluate.json", "predictions": reports / "predictions.csv",
           "segments": reports / "segment_predictions.csv", "groups": reports / "group_predictions.csv",
           "plots": reports / "plots",
           "run_id": reports / "evaluate_run.json"}
    metrics = evaluate.run(features, ignored, model, tmp_path / "no_pretrain", evaluate.EvaluateParams(
        bootstrap_resamples=100), out)

    (rows, targets), = seen
    assert rows.tolist() == trained_on["row"].tolist() and targets.tolist() == [1, 0]  # [bad, good] order
    predictions = pd.read_csv(out["predictions"])
    assert {"baseline_predicted", "baseline_prob_bad", "baseline_prob_good", "baseline_correct"} <= set(predictions)
    assert set(metrics["baseline"]) == {"files", "groups"}
    delta = metrics["model_minus_baseline"]["files"]["accuracy"]
    assert delta == pytest.approx(metrics["files"]["accuracy"]["value"] - metrics["baseline"]["files"]["accuracy"]["value"])
    mcnemar = metrics["model_vs_baseline"]["mcnemar"]
    model_right, base_right = predictions["correct"], predictions["baseline_correct"]
    assert mcnemar["b_only_right"] == int((model_right & ~base_right).sum())
    assert mcnemar["a_only_right"] == int((~model_right & base_right).sum())
    for name in ("baseline_confusion.csv", "baseline_roc.csv", "baseline_pr.csv"):
        assert (reports / "plots" / name).is_file()


def test_fastest_batch_size_picks_the_cheapest_per_clip() -> None:
    seen: list[tuple[int, int]] = []

    def call(waves: np.ndarray) -> None:  # 2 ms per clip, except 1 ms per clip in batches of 4
        seen.append(waves.shape)
        time.sleep(len(waves) * (0.001 if len(waves) == 4 else 0.002))

    assert fastest_batch_size(call, 10, limit=20) == 4
    assert {n for n, _ in seen} == {1, 2, 4, 8, 16} and {s for _, s in seen} == {10}


def test_fastest_batch_size_stops_trying_sizes_when_the_budget_is_spent() -> None:
    tried: list[int] = []
    assert fastest_batch_size(lambda waves: tried.append(len(waves)), 10, limit=32, budget_s=0.0) == 1
    assert set(tried) == {1}
