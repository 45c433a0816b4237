"""Stage package: import the registered ``models:/<name>@<alias>`` model into BentoML, build the Bento.

The register stage logs the exported model folder (model.json + safetensors) as artifact
``soundline_model/`` of its run; this stage downloads that folder, stores it in the BentoML
model store (labels: MLflow model/version/run and alias; metadata: model.json) and runs
``bentoml build`` on ``serving/bentofile.yaml`` with SOUNDLINE_MODEL_TAG naming the model, so
the Bento packs exactly that model. BENTOML_HOME (default ~/bentoml) is honoured.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from pipeline import tracking
from pipeline.config import Section, load_section
from pipeline.io import write_json

ARTIFACT = "soundline_model"
MODEL_FILES = ("model.json", "model.safetensors", "centroids.safetensors")
REPO = Path(__file__).resolve().parents[1]


class PackageParams(Section):
    model_name: str = "soundline"
    alias: str = "champion"
    bento_model_name: str = "soundline"
    bentofile: str = "serving/bentofile.yaml"


def import_model(folder: Path, p: PackageParams, version: str, run_id: str) -> str:
    """Copy the exported model files into a new BentoML model; return its tag."""
    import bentoml

    info = json.loads((folder / "model.json").read_text())
    labels = {"mlflow_model": p.model_name, "mlflow_version": version, "mlflow_run": run_id, "alias": p.alias}
    # BentoML metadata values must be simple; nested structures are kept as JSON text.
    metadata = {k: v if isinstance(v, str | int | float | bool) else json.dumps(v) for k, v in info.items()}
    with bentoml.models.create(p.bento_model_name, labels=labels, metadata=metadata) as model:
        for name in MODEL_FILES:
            if (folder / name).exists():
                shutil.copy2(folder / name, Path(model.path) / name)
    return str(model.tag)


def build_bento(bentofile: str, model_tag: str) -> str:
    """``bentoml build`` from the repo root with the service pointed at ``model_tag``; the Bento tag."""
    env = {**os.environ, "SOUNDLINE_MODEL_TAG": model_tag, "BENTOML_DO_NOT_TRACK": "True"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    result = subprocess.run([sys.executable, "-m", "bentoml", "build", "-f", bentofile, "--output", "tag"],
                            cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"bentoml build failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    match = re.search(r"__tag__:(\S+)", result.stdout) or re.search(r"Bento\(tag=\"?([^\s\")]+)", result.stdout)
    if match is None:
        raise RuntimeError(f"bentoml build printed no Bento tag:\n{result.stdout}")
    return match.group(1)


def run(p: PackageParams, out: Path) -> dict:
    version = tracking.get_alias_version(p.model_name, p.alias)
    if version is None:
        raise ValueError(f"no version holds alias {p.model_name}@{p.alias}: run dvc repro through register first")
    run_id = tracking.version_run_id(p.model_name, version)
    with tempfile.TemporaryDirectory() as tmp:
        folder = tracking.download_artifact(run_id, ARTIFACT, Path(tmp))
        if not (folder / "model.json").exists() or not (folder / "model.safetensors").exists():
            raise FileNotFoundError(f"run {run_id}: artifact {ARTIFACT}/ lacks model.json or model.safetensors")
        model_tag = import_model(folder, p, version, run_id)
    bento_tag = build_bento(p.bentofile, model_tag)
    record = {"bento_tag": bento_tag, "bento_model_tag": model_tag, "mlflow_model": p.model_name,
              "mlflow_version": version, "mlflow_run": run_id, "alias": p.alias}
    write_json(out, record)
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    try:
        record = run(load_section("package", PackageParams, args.params), args.out)
    except (ValueError, FileNotFoundError, RuntimeError, tracking.TrackingUnavailable) as err:
        sys.exit(f"package: {err}")
    print(f"package: {record['mlflow_model']} v{record['mlflow_version']} (@{record['alias']}) -> "
          f"model {record['bento_model_tag']}, bento {record['bento_tag']}")


if __name__ == "__main__":
    main()
