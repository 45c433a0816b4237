"""How long `dvc repro` takes when nothing changed (the cost of asking "is everything up to date?").

    python benchmarks/repro_noop.py [--repeats 3] [--stages data|all] [--keep DIR]

Builds a self-contained copy of the project in a temporary folder (dvc.yaml, params.yaml,
pipeline/, .dvcignore, a fresh git + dvc repo, data/raw = the reduced default corpus of 80 clips
tracked by data.dvc), runs `dvc repro` once to fill dvc.lock and the cache, then times
`dvc repro` again ``--repeats`` times; the median counts. ``--stages data`` (default) keeps
the data stages (validate_raw, featurize, validate_features); ``all`` keeps every stage of
dvc.yaml (the first repro then also trains). Writes benchmarks/results/repro_noop.json; the
last line printed is ``repro_noop_seconds=X``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.data.corpus import build  # noqa: E402

RESULT = REPO / "benchmarks" / "results" / "repro_noop.json"
DATA_STAGES = ("validate_raw", "featurize", "validate_features")
# The reduced corpus has 8 speakers and 40 clips per quality: loosen the count checks to fit.
REDUCED_PARAMS = {"validate_raw": {"min_clips_per_class": 10},
                  "featurize": {"split": {"test_fraction": 0.25, "n_folds": 3, "seed": 0}},
                  "validate_features": {"min_clips_per_fold_class": 5}}


def env() -> dict[str, str]:
    out = dict(os.environ)
    out["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{out.get('PATH', '')}"
    out["DVC_NO_ANALYTICS"] = "1"
    return out


def sh(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def deep_update(base: dict, updates: dict) -> dict:
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = value
    return base


def source_deps(definition: dict) -> list[str]:
    """The repo's own files and folders the kept stages depend on (code, serving/, ...)."""
    found = {"pipeline"}  # every stage runs `python -m pipeline.<stage>`
    for stage in definition["stages"].values():
        for dep in stage.get("deps", []):
            if isinstance(dep, str) and "${" not in dep and (REPO / dep).exists():
                found.add(dep.rstrip("/"))
    return sorted(d for d in found if not any(d.startswith(f"{o}/") for o in found if o != d))


def make_project(dest: Path, stages: str) -> int:
    """Lay out the project copy in ``dest``; return the number of stages kept."""
    dest.mkdir(parents=True, exist_ok=True)
    sh(["git", "init", "-q"], dest)
    sh(["dvc", "init", "-q"], dest)
    definition = yaml.safe_load((REPO / "dvc.yaml").read_text())
    if stages == "data":
        definition["stages"] = {k: v for k, v in definition["stages"].items() if k in DATA_STAGES}
    (dest / "dvc.yaml").write_text(yaml.safe_dump(definition, sort_keys=False))
    params = deep_update(yaml.safe_load((REPO / "params.yaml").read_text()), REDUCED_PARAMS)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copy2(REPO / ".dvcignore", dest / ".dvcignore")
    shutil.copy2(REPO / "data.dvc", dest / "data.dvc")
    for source in source_deps(definition):
        if (REPO / source).is_dir():
            shutil.copytree(REPO / source, dest / source, ignore=shutil.ignore_patterns("__pycache__"),
                            dirs_exist_ok=True)
        else:
            (dest / source).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / source, dest / source)
    build(dest / "data" / "raw", n_speakers=8, digits=5)
    sh(["dvc", "add", "-q", "data/raw"], dest)  # updates data.dvc, as after `pipeline.data.ingest`
    return len(definition["stages"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stages", choices=("data", "all"), default="data")
    parser.add_argument("--keep", type=Path, default=None, help="build the copy here and keep it")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="repro_noop.") as tmp:
        work = args.keep or Path(tmp) / "project"
        n_stages = make_project(work, args.stages)
        start = time.perf_counter()
        first = sh(["dvc", "repro"], work)
        first_s = time.perf_counter() - start
        ran = first.stdout.count("Running stage")
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            again = sh(["dvc", "repro"], work)
            times.append(time.perf_counter() - start)
            if "Running stage" in again.stdout:
                raise SystemExit(f"second `dvc repro` was not a no-op:\n{again.stdout}")
        status = sh(["dvc", "status"], work).stdout.strip()
        dvc_version = sh(["dvc", "--version"], work).stdout.strip()

    median = statistics.median(times)
    result = {"repro_noop_seconds": round(median, 3), "seconds": [round(t, 3) for t in times],
              "first_repro_seconds": round(first_s, 2), "stages": n_stages, "stages_run_first": ran,
              "stage_set": args.stages, "corpus": "reduced default corpus (8 speakers x 2 sessions x 5 digits)",
              "status": status, "dvc": dvc_version, "cores": len(os.sched_getaffinity(0)),
              "goal_seconds": 3.0}
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    print(f"repro_noop_seconds={median:.2f}")


if __name__ == "__main__":
    main()
