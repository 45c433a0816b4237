"""The training stages end to end: pretrain -> filter -> train on a tiny synthetic features folder.

Tracking goes to a SQLite file in tmp_path (and, in one test, to a real ``mlflow server``);
every stage runs with its working directory in tmp_path, so the repo tree is never written.
The resume test runs ``python -m pipeline.stages.train`` as a subprocess and SIGKILLs it mid-fold.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow import MlflowClient
from safetensors.torch import load_file

from pipeline.stages import filter as filter_stage
from pipeline import tracking
from pipeline.stages import evaluate, pretrain, train
from pipeline.models.networks import ModelParams
from pipeline.training.data import LabelCoder
from pipeline.models.inference import pretrained_weights
from pipeline.models.networks import backbone_of, build_network, make_spec

from tests.conftest import SYNTH_CLASSES as CLASSES
from tests.conftest import SYNTH_FRAMES as FRAMES
from tests.conftest import SYNTH_N_MELS as N_MELS
from tests.conftest import write_params, write_synthetic_features

EXPERIMENT = "soundline-training-tests"
RECON_COLUMNS = ["filename", "file", "reconstruction_loss", "signal_energy"]

# Small and quick: 3 epochs, batches of 8, tiny MAE patches for 32 x 32 inputs, no progress bars.
STAGE_PARAMS: dict[str, Any] = {
    "pretrain": {"model": {"patch_size": 8},
                 "trainer": {"max_epochs": 3, "batch_size": 8, "progress_bar": False, "patience": 10}},
    "train": {"model": {"patch_size": 8},
              "trainer": {"max_epochs": 3, "batch_size": 8, "progress_bar": False, "patience": 10}},
}


# --- helpers ------------------------------------------------------------------------------

def write_stage_params(dest: Path, *updates: Mapping[str, Any]) -> Path:
    """The repo's params.yaml (read only) with the small-run settings and ``updates`` merged in."""
    return write_params(dest, STAGE_PARAMS, *updates)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Paths:
    root: Path

    def __getattr__(self, name: str) -> Path:
        layout = {"features": "features", "pretrain_work": "work/pretrain", "pretrain_model": "models/pretrain",
                  "recon": "reports/pretrain", "pretrain_metrics": "reports/pretrain.json",
                  "pretrain_run": "reports/pretrain_run.json", "ignored": "ignored.csv",
                  "filter_metrics": "reports/filter.json", "train_work": "work/train", "model": "models/train",
                  "curves": "reports/train_curves.csv", "train_metrics": "reports/train.json",
                  "train_run": "reports/train_run.json", "params": "params.yaml", "db": "mlflow.db"}
        if name not in layout:
            raise AttributeError(name)
        return self.root / layout[name]

    @property
    def uri(self) -> str:
        return f"sqlite:///{self.db}"


def pretrain_args(p: Paths, params: Path | None = None) -> list[str]:
    return ["--features", str(p.features), "--work", str(p.pretrain_work), "--model", str(p.pretrain_model),
            "--recon", str(p.recon), "--metrics", str(p.pretrain_metrics), "--run-id", str(p.pretrain_run),
            "--params", str(params or p.params)]


def filter_args(p: Paths) -> list[str]:
    return ["--recon", str(p.recon), "--out", str(p.ignored), "--metrics", str(p.filter_metrics),
            "--params", str(p.params)]


def train_args(p: Paths, params: Path | None = None) -> list[str]:
    return ["--features", str(p.features), "--ignored", str(p.ignored), "--pretrained", str(p.pretrain_model),
            "--work", str(p.train_work), "--model", str(p.model), "--curves", str(p.curves),
            "--metrics", str(p.train_metrics), "--run-id", str(p.train_run), "--params", str(params or p.params)]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def local_tracking(mp: pytest.MonkeyPatch, p: Paths) -> None:
    """Tracking into a SQLite file of ``p`` with the stages' working directory in ``p.root``."""
    mp.setenv("MLFLOW_TRACKING_URI", p.uri)
    mp.setenv("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
    mp.delenv("DVC_EXP_NAME", raising=False)
    mp.chdir(p.root)  # relative paths the libraries choose (./mlruns artifacts) land in tmp


def empty_ignored(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"filename": pd.Series([], dtype=str)}).to_csv(path, index=False)
    return path


