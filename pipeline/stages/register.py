"""Stage register: log the trained model to the MLflow registry and run the champion gate.

One registered model per task: the challenger (this run's model) is registered as
``<model_name>-<label column>-<task id>``, the task id being a hash of its classes, target
column and feature parameters (``pipeline.contracts.task_signature``), so a model for other
classes or other features never competes with, or replaces, this task's champion. With
``task_suffix: false`` the name is ``model_name`` as given, and a champion of another task
fails the stage, naming that setting. With params ``task: enhance`` the model is a speech enhancer,
registered as ``<model_name>-enhance-<task id>`` (its task id: the sample rate), and gated on the
per-utterance ``register.enhance_metric`` with a paired Wilcoxon test (``pipeline.gate``).

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
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from torch import nn

from pipeline import tracking
from pipeline.config import Task, load_section, load_task
from pipeline.contracts import MODEL_ARTIFACT, EnhancerInfo, FeaturesFolder, ModelFolder, ModelInfo, signature_id
from pipeline.gate import (GateParams, baseline_gate, champion_gate, enhance_baseline_gate,
                           enhance_champion_gate)
from pipeline.io import atomic_path, write_json
from pipeline.models.enhancer import ExportedEnhancer
from pipeline.models.inference import ExportedModel

TAG_TASK = "task_id"


class RegisterParams(GateParams):
    model_name: str = "soundline"
    task_suffix: bool = True  # register as <model_name>-<label column>-<task id>
    alias: str = "champion"


Info = ModelInfo | EnhancerInfo


def task_of(info: Info) -> Task:
    return "enhance" if isinstance(info, EnhancerInfo) else "classify"


def registered_name(p: RegisterParams, info: Info) -> str:
    """The registry name of the model's task (see the module docstring)."""
    if not p.task_suffix:
        return p.model_name
    kind = "enhance" if task_of(info) == "enhance" else info.label_column or "label"
    return f"{p.model_name}-{kind}-{signature_id(info.signature())}"


def gate(challenger: pd.DataFrame, champion: pd.DataFrame | None, p: RegisterParams,
         task: Task = "classify") -> dict:
    """The baseline gate, then the champion gate (``pipeline.gate``, the task's): the decision to record."""
    enhance = task == "enhance"
    baseline = (enhance_baseline_gate if enhance else baseline_gate)(challenger, p)
    if not baseline["passed"]:
        return {"move": False, "why": f"refused by the baseline gate: {baseline['why']}", "baseline": baseline}
    return {**(enhance_champion_gate if enhance else champion_gate)(challenger, champion, p), "baseline": baseline}


def champion_info(name: str, version: str) -> Info:
    """The champion's model.json, read from its run's artifact."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = ModelFolder(tracking.download_artifact(tracking.version_run_id(name, version), MODEL_ARTIFACT,
                                                        Path(tmp)))
        return folder.enhancer_info() if folder.task() == "enhance" else folder.info()


def check_same_task(name: str, version: str, champion: Info, challenger: Info) -> None:
    """Fail when the champion answers another question than the challenger (see module docstring)."""
    mine, theirs = challenger.signature(), champion.signature()
    if mine == theirs:
        return
    differs = (f"task: {task_of(champion)!r} -> {task_of(challenger)!r}" if task_of(champion) != task_of(challenger)
               else ", ".join(f"{k}: {theirs.get(k)!r} -> {mine.get(k)!r}" for k in mine | theirs
                              if mine.get(k) != theirs.get(k)))
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


def champion_predictions(name: str, version: str, columns: list[str]) -> pd.DataFrame:
    """The champion's ``columns`` of its evaluation/predictions.csv (those it has)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = tracking.download_artifact(tracking.version_run_id(name, version),
                                          "evaluation/predictions.csv", Path(tmp))
        table = pd.read_csv(path)
        return table[[c for c in columns if c in table]]


@dataclass(frozen=True)
class Candidate:
    """The challenger as register logs it: network, model.json, an example input, the task's tags."""

    network: nn.Module
    info: Info
    example: np.ndarray  # float32 input batch (MLflow's signature and pt2 export)
    tags: dict[str, str]
    compared: list[str]  # the columns of the champion's predictions the champion gate needs


def classifier(model_dir: Path, features: FeaturesFolder) -> Candidate:
    model = ExportedModel.load(model_dir, inference=False)  # logged as trained, BatchNorm intact
    if model.info.signature() != features.meta().signature():
        raise ValueError(f"{model_dir} was not trained on {features.path} (other classes or feature parameters)")
    example = np.array(features.array()[:2], dtype=np.float32)[:, None]  # a writable copy
    tags = {"label_column": str(model.info.label_column), "classes": json.dumps(model.info.classes)[:4000],
            "seed": str(model.info.seed)}
    return Candidate(model.network, model.info, example, tags, ["path", "predicted", "correct"])


def enhancer(model_dir: Path, features: FeaturesFolder, p: RegisterParams) -> Candidate:
    if features.task() != "enhance":
        raise ValueError(f"{features.meta_path}: features of task {features.task()}, not enhance; rerun the "
                         "featurize stage with params.yaml task: enhance")
    model = ExportedEnhancer.load(model_dir, inference=False)  # logged as trained, BatchNorm intact
    if model.info.signature() != features.enhance_meta().signature():
        raise ValueError(f"{model_dir} was not trained on {features.path} (its rate {model.sample_rate} Hz, "
                         f"the features' {features.enhance_meta().sample_rate} Hz)")
    # Two one-second waves: a batch of one would pin the logged graph's batch size to 1. torch.export
    # also pins the length (the STFT), so the MLflow model takes (B, sample_rate) windows; the
    # service and evaluate enhance whole files through ExportedEnhancer instead.
    example = (0.1 * np.random.default_rng(0).standard_normal((2, model.sample_rate))).astype(np.float32)
    tags = {"task": "enhance", "sample_rate": str(model.sample_rate), "seed": str(model.info.seed)}
    return Candidate(model.network, model.info, example, tags, ["path", p.enhance_metric])


def run(model_dir: Path, predictions_csv: Path, train_metrics: Path, features_dir: Path, data_dvc: Path,
        params_file: Path, p: RegisterParams, decision_out: Path, audit_log: Path) -> dict:
    challenger = pd.read_csv(predictions_csv)
    train = json.loads(train_metrics.read_text())
    if train.get("partial"):
        raise ValueError(f"{train_metrics}: training was partial (fast_dev_run, overfit or a subset "
                         "of folds); refusing to register it")
    task = load_task(params_file)
    features = FeaturesFolder(features_dir)
    model = enhancer(model_dir, features, p) if task == "enhance" else classifier(model_dir, features)
    name = registered_name(p, model.info)
    tags = {**provenance(data_dvc, params_file), TAG_TASK: signature_id(model.info.signature()), **model.tags}
    with tracking.stage_run("register", p, tags=tags) as stage:
        champion = tracking.get_alias_version(name, p.alias)
        if champion:
            check_same_task(name, champion, champion_info(name, champion), model.info)
        uri = tracking.log_pytorch_model(model.network, "model", model.example,
                                         metadata=model.info.model_dump(mode="json"))
        stage.log_artifact(model_dir, MODEL_ARTIFACT)
        stage.log_text(predictions_csv.read_text(), "evaluation/predictions.csv")
        version = tracking.register(uri, name, tags)
        if champion is None:
            decision = gate(challenger, None, p, task)
        else:
            try:
                decision = gate(challenger, champion_predictions(name, champion, model.compared), p, task)
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
