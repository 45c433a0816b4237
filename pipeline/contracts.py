"""The on-disk contracts between stages: the features folder and the model folders.

Each folder is one class that names its files and reads or writes them, so a file name or the
layout of ``meta.json`` / ``model.json`` is spelled here and nowhere else:

  features folder (featurize)   features.npy (rows, n_mels, frames) float32, memory-mappable
                                index.parquet one row per clip (INDEX_COLUMNS)
                                meta.json     FeatureMeta: feature params, shape, classes
  model folder (train)          model.json ModelInfo, model.safetensors, centroids.safetensors
  pretrained folder (pretrain)  mae.json PretrainInfo, mae.safetensors

Task ``enhance`` (params.yaml ``task``) keeps the folders and changes what they hold: the
features folder has no array, its index names each noisy file's clean ``pair`` (the enhancer
reads waves) and ``meta.json`` is an EnhanceMeta; the model folder's ``model.json`` is an
EnhancerInfo. Both documents say ``task: enhance``; a document without ``task`` is classify.

Weights are safetensors, never pickles.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.features import BandNorm, FeatureParams, SegmentParams
from pipeline.io import file_digest, write_json
from pipeline.profile import Profile

# path: the row's key (the file, or "<file>#<segment>" with featurize.segment); file: the recording
INDEX_COLUMNS = ("row", "path", "file", "segment", "start_s", "label", "group", "split", "fold", "energy",
                 "duration_s")
ENHANCE_INDEX_COLUMNS = ("row", "path", "pair", "group", "snr_db", "noise", "split", "fold", "duration_s")
MODEL_ARTIFACT = "soundline_model"  # the model folder as an MLflow run artifact (register logs it)


class Contract(BaseModel):
    """A JSON document of a folder: unknown keys are kept (older or newer writers), values frozen."""

    model_config = ConfigDict(extra="allow", frozen=True)


def _task(path: Path) -> str:
    """The ``task`` a folder's JSON document states (``classify`` when it states none)."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found; run the stage that writes it")
    return json.loads(path.read_text()).get("task", "classify")


def _read(model: type[Contract], path: Path) -> Any:
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found; run the stage that writes it")
    try:
        return model.model_validate_json(path.read_text())
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise ValueError(f"{path}: {problems}") from err


class FeatureMeta(Contract):
    """``meta.json``: how the features were computed and what they hold."""

    features: FeatureParams
    label_column: str
    shape: tuple[int, int, int]  # rows, n_mels, frames
    classes: list[str]  # sorted
    segment: SegmentParams | None = None  # rows are windows of the files (featurize.segment)
    # band_norm: per-band statistics of the training rows of each fold ("fold_<k>": every
    # training-split row outside fold k) and of the whole training split ("train")
    band_norm: dict[str, BandNorm] | None = None

    def fold_norm(self, key: str) -> BandNorm | None:
        """The band statistics a model trained with ``key``'s rows uses (None without band_norm)."""
        if not self.features.band_norm:
            return None
        if not self.band_norm or key not in self.band_norm:
            raise ValueError(f"meta.json has no band statistics for {key!r}; rerun the featurize stage")
        return self.band_norm[key]

    @property
    def n_mels(self) -> int:
        return self.shape[1]

    def signature(self) -> dict:
        return task_signature(self.classes, self.features, self.label_column, self.segment)

    @property
    def frames(self) -> int:
        return self.shape[2]


def task_signature(classes: list[str], features: FeatureParams, label_column: str | None,
                   segment: SegmentParams | None = None) -> dict:
    """What makes two models answer the same question: classes, target column, feature front end.

    A model trained for another signature cannot be compared with, or replace, one of this
    signature (see the register stage's champion gate and the package stage).
    """
    signature = {"classes": sorted(classes), "label_column": label_column,
                 "features": features.model_dump(mode="json")}
    return signature if segment is None else {**signature, "segment": segment.model_dump(mode="json")}


def enhance_signature(sample_rate: int) -> dict:
    """The :func:`task_signature` of task enhance: enhancers at one rate answer the same question."""
    return {"task": "enhance", "sample_rate": sample_rate}


class EnhanceMeta(Contract):
    """``meta.json`` of task enhance: the rate every wave is read at, and the pair count."""

    task: Literal["enhance"] = "enhance"
    sample_rate: int
    pairs: int

    def signature(self) -> dict:
        return enhance_signature(self.sample_rate)


def signature_id(signature: dict) -> str:
    """A short stable hash of a :func:`task_signature`."""
    return hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()[:8]