# --- the three stages, once per module ------------------------------------------------------

@pytest.fixture(scope="module")
def stages(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Paths]:
    """pretrain -> filter -> train through their ``main`` with a tmp params.yaml and SQLite MLflow."""
    p = Paths(tmp_path_factory.mktemp("stages"))
    write_synthetic_features(p.features)
    write_stage_params(p.params)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        local_tracking(mp, p)
        pretrain.main(pretrain_args(p))
        filter_stage.main(filter_args(p))
        train.main(train_args(p))
        yield p
    torch.set_num_threads(threads)


def client_for(p: Paths) -> MlflowClient:
    return MlflowClient(p.uri)


def artifact_paths(client: MlflowClient, run_id: str, folder: str | None = None) -> set[str]:
    return {a.path for a in client.list_artifacts(run_id, folder)}


def test_pretrain_outputs(stages: Paths) -> None:
    p = stages
    for name in ("mae.safetensors", "mae.json", "model_summary.txt", "config_used.yaml"):
        assert (p.pretrain_model / name).is_file(), name
    spec = json.loads((p.pretrain_model / "mae.json").read_text())["spec"]
    assert spec["arch"] == "mae" and spec["kwargs"]["patch_size"] == 8
    build_network(spec).load_state_dict(load_file(str(p.pretrain_model / "mae.safetensors")))  # strict
    used = yaml.safe_load((p.pretrain_model / "config_used.yaml").read_text())
    assert used["trainer"]["max_epochs"] == 3 and used["train_classes"] == ["good"]
    assert "Params" in (p.pretrain_model / "model_summary.txt").read_text()

    index = pd.read_parquet(p.features / "index.parquet")
    parts = {name: pd.read_csv(p.recon / f"{name}_recon.csv") for name in ("train", "val", "test")}
    for name, part in parts.items():
        assert list(part.columns) == RECON_COLUMNS, name
        assert np.isfinite(part[["reconstruction_loss", "signal_energy"]].to_numpy()).all()
    # Every clip is scored exactly once: train = good clips of folds != val_fold.
    everything = pd.concat(parts.values())
    assert sorted(everything["filename"]) == sorted(index["path"])
    good_train = index[(index["split"] == "train") & (index["label"] == "good") & (index["fold"] != 0)]
    assert set(parts["train"]["filename"]) == set(good_train["path"])
    assert set(parts["test"]["filename"]) == set(index.loc[index["split"] == "test", "path"])

    summary = json.loads((p.recon / "recon_summary.json").read_text())
    assert set(summary) == {"train", "val", "test"}
    for name, stats in summary.items():
        for column in ("reconstruction_loss", "signal_energy"):
            s = stats[column]
            assert {"mean", "std", "bins", "counts"} <= set(s)
            assert len(s["bins"]) == len(s["counts"]) + 1 == 21  # histogram_bins: 20
            assert sum(s["counts"]) == len(parts[name])
            assert s["mean"] == pytest.approx(parts[name][column].mean(), rel=1e-5)

    metrics = json.loads(p.pretrain_metrics.read_text())
    assert metrics["epochs"] == 3 and np.isfinite(metrics["val_loss"])
    assert metrics["train_files"] == len(parts["train"])


def test_filter_outputs(stages: Paths) -> None:
    ignored = pd.read_csv(stages.ignored)
    assert {"filename", "reason", "reconstruction_loss", "signal_energy"} <= set(ignored.columns)
    # Energy mode percentile(lower=0.01) drops at least the quietest file.
    assert len(ignored) >= 1 and ignored["reason"].str.contains("signal_energy").any()
    summary = json.loads(stages.filter_metrics.read_text())
    assert summary["judged"] == 48 and summary["ignored"] == summary["ignored_rows"] == len(ignored)
    assert summary["level"] == "segment"


