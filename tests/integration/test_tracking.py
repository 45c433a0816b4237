"""pipeline.tracking against a real ``mlflow server`` (and the local SQLite default)."""
from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from mlflow import MlflowClient
from pydantic import BaseModel

from pipeline import tracking


class TrainParams(BaseModel):
    lr: float = 1e-3
    layers: list[int] = [32, 64]
    data: Path = Path("data/features")


@pytest.fixture
def server(mlflow_server: str, monkeypatch: pytest.MonkeyPatch) -> MlflowClient:
    """Point tracking at the shared server, in an experiment of this test's own."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", f"test-{uuid.uuid4().hex[:8]}")
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    return MlflowClient(mlflow_server, registry_uri=mlflow_server)


@pytest.fixture
def dead_uri(free_port: int, monkeypatch: pytest.MonkeyPatch) -> str:
    """A tracking URI on a port nothing listens on."""
    uri = f"http://127.0.0.1:{free_port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def test_flatten_nests_dots_lists_json_and_none_null() -> None:
    nested = {"a": {"b": 1, "c": {"d": True}}, "l": [1, "x"], "n": None, "p": Path("q")}
    flat = tracking.flatten(nested)
    assert flat == {"a.b": 1, "a.c.d": True, "l": '[1, "x"]', "n": "null", "p": "q"}
    assert tracking.flatten({"a": {"b": 1}}, prefix="cfg", sep="/") == {"cfg/a/b": 1}


def test_uri_defaults_and_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    assert tracking.tracking_uri() == tracking.DEFAULT_URI == "sqlite:///mlflow.db"
    assert tracking.experiment_name() == "soundline"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "other")
    assert tracking.tracking_uri() == "http://tracking:5000"
    assert tracking.experiment_name() == "other"


def test_stage_run_logs_params_tags_metrics_artifacts_and_children(
    server: MlflowClient, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DVC_EXP_NAME", "exp-fuzzy-cat")
    params = {
        "model": {"width": 64, "dropout": None, "kernels": [3, 5]},
        "long": "x" * 10_000,  # over MLflow's param value limit
        **{f"k{i:03d}": i for i in range(150)},  # over the 100-params-per-request limit
    }
    report = tmp_path / "report.txt"
    report.write_text("ok\n")
    with tracking.stage_run("train", params, tags={"team": "audio"}) as run:
        run.log_metrics({"loss": 1.0, "acc": 0.5}, step=0)
        run.log_metrics({"loss": 0.25}, step=1)
        run.log_artifact(report, "reports")
        run.log_dict({"a": 1}, "summary.json")
        run.log_text("hello", "notes/hello.txt")
        fig = Figure()  # no pyplot: no GUI backend, no global figure state
        fig.subplots().plot([0, 1], [1, 0])
        run.log_figure(fig, "plots/loss.png")
        with run.child("fold-0", TrainParams()) as child:
            child.log_metrics({"val_loss": 0.3}, step=2)
            run.log_metrics({"outer": 1.0})  # the parent handle still writes to the parent

    parent = server.get_run(run.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.info.run_name == "train"
    assert parent.info.experiment_id == run.experiment_id
    assert parent.data.tags[tracking.TAG_STAGE] == "train"
    assert parent.data.tags[tracking.TAG_DVC_EXPERIMENT] == "exp-fuzzy-cat"
    assert parent.data.tags["team"] == "audio"
    assert parent.data.params["model.width"] == "64"
    assert parent.data.params["model.dropout"] == "null"
    assert parent.data.params["model.kernels"] == "[3, 5]"
    assert parent.data.params["k149"] == "149"
    assert parent.data.params["long"].endswith("...[truncated]")
    assert parent.data.metrics["outer"] == 1.0
    assert "val_loss" not in parent.data.metrics
    history = server.get_metric_history(run.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 0.25)]
    artifacts = {a.path for a in server.list_artifacts(run.run_id)}
    assert {"reports", "summary.json", "notes", "plots"} <= artifacts
    assert [a.path for a in server.list_artifacts(run.run_id, "plots")] == ["plots/loss.png"]
    summary = server.download_artifacts(run.run_id, "summary.json", str(tmp_path))
    assert json.loads(Path(summary).read_text()) == {"a": 1}

    nested = server.get_run(child.run_id)
    assert nested.info.status == "FINISHED"
    assert nested.info.run_name == "fold-0"
    assert nested.data.tags["mlflow.parentRunId"] == run.run_id
    assert nested.data.params == {"lr": "0.001", "layers": "[32, 64]", "data": "data/features"}
    assert nested.data.metrics == {"val_loss": 0.3}


def test_failing_block_marks_run_failed_and_propagates(server: MlflowClient) -> None:
    with pytest.raises(ValueError, match="boom"):
        with tracking.stage_run("featurize", {"n": 1}) as run:
            with run.child("inner") as child:
                raise ValueError("boom")
    assert server.get_run(child.run_id).info.status == "FAILED"
    assert server.get_run(run.run_id).info.status == "FAILED"


def test_check_reachable_fails_fast_with_clear_message(dead_uri: str) -> None:
    start = time.monotonic()
    with pytest.raises(tracking.TrackingUnavailable) as info:
        tracking.check_reachable(timeout_s=2.0)
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert f"MLflow tracking server at {dead_uri} is unreachable" in message
    assert "Start it or set MLFLOW_TRACKING_URI" in message


def test_stage_run_refuses_to_start_against_dead_server(dead_uri: str) -> None:
    with pytest.raises(tracking.TrackingUnavailable, match="unreachable"):
        with tracking.stage_run("train", {}):
            pytest.fail("the block must not run without a tracking server")


def test_registry_call_against_dead_server_is_tracking_unavailable(
    dead_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # skip mlflow's backoff sleeps
    with pytest.raises(tracking.TrackingUnavailable, match=dead_uri):
        tracking.get_alias_version("any-model", "champion")


def test_sqlite_default_in_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    tracking.check_reachable()  # no server needed
    with tracking.stage_run("split", {"seed": 7}) as run:
        run.log_metrics({"n_train": 10.0})
    assert tracking.git_commit() is None  # tmp_path is not a git work tree
    assert (tmp_path / "mlflow.db").is_file()
    fetched = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run.run_id)
    assert fetched.data.params == {"seed": "7"}
    assert fetched.data.tags[tracking.TAG_STAGE] == "split"
    assert run.tracking_uri == "sqlite:///mlflow.db"


def test_run_id_file_round_trip(server: MlflowClient, tmp_path: Path) -> None:
    with tracking.stage_run("train", {}) as run:
        tracking.write_run_id(tmp_path / "runs" / "train.json", run)
    record = tracking.read_run_id(tmp_path / "runs" / "train.json")
    assert record == {
        "run_id": run.run_id,
        "experiment_id": run.experiment_id,
        "tracking_uri": run.tracking_uri,
        "stage": "train",
    }
    with pytest.raises(FileNotFoundError, match="run-id file not found"):
        tracking.read_run_id(tmp_path / "missing.json")


def test_lightning_logger_writes_into_given_run(server: MlflowClient) -> None:
    with tracking.stage_run("train", {}) as run:
        with run.child("fit") as child:
            logger = tracking.lightning_logger(child)
            logger.log_metrics({"train_loss": 0.75}, step=3)
            assert logger.run_id == child.run_id
    history = server.get_metric_history(child.run_id, "train_loss")
    assert [(m.step, m.value) for m in history] == [(3, 0.75)]
    assert "train_loss" not in server.get_run(run.run_id).data.metrics
    assert len(server.search_runs([run.experiment_id])) == 2  # no run of Lightning's own


def test_register_and_alias_round_trip(server: MlflowClient) -> None:
    name = f"soundline-test-{uuid.uuid4().hex[:8]}"
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    example = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    assert tracking.get_alias_version(name, "champion") is None  # no such model yet
    with tracking.stage_run("register", {}) as run:
        model_uri = tracking.log_pytorch_model(model, "model", example, metadata={"auc": 0.9})
        version = tracking.register(model_uri, name, {"soundline.stage": "register"})
    assert model_uri.startswith("models:/")
    assert version == "1"
    assert tracking.get_alias_version(name, "champion") is None  # model exists, alias does not
    tracking.set_alias(name, "champion", version)
    assert tracking.get_alias_version(name, "champion") == "1"
    assert tracking.model_version_tags(name, version) == {"soundline.stage": "register"}
    assert server.get_model_version(name, version).run_id == run.run_id
