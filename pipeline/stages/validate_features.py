"""Stage validate_features: a Great Expectations suite over the feature index and array.

Checks that every clip's features are finite and of the declared shape, that signal energy is
within bounds, that every fold and the test set hold enough clips of every class, and that no
group sits in two places (train fold, test).

Task enhance (params.yaml ``task``): the folder holds no array; the suite checks the pair index
instead: every fold and the test set hold at least ``min_clips_per_fold_class`` pairs, no group
and no clean reference sits in two places.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import great_expectations as gx
import numpy as np
import pandas as pd
from pydantic import Field

from pipeline.config import Section, load_section, load_task
from pipeline.contracts import FeatureMeta, FeaturesFolder
from pipeline.expectations import SuiteReport, Table, validate
from pipeline.io import write_json


class FeatureChecks(Section):
    min_energy: float = Field(1e-10, ge=0)  # below: a silent clip
    max_energy: float | None = None
    min_clips_per_fold_class: int = Field(1, ge=1)
    batch: int = Field(1024, gt=0)  # rows per read, to bound memory on large arrays


def clip_stats(features: np.ndarray, batch: int) -> pd.DataFrame:
    """Per-clip finite flag, min, max, mean and std, read from the memmap in batches."""
    parts = []
    for start in range(0, len(features), batch):
        x = np.asarray(features[start:start + batch], dtype=np.float64).reshape(min(batch, len(features) - start), -1)
        parts.append(pd.DataFrame({"finite": np.isfinite(x).all(axis=1), "min": np.nanmin(x, axis=1),
                                   "max": np.nanmax(x, axis=1), "std": np.nanstd(x, axis=1)}))
    return pd.concat(parts, ignore_index=True)


def fold_class_counts(index: pd.DataFrame) -> pd.DataFrame:
    """Clips per (place, label), with zeros for classes missing from a fold or from test."""
    place = np.where(index["split"] == "test", "test", "fold" + index["fold"].astype(str))
    table = pd.crosstab(pd.Series(place, name="place"), index["label"])
    return table.stack().rename("count").reset_index().assign(
        key=lambda t: t["place"] + ":" + t["label"].astype(str))


def group_places(index: pd.DataFrame) -> pd.DataFrame:
    place = np.where(index["split"] == "test", "test", "fold" + index["fold"].astype(str))
    return (pd.DataFrame({"group": index["group"], "place": place}).groupby("group")["place"]
            .agg(n_places="nunique", places=lambda s: ",".join(sorted(set(s)))).reset_index())


def tables(index: pd.DataFrame, features: np.ndarray, meta: FeatureMeta, p: FeatureChecks) -> dict[str, Table]:
    ex = gx.expectations
    n, n_mels, frames = meta.shape
    shape = pd.DataFrame([{"name": "array", "rows": features.shape[0], "n_mels": features.shape[1],
                           "frames": features.shape[2], "index_rows": len(index)}])
    clips = pd.concat([index.reset_index(drop=True), clip_stats(features, p.batch)], axis=1)
    return {
        "array": Table(shape, "name", [
            ex.ExpectColumnValuesToBeBetween(column="rows", min_value=n, max_value=n),
            ex.ExpectColumnValuesToBeBetween(column="index_rows", min_value=n, max_value=n),
            ex.ExpectColumnValuesToBeBetween(column="n_mels", min_value=n_mels, max_value=n_mels),
            ex.ExpectColumnValuesToBeBetween(column="frames", min_value=frames, max_value=frames),
        ]),
        "clips": Table(clips, "path", [
            ex.ExpectColumnValuesToBeInSet(column="finite", value_set=[True]),
            ex.ExpectColumnValuesToBeBetween(column="energy", min_value=p.min_energy, max_value=p.max_energy),
            ex.ExpectColumnValuesToBeInSet(column="split", value_set=["train", "test"]),
            ex.ExpectColumnValuesToBeUnique(column="row"),
        ], context=("label", "group")),
        "folds": Table(fold_class_counts(index), "key", [
            ex.ExpectColumnValuesToBeBetween(column="count", min_value=p.min_clips_per_fold_class),
        ]),
        "groups": Table(group_places(index), "group", [
            ex.ExpectColumnValuesToBeBetween(column="n_places", max_value=1),
        ], context=("places",)),
    }


def enhance_tables(index: pd.DataFrame, p: FeatureChecks) -> dict[str, Table]:
    """Task enhance: pairs per fold and test, groups and clean references each in one place."""
    ex = gx.expectations
    places = group_places(index)
    cleans = group_places(index.assign(group=index["pair"])).rename(columns={"group": "pair"})
    counts = fold_class_counts(index.assign(label="pairs"))
    return {
        "pairs": Table(index, "path", [
            ex.ExpectColumnValuesToBeInSet(column="split", value_set=["train", "test"]),
            ex.ExpectColumnValuesToBeUnique(column="row"),
            ex.ExpectColumnValuesToNotBeNull(column="pair"),
        ], context=("pair", "group")),
        "folds": Table(counts, "key", [ex.ExpectColumnValuesToBeBetween(column="count",
                                                                        min_value=p.min_clips_per_fold_class)]),
        "groups": Table(places, "group", [ex.ExpectColumnValuesToBeBetween(column="n_places", max_value=1)],
                        context=("places",)),
        "clean": Table(cleans, "pair", [ex.ExpectColumnValuesToBeBetween(column="n_places", max_value=1)],
                       context=("places",)),
    }


def run(features_dir: Path, p: FeatureChecks, result_out: Path, docs_dir: Path) -> SuiteReport:
    folder = FeaturesFolder(features_dir)
    if folder.task() == "enhance":
        index = folder.enhance_index()
        report = validate("validate_features", enhance_tables(index, p), docs_dir)
    else:
        index = folder.index()
        report = validate("validate_features", tables(index, folder.array(), folder.meta(), p), docs_dir)
    write_json(result_out, {"success": report.success, "clips": len(index), "expectations": report.evaluated,
                            "failed": len(report.failures), "failures": [f.__dict__ for f in report.failures]})
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=Path, required=True, help="features folder from featurize")
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--docs", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    try:
        params = load_section("validate_features", FeatureChecks, args.params)
        task = load_task(args.params)
        if FeaturesFolder(args.features).task() != task:
            raise ValueError(f"{args.features} holds features of task {FeaturesFolder(args.features).task()}, "
                             f"params.yaml says task: {task}; rerun featurize")
        report = run(args.features, params, args.result, args.docs)
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"validate_features: {err}")
    print(report.summary())
    if not report.success:
        sys.exit(f"validate_features: FAILED; details in {args.result} and {args.docs}/index.html")


if __name__ == "__main__":
    main()
