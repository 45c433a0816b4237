"""Stage validate_raw: a manifest of every recording, checked by a Great Expectations suite.

The manifest has one row per file listed in ``metadata.csv``: content hash, header facts and
signal statistics. The suite stops the pipeline (exit 1) on unreadable or non-finite audio,
disallowed sample rates, durations out of bounds, unknown labels, too few clips per class,
too much class imbalance, and identical content filed under different labels.

Task enhance (params.yaml ``task``): ``metadata.csv`` lists noisy files with their clean ``pair``
(no label); the label checks give way to the pair checks (``pipeline.pairs``): both sides
present and readable, one sample rate, lengths within ``pairs.length_tolerance_s``, a stated
``snr_db`` within ``pairs.snr_db``; each failing pair is named with its problem.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path
from typing import Literal

import great_expectations as gx
import pandas as pd
from pydantic import Field

from pipeline import audio
from pipeline.config import Section, Task, load_section, load_task
from pipeline.expectations import SuiteReport, Table, validate
from pipeline.io import read_metadata, write_json, write_parquet
from pipeline.pairs import PairParams, check_pairs
from pipeline.parallel import pmap


class RawParams(Section):
    label_column: str = "label"
    classes: list[str] = []  # empty: any label
    sample_rates: list[int] = [8000, 16000]
    min_duration_s: float = Field(0.1, ge=0)
    max_duration_s: float = Field(30.0, gt=0)
    min_clips_per_class: int = Field(1, ge=1)
    max_class_ratio: float = Field(10.0, ge=1)
    stereo: Literal["downmix", "reject"] = "downmix"
    workers: int = 0  # 0: all cores
    pairs: PairParams = PairParams()  # task enhance: the noisy/clean pair checks


def describe(path: Path, rel: str) -> dict:
    """Manifest facts for one file; never raises, a bad file gets readable/finite False and an error."""
    # finite stays None (not False) for unreadable files, so only the readable check names them.
    row: dict = {"path": rel, "readable": False, "finite": None, "error": ""}
    try:
        data = path.read_bytes()
        row["sha256"] = hashlib.sha256(data).hexdigest()
        samples, info = audio.decode(data, name=rel)
    except audio.NonFiniteAudio as err:
        info = audio.probe(data, name=rel)
        row.update(readable=True, finite=False, error=err.problem, sample_rate=info.sample_rate,
                   channels=info.channels, bit_depth=info.bit_depth, duration_s=info.duration_s)
        return row
    except (audio.AudioError, OSError) as err:
        row["error"] = getattr(err, "problem", str(err))
        return row
    row.update(readable=True, finite=True, sample_rate=info.sample_rate, channels=info.channels,
               bit_depth=info.bit_depth, duration_s=info.duration_s, **audio.signal_stats(samples, info.sample_rate))
    return row


def _describe_one(item: tuple[Path, str]) -> dict:
    return describe(*item)


def build_manifest(raw_dir: Path, metadata: pd.DataFrame, workers: int) -> pd.DataFrame:
    """Describe every file in ``metadata`` (paths relative to ``raw_dir``), keeping its metadata."""
    rows = pmap(_describe_one, [(raw_dir / p, p) for p in metadata["path"]], workers, "manifest")
    facts = pd.DataFrame(rows)
    columns = ["path", "sha256", "sample_rate", "channels", "bit_depth", "duration_s", "peak", "rms",
               "clipping_fraction", "silence_fraction", "readable", "finite", "error"]
    facts = facts.reindex(columns=columns).astype(
        {"sample_rate": "Int64", "channels": "Int64", "bit_depth": "Int64", "finite": "boolean"})
    return facts.merge(metadata, on="path", how="left", validate="one_to_one")


def class_table(manifest: pd.DataFrame, label_column: str) -> pd.DataFrame:
    counts = manifest[label_column].value_counts().rename_axis("label").reset_index(name="count")
    counts["imbalance"] = counts["count"].max() / counts["count"]
    return counts


def content_table(manifest: pd.DataFrame, label_column: str) -> pd.DataFrame:
    """One row per distinct content hash: how many labels and which files carry it."""
    known = manifest[manifest["readable"].astype(bool)]
    grouped = known.groupby("sha256")
    return pd.DataFrame({
        "n_labels": grouped[label_column].nunique(),
        "files": grouped.apply(lambda g: "; ".join(f"{p}={lab}" for p, lab in zip(g["path"], g[label_column]))),
    }).reset_index()


def pair_table(metadata: pd.DataFrame, raw_dir: Path, p: PairParams) -> pd.DataFrame:
    """One row per noisy file: ``pair_ok`` and the pair's problems (``pipeline.pairs.check_pairs``)."""
    stated = metadata.get("snr_db", pd.Series("", index=metadata.index)).str.strip()
    snr = pd.to_numeric(stated, errors="coerce")
    rows = metadata.assign(snr_db=snr)
    problems = [([f"{path}: snr_db {text!r} is not a number"] if text and pd.isna(value) else [])
                + check_pairs(rows.iloc[[i]], raw_dir, p.length_tolerance_s, p.snr_db)
                for i, (path, text, value) in enumerate(zip(metadata["path"], stated, snr))]
    return pd.DataFrame({"path": metadata["path"], "pair": metadata["pair"],
                         "pair_ok": [not found for found in problems], "problem": ["; ".join(f) for f in problems]})


