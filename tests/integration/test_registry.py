"""The register stage against a real ``mlflow server``: champion gate, audit log, provenance tags,
refusals, and a tracking server that is down or dies in the middle of a registration.

Every test registers under a model name of its own, in an experiment of its own, with its
working directory in a tmp git repo (for the git_commit tag); nothing is written to the repo.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from safetensors.torch import save_file

from pipeline import tracking
from pipeline.contracts import FeatureMeta, FeaturesFolder, ModelFolder, ModelInfo
from pipeline.features import FeatureParams
from pipeline.stages import register
from pipeline.models.networks import ModelParams, build_network, make_spec

N_MELS, FRAMES = 16, 16
N_TEST = 20
WORSE_WRONG = set(range(0, N_TEST, 2))  # 10 wrong files: McNemar p = 2 / 2**10 against all-correct


def _load_conftest():
    """The helpers of tests/integration/conftest.py (conftests are not importable by name)."""
    spec = importlib.util.spec_from_file_location("_soundline_integration_conftest",
                                                  Path(__file__).with_name("conftest.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


server_helpers = _load_conftest()


@dataclass(frozen=True)
class Assets:
    root: Path
    work: Path  # a git work tree (cwd of every test)
    commit: str
    features: Path
    model: Path
    better: Path  # predictions.csv: every test file right
    worse: Path  # predictions.csv: WORSE_WRONG wrong
    train: Path  # train.json of a complete run
    partial: Path  # train.json of a partial run
    data_dvc: Path


def _predictions(index: pd.DataFrame, wrong: set[int]) -> pd.DataFrame:
    test = index[index["split"] == "test"].reset_index(drop=True)
    predicted = [("bad" if lab == "good" else "good") if i in wrong else lab for i, lab in enumerate(test["label"])]
    p_good = np.where(np.array(predicted) == "good", 0.9, 0.1)
    # the baseline is as good as the worse model: both tables clear the default baseline gate
    baseline = [("bad" if lab == "good" else "good") if i in WORSE_WRONG else lab for i, lab in enumerate(test["label"])]
    return pd.DataFrame({"path": test["path"], "group": test["group"], "label": test["label"],
                         "predicted": predicted, "prob_bad": 1 - p_good, "prob_good": p_good,
                         "kept": True, "correct": np.array(predicted) == test["label"].to_numpy(),
                         "baseline_predicted": baseline,
                         "baseline_correct": np.array(baseline) == test["label"].to_numpy()})


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Assets:
    root = tmp_path_factory.mktemp("registry")
    work = root / "work"
    work.mkdir()

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=work, check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    git("config", "user.email", "tests@soundline.invalid")
    git("config", "user.name", "soundline tests")
    (work / "README").write_text("registry tests\n")
    git("add", "-A")
    git("commit", "-q", "-m", "init")

    features = root / "features"
    features.mkdir()
    n = N_TEST + 4
    groups = [f"spk{i // 2:02d}" for i in range(N_TEST)] + ["trn0", "trn0", "trn1", "trn1"]
    labels = ["good" if (i // 2) % 2 == 0 else "bad" for i in range(N_TEST)] + ["good", "good", "bad", "bad"]
    index = pd.DataFrame({"row": np.arange(n), "path": [f"{g}/{g}_{i}.wav" for i, g in enumerate(groups)],
                          "label": labels, "group": groups, "duration_s": 1.0,
                          "split": ["test"] * N_TEST + ["train"] * 4, "fold": [-1] * N_TEST + [0, 0, 1, 1],
                          "energy": np.float32(0.05)})
    index[["file", "segment", "start_s"]] = index[["path"]].assign(segment=0, start_s=0.0)
    np.save(features / "features.npy", np.random.default_rng(0).normal(size=(n, N_MELS, FRAMES)).astype(np.float32))
    feature_params = FeatureParams(n_mels=N_MELS, frames=FRAMES)
    FeaturesFolder(features).write(index, FeatureMeta(features=feature_params, label_column="quality",
                                                      shape=(n, N_MELS, FRAMES), classes=["bad", "good"]))

    model = root / "model"
    model.mkdir()
    spec = make_spec(ModelParams(arch="cnn", overrides={"channels": [4, 8, 8], "conv1d_channels": 8, "hidden": 16}),
                     N_MELS, FRAMES, "classifier", 1)
    torch.manual_seed(0)
    network = build_network(spec)
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(model / "model.safetensors"))
    ModelFolder(model).write_info(ModelInfo(
        spec=spec, mode="classifier", classes=["bad", "good"], binary=True, positive_class="good",
        features=feature_params, label_column="quality", fold="fold_0", selection="best fold by val/loss (min)"))

    better, worse = root / "better.csv", root / "worse.csv"
    _predictions(index, set()).to_csv(better, index=False)
    _predictions(index, WORSE_WRONG).to_csv(worse, index=False)
    train, partial = root / "train.json", root / "train_partial.json"
    train.write_text(json.dumps({"folds": 2, "partial": False, "final_fold": "fold_0"}))
    partial.write_text(json.dumps({"folds": 1, "partial": True, "final_fold": "fold_0"}))
    data_dvc = root / "data.dvc"
    data_dvc.write_text("outs:\n- md5: feedfacefeedfacefeedfacefeedface.dir\n  size: 10\n  nfiles: 2\n"
                        "  hash: md5\n  path: data/raw\n")
    return Assets(root, work, git("rev-parse", "HEAD"), features, model, better, worse, train, partial, data_dvc)


@dataclass
class Registrar:
    """Runs ``python -m pipeline.stages.register`` (in process) for one model name."""

    assets: Assets
    name: str
    params: Path
    out: Path

    @property
    def audit_log(self) -> Path:
        return self.out / "registry" / "champion_log.jsonl"

    @property
    def decision(self) -> Path:
        return self.out / "reports" / "register.json"

    def __call__(self, predictions: Path, train: Path | None = None) -> None:
        register.main(["--model", str(self.assets.model), "--predictions", str(predictions),
                       "--train-metrics", str(train or self.assets.train), "--features", str(self.assets.features),
                       "--data-dvc", str(self.assets.data_dvc), "--decision", str(self.decision),
                       "--audit-log", str(self.audit_log), "--params", str(self.params)])

    def records(self) -> list[dict]:
        if not self.audit_log.exists():
            return []
        return [json.loads(line) for line in self.audit_log.read_text().splitlines()]


@pytest.fixture
def registrar(assets: Assets, tmp_path: Path, params_file: Callable[..., Path],
              monkeypatch: pytest.MonkeyPatch) -> Registrar:
    name = f"soundline-reg-{uuid.uuid4().hex[:8]}"
    params = params_file({"register": {"model_name": name, "task_suffix": False, "bootstrap_resamples": 100}})
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", f"registry-{name}")
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.chdir(assets.work)
    return Registrar(assets, name, params, tmp_path / "out")


@pytest.fixture
def server(mlflow_server: str, monkeypatch: pytest.MonkeyPatch) -> MlflowClient:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    return MlflowClient(mlflow_server, registry_uri=mlflow_server)


def test_better_takes_the_alias_and_worse_does_not(server: MlflowClient, registrar: Registrar,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    name, a = registrar.name, registrar.assets
    assert tracking.get_alias_version(name, "champion") is None

    registrar(a.better)
    assert tracking.get_alias_version(name, "champion") == "1"
    assert f"register: {name} v1; @champion moved to v1 (no champion yet)" in capsys.readouterr().out

    registrar(a.worse)
    assert tracking.get_alias_version(name, "champion") == "1"
    printed = capsys.readouterr().out
    assert f"register: {name} v2; @champion stays at v1 (not better enough" in printed

    first, second = registrar.records()
    assert (first["move"], first["challenger_version"], first["champion_version"], first["holder_after"]) == \
        (True, "1", None, "1")
    assert (second["move"], second["challenger_version"], second["champion_version"], second["holder_after"]) == \
        (False, "2", "1", "1")
    assert second["test"] == "mcnemar" and second["discordant"] == [len(WORSE_WRONG), 0]
    assert second["improvement"] == pytest.approx(-0.5)
    assert second["model"] == name and second["alias"] == "champion"
    assert first["time"] <= second["time"]
    assert json.loads(registrar.decision.read_text()) == second  # the declared output: the last decision

    for version in ("1", "2"):
        tags = tracking.model_version_tags(name, version)
        assert tags["git_commit"] == a.commit
        assert tags["data_dvc_md5"] == "feedfacefeedfacefeedfacefeedface.dir"
        assert tags["params_sha256"] == first["params_sha256"] and len(tags["params_sha256"]) == 16
        assert "dvc_experiment" not in tags
    run_id = server.get_model_version(name, "2").run_id
    run = server.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[tracking.TAG_STAGE] == "register"
    assert run.data.tags["data_dvc_md5"] == "feedfacefeedfacefeedfacefeedface.dir"
    artifacts = {f.path for f in server.list_artifacts(run_id)}
    assert {"evaluation", "register", "soundline_model"} <= artifacts
    logged = Path(server.download_artifacts(run_id, "register/decision.json", str(registrar.out)))
    assert json.loads(logged.read_text()) == second


def test_significantly_better_challenger_replaces_the_champion(server: MlflowClient, registrar: Registrar,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DVC_EXP_NAME", "cnn-focal")
    registrar(registrar.assets.worse)
    registrar(registrar.assets.better)
    assert tracking.get_alias_version(registrar.name, "champion") == "2"
    first, second = registrar.records()
    assert first["move"] is True and second["move"] is True
    assert second["champion_version"] == "1" and second["holder_after"] == "2"
    assert second["p_value"] == pytest.approx(2 / 2 ** len(WORSE_WRONG))
    assert second["why"] == "challenger is significantly better"
    assert tracking.model_version_tags(registrar.name, "2")["dvc_experiment"] == "cnn-focal"


def _other_task(assets: Assets, root: Path) -> tuple[Path, Path]:
    """The same network and test files, as trained on features with another front end (top_db)."""
    features, model = root / "features_other", root / "model_other"
    shutil.copytree(assets.features, features)
    shutil.copytree(assets.model, model)
    meta = FeaturesFolder(features).meta()
    other = meta.features.model_copy(update={"top_db": 60.0})
    FeaturesFolder(features).write(FeaturesFolder(features).index(), meta.model_copy(update={"features": other}))
    info = ModelFolder(model).info()
    ModelFolder(model).write_info(info.model_copy(update={"features": other}))
    return features, model


def test_each_task_gets_its_own_registered_model(server: MlflowClient, registrar: Registrar,
                                                 params_file: Callable[..., Path], tmp_path: Path) -> None:
    """Default naming: <model_name>-<label column>-<task id>; another task never meets this champion."""
    params = params_file({"register": {"model_name": registrar.name, "bootstrap_resamples": 100}})
    per_task = Registrar(registrar.assets, registrar.name, params, registrar.out)
    per_task(registrar.assets.worse)
    first = per_task.records()[-1]
    assert first["model"].startswith(f"{registrar.name}-quality-") and first["holder_after"] == "1"
    features, model = _other_task(registrar.assets, tmp_path)
    other = Registrar(replace(registrar.assets, features=features, model=model), registrar.name, params, registrar.out)
    other(registrar.assets.better)
    second = per_task.records()[-1]
    assert second["model"] != first["model"] and second["model"].startswith(f"{registrar.name}-quality-")
    assert (second["challenger_version"], second["why"]) == ("1", "no champion yet")
    assert tracking.get_alias_version(first["model"], "champion") == "1"  # untouched by the other task
    assert tracking.model_version_tags(first["model"], "1")["task_id"] == first["model"].rsplit("-", 1)[1]


def test_a_champion_of_another_task_fails_the_stage_naming_the_setting(
        server: MlflowClient, registrar: Registrar, tmp_path: Path) -> None:
    registrar(registrar.assets.worse)  # task_suffix: false, so both tasks would share the name
    features, model = _other_task(registrar.assets, tmp_path)
    other = Registrar(replace(registrar.assets, features=features, model=model), registrar.name,
                      registrar.params, registrar.out)
    with pytest.raises(SystemExit) as info:
        other(registrar.assets.better)
    message = str(info.value.code)
    assert "trained for another task" in message and "top_db" in message
    assert "register.task_suffix" in message and "register.model_name" in message
    assert tracking.get_alias_version(registrar.name, "champion") == "1"
    assert [v.version for v in server.search_model_versions(f"name='{registrar.name}'")] == ["1"]


def test_a_model_not_trained_on_the_features_is_refused(server: MlflowClient, registrar: Registrar,
                                                        tmp_path: Path) -> None:
    features, _ = _other_task(registrar.assets, tmp_path)
    mismatched = Registrar(replace(registrar.assets, features=features), registrar.name,
                           registrar.params, registrar.out)
    with pytest.raises(SystemExit, match="was not trained on"):
        mismatched(registrar.assets.better)
    assert tracking.get_alias_version(registrar.name, "champion") is None


def test_partial_training_is_refused_and_alias_kept(server: MlflowClient, registrar: Registrar) -> None:
    registrar(registrar.assets.worse)
    assert tracking.get_alias_version(registrar.name, "champion") == "1"
    with pytest.raises(SystemExit) as info:
        registrar(registrar.assets.better, train=registrar.assets.partial)
    message = str(info.value.code)
    assert "training was partial" in message and "refusing to register it" in message
    assert message.endswith("the registry alias was not changed")
    assert tracking.get_alias_version(registrar.name, "champion") == "1"
    assert [v.version for v in server.search_model_versions(f"name='{registrar.name}'")] == ["1"]
    assert len(registrar.records()) == 1


def test_dead_server_fails_fast_and_writes_nothing(registrar: Registrar, free_port: int,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"http://127.0.0.1:{free_port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    start = time.monotonic()
    with pytest.raises(SystemExit) as info:
        registrar(registrar.assets.better)
    assert time.monotonic() - start < 30
    message = str(info.value.code)
    assert message.startswith("register: ")
    assert f"MLflow tracking server at {uri} is unreachable" in message
    assert "the registry alias was not changed" in message
    assert not registrar.audit_log.exists()
    assert not registrar.decision.exists()


# --- the server dies in the middle of a registration ------------------------------------------------

@dataclass
class PrivateServer:
    root: Path
    uri: str = ""
    process: subprocess.Popen | None = None

    def start(self) -> str:
        """Start (or restart) ``mlflow server`` on the same SQLite store and artifact folder."""
        port = server_helpers._free_port()
        self.uri = f"http://127.0.0.1:{port}"
        log = self.root / f"server-{port}.log"
        command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                   "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                   "--serve-artifacts", "--artifacts-destination", str(self.root / "artifacts")]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with log.open("w") as log_file:
            self.process = subprocess.Popen(command, cwd=self.root, env=env, stdout=log_file,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        server_helpers._wait_healthy(self.uri, self.process, log)
        return self.uri

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            server_helpers._stop(self.process)


@pytest.fixture
def private_server(tmp_path: Path) -> Iterator[PrivateServer]:
    server = PrivateServer(tmp_path / "private_mlflow")
    server.root.mkdir()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _kill_server_inside(target_name: str, server: PrivateServer, monkeypatch: pytest.MonkeyPatch) -> list:
    """Wrap ``module.function`` so that the server is stopped right before the call goes out."""
    module, attr = target_name.split(".")
    target = {"tracking": tracking, "register": register}[module]
    original = getattr(target, attr)
    calls: list = []

    def kill_then_call(*args, **kwargs):
        calls.append(args)
        server.stop()
        return original(*args, **kwargs)

    monkeypatch.setattr(target, attr, kill_then_call)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail without backoff sleeps
    return calls


# tracking.register: the server dies before the new version exists; champion_predictions: after
# the version was registered, before the gate could read the champion's predictions.
@pytest.mark.parametrize("dies_in", ["tracking.register", "register.champion_predictions"])
def test_server_dying_mid_register_keeps_the_alias(dies_in: str, private_server: PrivateServer,
                                                   registrar: Registrar,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", private_server.uri)
    registrar(registrar.assets.worse)  # v1 takes the alias; the better challenger would replace it
    assert tracking.get_alias_version(registrar.name, "champion") == "1"

    calls = _kill_server_inside(dies_in, private_server, monkeypatch)
    start = time.monotonic()
    # The stage must fail (SystemExit from main, see the next test for its message; an
    # MlflowException escapes today) and must not record a decision.
    with pytest.raises((SystemExit, MlflowException)) as info:
        registrar(registrar.assets.better)
    assert calls, f"{dies_in} was never reached"
    assert time.monotonic() - start < 60
    if isinstance(info.value, SystemExit):
        assert info.value.code not in (0, None)
    assert len(registrar.records()) == 1 and registrar.records()[0]["challenger_version"] == "1"
    assert not registrar.decision.exists() or json.loads(registrar.decision.read_text())["holder_after"] == "1"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", private_server.start())  # same store, new process
    assert tracking.get_alias_version(registrar.name, "champion") == "1"
    versions = {v.version for v in MlflowClient(private_server.uri).search_model_versions(f"name='{registrar.name}'")}
    assert versions == ({"1"} if dies_in == "tracking.register" else {"1", "2"})


def test_server_dying_mid_register_exits_with_a_message(private_server: PrivateServer, registrar: Registrar,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", private_server.uri)
    registrar(registrar.assets.worse)
    _kill_server_inside("tracking.register", private_server, monkeypatch)
    with pytest.raises(SystemExit) as info:
        registrar(registrar.assets.better)
    message = str(info.value.code)
    assert message.startswith("register: ") and "unreachable" in message
    assert message.endswith("the registry alias was not changed")