def test_train_outputs(stages: Paths) -> None:
    p = stages
    for name in ("model.safetensors", "model.json", "config_used.yaml", "model_summary.txt"):
        assert (p.model / name).is_file(), name
    model = json.loads((p.model / "model.json").read_text())
    assert model["classes"] == ["bad", "good"] and model["binary"] and model["mode"] == "classifier"
    network = build_network(model["spec"])
    network.load_state_dict(load_file(str(p.model / "model.safetensors")))  # strict: the spec fits
    assert sha256(p.model / "model.safetensors") == sha256(p.train_work / model["fold"] / "model.safetensors")
    assert yaml.safe_load((p.model / "config_used.yaml").read_text())["trainer"]["max_epochs"] == 3

    metrics = json.loads(p.train_metrics.read_text())
    assert metrics["folds"] == 3 and metrics["skipped_folds"] == 0 and metrics["resumed_folds"] == 0
    for name in ("val/loss", "val/acc", "val/auroc", "val/f1"):
        assert np.isfinite(metrics[f"cv/{name}_mean"]) and metrics[f"cv/{name}_std"] >= 0
    assert metrics["final_fold"] == min(metrics["per_fold"], key=lambda f: metrics["per_fold"][f]["val/loss"])

    curves = pd.read_csv(p.curves)
    assert {"fold", "epoch", "train/loss", "val/loss"} <= set(curves.columns)
    assert sorted(curves.groupby("fold")["epoch"].apply(list).to_dict().items()) == [
        (f"fold_{k}", [0, 1, 2]) for k in range(3)]

    # Filtered files were left out of training and validation.
    ignored = set(pd.read_csv(p.ignored)["filename"])
    index = pd.read_parquet(p.features / "index.parquet")
    pool = index[(index["split"] == "train") & ~index["path"].isin(ignored)]
    run = json.loads(p.train_run.read_text())
    children = child_runs(client_for(p), run)
    for child in children:
        fold = int(child.data.params["fold"])
        assert int(child.data.params["val_files"]) == (pool["fold"] == fold).sum()
        assert int(child.data.params["train_files"]) == (pool["fold"] != fold).sum()


def child_runs(client: MlflowClient, run: dict) -> list:
    return client.search_runs([run["experiment_id"]], f"tags.mlflow.parentRunId = '{run['run_id']}'")


def test_train_mlflow_run(stages: Paths) -> None:
    client = client_for(stages)
    record = tracking.read_run_id(stages.train_run)
    assert record["tracking_uri"] == stages.uri and record["stage"] == "train"
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED"
    written = yaml.safe_load(stages.params.read_text())["train"]  # the run records what it read
    assert run.data.params["trainer.lr"] == str(written["trainer"]["lr"])
    assert run.data.params["model.arch"] == written["model"]["arch"]
    assert run.data.params["specaugment.freq_mask_param"] == str(written["specaugment"]["freq_mask_param"])
    assert run.data.tags[tracking.TAG_STAGE] == "train"
    assert "cv/val/loss_mean" in run.data.metrics

    children = child_runs(client, record)
    assert sorted(c.info.run_name for c in children) == ["fold_0", "fold_1", "fold_2"]
    for child in children:
        history = client.get_metric_history(child.info.run_id, "val/loss")
        assert len(history) > 1, child.info.run_name  # one point per epoch
        assert len(client.get_metric_history(child.info.run_id, "train/loss")) >= 3
        assert "best/val/loss" in child.data.metrics

    assert {"config_used.yaml", "model_summary.txt", "model.json"} <= artifact_paths(client, run.info.run_id)
    assert "plots/learning_curves.png" in artifact_paths(client, run.info.run_id, "plots")


def test_pretrain_mlflow_run(stages: Paths) -> None:
    client = client_for(stages)
    record = tracking.read_run_id(stages.pretrain_run)
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags[tracking.TAG_STAGE] == "pretrain"
    assert run.data.params["model.patch_size"] == "8" and run.data.params["trainer.max_epochs"] == "3"
    assert len(client.get_metric_history(run.info.run_id, "val/loss")) > 1
    assert "recon/train_mean" in run.data.metrics
    root = artifact_paths(client, run.info.run_id)
    assert {"config_used.yaml", "model_summary.txt", "recon_summary.json"} <= root
    plots = artifact_paths(client, run.info.run_id, "plots")
    assert {"plots/mae_reconstruction.png", "plots/learning_curves.png"} <= plots