def file_expectations(p: RawParams) -> list:
    ex = gx.expectations
    files = [
        ex.ExpectTableRowCountToBeBetween(min_value=1),
        ex.ExpectColumnValuesToBeInSet(column="readable", value_set=[True]),
        ex.ExpectColumnValuesToBeInSet(column="finite", value_set=[True]),
        ex.ExpectColumnValuesToBeInSet(column="sample_rate", value_set=p.sample_rates),
        ex.ExpectColumnValuesToBeBetween(column="duration_s", min_value=p.min_duration_s,
                                         max_value=p.max_duration_s),
    ]
    if p.stereo == "reject":
        files.append(ex.ExpectColumnValuesToBeInSet(column="channels", value_set=[1]))
    return files


def tables(manifest: pd.DataFrame, p: RawParams) -> dict[str, Table]:
    ex = gx.expectations
    files = file_expectations(p)
    if p.classes:
        files.append(ex.ExpectColumnValuesToBeInSet(column=p.label_column, value_set=p.classes))
    classes = [
        ex.ExpectColumnValuesToBeBetween(column="count", min_value=p.min_clips_per_class),
        ex.ExpectColumnValuesToBeBetween(column="imbalance", max_value=p.max_class_ratio),
    ]
    content = [ex.ExpectColumnValuesToBeBetween(column="n_labels", max_value=1)]
    return {
        "files": Table(manifest, "path", files, context=("error",)),
        "classes": Table(class_table(manifest, p.label_column), "label", classes),
        "content": Table(content_table(manifest, p.label_column), "files", content),
    }


def enhance_tables(manifest: pd.DataFrame, pairs: pd.DataFrame, p: RawParams) -> dict[str, Table]:
    """Task enhance: the noisy files' checks, and one pair check per noisy file naming its problem."""
    ok = [gx.expectations.ExpectColumnValuesToBeInSet(column="pair_ok", value_set=[True])]
    return {"files": Table(manifest, "path", file_expectations(p), context=("error",)),
            "pairs": Table(pairs, "path", ok, context=("problem",))}


def run(raw_dir: Path, p: RawParams, manifest_out: Path, result_out: Path, docs_dir: Path,
        task: Task = "classify") -> SuiteReport:
    if task == "enhance":
        metadata = read_metadata(raw_dir / "metadata.csv", required=("path", "group", "pair"))
    else:
        metadata = read_metadata(raw_dir / "metadata.csv")
        if p.label_column not in metadata.columns:
            raise ValueError(f"{raw_dir / 'metadata.csv'}: no column '{p.label_column}' (validate_raw.label_column)")
    manifest = build_manifest(raw_dir, metadata, p.workers)
    checks = (enhance_tables(manifest, pair_table(metadata, raw_dir, p.pairs), p) if task == "enhance"
              else tables(manifest, p))
    report = validate("validate_raw", checks, docs_dir)
    write_parquet(manifest_out, manifest)
    summary = {"success": report.success, "task": task, "files": len(manifest),
               "unreadable": int((~manifest["readable"].astype(bool)).sum()),
               "expectations": report.evaluated, "failed": len(report.failures)}
    write_json(result_out, {**summary, "failures": [f.__dict__ for f in report.failures]})
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", type=Path, required=True, help="folder with metadata.csv and the wav files")
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True, help="JSON validation result (DVC metric)")
    parser.add_argument("--docs", type=Path, required=True, help="GX Data Docs folder")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    try:
        params = load_section("validate_raw", RawParams, args.params)
        report = run(args.raw, params, args.manifest, args.result, args.docs, load_task(args.params))
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"validate_raw: {err}")
    print(report.summary())
    if not report.success:
        sys.exit(f"validate_raw: FAILED; details in {args.result} and {args.docs}/index.html")


if __name__ == "__main__":
    main()
