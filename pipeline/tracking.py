"""MLflow tracking and registry for pipeline stages: the only module that imports mlflow,
so MLflow 3 details (URIs, retries, nested runs, logged models, aliases) stay in one place."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from importlib.metadata import version
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH
from pydantic import BaseModel

from pipeline.io import write_json

if TYPE_CHECKING:
    import torch
    from lightning.pytorch.loggers import MLFlowLogger

DEFAULT_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "soundline"
TAG_STAGE = "soundline.stage"
TAG_GIT_COMMIT = "soundline.git_commit"
TAG_DVC_EXPERIMENT = "soundline.dvc_experiment"
_RUN_ID_KEYS = ("run_id", "experiment_id", "tracking_uri", "stage")

Scalar = str | int | float | bool
Params = Mapping[str, Any] | BaseModel


class TrackingUnavailable(RuntimeError):
    """The configured MLflow tracking server cannot be reached."""


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a SQLite file in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def experiment_name() -> str:
    """``MLFLOW_EXPERIMENT_NAME`` if set, else ``soundline``."""
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def configure() -> str:
    """Point mlflow's tracking and registry at :func:`tracking_uri` and return it."""
    # mlflow's defaults (7 retries, exponential backoff, 120 s timeout) make a dead server look
    # like a hung stage for minutes; fail within seconds instead unless the user chose otherwise.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    # A stage downloads a handful of small artifacts; a progress bar per download is noise, and
    # so are the SQLite store's schema-creation lines on a first run.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def _client() -> MlflowClient:
    uri = configure()
    return MlflowClient(uri, registry_uri=uri)


def check_reachable(timeout_s: float = 5.0) -> None:
    """Raise :class:`TrackingUnavailable` unless an http(s) server answers ``/health``."""
    uri = tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return  # local sqlite/file stores need no server
    try:
        httpx.get(f"{uri.rstrip('/')}/health", timeout=timeout_s).raise_for_status()
    except httpx.HTTPError as err:
        raise TrackingUnavailable(
            f"MLflow tracking server at {uri} is unreachable: {str(err) or type(err).__name__}. "
            "Start it or set MLFLOW_TRACKING_URI."
        ) from err


@contextmanager
def _explain_unreachable() -> Iterator[None]:
    """Turn an mlflow error caused by a dead server into :class:`TrackingUnavailable`."""
    try:
        yield
    except MlflowException:
        check_reachable()  # raises TrackingUnavailable if the server is the problem
        raise


def flatten(d: Mapping[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Scalar]:
    """Flatten nested mappings to ``a.b.c`` keys; lists become JSON, ``None`` becomes ``"null"``."""
    flat: dict[str, Scalar] = {}
    for key, value in d.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, name, sep))
        elif isinstance(value, list | tuple):
            flat[name] = json.dumps(value, default=str)
        elif value is None:
            flat[name] = "null"
        elif isinstance(value, Scalar):
            flat[name] = value
        else:  # Paths, enums, ...: MLflow stores strings anyway.
            flat[name] = str(value)
    return flat


