"""Long recordings: segment mode against the centre crop, on 20 s recordings made of real speech.

Each recording is 20 s at 8 kHz: six FSDD takes of one digit by one speaker at random places in
a quiet noise floor (the rest of the recording is background), so the digit is the file's label
and one centre crop of 1.27 s often hears nothing but noise. A group is one speaker's digit
(two recordings each, like two visits of a patient); test groups are the fixed split's
speakers (nicolas, yweweler), never heard in training. Every run uses the FSDD recipe
(``benchmarks/fsdd_params.yaml``) through the pipeline's stages:

* crop: one row per file, the centre ``frames`` of it (``featurize.segment: null``);
* segments: consecutive 1.27 s windows, 50% overlap; the file's probabilities are the mean of its
  windows' (``featurize.segment``), the group's label the vote of its files;
* segments_energy: the same, with the filter stage's energy rule ignoring windows quieter than
  ``QUIET_DB`` (most windows hear only the floor; they teach nothing and dilute the mean), in
  training and in evaluation alike (the pretrain stage, one epoch, writes the per-window
  energies the filter reads).

Writes benchmarks/results/long_recordings.json; the last line is ``long_recording_segment_gain=X``
(file accuracy of segments_energy minus crop).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import held_out  # noqa: E402
from pipeline import audio  # noqa: E402
from pipeline.config import load_section  # noqa: E402
from pipeline.outliers import FilterParams  # noqa: E402
from pipeline.stages import evaluate, featurize, pretrain, train, validate_raw  # noqa: E402
from pipeline.stages import filter as filter_stage  # noqa: E402

SPEAKERS = ("george", "jackson", "lucas", "nicolas", "theo", "yweweler")
TEST = ("nicolas", "yweweler")
RATE, SECONDS, TAKES, PER_GROUP = 8000, 20.0, 6, 2
SEGMENT = {"window_s": 1.27, "hop_s": 0.635, "aggregate": "mean"}
QUIET_DB = -40.0  # mean mel power of a window, dB: the floor sits near -45, speech far above
MODES = ("crop", "segments", "segments_energy")


def build(fsdd: Path, out: Path, seed: int = 0) -> pd.DataFrame:
    """The recordings and their metadata.csv (label: digit, group: speaker-digit)."""
    rng = np.random.default_rng(seed)
    rows = []
    for speaker in SPEAKERS:
        for digit in range(10):
            takes = rng.permutation(50)
            for k in range(PER_GROUP):
                wave = rng.normal(0, 10 ** (-50 / 20), int(RATE * SECONDS)).astype(np.float32)  # -50 dBFS floor
                for take in takes[k * TAKES:(k + 1) * TAKES]:
                    clip = audio.load(fsdd / f"{digit}_{speaker}_{take}.wav", RATE)
                    start = rng.integers(0, len(wave) - len(clip))
                    wave[start:start + len(clip)] += clip
                rel = f"{speaker}/{speaker}_{digit}_{k}.wav"
                (out / speaker).mkdir(parents=True, exist_ok=True)
                audio.write_wav(out / rel, np.clip(wave, -1, 1), RATE)
                rows.append({"path": rel, "label": str(digit), "group": f"{speaker}_{digit}", "speaker": speaker})
    meta = pd.DataFrame(rows)
    meta.to_csv(out / "metadata.csv", index=False)
    return meta


def run(mode: str, raw: Path, work: Path, epochs: int) -> dict:
    from tests.conftest import write_params

    recipe = yaml.safe_load((ROOT / "benchmarks" / "fsdd_params.yaml").read_text())
    params = write_params(work / f"{mode}.yaml", recipe, {
        "validate_raw": {"max_duration_s": 30.0, "min_clips_per_class": 4},
        "featurize": {"segment": None if mode == "crop" else SEGMENT},
        "pretrain": {"val_fold": None, "trainer": {"max_epochs": 1, "progress_bar": False}},
        "filter": {"energy": {"mode": "hardcode", "lower": 10 ** (QUIET_DB / 10), "upper": 1e9}},
        "train": {"trainer": {"max_epochs": epochs}}})
    merged = yaml.safe_load(params.read_text())
    merged["filter"]["reconstruction"] = {"mode": None}  # energy alone: the MAE's one epoch judges nothing
    params.write_text(yaml.safe_dump(merged))
    out = work / mode
    validate_raw.run(raw, load_section("validate_raw", validate_raw.RawParams, params), out / "manifest.parquet",
                     out / "raw.json", out / "gx")
    fp = load_section("featurize", featurize.FeaturizeParams, params)
    index = featurize.run(raw, out / "manifest.parquet", fp, out / "features")
    test = index["group"].str.split("_").str[0].isin(TEST).to_numpy()  # the fixed split's speakers, whole
    held_out(out / "features", test)
    pd.DataFrame({"filename": []}).to_csv(out / "ignored.csv", index=False)
    if mode == "segments_energy":
        pretrain.run(out / "features", load_section("pretrain", pretrain.PretrainParams, params), out / "pw",
                     out / "pretrained", out / "recon", out / "pretrain_run.json")
        ignored, _ = filter_stage.run(out / "recon", load_section("filter", FilterParams, params))
        ignored.to_csv(out / "ignored.csv", index=False)
    start = time.perf_counter()
    train.run(out / "features", out / "ignored.csv", work / "none", load_section("train", train.TrainParams, params),
              out / "work", out / "model", out / "curves.csv", out / "train_run.json")
    seconds = time.perf_counter() - start
    paths = {k: out / f"{k}.csv" for k in ("predictions", "segments", "groups")}
    paths.update(metrics=out / "evaluate.json", plots=out / "plots", run_id=out / "run.json")
    m = evaluate.run(out / "features", out / "ignored.csv", out / "model", work / "none",
                     load_section("evaluate", evaluate.EvaluateParams, params), paths)
    pick = lambda level, who: round(m[level]["accuracy"]["value"] if who == "model" else  # noqa: E731
                                    m["baseline"][level]["accuracy"]["value"], 4)
    ignored = set(pd.read_csv(out / "ignored.csv")["filename"])
    return {"rows": len(index), "train_rows": int((~test & ~index["path"].isin(ignored)).sum()),
            "ignored_rows": len(ignored), "train_s": round(seconds, 1),
            **{f"{who}_{level}_accuracy": pick(level, who) for who in ("model", "baseline") for level in ("files", "groups")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fsdd", type=Path, default=ROOT.parent / "shared" / "data" / "fsdd" / "recordings")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "long_recordings.json")
    args = parser.parse_args()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="long_recordings_") as tmp:
        work = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
        meta = build(args.fsdd, work / "raw")
        results = {}
        for mode in MODES:
            results[mode] = run(mode, work / "raw", work, args.epochs)
            print(mode, json.dumps(results[mode]), flush=True)
    gain = results["segments_energy"]["model_files_accuracy"] - results["crop"]["model_files_accuracy"]
    result = {"recordings": len(meta), "seconds_each": SECONDS, "test_speakers": list(TEST), "epochs": args.epochs,
              "segment": SEGMENT, "quiet_db": QUIET_DB, **results, "segment_gain_files": round(gain, 4),
              "segment_gain_groups": round(results["segments_energy"]["model_groups_accuracy"]
                                           - results["crop"]["model_groups_accuracy"], 4),
              "seconds": round(time.perf_counter() - start, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"long_recording_segment_gain={gain:.3f}")


if __name__ == "__main__":
    main()
