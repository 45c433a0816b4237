"""Speaker-independent digit classification on FSDD: test speakers are never seen in training.

Runs the pipeline's own stages (ingest → validate_raw → featurize → validate_features → train
→ evaluate) in a temporary workspace, with the digit as label and the speaker as group, and
reports held-out test accuracy. Usage:

    python benchmarks/fsdd_accuracy.py [--fsdd ../shared/data/fsdd/recordings] [--epochs 30]

Writes benchmarks/results/fsdd_accuracy.json; last line ``fsdd_speaker_independent_accuracy=X``.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import pandas as pd

from pipeline.data import ingest
from pipeline.stages import evaluate, featurize, train, validate_features, validate_raw
from pipeline.splits import SplitParams
from pipeline.models.networks import ModelParams
from pipeline.training.config import TrainerParams

ROOT = Path(__file__).resolve().parents[1]
PATTERN = r"(?P<label>\d)_(?P<group>[a-z]+)_\d+\.wav"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fsdd", type=Path, default=ROOT.parent / "shared" / "data" / "fsdd" / "recordings")
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    digits = [str(d) for d in range(10)]
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
        raw = work / "raw"
        ingest.ingest(args.fsdd, ingest.scan(args.fsdd, PATTERN), raw)
        report = validate_raw.run(raw, validate_raw.RawParams(label_column="label", classes=digits,
                                                              sample_rates=[8000], max_duration_s=3.0),
                                  work / "manifest.parquet", work / "raw.json", work / "gx_raw")
        assert report.success, report.summary()
        # 6 speakers: 2 held out for test (test_fraction 1/3), 2 folds over the other 4.
        fp = featurize.FeaturizeParams(label_column="label", split=SplitParams(test_fraction=0.34, n_folds=2))
        index = featurize.run(raw, work / "manifest.parquet", fp, work / "features")
        checks = validate_features.run(work / "features", validate_features.FeatureChecks(), work / "f.json", work / "gx_f")
        assert checks.success, checks.summary()
        pd.DataFrame({"filename": []}).to_csv(work / "ignored.csv", index=False)
        tp = train.TrainParams(positive_class="0", model=ModelParams(arch="cnn", dropout=0.3),
                               # val/loss rises early while accuracy still climbs: select on accuracy.
                               trainer=TrainerParams(max_epochs=args.epochs, monitor="val/acc", monitor_mode="max",
                                                     patience=8, progress_bar=False, batch_size=64))
        summary = train.run(work / "features", work / "ignored.csv", work / "none", tp, work / "train_work",
                            work / "model", work / "curves.csv", work / "train_run.json")
        out = {"metrics": work / "eval.json", "predictions": work / "pred.csv", "segments": work / "segments.csv",
               "groups": work / "groups.csv",
               "plots": work / "plots", "run_id": work / "eval_run.json"}
        metrics = evaluate.run(work / "features", work / "ignored.csv", work / "model", work / "none",
                               evaluate.EvaluateParams(), out)
    test_speakers = sorted(index.loc[index["split"] == "test", "group"].unique())
    result = {"test_speakers": test_speakers, "files": len(index), "epochs": args.epochs,
              "cv_val_acc_mean": summary.get("cv/val/acc_mean"),
              "test_accuracy": metrics["files"]["accuracy"], "test_balanced_accuracy": metrics["files"]["balanced_accuracy"],
              "seconds": round(time.time() - start, 1)}
    (ROOT / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)
    (ROOT / "benchmarks" / "results" / "fsdd_accuracy.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"fsdd_speaker_independent_accuracy={metrics['files']['accuracy']['value']:.3f}")


if __name__ == "__main__":
    main()
