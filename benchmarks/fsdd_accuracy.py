"""Speaker-independent digit recognition on FSDD: the pipeline's model beside the MFCC baseline.

Runs the pipeline's own stages (ingest → validate_raw → featurize once; then per fold train →
evaluate, which fits and scores the baseline on the same files) with the recipe in
``benchmarks/fsdd_params.yaml`` over the repo's params.yaml, on two protocols:

* leave-one-speaker-out (LOSO) over all six speakers: train on five, test on the sixth;
* the fixed split: test speakers nicolas + yweweler, train on the other four.

No validation-based selection: each fold trains one model on every training speaker for a
fixed number of epochs (``train.folds: []``, ``final: refit``). Usage::

    python benchmarks/fsdd_accuracy.py [--fsdd ../shared/data/fsdd/recordings] [--folds loso_theo fixed]
        [--seed N] [--set train.augment.mixup_alpha=0.4 ...]

Writes benchmarks/results/fsdd_accuracy.json; the last line is ``fsdd_loso_accuracy=X``.
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

from common import held_out, setting  # noqa: E402
from pipeline.config import load_section  # noqa: E402
from pipeline.contracts import FeaturesFolder  # noqa: E402
from pipeline.data import ingest  # noqa: E402
from pipeline.stages import evaluate, featurize, train, validate_raw  # noqa: E402

PATTERN = r"(?P<label>\d)_(?P<group>[a-z]+)_\d+\.wav"
SPEAKERS = ("george", "jackson", "lucas", "nicolas", "theo", "yweweler")
FIXED = ("nicolas", "yweweler")
FOLDS = {**{f"loso_{s}": (s,) for s in SPEAKERS}, "fixed": FIXED}


def params(out: Path, epochs: int | None, seed: int | None = None, sets: list[dict] | None = None) -> Path:
    """The repo's params.yaml with the FSDD recipe merged in (``epochs``: a smoke run; ``seed``:
    train.seed; ``sets``: further overrides, applied last)."""
    from tests.conftest import write_params

    recipe = yaml.safe_load((ROOT / "benchmarks" / "fsdd_params.yaml").read_text())
    overrides: dict = {}
    if epochs:
        overrides["trainer"] = {"max_epochs": epochs}
    if seed is not None:
        overrides["seed"] = seed
    return write_params(out, recipe, {"train": overrides} if overrides else None, *(sets or []))


def run_fold(name: str, work: Path, all_features: Path, params_file: Path) -> dict:
    test = FeaturesFolder(all_features).index()["group"].isin(FOLDS[name]).to_numpy()
    features = held_out(all_features, test, work / name / "features")
    ignored = work / "ignored.csv"
    start = time.perf_counter()
    train.run(features, ignored, work / "none", load_section("train", train.TrainParams, params_file),
              work / name / "work", work / name / "model", work / name / "curves.csv", work / name / "train_run.json")
    train_s = time.perf_counter() - start
    out = {k: work / name / f"{k}.csv" for k in ("predictions", "segments", "groups")}
    out.update(metrics=work / name / "evaluate.json", plots=work / name / "plots", run_id=work / name / "run.json")
    metrics = evaluate.run(features, ignored, work / name / "model", work / "none",
                           load_section("evaluate", evaluate.EvaluateParams, params_file), out)
    table = pd.read_csv(out["predictions"])
    by_speaker = table.groupby("group")
    return {"model": by_speaker["correct"].mean().round(4).to_dict(),
            "baseline": by_speaker["baseline_correct"].mean().round(4).to_dict(),
            "accuracy": metrics["files"]["accuracy"], "baseline_accuracy": metrics["baseline"]["files"]["accuracy"],
            "mcnemar_p": metrics["model_vs_baseline"]["mcnemar"]["p_value"], "train_s": round(train_s, 1)}


def summarize(folds: dict[str, dict]) -> dict:
    loso = {f: folds[f] for f in folds if f.startswith("loso_")}
    out: dict = {}
    for who in ("model", "baseline"):
        per = [r[who][f.removeprefix("loso_")] for f, r in loso.items()]
        out[who] = {"loso_mean": round(float(np.mean(per)), 4) if per else None,
                    "loso_worst": round(float(np.min(per)), 4) if per else None,
                    "fixed": round(float(np.mean([folds["fixed"][who][s] for s in FIXED])), 4) if "fixed" in folds else None}
    out["model_beats_baseline_on_every_held_out_speaker"] = all(
        r["model"][s] > r["baseline"][s] for r in folds.values() for s in r["model"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fsdd", type=Path, default=ROOT.parent / "shared" / "data" / "fsdd" / "recordings")
    parser.add_argument("--folds", nargs="+", choices=list(FOLDS), default=list(FOLDS))
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's (a smoke run)")
    parser.add_argument("--seed", type=int, default=None, help="override train.seed (a second run for a range)")
    parser.add_argument("--set", type=setting, action="append", dest="sets", metavar="SECTION.KEY=VALUE",
                        help="override any param on top of the recipe (repeatable): a variant to compare")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fsdd_accuracy.json")
    args = parser.parse_args()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fsdd_bench_") as tmp:
        work = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
        params_file = params(work / "params.yaml", args.epochs, args.seed, args.sets)
        raw = work / "raw"
        ingest.ingest(args.fsdd, ingest.scan(args.fsdd, PATTERN), raw)
        report = validate_raw.run(raw, load_section("validate_raw", validate_raw.RawParams, params_file),
                                  work / "manifest.parquet", work / "raw.json", work / "gx_raw")
        assert report.success, report.summary()
        fp = load_section("featurize", featurize.FeaturizeParams, params_file)
        featurize.run(raw, work / "manifest.parquet", fp.model_copy(update={"features": fp.features.model_copy(
            update={"band_norm": False})}), work / "all")  # each fold computes its own statistics
        pd.DataFrame({"filename": []}).to_csv(work / "ignored.csv", index=False)
        folds = {}
        for name in args.folds:
            folds[name] = run_fold(name, work, work / "all", params_file)
            print(name, json.dumps(folds[name]), flush=True)
        recipe = yaml.safe_load((ROOT / "benchmarks" / "fsdd_params.yaml").read_text())
        seed = load_section("train", train.TrainParams, params_file).seed
    result = {"folds": folds, "summary": summarize(folds), "recipe": recipe, "overrides": args.sets or [],
              "seed": seed, "threads": os.cpu_count(),
              "seconds": round(time.perf_counter() - start, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))
    loso = result["summary"]["model"]["loso_mean"]
    print(f"fsdd_loso_accuracy={loso if loso is not None else float('nan'):.3f}")


if __name__ == "__main__":
    main()
