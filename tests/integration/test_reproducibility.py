"""The same code, data and params give the same model, byte for byte, on one machine.

(a) pretrain -> filter -> train -> evaluate twice, as DVC runs them (one process per stage), in
    fresh work folders on the reduced default corpus: weights, filter lists, predictions and
    metrics are byte-identical.
(b) ``dvc exp run`` twice with the same params (temporary workspaces, forced): ``dvc exp show``
    reports identical metrics.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, deep_update
from tests.integration.repo import reduced_repo, sh

pytestmark = pytest.mark.slow
REDUCED_PARAMS = yaml.safe_load((REPO / "tests" / "reduced_params.yaml").read_text())
EPOCHS = {"pretrain": {"trainer": {"max_epochs": 3}}, "train": {"trainer": {"max_epochs": 3}}}
UP_TO_EVALUATE = ["validate_raw", "featurize", "validate_features", "pretrain", "filter", "train", "evaluate"]


def _stage(name: str, args: list[str], cwd: Path, env: dict[str, str]) -> None:
    proc = subprocess.run([sys.executable, "-m", f"pipeline.stages.{name}", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def _chain(out: Path, features: Path, params: Path, env: dict[str, str]) -> dict[str, str]:
    """Run the learning stages into ``out``; md5 of every output that must not vary."""
    out.mkdir()
    env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{out / 'mlflow.db'}"}
    p = ["--params", str(params)]
    _stage("pretrain", ["--features", str(features), "--work", "pw", "--model", "pretrained", "--recon", "recon",
                        "--metrics", "pretrain.json", "--run-id", "pretrain_run.json", *p], out, env)
    _stage("filter", ["--recon", "recon", "--out", "ignored.csv", "--metrics", "filter.json", *p], out, env)
    _stage("train", ["--features", str(features), "--ignored", "ignored.csv", "--pretrained", "pretrained",
                     "--work", "tw", "--model", "model", "--curves", "curves.csv", "--metrics", "train.json",
                     "--run-id", "train_run.json", *p], out, env)
    _stage("evaluate", ["--features", str(features), "--ignored", "ignored.csv", "--model", "model",
                        "--pretrained", "pretrained", "--metrics", "evaluate.json", "--predictions",
                        "predictions.csv", "--segments", "segments.csv", "--groups", "groups.csv", "--plots", "plots", "--run-id",
                        "evaluate_run.json", *p], out, env)
    files = ["pretrained/mae.safetensors", "recon/train_recon.csv", "recon/val_recon.csv", "recon/test_recon.csv",
             "ignored.csv", "filter.json", "pretrain.json", "model/model.safetensors", "model/model.json",
             "train.json", "curves.csv", "predictions.csv", "groups.csv", "evaluate.json"]
    return {name: hashlib.md5((out / name).read_bytes()).hexdigest() for name in files}


def test_learning_stages_are_byte_identical_run_to_run(tmp_path: Path, corpus_dir: Path, child_env: dict[str, str],
                                                       params_writer) -> None:
    params = params_writer(tmp_path / "params.yaml", REDUCED_PARAMS, EPOCHS)
    features = tmp_path / "features"
    _stage("validate_raw", ["--raw", str(corpus_dir), "--manifest", "manifest.parquet", "--result", "vr.json",
                            "--docs", "gx", "--params", str(params)], tmp_path, child_env)
    _stage("featurize", ["--raw", str(corpus_dir), "--manifest", "manifest.parquet", "--out", str(features),
                         "--params", str(params)], tmp_path, child_env)
    first = _chain(tmp_path / "first", features, params, child_env)
    second = _chain(tmp_path / "second", features, params, child_env)
    assert first == second, {k: (first[k], second[k]) for k in first if first[k] != second[k]}


def _metrics(shown: list[dict], name: str) -> dict:
    """The metrics ``dvc exp show --json`` reports for experiment ``name``."""
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            for run in exp.get("revs") or []:
                if exp.get("name") == name or run.get("name") == name:
                    return run["data"]["metrics"]
    raise AssertionError(f"experiment {name} not in dvc exp show: {json.dumps(shown)[:2000]}")


def test_dvc_exp_run_twice_reports_identical_metrics(tmp_path: Path, corpus_dir: Path, child_env: dict[str, str],
                                                     params_writer) -> None:
    env = {k: v for k, v in child_env.items() if k not in ("MLFLOW_EXPERIMENT_NAME", "DVC_EXP_NAME")}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"  # absolute: temp workspaces go away
    repo = reduced_repo(tmp_path / "repo", corpus_dir, env, params_writer, deep_update(REDUCED_PARAMS, EPOCHS),
                        UP_TO_EVALUATE)
    for name in ("same-1", "same-2"):
        sh(["dvc", "exp", "run", "--temp", "--force", "-n", name], repo, env, timeout=900)
    shown = json.loads(sh(["dvc", "exp", "show", "--json"], repo, env))
    first, second = _metrics(shown, "same-1"), _metrics(shown, "same-2")
    assert "reports/evaluate.json" in first and "reports/train.json" in first
    assert first == second