def test_init_from_pretrain_loads_the_encoder(stages: Paths) -> None:
    coder = LabelCoder(CLASSES, "good")
    p = train.TrainParams(model=ModelParams(arch="mae", patch_size=8, mask_ratio=0.5), init_from_pretrain=True)
    spec = make_spec(p.model, N_MELS, FRAMES, "classifier", coder.num_outputs)
    weights = pretrained_weights(stages.pretrain_model, spec)  # mask_ratio may differ
    index = pd.read_parquet(stages.features / "index.parquet")
    module = train.make_module(p, spec, coder, index[index["split"] == "train"], weights)
    loaded = backbone_of(module.network).state_dict()
    for key, value in load_file(str(weights)).items():
        assert torch.equal(loaded[key], value), key
    other = make_spec(ModelParams(arch="mae", patch_size=16), N_MELS, FRAMES, "classifier", 1)
    with pytest.raises(ValueError, match="does not match the pretrained MAE"):
        pretrained_weights(stages.pretrain_model, other)


# --- a real MLflow server --------------------------------------------------------------------

def test_train_against_mlflow_server(request: pytest.FixtureRequest, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        server = request.getfixturevalue("mlflow_server")  # from tests/integration/conftest.py
    except pytest.FixtureLookupError:
        pytest.skip("tests/integration/conftest.py provides no mlflow_server fixture")
    p = Paths(tmp_path)
    write_synthetic_features(p.features)
    empty_ignored(p.ignored)
    write_stage_params(p.params, {"train": {"folds": [0], "trainer": {"max_epochs": 2}}})
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    experiment = f"training-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", experiment)
    train.main(train_args(p))
    record = tracking.read_run_id(p.train_run)
    assert record["tracking_uri"] == server
    client = MlflowClient(server)
    run = client.get_run(record["run_id"])
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == experiment
    children = child_runs(client, record)
    assert [c.info.run_name for c in children] == ["fold_0"]
    assert len(client.get_metric_history(children[0].info.run_id, "val/loss")) > 1
    assert "plots/learning_curves.png" in artifact_paths(client, run.info.run_id, "plots")
    assert not (tmp_path / "mlruns").exists()  # artifacts went to the server, not a local store


# --- crash-safe resume ------------------------------------------------------------------------

RESUME_TIMEOUT_S = 240


