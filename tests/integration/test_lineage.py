"""Lineage end to end: the default corpus, then FSDD digits in the same checkout, then a fresh
clone that serves the champion after ``dvc pull`` alone.

One module-scoped run (slow): ``dvc repro`` on the reduced default corpus (good/bad quality);
``pipeline.data.ingest`` of FSDD digits + ``dvc add`` + ``dvc repro`` with the digit params;
``dvc push`` to a local remote and a commit; ``git clone``, ``dvc pull``, ``make serve``.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from pipeline import tracking
from tests.conftest import REPO
from tests.integration.conftest import _free_port, wait_ready
from tests.integration.repo import commit_data, link_venv, processes_in, reduced_repo, sh

pytestmark = pytest.mark.slow
REDUCED_PARAMS = yaml.safe_load((REPO / "tests" / "reduced_params.yaml").read_text())
DIGITS = {  # params.yaml changes for FSDD digits: target `label`, 8 kHz, every class, short clips
    "validate_raw": {"label_column": "label", "classes": [], "min_duration_s": 0.1, "min_clips_per_class": 5},
    "featurize": {"label_column": "label"},
    "pretrain": {"train_classes": []},
}
FSDD_PATTERN = r"(?P<label>\d)_(?P<group>[a-z]+)_\d+\.wav"
REPRO_TIMEOUT_S = 900
SERVE_TIMEOUT_S = 180


@dataclass(frozen=True)
class Lineage:
    repo: Path
    clone: Path
    env: dict[str, str]
    quality: dict  # reports/register.json after the default corpus
    digits: dict  # after FSDD digits
    package: dict  # reports/package.json after FSDD digits
    served: dict  # a /classify answer of `make serve` in the clone
    serve_log: str


def _params(repo: Path, write_params, *updates: dict) -> None:
    write_params(repo / "params.yaml", REDUCED_PARAMS, *updates)


def _read(repo: Path, name: str) -> dict:
    return json.loads((repo / "reports" / name).read_text())


def _serve(clone: Path, env: dict[str, str], wav: Path) -> tuple[dict, str]:
    """``make serve`` in ``clone``: wait until ready, classify ``wav``, stop it."""
    port = _free_port()
    log = clone / "serve.log"
    with log.open("w") as out:
        # -o install: the clone's .venv is this test's venv, which make must not reinstall
        process = subprocess.Popen(["make", "-o", "install", "serve", f"PORT={port}"], cwd=clone, env=env,
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(process, f"http://127.0.0.1:{port}", log, SERVE_TIMEOUT_S)
        resp = httpx.post(f"http://127.0.0.1:{port}/classify", files={"audio": (wav.name, wav.read_bytes())},
                          timeout=60)
        assert resp.status_code == 200, resp.text
        return resp.json(), log.read_text()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        for pid in processes_in(clone):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def lineage(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path, shared_data: Path,
            child_env: dict[str, str], params_writer) -> Iterator[Lineage]:
    root = tmp_path_factory.mktemp("lineage")
    env = {k: v for k, v in child_env.items() if k not in ("MLFLOW_EXPERIMENT_NAME", "DVC_EXP_NAME")}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}", BENTOML_HOME=str(root / "bentoml"),
               BENTOML_DO_NOT_TRACK="True", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    repo = reduced_repo(root / "repo", corpus_dir, env, params_writer, REDUCED_PARAMS)
    sh(["dvc", "repro"], repo, env, timeout=REPRO_TIMEOUT_S)
    quality = _read(repo, "register.json")

    sh(["python", "-m", "pipeline.data.ingest", str(shared_data / "fsdd" / "recordings"), "--pattern", FSDD_PATTERN,
        "--limit-per-group", "3", "--out", "data/raw"], repo, env)
    commit_data(repo, env)
    _params(repo, params_writer, DIGITS)
    sh(["dvc", "repro"], repo, env, timeout=REPRO_TIMEOUT_S)
    digits, package = _read(repo, "register.json"), _read(repo, "package.json")

    storage = root / "storage"
    sh(["dvc", "remote", "add", "-d", "storage", str(storage)], repo, env)
    sh(["dvc", "push", "-q"], repo, env, timeout=REPRO_TIMEOUT_S)
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-q", "-m", "FSDD digits"], repo, env)

    clone = root / "clone"
    sh(["git", "clone", "-q", str(repo), str(clone)], root, env)
    link_venv(clone)
    sh(["dvc", "pull", "-q"], clone, env, timeout=REPRO_TIMEOUT_S)
    served_env = {**env, "BENTOML_HOME": str(root / "bentoml_clone")}  # an empty store: make serve imports
    wav = sorted((clone / "data" / "raw").glob("*.wav"))[0]
    served, log = _serve(clone, served_env, wav)
    yield Lineage(repo, clone, env, quality, digits, package, served, log)


def test_the_new_dataset_gets_a_champion_of_its_own(lineage: Lineage, monkeypatch: pytest.MonkeyPatch) -> None:
    quality, digits = lineage.quality, lineage.digits
    assert quality["model"].startswith("soundline-quality-") and quality["holder_after"] == "1"
    assert digits["model"].startswith("soundline-label-") and digits["model"] != quality["model"]
    assert (digits["challenger_version"], digits["holder_after"], digits["why"]) == ("1", "1", "no champion yet")
    assert json.loads(digits["classes"]) == [str(d) for d in range(10)]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", lineage.env["MLFLOW_TRACKING_URI"])
    assert tracking.get_alias_version(quality["model"], "champion") == "1"  # the other task's champion stays


def test_package_packs_the_champion_of_the_current_task(lineage: Lineage) -> None:
    package = lineage.package
    assert (package["mlflow_model"], package["mlflow_version"]) == (lineage.digits["model"], "1")
    assert (lineage.repo / "models" / "bento" / "soundline.bento").stat().st_size > 0


def test_package_refuses_a_champion_of_another_task(lineage: Lineage, tmp_path: Path) -> None:
    decision = tmp_path / "register.json"
    decision.write_text(json.dumps(lineage.quality))  # names the good/bad model, features are digits'
    proc = subprocess.run(["python", "-m", "pipeline.stages.package", "--decision", str(decision),
                           "--features", "data/features", "--bento", str(tmp_path / "x.bento"),
                           "--out", str(tmp_path / "package.json")], cwd=lineage.repo, env=lineage.env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "trained for another task" in proc.stderr and "data/features/meta.json" in proc.stderr
    assert not (tmp_path / "x.bento").exists() and not (tmp_path / "package.json").exists()


def test_a_clone_serves_the_champion_after_dvc_pull(lineage: Lineage) -> None:
    served = lineage.served
    assert served["model"] == lineage.digits["model"] and served["version"] == "1"
    assert set(served["probabilities"]) == {str(d) for d in range(10)}
    assert "imported soundline:" in lineage.serve_log  # from the pulled archive into an empty store
    assert (lineage.clone / "models" / "bento" / "soundline.bento").is_file()
    assert not (lineage.clone / "reports" / "train.json").exists()  # no stage ran in the clone
