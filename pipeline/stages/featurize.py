"""Stage featurize: log-mel features of every validated recording, with group-aware splits.

Writes the features folder (``pipeline.contracts.FeaturesFolder``): one memory-mappable array,
an index with one row per clip and its split/fold, and ``meta.json`` with the feature
parameters, shape and class list, so training and serving compute and read features the same
way without reading params.yaml.

Task enhance (params.yaml ``task``): no features are computed (the enhancer reads the waves);
the folder holds the index of noisy files with their clean ``pair``, split by speaker (group) the
same way, and an EnhanceMeta naming the rate (``features.sample_rate``) every wave is read at.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from pydantic import Field

from pipeline import audio
from pipeline.config import Section, load_section, load_task
from pipeline.contracts import ENHANCE_INDEX_COLUMNS, EnhanceMeta, FeatureMeta, FeaturesFolder
from pipeline.features import BandNorm, FeatureParams, SegmentParams, log_mel_batch
from pipeline.io import atomic_dir, write_json
from pipeline.pairs import check_pair_splits
from pipeline.parallel import pmap
from pipeline.splits import SplitParams, assign, check_leakage


class FeaturizeParams(Section):
    label_column: str = "label"
    seed: int = 0  # the splits' (params.yaml's top-level seed unless set here)
    features: FeatureParams = FeatureParams()
    segment: SegmentParams | None = None  # None: one clip per file (cropped/padded to `frames`)
    split: SplitParams = SplitParams()
    workers: int = 0  # 0: all cores
    chunk: int = Field(64, gt=0)  # files per worker task (one batched STFT each)


def _featurize_chunk(task: tuple[Path, list[str], list[int], FeatureParams, SegmentParams | None, Path, int]) -> np.ndarray:
    """Write the features of one chunk of files (all their segments) into their rows of the shared
    .npy; return their energies.

    Workers write in place rather than sending every row back through a pipe, which would leave
    the parent process copying while the cores wait.
    """
    raw_dir, paths, counts, params, segment, out, start = task
    torch.set_num_threads(1)  # one process per core already; more threads would oversubscribe
    waves = []
    for path, count in zip(paths, counts):
        wave = audio.load(raw_dir / path, params.sample_rate, name=path)
        windows = segment.windows(wave, params.sample_rate) if segment else [wave]
        if len(windows) != count:
            raise ValueError(f"{path}: {len(wave)} samples decoded, the header promised {count} segments")
        waves += windows
    feats, energy = log_mel_batch(waves, params)
    array = np.load(out, mmap_mode="r+")
    # A shared mapping: the rows are in the file once written; no msync per chunk.
    array[start:start + len(feats)] = feats
    return energy


def featurize(raw_dir: Path, index: pd.DataFrame, params: FeatureParams, segment: SegmentParams | None,
              workers: int, chunk: int, out: FeaturesFolder) -> np.ndarray:
    """Write the features of every row of ``index`` (files in order, their segments consecutive)
    into ``out``'s array (memory-mapped); return their energies."""
    out.create_array(len(index), params.n_mels, params.frames)  # the workers fill in the rows
    # One clip here first: forked workers then inherit the filterbank, the FFT plan and
    # librosa's lazily imported modules instead of each paying for them on its first chunk.
    log_mel_batch([np.zeros(params.clip_samples, np.float32)], params)
    per_file = index.groupby("file", sort=False).size()
    files, counts = per_file.index.tolist(), per_file.tolist()
    offsets = np.concatenate([[0], np.cumsum(counts)])
    tasks = [(raw_dir, files[i:i + chunk], counts[i:i + chunk], params, segment, out.array_path, int(offsets[i]))
             for i in range(0, len(files), chunk)]
    energies = pmap(_featurize_chunk, tasks, workers, "featurize", chunk=1)
    return np.concatenate(energies) if energies else np.empty(0, np.float32)