def _child_env(p: Paths) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(MLFLOW_TRACKING_URI=p.uri, MLFLOW_EXPERIMENT_NAME=EXPERIMENT, OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    env.pop("DVC_EXP_NAME", None)
    return env


def _rows(csv: Path) -> int:
    """Data rows of a CSV that another process may be appending to."""
    return max(0, len(csv.read_text().splitlines()) - 1) if csv.exists() else 0


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def _run_to_completion(cmd: list[str], p: Paths, log: Path) -> subprocess.CompletedProcess:
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=p.root, env=_child_env(p), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            proc.wait(timeout=RESUME_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            pytest.fail(f"{' '.join(cmd)} did not finish in {RESUME_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode)


@pytest.mark.slow
def test_killed_train_stage_resumes(tmp_path: Path) -> None:
    p = Paths(tmp_path)
    write_synthetic_features(p.features)
    empty_ignored(p.ignored)
    # Long enough that fold_1 is mid-training when we kill; patience so high it never stops early.
    write_stage_params(p.params, {"train": {"folds": [0, 1],
                                            "trainer": {"max_epochs": 30, "patience": 100, "save_top_k": 1}}})
    cmd = [sys.executable, "-m", "pipeline.stages.train", *train_args(p)]
    fold0, fold1 = p.train_work / "fold_0", p.train_work / "fold_1"
    log = tmp_path / "first.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=p.root, env=_child_env(p), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + RESUME_TIMEOUT_S
            while not ((fold0 / "result.json").exists() and (fold1 / "checkpoints" / "last.ckpt").exists()
                       and _rows(fold1 / "history.csv") >= 2):
                if proc.poll() is not None:
                    pytest.fail(f"train exited ({proc.returncode}) before fold_1 checkpointed:\n"
                                f"{log.read_text()[-3000:]}")
                if time.monotonic() > deadline:
                    pytest.fail(f"fold_1 did not checkpoint within {RESUME_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
                time.sleep(0.05)
            os.kill(proc.pid, signal.SIGKILL)  # no chance to clean up, as in a power cut
            proc.wait(timeout=30)
        finally:
            _kill_group(proc)
    assert proc.returncode == -signal.SIGKILL
    assert not (fold1 / "result.json").exists(), "fold_1 finished before the kill; raise max_epochs"
    assert not p.train_metrics.exists()

    result0 = fold0 / "result.json"
    before = {"mtime": result0.stat().st_mtime_ns, "content": result0.read_text(),
              "sha": sha256(fold0 / "model.safetensors")}
    epochs_before_kill = _rows(fold1 / "history.csv")

    second = _run_to_completion(cmd, p, tmp_path / "second.log")
    assert second.returncode == 0, (tmp_path / "second.log").read_text()[-3000:]

    # fold_0 was complete: skipped, not touched.
    assert result0.stat().st_mtime_ns == before["mtime"]
    assert result0.read_text() == before["content"]
    assert sha256(fold0 / "model.safetensors") == before["sha"]
    # fold_1 picked up from its last checkpoint and ran to max_epochs.
    result1 = json.loads((fold1 / "result.json").read_text())
    assert result1["resumed"] is True
    assert result1["epochs"] == 30
    rows = len(pd.read_csv(fold1 / "history.csv"))
    epochs = set(train.read_history(fold1 / "history.csv")["epoch"])
    # No restart from epoch 0: at most the killed epoch is run twice. (A kill between the
    # checkpoint save and the history append of one epoch can lose that epoch's row.)
    assert rows <= 30 + 1 and rows < epochs_before_kill + 30
    assert max(epochs) == 29 and len(epochs) >= 29
    metrics = json.loads(p.train_metrics.read_text())
    assert metrics["resumed_folds"] >= 1 and metrics["skipped_folds"] >= 1 and metrics["folds"] == 2
    assert all((p.train_work / f"fold_{k}" / "result.json").exists() for k in (0, 1))
    # Every epoch reseeds with seed + epoch: the resumed fold is the fold an uninterrupted run trains.
    fresh = Paths(tmp_path / "uninterrupted")
    shutil.copytree(p.features, fresh.features)
    empty_ignored(fresh.ignored)
    shutil.copy2(p.params, fresh.params)
    assert _run_to_completion([sys.executable, "-m", "pipeline.stages.train", *train_args(fresh)], fresh,
                              tmp_path / "fresh.log").returncode == 0
    assert sha256(fresh.train_work / "fold_1" / "model.safetensors") == sha256(fold1 / "model.safetensors")

    # A changed param changes the fingerprint: the rerun starts over and wipes the old folds.
    key = (p.train_work / "fingerprint.txt").read_text()
    changed = write_stage_params(tmp_path / "params_changed.yaml",
                                 {"train": {"folds": [0, 1], "trainer": {"max_epochs": 2, "save_top_k": 1}}})
    with pytest.MonkeyPatch.context() as mp:  # in-process: spares a third interpreter start
        local_tracking(mp, p)
        train.main(train_args(p, changed))
    assert (p.train_work / "fingerprint.txt").read_text() != key
    metrics = json.loads(p.train_metrics.read_text())
    assert metrics["skipped_folds"] == 0 and metrics["resumed_folds"] == 0
    for k in (0, 1):
        assert json.loads((p.train_work / f"fold_{k}" / "result.json").read_text())["epochs"] == 2
        assert len(pd.read_csv(p.train_work / f"fold_{k}" / "history.csv")) == 2  # old rows gone
    assert result0.read_text() != before["content"]


def test_changed_fold_assignment_invalidates_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = Paths(tmp_path)
    write_synthetic_features(p.features)
    empty_ignored(p.ignored)
    write_stage_params(p.params, {"train": {"folds": [0], "trainer": {"max_epochs": 1}}})
    local_tracking(monkeypatch, p)
    train.main(train_args(p))
    first = json.loads(p.train_metrics.read_text())
    assert first["skipped_folds"] == 0
    # Same clips, same meta.json, another group k-fold: fold 0 now holds other rows.
    before = pd.read_parquet(p.features / "index.parquet")
    meta = (p.features / "meta.json").read_text()
    write_synthetic_features(p.features, split_seed=1)
    after = pd.read_parquet(p.features / "index.parquet")
    assert (p.features / "meta.json").read_text() == meta
    assert set(before.loc[before["fold"] == 0, "path"]) != set(after.loc[after["fold"] == 0, "path"])
    train.main(train_args(p))
    assert json.loads(p.train_metrics.read_text())["skipped_folds"] == 0


# --- errors name what is wrong ----------------------------------------------------------------

def test_init_from_pretrain_with_cnn_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = Paths(tmp_path)
    write_synthetic_features(p.features)
    empty_ignored(p.ignored)
    params = write_stage_params(p.params, {"train": {"init_from_pretrain": True, "model": {"arch": "cnn"}}})
    local_tracking(monkeypatch, p)
    with pytest.raises(SystemExit) as exit_info:
        train.main(train_args(p, params))
    message = str(exit_info.value.code)
    assert message.startswith("train: ") and "train.init_from_pretrain" in message and "mae" in message
    assert not p.train_work.exists() and not p.db.exists()  # refused before any work or run


@pytest.mark.parametrize("folds", [None, []], ids=["cv-then-refit", "refit-only"])
def test_refit_trains_the_final_model_on_every_training_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            folds: list | None) -> None:
    p = Paths(tmp_path)
    write_synthetic_features(p.features)
    index = pd.read_parquet(p.features / "index.parquet")
    dropped = index.loc[index["split"] == "train", "path"].iloc[:2].tolist()
    pd.DataFrame({"filename": dropped}).to_csv(p.ignored, index=False)
    params = write_stage_params(p.params, {"train": {"final": "refit", "folds": folds}})
    local_tracking(monkeypatch, p)
    train.main(train_args(p, params))
    info = json.loads((p.model / "model.json").read_text())
    assert info["fold"] == "refit" and info["selection"].startswith("refit on every training row")
    trained_on = pd.read_csv(p.model / "training_files.csv")["path"]
    expected = index.loc[(index["split"] == "train") & ~index["path"].isin(dropped), "path"]
    assert sorted(trained_on) == sorted(expected)  # every fold's rows, none held out for validation
    assert sha256(p.model / "model.safetensors") == sha256(p.train_work / "refit" / "model.safetensors")
    metrics = json.loads(p.train_metrics.read_text())
    assert metrics["final_fold"] == "refit" and metrics["partial"] is False
    assert metrics["folds"] == (0 if folds == [] else 3)
    curves = pd.read_csv(p.curves)
    assert curves.loc[curves["fold"] == "refit", "epoch"].tolist() == [0, 1, 2]


def test_unknown_loss_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = Paths(tmp_path)
    write_synthetic_features(p.features)
    empty_ignored(p.ignored)
    params = write_stage_params(p.params, {"train": {"loss": "hinge"}})
    local_tracking(monkeypatch, p)
    with pytest.raises(SystemExit) as exit_info:
        train.main(train_args(p, params))
    message = str(exit_info.value.code)
    assert message.startswith("train: ") and "hinge" in message
    for name in ("who", "focal", "asymmetric", "auc", "bce"):
        assert name in message
    assert not p.model.exists() and not p.train_metrics.exists()


def test_pretrain_unknown_train_class_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = Paths(tmp_path)
    write_synthetic_features(p.features)
    params = write_stage_params(p.params, {"pretrain": {"train_classes": ["good", "ugly"]}})
    local_tracking(monkeypatch, p)
    with pytest.raises(SystemExit) as exit_info:
        pretrain.main(pretrain_args(p, params))
    message = str(exit_info.value.code)
    assert message.startswith("pretrain: ") and "ugly" in message and "train_classes" in message
    assert "good" not in message.split("not among")[0]  # only the unknown class is blamed
    assert not p.pretrain_model.exists() and not p.recon.exists()


# --- the multi-process (DDP) path: 2 CPU processes over gloo --------------------------------------

DDP = {"accelerator": "cpu", "devices": 2, "strategy": "ddp"}


def test_ddp_train_matches_one_process_evaluates_and_resumes_after_a_kill(tmp_path: Path) -> None:
    """trainer.strategy: ddp on 2 CPU processes: the exported model loads and evaluates like a
    one-process run's (same global batch), and a run killed mid-fold resumes from its checkpoint."""
    p = Paths(tmp_path)
    write_synthetic_features(p.features)
    empty_ignored(p.ignored)
    one = {"train": {"folds": [0], "trainer": {"max_epochs": 12, "batch_size": 16, "patience": 100,
                                               "progress_bar": False}}}
    single = write_stage_params(tmp_path / "single.yaml", one)
    ddp = write_stage_params(tmp_path / "ddp.yaml", one, {"train": {"trainer": {**DDP, "batch_size": 8}}})
    args = lambda params, name: ["--features", str(p.features), "--ignored", str(p.ignored),  # noqa: E731
                                 "--pretrained", "none", "--work", str(tmp_path / f"{name}_work"),
                                 "--model", str(tmp_path / f"{name}_model"), "--curves", str(tmp_path / f"{name}.csv"),
                                 "--metrics", str(tmp_path / f"{name}.json"), "--run-id", str(tmp_path / f"{name}_run.json"),
                                 "--params", str(params)]
    assert _run_to_completion([sys.executable, "-m", "pipeline.stages.train", *args(single, "one")], p,
                              tmp_path / "one.log").returncode == 0, (tmp_path / "one.log").read_text()[-3000:]

    cmd = [sys.executable, "-m", "pipeline.stages.train", *args(ddp, "ddp")]
    fold = tmp_path / "ddp_work" / "fold_0"
    log = tmp_path / "ddp_first.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=p.root, env=_child_env(p), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + RESUME_TIMEOUT_S
            while not ((fold / "checkpoints" / "last.ckpt").exists() and _rows(fold / "history.csv") >= 2):
                assert proc.poll() is None, f"ddp train exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.05)
        finally:
            _kill_group(proc)  # both processes, no chance to clean up
    assert "distributed_backend=gloo" in log.read_text() and "Starting with 2 processes" in log.read_text()
    assert not (fold / "result.json").exists()
    second = _run_to_completion(cmd, p, tmp_path / "ddp_second.log")
    assert second.returncode == 0, (tmp_path / "ddp_second.log").read_text()[-3000:]
    result = json.loads((fold / "result.json").read_text())
    assert result["resumed"] is True and result["epochs"] == 12
    assert (tmp_path / "ddp_model" / "model.safetensors").is_file()  # written once, by the main process

    ones, ddps = (json.loads((tmp_path / f"{n}.json").read_text())["per_fold"]["fold_0"] for n in ("one", "ddp"))
    assert abs(ones["val/acc"] - ddps["val/acc"]) <= 0.2 and abs(ones["val/loss"] - ddps["val/loss"]) <= 0.3
    scores = {}
    for name in ("one", "ddp"):
        out = {k: tmp_path / f"{name}_{k}.csv" for k in ("predictions", "segments", "groups")}
        out.update(metrics=tmp_path / f"{name}_eval.json", plots=tmp_path / f"{name}_plots",
                   run_id=tmp_path / f"{name}_eval_run.json")
        with pytest.MonkeyPatch.context() as mp:
            local_tracking(mp, p)
            scores[name] = evaluate.run(p.features, p.ignored, tmp_path / f"{name}_model", tmp_path / "none",
                                        evaluate.EvaluateParams(bootstrap_resamples=100), out)
    assert abs(scores["one"]["files"]["accuracy"]["value"] - scores["ddp"]["files"]["accuracy"]["value"]) <= 0.2
