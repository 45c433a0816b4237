"""A tmp git + DVC copy of the project for end-to-end tests (`make compare`, lineage, serving).

The copy holds the Makefile, the code, dvc.yaml (all stages, or the first ones), params.yaml with
overrides, the recordings committed as data.dvc, and ``.venv`` linked to this interpreter's venv;
``make -o install`` keeps make from touching that shared venv.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import yaml

from tests.conftest import REPO


def sh(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def processes_in(folder: Path) -> list[int]:
    """PIDs of processes whose working directory is ``folder`` or below (a DVC queue worker, a server)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cwd = Path(os.readlink(proc / "cwd"))
            except OSError:
                continue
            if (cwd == folder or folder in cwd.parents) and int(proc.name) != os.getpid():
                pids.append(int(proc.name))
    return pids


def link_venv(dest: Path) -> None:
    """``dest/.venv`` -> this interpreter's venv, ignored by git (a symlink is no directory)."""
    venv = Path(sys.prefix)
    assert (venv / "bin" / "dvc").exists(), f"{venv} is not the project's virtual environment"
    (dest / ".venv").symlink_to(venv, target_is_directory=True)
    if (dest / ".git").is_dir():
        with (dest / ".git" / "info" / "exclude").open("a") as exclude:
            exclude.write(".venv\n")


def commit_data(dest: Path, env: dict[str, str]) -> None:
    """``dvc add`` data/raw, kept at the root as data.dvc (path: data/raw), as in the project."""
    sh(["dvc", "add", "-q", "data/raw"], dest, env)
    if not (dest / "data" / "raw.dvc").exists():  # data.dvc already tracked it: updated in place
        return
    pointer = yaml.safe_load((dest / "data" / "raw.dvc").read_text())
    pointer["outs"][0]["path"] = "data/raw"
    (dest / "data.dvc").write_text(yaml.safe_dump(pointer, sort_keys=False))
    (dest / "data" / "raw.dvc").unlink()


def reduced_repo(dest: Path, raw: Path, env: dict[str, str], write_params: Callable[..., Path],
                 params: dict[str, Any], stages: list[str] | None = None) -> Path:
    """The project in ``dest`` with ``raw`` as data/raw, ``params`` over params.yaml, and only
    ``stages`` of dvc.yaml (None: all), committed."""
    dest.mkdir(parents=True)
    for name in ("Makefile", "pyproject.toml", "requirements.lock", ".gitignore", ".dvcignore"):
        shutil.copy2(REPO / name, dest / name)
    for folder in ("pipeline", "serving"):
        shutil.copytree(REPO / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__"))
    pipeline = yaml.safe_load((REPO / "dvc.yaml").read_text())
    if stages is not None:
        missing = set(stages) - set(pipeline["stages"])
        assert not missing, f"dvc.yaml lacks stage(s) {sorted(missing)}"
        pipeline["stages"] = {k: v for k, v in pipeline["stages"].items() if k in stages}
    (dest / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    write_params(dest / "params.yaml", params)
    sh(["git", "init", "-q"], dest, env)
    sh(["git", "config", "user.email", "tests@soundline.invalid"], dest, env)
    sh(["git", "config", "user.name", "soundline tests"], dest, env)
    link_venv(dest)
    sh(["dvc", "init", "-q"], dest, env)
    sh(["dvc", "config", "core.analytics", "false"], dest, env)
    shutil.copytree(raw, dest / "data" / "raw")
    commit_data(dest, env)
    assert "Data and pipelines are up to date" in sh(["dvc", "status", "data.dvc"], dest, env)
    sh(["git", "add", "-A"], dest, env)
    sh(["git", "commit", "-q", "-m", "reduced soundline"], dest, env)  # queued experiments need a commit
    return dest
