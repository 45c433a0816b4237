"""Shared fixtures and helpers: the real recordings beside the repo, a reduced default corpus,
params variants, a tiny synthetic features folder for the training tests."""
from __future__ import annotations

import copy
import json
import os
import shutil
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
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


def write_params(dest: Path, *updates: Mapping[str, Any] | None) -> Path:
    """Write the repo's params.yaml, deep-updated with each of ``updates`` in turn (``None``
    entries are skipped), to ``dest``; return ``dest``."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for update in updates:
        params = deep_update(params, update or {})
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(yaml.safe_dump(params, sort_keys=False))
    return dest


# A tiny synthetic features folder for the training tests (unit and integration).
SYNTH_N_MELS, SYNTH_FRAMES = 32, 32
SYNTH_CLASSES = ["bad", "good"]
SYNTH_BAND = slice(SYNTH_N_MELS // 2, SYNTH_N_MELS // 2 + 4)  # mel bins that are bright in "bad" clips


def write_synthetic_features(out: Path, n_groups: int = 8, per_group: int = 6, n_folds: int = 3,
                             seed: int = 0, split_seed: int = 0) -> Path:
    """A features folder as pipeline.stages.featurize writes it: 48 clips, 2 classes, 8 groups.

    Every group holds both classes (so every fold does); "bad" clips carry a bright band of
    4 mel bins (``SYNTH_BAND``), which a model can learn. Spectrograms are
    ``SYNTH_N_MELS x SYNTH_FRAMES``. Splits come from pipeline.splits.assign, seeded with
    ``split_seed`` (``seed`` drives the data).
    """
    from pipeline.splits import SplitParams, assign

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    n = n_groups * per_group
    labels = np.array(["good", "bad"] * (n // 2))
    groups = np.repeat([f"spk{g:02d}" for g in range(n_groups)], per_group)
    x = rng.normal(-0.5, 0.3, size=(n, SYNTH_N_MELS, SYNTH_FRAMES)).astype(np.float32)
    x[labels == "bad", SYNTH_BAND, :] += 2.0
    np.save(out / "features.npy", x)
    index = pd.DataFrame({"row": np.arange(n), "path": [f"{g}/clip_{i:03d}.wav" for i, g in enumerate(groups)],
                          "label": labels, "group": groups, "duration_s": rng.uniform(0.5, 1.5, n)})
    index[["split", "fold"]] = assign(index["label"], index["group"],
                                      SplitParams(test_fraction=0.25, n_folds=n_folds, seed=split_seed))
    index["energy"] = rng.uniform(0.01, 0.1, n).astype(np.float32)
    index[["file", "segment", "start_s"]] = index[["path"]].assign(segment=0, start_s=0.0)
    index.to_parquet(out / "index.parquet", index=False)
    features = {"sample_rate": 16000, "n_fft": 512, "win_length": None, "hop_length": 160,
                "n_mels": SYNTH_N_MELS, "fmin": 0.0, "fmax": None, "frames": SYNTH_FRAMES,
                "pad_mode": "constant", "crop": "center", "top_db": 80.0, "normalize": "fixed",
                "norm_mean": -55.0, "norm_std": 24.0}
    (out / "meta.json").write_text(json.dumps({"features": features, "label_column": "quality",
                                               "shape": [n, SYNTH_N_MELS, SYNTH_FRAMES],
                                               "classes": SYNTH_CLASSES}))
    return out


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
    from pipeline.data.corpus import build

    def make(out: Path) -> Path:
        build(out, **REDUCED)
        return out

    return make


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory, build_reduced_corpus) -> Path:
    """The reduced default corpus (80 clips), built once per session; treat it as read-only."""
    return build_reduced_corpus(tmp_path_factory.mktemp("corpus") / "raw")


@pytest.fixture(scope="session")
def params_writer() -> Callable[..., Path]:
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
