"""pipeline.compare: variants from MLflow, paired Wilcoxon tests, and `make compare` end to end.

(a) Fake evaluate runs (one per DVC experiment) in a SQLite MLflow in tmp_path, each with its
    metrics and a hand-made predictions.csv (classify, and one case of task enhance); (b) `make compare` in a tmp git+DVC copy of the
    repo on the reduced default corpus (queued DVC experiments, slow).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats

from pipeline import compare, tracking
from tests.conftest import REPO
from tests.integration.repo import processes_in, reduced_repo

N_FILES = 24
CLASSES = ["bad", "good"]


# --- (a) compare on hand-made evaluate runs ----------------------------------------------------

def predictions(p_true: np.ndarray, kept: np.ndarray | None = None) -> pd.DataFrame:
    """A predictions.csv as the evaluate stage writes it, with P(true class) = ``p_true``."""
    n = len(p_true)
    label = np.array([CLASSES[i % 2] for i in range(n)])
    p_good = np.where(label == "good", p_true, 1 - p_true)
    predicted = np.where(p_good >= 0.5, "good", "bad")
    return pd.DataFrame({"path": [f"spk{i // 4:02d}/clip_{i:02d}.wav" for i in range(n)],
                         "group": [f"spk{i // 4:02d}" for i in range(n)], "label": label,
                         "predicted": predicted, "prob_bad": 1 - p_good, "prob_good": p_good,
                         "kept": np.ones(n, bool) if kept is None else kept,
                         "correct": predicted == label})


def variant_scores() -> dict[str, np.ndarray]:
    """P(true class) per file: `strong` clearly above `weak`; `weak-twin` = weak with small
    symmetric noise (no real difference)."""
    rng = np.random.default_rng(0)
    weak = rng.uniform(0.35, 0.6, N_FILES)
    strong = np.clip(weak + rng.uniform(0.25, 0.35, N_FILES), 0, 0.99)
    twin = weak + np.where(np.arange(N_FILES) % 2 == 0, 1, -1) * rng.uniform(0.001, 0.01, N_FILES)
    return {"strong": strong, "weak": weak, "weak-twin": twin}


@pytest.fixture(scope="module")
def fake_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, np.ndarray]]:
    """Four evaluate runs (an old one of `weak`, then strong, weak, weak-twin), logged once."""
    tmp_path = tmp_path_factory.mktemp("compare_mlflow")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
        mp.setenv("MLFLOW_EXPERIMENT_NAME", "compare-tests")
        mp.delenv("DVC_EXP_NAME", raising=False)
        mp.chdir(tmp_path)  # ./mlruns artifacts land in tmp
        yield log_fake_runs(tmp_path)


def log_fake_runs(tmp_path: Path) -> dict[str, np.ndarray]:
    scores = variant_scores()
    kept = np.ones(N_FILES, bool)
    kept[[3, 17]] = False  # filtered files are not compared
    # an older run of `weak` that looks like `strong`: only the newest run of an experiment counts
    runs = [("weak", scores["strong"]), *scores.items()]
    for i, (name, p_true) in enumerate(runs):
        table = predictions(p_true, kept)
        folder = tmp_path / "logged" / f"{i}-{name}"
        folder.mkdir(parents=True)
        table.to_csv(folder / "predictions.csv", index=False)
        acc = float(table.loc[table["kept"], "correct"].mean())
        with tracking.stage_run("evaluate", {"seed": 0}, tags={tracking.TAG_DVC_EXPERIMENT: name}) as run:
            metrics = {}
            for level in ("files", "groups"):
                for metric in ("accuracy", "balanced_accuracy", "f1_macro"):
                    metrics[f"test/{level}/{metric}"] = acc
                    metrics[f"test/{level}/{metric}_ci_low"] = acc - 0.1
                    metrics[f"test/{level}/{metric}_ci_high"] = min(1.0, acc + 0.1)
            metrics["test/files/roc_auc"] = acc  # evaluate logs no roc_auc for groups (hard votes)
            run.log_metrics(metrics)
            run.log_artifact(folder / "predictions.csv")
        time.sleep(0.01)  # distinct start times
    return scores


def test_compare_writes_tables_and_bonferroni_pairs(fake_runs: dict[str, np.ndarray], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "compare"
    compare.main(["--experiments", "strong", "weak", "weak-twin", "--out", str(out)])
    for name in ("compare.md", "variants.csv", "pairs.csv", "compare.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    variants = pd.read_csv(out / "variants.csv")
    assert sorted(variants["variant"]) == ["strong", "weak", "weak-twin"]
    assert {"accuracy", "accuracy_ci_low", "accuracy_ci_high", "balanced_accuracy", "f1_macro"} <= set(variants)

    pairs = pd.read_csv(out / "pairs.csv")
    assert len(pairs) == 3
    assert list(zip(pairs["a"], pairs["b"])) == [("strong", "weak"), ("strong", "weak-twin"), ("weak", "weak-twin")]
    np.testing.assert_allclose(pairs["p_bonferroni"], np.minimum(1.0, 3 * pairs["p_value"]))
    assert (pairs["n"] == N_FILES - 2).all()  # the two filtered files are left out

    keep = np.ones(N_FILES, bool)
    keep[[3, 17]] = False
    s = fake_runs
    by_pair = pairs.set_index(["a", "b"])
    expected = stats.wilcoxon(s["weak"][keep], s["strong"][keep]).pvalue  # differences b - a
    assert by_pair.loc[("strong", "weak"), "p_value"] == pytest.approx(expected)
    assert by_pair.loc[("strong", "weak"), "mean_diff"] == pytest.approx((s["weak"] - s["strong"])[keep].mean())
    assert by_pair.loc[("strong", "weak"), "mean_diff"] < -0.2
    assert bool(by_pair.loc[("strong", "weak"), "significant"]) is True
    assert bool(by_pair.loc[("strong", "weak-twin"), "significant"]) is True
    assert bool(by_pair.loc[("weak", "weak-twin"), "significant"]) is False
    assert by_pair.loc[("weak", "weak-twin"), "p_bonferroni"] == pytest.approx(
        min(1.0, 3 * stats.wilcoxon(s["weak-twin"][keep], s["weak"][keep]).pvalue))

    markdown = (out / "compare.md").read_text()
    assert "Paired Wilcoxon signed-rank, Bonferroni-corrected (3 pairs)" in markdown
    assert "run_id" not in markdown
    printed = capsys.readouterr().out
    for name in ("strong", "weak", "weak-twin"):
        assert name in printed


def test_seeds_pool_per_file_scores_and_show_the_seed_spread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two variants x two seeds (experiments <variant>-s<seed>): pairs matched by (seed, file)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "compare-seeds")
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(1)
    weak = {s: rng.uniform(0.35, 0.6, N_FILES) for s in range(2)}
    strong = {s: np.clip(weak[s] + 0.2 + 0.1 * s, 0, 0.99) for s in range(2)}  # seed 1 gains more
    accuracy = {"weak": [0.5, 0.6], "strong": [0.8, 0.9]}
    for variant, per_seed in (("weak", weak), ("strong", strong)):
        for seed, p_true in per_seed.items():
            folder = tmp_path / f"{variant}-s{seed}"
            folder.mkdir()
            predictions(p_true).to_csv(folder / "predictions.csv", index=False)
            with tracking.stage_run("evaluate", {}, tags={tracking.TAG_DVC_EXPERIMENT: f"{variant}-s{seed}"}) as run:
                run.log_metrics({"test/files/accuracy": accuracy[variant][seed]})
                run.log_artifact(folder / "predictions.csv")
    out = tmp_path / "compared"
    compare.main(["--experiments", "strong", "weak", "--seeds", "2", "--metrics", "accuracy", "--out", str(out)])
    variants = pd.read_csv(out / "variants.csv").set_index("variant")
    assert variants.loc["strong", "seeds"] == 2 and variants.loc["strong", "accuracy"] == pytest.approx(0.85)
    assert variants.loc["strong", "accuracy_seed_sd"] == pytest.approx(np.std([0.8, 0.9], ddof=1))
    pairs = pd.read_csv(out / "pairs.csv")
    assert pairs.loc[0, "n"] == 2 * N_FILES  # one pair per (seed, file)
    logged = {f"{v}-s{s}": compare.true_class_scores(pd.read_csv(tmp_path / f"{v}-s{s}" / "predictions.csv"), "files")
              for v in ("weak", "strong") for s in range(2)}
    pooled = {v: np.concatenate([logged[f"{v}-s{s}"].to_numpy() for s in range(2)]) for v in ("weak", "strong")}
    assert pairs.loc[0, "mean_diff"] == pytest.approx((pooled["weak"] - pooled["strong"]).mean())  # b - a
    assert pairs.loc[0, "p_value"] == pytest.approx(stats.wilcoxon(pooled["weak"], pooled["strong"]).pvalue)
    per_seed = [(logged[f"weak-s{s}"] - logged[f"strong-s{s}"]).mean() for s in range(2)]
    assert pairs.loc[0, "seed_sd"] == pytest.approx(np.std(per_seed, ddof=1))
    assert "mean ± sd over 2 seeds" in (out / "compare.md").read_text()


def test_compare_by_group_uses_group_means(fake_runs: dict[str, np.ndarray], tmp_path: Path) -> None:
    compare.main(["--experiments", "strong", "weak", "--level", "groups", "--out", str(tmp_path / "g")])
    pairs = pd.read_csv(tmp_path / "g" / "pairs.csv")
    assert len(pairs) == 1 and pairs.loc[0, "n"] == N_FILES // 4  # one score per speaker


def test_all_variants_by_default(fake_runs: dict[str, np.ndarray], tmp_path: Path) -> None:
    compare.main(["--out", str(tmp_path / "all")])
    assert sorted(pd.read_csv(tmp_path / "all" / "variants.csv")["variant"]) == ["strong", "weak", "weak-twin"]


def test_unknown_experiment_is_named(fake_runs: dict[str, np.ndarray], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        compare.main(["--experiments", "strong", "no-such-exp", "--out", str(tmp_path / "x")])
    message = str(info.value.code)
    assert message.startswith("compare: ") and "no-such-exp" in message and "strong" not in message
    assert not (tmp_path / "x").exists()


def test_one_variant_is_not_enough(fake_runs: dict[str, np.ndarray], tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="need at least 2 variants"):
        compare.main(["--experiments", "weak", "--out", str(tmp_path / "x")])


def test_metric_missing_from_the_runs_is_reported(fake_runs: dict[str, np.ndarray], tmp_path: Path) -> None:
    out = tmp_path / "missing"
    try:
        compare.main(["--experiments", "strong", "weak", "--level", "groups", "--metrics", "roc_auc",
                      "--out", str(out)])
    except SystemExit as err:
        assert "roc_auc" in str(err.code)
    else:
        assert (out / "variants.csv").is_file()


def test_artifacts_outlive_the_stage_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # what `make compare` does on a fresh MLflow database: the absolute sqlite URI the Makefile
    # exports, the first stage run inside a temporary workspace that is removed afterwards
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "fresh")
    workspace = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmp1234"
    workspace.mkdir(parents=True)
    monkeypatch.chdir(workspace)
    predictions(variant_scores()["weak"]).to_csv(workspace / "predictions.csv", index=False)
    with tracking.stage_run("evaluate", {}, tags={tracking.TAG_DVC_EXPERIMENT: "cnn"}) as run:
        run.log_artifact(workspace / "predictions.csv")
    monkeypatch.chdir(tmp_path / "repo")
    shutil.rmtree(workspace)
    path = tracking.download_artifact(run.run_id, "predictions.csv", tmp_path / "download")
    assert len(pd.read_csv(path)) == N_FILES


def test_enhance_runs_are_downloaded_and_compared_with_the_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Task enhance: three evaluate runs with per-utterance predictions.csv, and one classify run in
    the same MLflow experiment, which compare leaves out when no experiment is named."""
    from tests.unit.test_compare_enhance import enhance_predictions, variant_gains

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "compare-enhance")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("task: enhance\n")  # the task compare reads without --task
    gains = variant_gains()
    logged = [("cnn", predictions(variant_scores()["weak"]), {"test/files/accuracy": 0.7}),
              *((name, enhance_predictions(g), {"si_snr": 8.0, "si_snr_i": float(g.mean())}) for name, g in gains.items())]
    for name, table, metrics in logged:
        (tmp_path / name).mkdir()
        table.to_csv(tmp_path / name / "predictions.csv", index=False)
        with tracking.stage_run("evaluate", {}, tags={tracking.TAG_DVC_EXPERIMENT: name}) as run:
            run.log_metrics(metrics)
            run.log_artifact(tmp_path / name / "predictions.csv")

    out = tmp_path / "compared"
    compare.main(["--out", str(out)])
    for name in ("compare.md", "variants.csv", "pairs.csv", "compare.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    variants = pd.read_csv(out / "variants.csv")
    assert sorted(variants["variant"]) == ["spectral_gating", "unet", "unet-twin", "wide"]
    pairs = pd.read_csv(out / "pairs.csv").set_index(["metric", "a", "b"])
    assert len(pairs) == 6 * 3
    assert pairs.loc[("si_snr_i", "unet", "wide"), "p_value"] == pytest.approx(
        stats.wilcoxon(gains["wide"], gains["unet"]).pvalue)
    assert bool(pairs.loc[("pesq", "unet", "wide"), "significant"]) is True
    assert bool(pairs.loc[("pesq", "unet", "unet-twin"), "significant"]) is False
    printed = capsys.readouterr().out
    assert "Bonferroni-corrected over 18 tests (6 pairs x 3 metrics)" in printed and "spectral_gating" in printed

    with pytest.raises(SystemExit, match="experiment 'cnn': predictions.csv lacks column"):
        compare.main(["--task", "enhance", "--experiments", "unet", "cnn", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="is it a task enhance run"):
        compare.main(["--task", "classify", "--experiments", "cnn", "unet", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


# --- (b) `make compare` on the reduced default corpus --------------------------------------------

VARIANTS = ["cnn", "cnn-focal", "mae-scratch", "mae-pretrained"]
PIPELINE_STAGES = ["validate_raw", "featurize", "validate_features", "pretrain", "filter", "train",
                   "evaluate", "register"]  # later stages (packaging) are not needed to compare
REDUCED_PARAMS = yaml.safe_load((REPO / "tests" / "reduced_params.yaml").read_text())
MAKE_TIMEOUT_S = 1500


@pytest.mark.slow
def test_make_compare_on_the_reduced_corpus(tmp_path: Path, repo_root: Path, corpus_dir: Path,
                                           child_env: dict[str, str], params_writer,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    env = {k: v for k, v in child_env.items() if k not in ("MLFLOW_EXPERIMENT_NAME", "DVC_EXP_NAME")}
    repo = reduced_repo(tmp_path / "repo", corpus_dir, env, params_writer, REDUCED_PARAMS, PIPELINE_STAGES)
    uri = f"sqlite:///{repo / 'mlflow.db'}"  # what the Makefile exports by default, made explicit
    env.update(MLFLOW_TRACKING_URI=uri, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")

    monkeypatch.chdir(tmp_path)  # out of the repo: leftover processes in it are killed below

    start = time.monotonic()
    try:
        # -o install: never (re)install into the shared venv
        proc = subprocess.run(["make", "-o", "install", "compare"], cwd=repo, env=env,
                              capture_output=True, text=True, timeout=MAKE_TIMEOUT_S)
    finally:
        subprocess.run(["dvc", "queue", "stop"], cwd=repo, env=env, capture_output=True, timeout=120)
        deadline = time.monotonic() + 30
        while processes_in(repo) and time.monotonic() < deadline:
            time.sleep(1)
        for pid in processes_in(repo):  # a queue worker that did not stop
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    elapsed = time.monotonic() - start
    out = proc.stdout
    assert proc.returncode == 0, f"make compare exited {proc.returncode} after {elapsed:.0f} s\n" \
                                 f"{out[-6000:]}\n{proc.stderr[-6000:]}"
    for name in VARIANTS:
        assert f"Reproducing experiment '{name}'" in out + proc.stderr
    table = out[out.index("## Variants"):out.index("## Paired Wilcoxon")]
    rows = {line.split("|")[1].strip() for line in table.splitlines() if line.startswith("|")}
    assert set(VARIANTS) <= rows, table
    assert "Bonferroni-corrected (6 pairs)" in out

    compared = repo / "reports" / "compare"
    pairs = pd.read_csv(compared / "pairs.csv")
    assert len(pairs) == 6
    assert {tuple(p) for p in pairs[["a", "b"]].to_numpy()} == {
        (a, b) for i, a in enumerate(sorted(VARIANTS)) for b in sorted(VARIANTS)[i + 1:]}
    np.testing.assert_allclose(pairs["p_bonferroni"], np.minimum(1.0, 6 * pairs["p_value"]))
    assert (pairs["n"] > 0).all()
    variants = pd.read_csv(compared / "variants.csv")
    assert sorted(variants["variant"]) == sorted(VARIANTS)
    assert variants["accuracy"].between(0, 1).all()
    assert (compared / "compare.png").is_file() and (compared / "compare.md").is_file()
    print(f"make compare: {elapsed:.0f} s")
