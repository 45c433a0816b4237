"""Stage package: the registry's champion of this task → BentoML model store → Bento → a DVC output.

Reads the registered model's name and alias from the register stage's decision, refuses a
champion whose classes or feature parameters differ from the current features folder (it would
serve another task's labels), stores its exported folder (model.json + safetensors, logged by
register as artifact ``soundline_model/``) in the BentoML model store with its MLflow lineage
as labels, runs ``bentoml build`` on ``serving/bentofile.yaml`` with SOUNDLINE_MODEL_TAG naming
that model, and exports the Bento to one file (``models/bento/soundline.bento``), so that
``dvc push`` / ``dvc pull`` share what is served. ``make serve`` imports that file into the
local store (BENTOML_HOME, default ~/bentoml) when it is missing there.

A champion of task enhance (its model.json an ``EnhancerInfo``) is stored the same way; the
BentoML model's metadata then says ``task: enhance`` and the service serves ``/enhance``.
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
from pipeline.contracts import MODEL_ARTIFACT, EnhancerInfo, FeaturesFolder, ModelFolder, ModelInfo
from pipeline.io import write_json

REPO = Path(__file__).resolve().parents[2]


class PackageParams(Section):
    bento_model_name: str = "soundline"
    bentofile: str = "serving/bentofile.yaml"


def folder_info(folder: Path) -> ModelInfo | EnhancerInfo:
    """The model.json of an exported classifier or enhancer (its ``task`` says which)."""
    model = ModelFolder(folder)
    return model.enhancer_info() if model.task() == "enhance" else model.info()


def check_task(info: ModelInfo | EnhancerInfo, features: FeaturesFolder, name: str, version: str) -> None:
    """Refuse a model whose task, classes or feature parameters are not those of the current features."""
    meta = features.enhance_meta() if features.task() == "enhance" else features.meta()
    mine, current = info.signature(), meta.signature()
    if mine != current:
        differs = ", ".join(k for k in mine | current if mine.get(k) != current.get(k))
        raise ValueError(f"{name} v{version} differs from {features.meta_path} in {differs}: "
                         "it was trained for another task and would serve its labels; run dvc repro "
                         "through register for the current data")


def import_model(folder: Path, p: PackageParams, labels: dict[str, str]) -> str:
    """Copy the exported model files into a new BentoML model; return its tag."""
    import bentoml

    info = folder_info(folder).model_dump(mode="json")
    # BentoML metadata values must be simple; nested structures are kept as JSON text.
    metadata = {k: v if isinstance(v, str | int | float | bool) else json.dumps(v) for k, v in info.items()}
    with bentoml.models.create(p.bento_model_name, labels=labels, metadata=metadata) as model:
        for name in ModelFolder.files:
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


def export_bento(tag: str, out: Path) -> None:
    """Write the Bento to ``out`` (``*.bento``, BentoML's archive format) in one rename."""
    import bentoml

    out = out.resolve()  # BentoML reads a relative path from the file system's root
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".export.", dir=out.parent) as tmp:
        os.replace(bentoml.export_bento(tag, str(Path(tmp) / out.name)), out)


def run(decision_file: Path, features_dir: Path, p: PackageParams, bento_out: Path, out: Path) -> dict:
    decision = json.loads(decision_file.read_text())
    name, alias = decision["model"], decision["alias"]
    version = tracking.get_alias_version(name, alias)
    if version is None:
        raise ValueError(f"no version of {name} holds @{alias}, nothing to package: register decided "
                         f"\"{decision.get('why')}\" ({decision_file})")
    run_id = tracking.version_run_id(name, version)
    with tempfile.TemporaryDirectory() as tmp:
        folder = tracking.download_artifact(run_id, MODEL_ARTIFACT, Path(tmp))
        model = ModelFolder(folder)
        if not model.weights_path.exists():
            raise FileNotFoundError(f"run {run_id}: artifact {MODEL_ARTIFACT}/ lacks {model.weights_path.name}")
        check_task(folder_info(folder), FeaturesFolder(features_dir), name, version)
        labels = {"mlflow_model": name, "mlflow_version": version, "mlflow_run": run_id, "alias": alias}
        model_tag = import_model(folder, p, labels)
    bento_tag = build_bento(p.bentofile, model_tag)
    export_bento(bento_tag, bento_out)
    record = {"bento_tag": bento_tag, "bento_model_tag": model_tag, "bento_file": str(bento_out),
              "mlflow_model": name, "mlflow_version": version, "mlflow_run": run_id, "alias": alias}
    write_json(out, record)
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decision", type=Path, required=True, help="the register stage's decision JSON")
    parser.add_argument("--features", type=Path, required=True, help="features folder (its meta.json)")
    parser.add_argument("--bento", type=Path, required=True, help="exported Bento archive (DVC output)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    try:
        record = run(args.decision, args.features, load_section("package", PackageParams, args.params),
                     args.bento, args.out)
    except (ValueError, FileNotFoundError, RuntimeError, tracking.TrackingUnavailable) as err:
        sys.exit(f"package: {err}")
    print(f"package: {record['mlflow_model']} v{record['mlflow_version']} (@{record['alias']}) -> "
          f"model {record['bento_model_tag']}, bento {record['bento_tag']} -> {record['bento_file']}")


if __name__ == "__main__":
    main()
