"""Label efficiency: the MAE-pretrained network against the same network from scratch, trained on
10% of the labels, leave-one-speaker-out on FSDD.

Per held-out speaker, through the pipeline's stages: the pretrain stage fits the masked
autoencoder on every training clip of the other five speakers (no labels); the train stage then
fine-tunes the MAE's encoder with a classification head on a seeded, stratified 10% of those
clips (``--label-fraction``; ``train.init_from_pretrain: true``, layer-wise lr decay
``LAYER_DECAY``), and trains the identical network from random weights on the same 10%
(``false``). Features as in ``benchmarks/fsdd_params.yaml``.

Writes benchmarks/results/label_efficiency.json; the last line is
``label_efficiency_pretraining_gain=X`` (mean accuracy difference, pretrained minus scratch).
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
from pipeline.stages import evaluate, featurize, pretrain, train, validate_raw  # noqa: E402

PATTERN = r"(?P<label>\d)_(?P<group>[a-z]+)_\d+\.wav"
SPEAKERS = ("george", "jackson", "lucas", "nicolas", "theo", "yweweler")
MODEL = {"arch": "mae", "mae_preset": "demo", "patch_size": [16, 16], "mask_ratio": 0.75, "dropout": 0.1}
LAYER_DECAY = 0.75  # fine-tuning only: from random weights every layer has everything to learn
OVERRIDES = {
    "pretrain": {"train_classes": [], "val_fold": None, "model": MODEL,  # every training clip, no labels
                 "trainer": {"max_epochs": 40, "batch_size": 64, "lr": 0.002, "scheduler": "one_cycle",
                             "progress_bar": False}},
    "train": {"model": MODEL, "label_fraction": 0.1, "augment": {"mixup_alpha": 0.0, "noise_db": None, "eq_db": 0.0},
              "trainer": {"max_epochs": 60, "batch_size": 32}},
}


def main() -> None:
    from tests.conftest import write_params

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fsdd", type=Path, default=ROOT.parent / "shared" / "data" / "fsdd" / "recordings")
    parser.add_argument("--speakers", nargs="+", choices=SPEAKERS, default=list(SPEAKERS))
    parser.add_argument("--label-fraction", type=float, default=0.1,
                        help="share of the training clips with labels (1.0: the MAE recipe on every label)")
    parser.add_argument("--set", type=setting, action="append", dest="sets", metavar="SECTION.KEY=VALUE",
                        help="override a param after the benchmark's own (repeatable), as `dvc exp run -S`")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "label_efficiency.json")
    args = parser.parse_args()
    start = time.perf_counter()
    folds = {}
    with tempfile.TemporaryDirectory(prefix="label_efficiency_") as tmp:
        work = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
        recipe = yaml.safe_load((ROOT / "benchmarks" / "fsdd_params.yaml").read_text())
        del recipe["train"]["model"]  # MODEL replaces the recipe's network, its constructor overrides too
        overrides = {**OVERRIDES, "train": {**OVERRIDES["train"], "label_fraction": args.label_fraction}}
        params = write_params(work / "params.yaml", recipe, overrides, *(args.sets or []))
        raw = work / "raw"
        ingest.ingest(args.fsdd, ingest.scan(args.fsdd, PATTERN), raw)
        validate_raw.run(raw, load_section("validate_raw", validate_raw.RawParams, params), work / "manifest.parquet",
                         work / "raw.json", work / "gx")
        featurize.run(raw, work / "manifest.parquet", load_section("featurize", featurize.FeaturizeParams, params),
                      work / "all")
        pd.DataFrame({"filename": []}).to_csv(work / "ignored.csv", index=False)
        for speaker in args.speakers:
            fold = work / speaker
            test = FeaturesFolder(work / "all").index()["group"].eq(speaker).to_numpy()
            features = held_out(work / "all", test, fold / "features")
            pretrain.run(features, load_section("pretrain", pretrain.PretrainParams, params), fold / "pw",
                         fold / "pretrained", fold / "recon", fold / "pretrain_run.json")
            result = {}
            for name, init, decay in (("scratch", False, 1.0), ("pretrained", True, LAYER_DECAY)):
                p = load_section("train", train.TrainParams, params)
                p = p.model_copy(update={"init_from_pretrain": init,
                                         "trainer": p.trainer.model_copy(update={"layer_decay": decay})})
                train.run(features, work / "ignored.csv", fold / "pretrained", p, fold / f"{name}_work",
                          fold / name, fold / f"{name}_curves.csv", fold / f"{name}_run.json")
                out = {k: fold / f"{name}_{k}.csv" for k in ("predictions", "segments", "groups")}
                out.update(metrics=fold / f"{name}.json", plots=fold / f"{name}_plots", run_id=fold / f"{name}_ev.json")
                m = evaluate.run(features, work / "ignored.csv", fold / name, fold / "pretrained",
                                 load_section("evaluate", evaluate.EvaluateParams, params), out)
                result[name] = round(m["files"]["accuracy"]["value"], 4)
                result["baseline"] = round(m["baseline"]["files"]["accuracy"]["value"], 4)
            folds[speaker] = result
            print(speaker, json.dumps(result), flush=True)
    gain = float(np.mean([r["pretrained"] - r["scratch"] for r in folds.values()]))
    result = {"folds": folds, "label_fraction": args.label_fraction, "model": MODEL, "overrides": overrides, "sets": args.sets or [],
              "layer_decay": LAYER_DECAY,
              "mean": {k: round(float(np.mean([r[k] for r in folds.values()])), 4) for k in ("scratch", "pretrained", "baseline")},
              "pretraining_gain": round(gain, 4), "seconds": round(time.perf_counter() - start, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"label_efficiency_pretraining_gain={gain:.3f}")


if __name__ == "__main__":
    main()