def build_index(manifest: pd.DataFrame, p: FeaturizeParams) -> pd.DataFrame:
    """One row per clip, or per segment of each file: splits are drawn per file, by group."""
    if p.label_column not in manifest.columns:
        raise ValueError(f"manifest has no column '{p.label_column}' (featurize.label_column)")
    files = pd.DataFrame({
        "file": manifest["path"].to_numpy(), "label": manifest[p.label_column].astype(str).to_numpy(),
        "group": manifest["group"].astype(str).to_numpy(), "duration_s": manifest["duration_s"].to_numpy(dtype=float),
    })
    files[["split", "fold"]] = assign(files["label"], files["group"], p.split)
    rate = p.features.sample_rate
    starts = [p.segment.starts(audio.resampled_length(round(d * sr), int(sr), rate), rate) if p.segment else [0]
              for d, sr in zip(manifest["duration_s"], manifest["sample_rate"])]
    index = files.loc[files.index.repeat([len(s) for s in starts])].reset_index(drop=True)
    index["segment"] = np.concatenate([np.arange(len(s)) for s in starts]) if starts else []
    index["start_s"] = np.concatenate(starts) / rate if starts else []
    index["path"] = (index["file"] + "#" + index["segment"].astype(str).str.zfill(4)) if p.segment else index["file"]
    index.insert(0, "row", np.arange(len(index)))
    check_leakage(index)  # per row: no segment of a group lands in two places
    return index


def run(raw_dir: Path, manifest_path: Path, p: FeaturizeParams, out_dir: Path) -> pd.DataFrame:
    manifest = pd.read_parquet(manifest_path)
    if not manifest["readable"].all():
        raise ValueError(f"{manifest_path}: has unreadable files; run validate_raw first")
    index = build_index(manifest, p)
    with atomic_dir(out_dir) as tmp:
        folder = FeaturesFolder(tmp)
        index["energy"] = featurize(raw_dir, index, p.features, p.segment, p.workers, p.chunk, folder)
        folder.write(index, FeatureMeta(
            features=p.features, label_column=p.label_column, segment=p.segment,
            shape=(len(index), p.features.n_mels, p.features.frames),
            classes=sorted(index["label"].unique()),
            band_norm=band_statistics(folder.array(), index) if p.features.band_norm else None))
    return index


def enhance_index(manifest: pd.DataFrame, p: FeaturizeParams) -> pd.DataFrame:
    """Task enhance: one row per noisy file, split by group (speaker) like classify's clips; a
    clean reference shared by noisy files of two splits is refused, naming it."""
    files = manifest.assign(snr_db=pd.to_numeric(manifest.get("snr_db"), errors="coerce"),
                            noise=manifest.get("noise", pd.Series("", index=manifest.index)).astype(str),
                            group=manifest["group"].astype(str)).reset_index(drop=True)
    # one stratum: any speaker may go anywhere; the folds only balance speaker counts
    files[["split", "fold"]] = assign(pd.Series("pair", index=files.index), files["group"], p.split)
    files.insert(0, "row", np.arange(len(files)))
    index = files[list(ENHANCE_INDEX_COLUMNS)]
    check_leakage(index)
    if problems := check_pair_splits(index):
        raise ValueError("; ".join(problems[:10]) + (f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""))
    return index


def run_enhance(manifest_path: Path, p: FeaturizeParams, out_dir: Path) -> pd.DataFrame:
    manifest = pd.read_parquet(manifest_path)
    if "pair" not in manifest.columns:
        raise ValueError(f"{manifest_path}: no 'pair' column; was validate_raw run with task: enhance?")
    index = enhance_index(manifest, p)
    with atomic_dir(out_dir) as tmp:
        folder = FeaturesFolder(tmp)
        index.to_parquet(folder.index_path, index=False)
        write_json(folder.meta_path, EnhanceMeta(sample_rate=p.features.sample_rate, pairs=len(index)).model_dump())
    return index


def band_statistics(features: np.ndarray, index: pd.DataFrame) -> dict[str, BandNorm]:
    """Per-band statistics of the training rows of each fold, and of the whole training split.

    Fold k's model trains on the training split outside fold k, so its statistics never see
    its validation rows, nor any test row.
    """
    train = index[index["split"] == "train"]
    stats = {"train": BandNorm.fit(features, train["row"].to_numpy())}
    for fold in sorted(train["fold"].unique()):
        stats[f"fold_{fold}"] = BandNorm.fit(features, train.loc[train["fold"] != fold, "row"].to_numpy())
    return stats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", type=Path, required=True)
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="features folder")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    try:
        params = load_section("featurize", FeaturizeParams, args.params)
        enhance = load_task(args.params) == "enhance"
        index = (run_enhance(args.manifest, params, args.out) if enhance
                 else run(args.raw, args.manifest, params, args.out))
    except (ValueError, FileNotFoundError, audio.AudioError) as err:
        sys.exit(f"featurize: {err}")
    counts = index.groupby(["split", "group" if enhance else "label"]).size().to_dict()
    print(f"featurize: {len(index)} {'pairs' if enhance else 'clips'} -> {args.out}; "
          f"per split/{'group' if enhance else 'label'}: {counts}")


if __name__ == "__main__":
    main()
