"""Shared by benchmarks/loader.py and benchmarks/train_overhead.py: their common CLI options,
the real features they time on, and how they write their result; by the FSDD benchmarks: the
held-out features of a fold, and ``--set`` overrides of params.

Features: ``--features``, else the repo's data/features (``dvc repro``), else the default
corpus is built and featurized into a tmp dir with the pipeline's own functions.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pipeline.contracts import FeatureMeta, FeaturesFolder  # noqa: E402


def benchmark_parser(doc: str, *, repeats: int, repeats_help: str) -> argparse.ArgumentParser:
    """A parser (described by the first line of ``doc``) with ``--features`` and ``--repeats``;
    the script adds its own options, then calls :func:`parse_benchmark_args`."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--features", type=Path, default=None, help="features folder (default data/features)")
    parser.add_argument("--repeats", type=int, default=repeats, help=repeats_help)
    return parser


def parse_benchmark_args(parser: argparse.ArgumentParser, argv: list[str] | None, result: Path) -> argparse.Namespace:
    """Add ``--threads`` and ``--out`` (default ``result``), parse ``argv``, require
    ``--repeats >= 3`` and apply ``torch.set_num_threads``."""
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--out", type=Path, default=result)
    args = parser.parse_args(argv)
    if args.repeats < 3:
        parser.error("--repeats must be >= 3")
    torch.set_num_threads(args.threads)
    return args


def build_default_features(out: Path) -> Path:
    """The default corpus -> validate_raw -> featurize with the repo's params.yaml, into ``out``."""
    from pipeline.stages import featurize, validate_raw
    from pipeline.data.corpus import build

    raw = out / "raw"
    build(raw)
    params = REPO / "params.yaml"
    validate_raw.main(["--raw", str(raw), "--manifest", str(out / "manifest.parquet"),
                       "--result", str(out / "validate_raw.json"), "--docs", str(out / "gx"),
                       "--params", str(params)])
    featurize.main(["--raw", str(raw), "--manifest", str(out / "manifest.parquet"),
                    "--out", str(out / "features"), "--params", str(params)])
    return out / "features"


def real_features(arg: Path | None, tmp: Path) -> Path:
    """``arg``, else the repo's data/features, else freshly built default-corpus features."""
    for candidate in (arg, REPO / "data" / "features"):
        if candidate is not None and FeaturesFolder(candidate).array_path.exists():
            return candidate
    if arg is not None:
        raise SystemExit(f"{arg}: not a features folder (run the featurize stage)")
    print("data/features not found: building the default corpus features in a tmp dir", file=sys.stderr)
    return build_default_features(tmp)


@dataclass(frozen=True)
class Features:
    """A features folder with its index and meta read."""

    dir: Path
    index: pd.DataFrame
    meta: FeatureMeta


def load_features(arg: Path | None, tmp: Path) -> Features:
    """:func:`real_features` (building into ``tmp`` if needed), its index and its meta."""
    features_dir = real_features(arg, tmp)
    folder = FeaturesFolder(features_dir)
    return Features(features_dir, folder.index(), folder.meta())


def write_result(out: Path, result: dict[str, Any]) -> None:
    """Write ``result`` as JSON to ``out`` and print it, less its ``details``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "details"}, indent=2))


def held_out(source: Path, test: np.ndarray, out: Path | None = None) -> Path:
    """A features folder (``out``, or ``source`` rewritten) whose test split is the rows marked
    ``test`` and whose training rows are one fold, with their band statistics ("train"): for
    benchmarks that fix the held-out speakers and train one model on all the others."""
    from pipeline.features import BandNorm

    src = FeaturesFolder(source)
    index, meta = src.index(), src.meta()
    folder = src
    if out is not None:
        out.mkdir(parents=True)
        folder = FeaturesFolder(out)
        folder.array_path.symlink_to(src.array_path.resolve())
    index["split"], index["fold"] = np.where(test, "test", "train"), np.where(test, -1, 0)
    norm = {"train": BandNorm.fit(src.array(), index.loc[~np.asarray(test), "row"].to_numpy())}
    folder.write(index, meta.model_copy(update={"features": meta.features.model_copy(update={"band_norm": True}),
                                                "band_norm": norm}))
    return folder.path


def setting(text: str) -> dict:
    """``a.b.c=value`` (the value in YAML) -> {"a": {"b": {"c": value}}}, as ``dvc exp run -S``."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set {text!r}: expected section.key=value")
    nested: dict = yaml.safe_load(value)
    for part in reversed(key.split(".")):
        nested = {part: nested}
    return nested
