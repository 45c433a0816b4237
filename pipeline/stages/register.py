"""Stage register: log the trained model to the MLflow registry and run the champion gate.

One registered model per task: the challenger (this run's model) is registered as
``<model_name>-<label column>-<task id>``, the task id being a hash of its classes, target
column and feature parameters (``pipeline.contracts.task_signature``), so a model for other
classes or other features never competes with, or replaces, this task's champion. With
``task_suffix: false`` the name is ``model_name`` as given, and a champion of another task
fails the stage, naming that setting.

Versions carry provenance tags (git commit, md5 of data.dvc, DVC experiment, params hash,
task). The challenger takes alias ``champion`` only when no champion exists, or when it beats
the champion on the same test files: a paired test (exact McNemar on per-file correctness, or
paired bootstrap of the metric) below ``alpha`` and an improvement of at least
``min_improvement``. A champion evaluated on other test files (other data, or another split)
cannot be compared: it keeps the alias (``when_incomparable: keep``) or yields it (``promote``). Partial runs
(fast_dev_run, a subset of folds) never move it. Every decision is written to a declared output
and appended to an audit log kept in git.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from pipeline import tracking
from pipeline.config import load_section
from pipeline.contracts import MODEL_ARTIFACT, FeaturesFolder, ModelFolder, ModelInfo, signature_id
from pipeline.gate import GateParams, baseline_gate, champion_gate
from pipeline.io import atomic_path, write_json
from pipeline.models.inference import ExportedModel

TAG_TASK = "task_id"


class RegisterParams(GateParams):
    model_name: str = "soundline"
    task_suffix: bool = True  # register as <model_name>-<label column>-<task id>
    alias: str = "champion"


def registered_name(p: RegisterParams, info: ModelInfo) -> str:
    """The registry name of the model's task (see the module docstring)."""
    if not p.task_suffix:
        return p.model_name
    return f"{p.model_name}-{info.label_column or 'label'}-{signature_id(info.signature())}"


def gate(challenger: pd.DataFrame, champion: pd.DataFrame | None, p: RegisterParams) -> dict:
    """The baseline gate, then the champion gate (``pipeline.gate``): the decision to record."""
    baseline = baseline_gate(challenger, p)
    if not baseline["passed"]:
        return {"move": False, "why": f"refused by the baseline gate: {baseline['why']}", "baseline": baseline}
    return {**champion_gate(challenger, champion, p), "baseline": baseline}


def champion_info(name: str, version: str) -> ModelInfo:
    """The champion's model.json, read from its run's artifact."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = tracking.download_artifact(tracking.version_run_id(name, version), MODEL_ARTIFACT, Path(tmp))
        return ModelFolder(folder).info()


def check_same_task(name: str, version: str, champion: ModelInfo, challenger: ModelInfo) -> None:
    """Fail when the champion answers another question than the challenger (see module docstring)."""
    mine, theirs = challenger.signature(), champion.signature()
    if mine == theirs:
        return
    differs = ", ".join(f"{k}: {theirs.get(k)!r} -> {mine.get(k)!r}" for k in mine | theirs
                        if mine.get(k) != theirs.get(k))
    raise ValueError(f"{name}@champion (v{version}) was trained for another task ({differs[:500]}); "
                     "a model of another task can neither compete with nor replace it. Set "
                     "register.task_suffix: true (one registered model per task) or choose another "
                     "register.model_name")


def provenance(data_dvc: Path, params_file: Path) -> dict[str, str]:
    outs = yaml.safe_load(data_dvc.read_text())["outs"]
    tags = {"data_dvc_md5": str(outs[0].get("md5")),
            "params_sha256": hashlib.sha256(params_file.read_bytes()).hexdigest()[:16]}
    if commit := tracking.git_commit():
        tags["git_commit"] = commit
    if exp := tracking.dvc_experiment():
        tags["dvc_experiment"] = exp
    return tags


def champion_predictions(name: str, version: str) -> pd.DataFrame:
    with tempfile.TemporaryDirectory() as tmp:
        path = tracking.download_artifact(tracking.version_run_id(name, version),
                                          "evaluation/predictions.csv", Path(tmp))
        return pd.read_csv(path)[["path", "predicted", "correct"]]


def run(model_dir: Path, predictions_csv: Path, train_metrics: Path, features_dir: Path, data_dvc: Path,
        params_file: Path, p: RegisterParams, decision_out: Path, audit_log: Path) -> dict:
    challenger = pd.read_csv(predictions_csv)
    train = json.loads(train_metrics.read_text())
    if train.get("partial"):
        raise ValueError(f"{train_metrics}: training was partial (fast_dev_run, overfit or a subset "
                         "of folds); refusing to register it")
    model = ExportedModel.load(model_dir, inference=False)  # logged as trained, BatchNorm intact
    features = FeaturesFolder(features_dir)
    if model.info.signature() != features.meta().signature():
        raise ValueError(f"{model_dir} was not trained on {features_dir} (other classes or feature parameters)")
    example = np.array(features.array()[:2], dtype=np.float32)[:, None]  # a writable copy
    name = registered_name(p, model.info)
    tags = {**provenance(data_dvc, params_file), TAG_TASK: signature_id(model.info.signature()),
            "label_column": str(model.info.label_column), "classes": json.dumps(model.info.classes)[:4000],
            "seed": str(model.info.seed)}
    with tracking.stage_run("register", p, tags=tags) as stage:
        champion = tracking.get_alias_version(name, p.alias)
        if champion:
            check_same_task(name, champion, champion_info(name, champion), model.info)
        uri = tracking.log_pytorch_model(model.network, "model", example,
                                         metadata=model.info.model_dump(mode="json"))
        stage.log_artifact(model_dir, MODEL_ARTIFACT)
        stage.log_text(predictions_csv.read_text(), "evaluation/predictions.csv")
        version = tracking.register(uri, name, tags)
        if champion is None:
            decision = gate(challenger, None, p)
        else:
            try:
                decision = gate(challenger, champion_predictions(name, champion), p)
            except FileNotFoundError as err:  # a champion we cannot compare with keeps its alias
                decision = {"move": False, "why": f"champion v{champion} cannot be compared: {err}"}
        if decision["move"]:
            tracking.set_alias(name, p.alias, version)
        record = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "model": name,
                  "alias": p.alias, "challenger_version": version, "champion_version": champion,
                  "holder_after": version if decision["move"] else champion, **tags, **decision}
        stage.log_dict(record, "register/decision.json")
    write_json(decision_out, record)
    previous = audit_log.read_text() if audit_log.exists() else ""
    with atomic_path(audit_log) as tmp:
        tmp.write_text(previous + json.dumps(record, sort_keys=True, default=str) + "\n")
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("model", "predictions", "train-metrics", "features", "data-dvc", "decision", "audit-log"):
        parser.add_argument(f"--{name}", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    try:
        params = load_section("register", RegisterParams, args.params)
        record = run(args.model, args.predictions, args.train_metrics, args.features, args.data_dvc,
                     args.params, params, args.decision, args.audit_log)
    except (ValueError, FileNotFoundError, tracking.TrackingUnavailable) as err:
        sys.exit(f"register: {err}; the registry alias was not changed")
    holder = f"v{record['holder_after']}" if record["holder_after"] else "no version"
    moved = "moved to" if record["move"] else "stays at"
    print(f"register: {record['model']} v{record['challenger_version']}; @{record['alias']} {moved} "
          f"{holder} ({record['why']})")


if __name__ == "__main__":
    main()
