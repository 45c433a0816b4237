"""Shared fixtures: the real recordings beside the repo, a reduced default corpus, params variants."""
from __future__ import annotations

import copy
import os
import shutil
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"  # the `shared` folder beside the repo root

# The reduced default corpus: 8 speakers (4 good, 4 bad) x 2 sessions x 5 digits = 80 clips.
REDUCED = {"n_speakers": 8, "digits": 5}


def deep_update(base: dict, updates: Mapping[str, Any]) -> dict:
    """Return a copy of ``base`` with ``updates`` merged in, recursively for nested dicts."""
    out = copy.deepcopy(base)
    for key, value in updates.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = deep_update(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def write_params(dest: Path, updates: Mapping[str, Any] | None = None) -> Path:
    """Write the repo's params.yaml, deep-updated with ``updates``, to ``dest``; return ``dest``."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(yaml.safe_dump(deep_update(params, updates or {}), sort_keys=False))
    return dest


def subprocess_env() -> dict[str, str]:
    """Environment for child commands (dvc, python -m ...): this interpreter's bin dir first."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    return env


@pytest.fixture(scope="session")
def child_env() -> dict[str, str]:
    return subprocess_env()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (FSDD, Speech Commands mini); skips the test where it is missing."""
    if not (SHARED_DATA / "fsdd" / "recordings").is_dir():
        pytest.skip(f"real recordings not found at {SHARED_DATA} (expected the `shared` folder "
                    "beside the repo, with fsdd/ and speech_commands_mini/)")
    return SHARED_DATA


def _require_espeak() -> None:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (needed to build the default corpus): make espeak")


@pytest.fixture(scope="session")
def build_reduced_corpus() -> Callable[[Path], Path]:
    """Build the reduced default corpus into a given folder (for determinism checks)."""
    _require_espeak()
    from pipeline.corpus import build

    def make(out: Path) -> Path:
        build(out, **REDUCED)
        return out

    return make


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory, build_reduced_corpus) -> Path:
    """The reduced default corpus (80 clips), built once per session; treat it as read-only."""
    return build_reduced_corpus(tmp_path_factory.mktemp("corpus") / "raw")


@pytest.fixture(scope="session")
def params_writer() -> Callable[[Path, Mapping[str, Any] | None], Path]:
    """:func:`write_params`: the repo's params.yaml deep-updated, written to a given path."""
    return write_params


@pytest.fixture
def params_file(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``params_file({"featurize": {"split": {"n_folds": 2}}})`` -> path of a params.yaml
    in tmp_path holding the repo's params with those values replaced."""
    counter = iter(range(1_000_000))

    def make(updates: Mapping[str, Any] | None = None, name: str | None = None) -> Path:
        return write_params(tmp_path / (name or f"params_{next(counter)}.yaml"), updates)

    return make