def git_commit() -> str | None:
    """The checked-out commit, or ``None`` outside a git work tree (or without git)."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def dvc_experiment() -> str | None:
    """The experiment name ``dvc exp run`` exports to its stages, if any."""
    return os.environ.get("DVC_EXP_NAME") or None


def _log_params(client: MlflowClient, run_id: str, params: Params | None) -> None:
    """Log flattened params in batches, truncating values the store would reject as too long."""
    if isinstance(params, BaseModel):
        params = params.model_dump(mode="json")  # JSON mode: Paths and enums become strings
    marker = "...[truncated]"
    entries = []
    for key, value in flatten(params or {}).items():
        text = str(value)
        if len(text) > MAX_PARAM_VAL_LENGTH:
            text = text[: MAX_PARAM_VAL_LENGTH - len(marker)] + marker
        entries.append(Param(key, text))
    for start in range(0, len(entries), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, params=entries[start : start + MAX_PARAMS_TAGS_PER_BATCH])


@dataclass
class StageRun:
    """Handle on one MLflow run; its methods write to *this* run even while a child is active."""

    run_id: str
    experiment_id: str
    stage: str
    tracking_uri: str
    client: MlflowClient = field(repr=False, compare=False)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log scalar metrics in one request (``step`` defaults to 0, as in MLflow)."""
        timestamp = int(time.time() * 1000)
        entries = [Metric(k, float(v), timestamp, step or 0) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=entries)

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        """Upload a local file or directory under ``artifact_path``."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: artifact to log does not exist")
        upload = self.client.log_artifacts if path.is_dir() else self.client.log_artifact
        upload(self.run_id, str(path), artifact_path)

    def log_figure(self, fig: Any, name: str) -> None:
        """Save a matplotlib/plotly figure as artifact ``name`` (e.g. ``plots/roc.png``)."""
        self.client.log_figure(self.run_id, fig, name)

    def log_dict(self, d: Mapping[str, Any], name: str) -> None:
        """Save a mapping as a JSON/YAML artifact (format chosen by ``name``'s extension)."""
        self.client.log_dict(self.run_id, dict(d), name)

    def log_text(self, text: str, name: str) -> None:
        """Save ``text`` as artifact ``name``."""
        self.client.log_text(self.run_id, text, name)

    @contextmanager
    def child(self, name: str, params: Params | None = None) -> Iterator[StageRun]:
        """Run a nested MLflow run under this one (FAILED if the block raises)."""
        # parent_run_id makes mlflow refuse to nest under anything but this run.
        with mlflow.start_run(
            run_name=name, nested=True, parent_run_id=self.run_id, tags={TAG_STAGE: self.stage}
        ) as active:
            run = replace(self, run_id=active.info.run_id)
            _log_params(self.client, run.run_id, params)
            yield run


class NoRun:
    """Stands in for a :class:`StageRun` where nothing may be recorded (the extra processes of a
    multi-process run): every method does nothing, a child is itself."""

    run_id = None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("log_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)

    @contextmanager
    def child(self, name: str, params: Params | None = None) -> Iterator[NoRun]:
        yield self


@contextmanager
def stage_run(
    stage: str, params: Params, tags: Mapping[str, str] | None = None, record: bool = True
) -> Iterator[StageRun | NoRun]:
    """Record a stage as an MLflow run with its params and provenance tags.

    The run ends FINISHED, or FAILED when the block raises (the exception propagates).
    ``record=False`` yields a :class:`NoRun` instead and touches no server."""
    if not record:
        yield NoRun()
        return
    client = _client()
    check_reachable()
    experiment_id = _experiment_id(experiment_name())
    provenance = {TAG_GIT_COMMIT: git_commit(), TAG_DVC_EXPERIMENT: dvc_experiment()}
    run_tags = {TAG_STAGE: stage, **{k: v for k, v in provenance.items() if v}, **(tags or {})}
    active = mlflow.start_run(experiment_id=experiment_id, run_name=stage, tags=run_tags)
    run = StageRun(active.info.run_id, experiment_id, stage, tracking_uri(), client)
    try:
        _log_params(client, run.run_id, params)
        yield run
    except BaseException:
        try:
            mlflow.end_run("FAILED")
        except MlflowException:
            pass  # the server may be what failed; the original error is the one to report
        raise
    with _explain_unreachable():
        mlflow.end_run("FINISHED")


def _experiment_id(name: str) -> str:
    """Get or create the experiment. With a SQLite store, artifacts go beside the database file
    (absolute path), not into the working directory of whichever process created the experiment
    (a DVC queue's temporary workspace is deleted after the run)."""
    with _explain_unreachable():
        found = mlflow.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        uri = tracking_uri()
        location = None
        if uri.startswith("sqlite:///"):
            location = (Path(uri[len("sqlite:///"):]).resolve().parent / "mlruns").as_uri()
        return mlflow.create_experiment(name, artifact_location=location)


def write_run_id(path: Path, run: StageRun) -> None:
    """Record where ``run`` lives, as a DVC output that later stages read back."""
    write_json(path, {key: getattr(run, key) for key in _RUN_ID_KEYS})


def read_run_id(path: Path | str) -> dict[str, str]:
    """Read a file written by :func:`write_run_id`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: run-id file not found; run the stage that writes it")
    record = json.loads(path.read_text())
    if missing := set(_RUN_ID_KEYS) - set(record):
        raise ValueError(f"{path}: run-id file lacks {sorted(missing)}")
    return record


def lightning_logger(run: StageRun | NoRun) -> MLFlowLogger | None:
    """A Lightning ``MLFlowLogger`` writing into ``run`` rather than a run of its own (None for a
    :class:`NoRun`).

    Lightning marks the run terminated when ``fit`` ends; the ``with`` block ends it again."""
    from lightning.pytorch.loggers import MLFlowLogger  # heavy import; only training needs it

    if isinstance(run, NoRun):
        return None
    return MLFlowLogger(run_id=run.run_id, tracking_uri=run.tracking_uri, log_model=False)


def log_pytorch_model(
    model: torch.nn.Module, name: str, signature_example: np.ndarray,
    metadata: Mapping[str, Any] | None = None,
) -> str:
    """Log ``model`` to the active run as an MLflow logged model; return its ``models:/`` URI.

    MLflow 3 saves with ``torch.export`` ("pt2"), which needs a tensor signature and example:
    ``signature_example`` is a float32 input batch, of size > 1 so the batch dim stays dynamic.
    """
    import torch  # heavy import; only the register stage needs it

    if mlflow.active_run() is None:
        raise RuntimeError("log_pytorch_model must be called inside stage_run(...)")
    model.eval()  # export the inference graph (no dropout, frozen batch-norm statistics)
    with torch.no_grad():
        output = model(torch.tensor(signature_example)).numpy()  # a copy: the example may be read-only
    with _explain_unreachable():
        info = mlflow.pytorch.log_model(
            model,
            name=name,
            signature=infer_signature(signature_example, output),
            input_example=signature_example,
            metadata=dict(metadata or {}),
            # Inferring requirements imports the model in a subprocess (seconds); a pt2 graph
            # needs only what the flavor's defaults pin. Stated here without torch's local
            # version label (+cpu), which MLflow would otherwise strip with a warning per run.
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                              f"cloudpickle=={version('cloudpickle')}"],
        )
    return info.model_uri


def register(model_uri: str, name: str, tags: Mapping[str, str]) -> str:
    """Create a new version of registered model ``name`` from ``model_uri``; return the version."""
    configure()
    with _explain_unreachable():
        return str(mlflow.register_model(model_uri, name, tags=dict(tags)).version)


def get_alias_version(name: str, alias: str) -> str | None:
    """The version ``alias`` points at, or ``None`` if the model or the alias does not exist."""
    with _explain_unreachable():
        try:
            # Read the model's alias map: get_model_version_by_alias reports a missing alias as
            # INVALID_PARAMETER_VALUE, indistinguishable from a malformed request.
            aliases = _client().get_registered_model(name).aliases
        except MlflowException as err:
            if err.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
                return None
            raise
    return str(aliases[alias]) if alias in aliases else None


def set_alias(name: str, alias: str, version: str) -> None:
    """Point ``alias`` of registered model ``name`` at ``version``."""
    with _explain_unreachable():
        _client().set_registered_model_alias(name, alias, version)


def model_version_tags(name: str, version: str) -> dict[str, str]:
    """Tags of one registered model version."""
    with _explain_unreachable():
        return dict(_client().get_model_version(name, version).tags)


def version_run_id(name: str, version: str) -> str:
    """The run that logged a registered model version."""
    with _explain_unreachable():
        return str(_client().get_model_version(name, version).run_id)


def download_artifact(run_id: str, artifact_path: str, dst: Path) -> Path:
    """Copy one artifact (file or folder) of a run into ``dst``; returns the local path."""
    configure()
    dst.mkdir(parents=True, exist_ok=True)
    with _explain_unreachable():
        try:
            return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path,
                                                            dst_path=str(dst)))
        except MlflowException as err:
            raise FileNotFoundError(f"run {run_id} has no artifact '{artifact_path}'") from err


def stage_runs(stage: str, dvc_experiments: list[str] | None = None) -> list[dict[str, Any]]:
    """Finished runs of ``stage``, newest first: {run_id, dvc_experiment, metrics}.

    With ``dvc_experiments``, only the newest run of each named DVC experiment; otherwise the
    newest run of every DVC experiment found.
    """
    configure()
    check_reachable()
    experiment = mlflow.get_experiment_by_name(experiment_name())
    if experiment is None:
        return []
    with _explain_unreachable():
        runs = _client().search_runs([experiment.experiment_id],
                                     f"tags.`{TAG_STAGE}` = '{stage}' and attributes.status = 'FINISHED'",
                                     order_by=["attributes.start_time DESC"], max_results=1000)
    newest: dict[str, dict[str, Any]] = {}
    for r in runs:
        name = r.data.tags.get(TAG_DVC_EXPERIMENT, "workspace")
        if name not in newest and (dvc_experiments is None or name in dvc_experiments):
            newest[name] = {"run_id": r.info.run_id, "dvc_experiment": name, "metrics": dict(r.data.metrics)}
    return list(newest.values())