@dataclass(frozen=True)
class FeaturesFolder:
    """The featurize stage's output folder."""

    path: Path

    @property
    def array_path(self) -> Path:
        return self.path / "features.npy"

    @property
    def index_path(self) -> Path:
        return self.path / "index.parquet"

    @property
    def meta_path(self) -> Path:
        return self.path / "meta.json"

    def index(self) -> pd.DataFrame:
        if not self.index_path.exists():
            raise FileNotFoundError(f"{self.index_path}: not found; run the featurize stage")
        index = pd.read_parquet(self.index_path)
        missing = [c for c in INDEX_COLUMNS if c not in index.columns]
        if missing:
            raise ValueError(f"{self.index_path}: missing column(s) {missing}")
        return index

    def meta(self) -> FeatureMeta:
        if self.task() != "classify":
            raise ValueError(f"{self.meta_path}: features of task {self.task()}, not classify; "
                             "set params.yaml task: accordingly and rerun")
        return _read(FeatureMeta, self.meta_path)

    def task(self) -> str:
        return _task(self.meta_path)

    def enhance_meta(self) -> EnhanceMeta:
        return _read(EnhanceMeta, self.meta_path)

    def enhance_index(self) -> pd.DataFrame:
        """Task enhance: one row per noisy file (ENHANCE_INDEX_COLUMNS)."""
        if not self.index_path.exists():
            raise FileNotFoundError(f"{self.index_path}: not found; run the featurize stage")
        index = pd.read_parquet(self.index_path)
        missing = [c for c in ENHANCE_INDEX_COLUMNS if c not in index.columns]
        if missing:
            raise ValueError(f"{self.index_path}: missing column(s) {missing}; was it written for task enhance?")
        return index

    def array(self) -> np.ndarray:
        """The (rows, n_mels, frames) array, memory-mapped read-only."""
        if not self.array_path.exists():
            raise FileNotFoundError(f"{self.array_path}: not found; run the featurize stage")
        return np.load(self.array_path, mmap_mode="r")

    def create_array(self, rows: int, n_mels: int, frames: int) -> None:
        """An empty (rows, n_mels, frames) float32 ``.npy`` whose rows writers fill in place."""
        np.lib.format.open_memmap(self.array_path, mode="w+", dtype=np.float32, shape=(rows, n_mels, frames))

    def write(self, index: pd.DataFrame, meta: FeatureMeta) -> None:
        """Write the index and meta beside an array filled by :meth:`create_array`'s writers."""
        index.to_parquet(self.index_path, index=False)
        write_json(self.meta_path, meta.model_dump(mode="json"))

    def content_id(self) -> str:
        """A digest of the folder's content (index, array, meta), not of where or when it was written."""
        paths = (self.index_path, self.meta_path) + ((self.array_path,) if self.task() == "classify" else ())
        return file_digest(*paths)


class ModelInfo(Contract):
    """``model.json``: everything needed to rebuild and use an exported classifier."""

    spec: dict  # pipeline.models.networks.make_spec
    mode: str = "classifier"  # classifier | triplet
    classes: list[str]  # position = target value; binary: [negative, positive]
    binary: bool
    positive_class: str | None = None
    features: FeatureParams
    label_column: str | None = None
    fold: str | None = None
    selection: str | None = None
    seed: int | None = None  # the train stage's seed
    input_norm: BandNorm | None = None  # band_norm: the statistics of its training rows
    segment: SegmentParams | None = None  # a file is scored as windows, aggregated (featurize.segment)

    def signature(self) -> dict:
        return task_signature(self.classes, self.features, self.label_column, self.segment)


class EnhancerInfo(Contract):
    """``model.json`` of task enhance: everything needed to rebuild and use an exported enhancer."""

    task: Literal["enhance"] = "enhance"
    spec: dict  # {"arch": "unet", "task": "enhance", "kwargs": MaskUNet's arguments}
    sample_rate: int  # the network's rate: other inputs are resampled to it and back
    precision: Literal["32", "bf16"] = "32"  # how evaluate and the service run it (bf16: autocast)
    seed: int | None = None
    fold: str | None = None
    selection: str | None = None

    def signature(self) -> dict:
        return enhance_signature(self.sample_rate)


@dataclass(frozen=True)
class ModelFolder:
    """The train stage's exported model (also the artifact ``soundline_model/`` in MLflow)."""

    path: Path

    @property
    def info_path(self) -> Path:
        return self.path / "model.json"

    @property
    def weights_path(self) -> Path:
        return self.path / "model.safetensors"

    @property
    def centroids_path(self) -> Path:
        return self.path / "centroids.safetensors"

    @property
    def training_files_path(self) -> Path:
        return self.path / "training_files.csv"

    @property
    def profile_path(self) -> Path:
        return self.path / "profile.json"

    files = ("model.json", "model.safetensors", "centroids.safetensors", "profile.json")  # what the service needs

    def task(self) -> str:
        return _task(self.info_path)

    def info(self) -> ModelInfo:
        if self.task() != "classify":
            raise ValueError(f"{self.info_path}: a model of task {self.task()}, not a classifier")
        return _read(ModelInfo, self.info_path)

    def enhancer_info(self) -> EnhancerInfo:
        if self.task() != "enhance":
            raise ValueError(f"{self.info_path}: a model of task {self.task()}, not an enhancer")
        return _read(EnhancerInfo, self.info_path)

    def profile(self) -> Profile | None:
        """The training data's profile (the drift guard), None for a model exported without one."""
        return _read(Profile, self.profile_path) if self.profile_path.exists() else None

    def training_files(self) -> pd.DataFrame:
        """The files (path, label) the exported weights were trained on (the baseline fits on them)."""
        if not self.training_files_path.exists():
            raise FileNotFoundError(f"{self.training_files_path}: not found; rerun the train stage")
        return pd.read_csv(self.training_files_path, dtype=str, keep_default_na=False)

    def write_info(self, info: ModelInfo | EnhancerInfo) -> None:
        write_json(self.info_path, info.model_dump(mode="json"))


class PretrainInfo(Contract):
    """``mae.json``: the pretrained MAE's spec and the features it saw."""

    spec: dict
    features: FeatureParams
    input_norm: BandNorm | None = None


@dataclass(frozen=True)
class PretrainFolder:
    """The pretrain stage's exported masked autoencoder."""

    path: Path

    @property
    def info_path(self) -> Path:
        return self.path / "mae.json"

    @property
    def weights_path(self) -> Path:
        return self.path / "mae.safetensors"

    def exists(self) -> bool:
        return self.weights_path.exists()

    def info(self) -> PretrainInfo:
        return _read(PretrainInfo, self.info_path)

    def write_info(self, info: PretrainInfo) -> None:
        write_json(self.info_path, info.model_dump(mode="json"))
