"""Speech enhancement: the MaskUNet recipe trained with Lightning vs classical spectral gating.

    python benchmarks/enhance.py [--speakers 8] [--utterances 10] [--corpus DIR] [--epochs 24]
                                 [--channels 6] [--depth 3] [--n-fft 256] [--hop 128] [--crop-s 1.0] ...

1. Builds the paired espeak corpus (pipeline.data.enhance_corpus) into a tmp dir, or reads
   ``--corpus``; splits it by speaker (train / val / test groups disjoint, so no clean utterance
   is shared; up to 8 speakers no voice is either, beyond that a voice recurs at another pitch).
2. Trains the recipe with pipeline.training.kfold.fit_fold (early stopping on val/si_snr, the
   best checkpoint kept) on ``--threads`` CPU threads, timing the fit.
3. Enhances every test utterance whole with the model and with ``spectral_gating`` and scores
   both with ``utterance_metrics`` against the clean reference.
4. Summarises per SNR bucket and overall: mean, std and a 95% percentile-bootstrap CI per
   metric and enhancer, a paired Wilcoxon test of model vs gating per metric, and the issue's
   goals (met or not).

Writes the per-utterance scores (``--csv``) and the summary (``--out``); the last line printed
is ``enhance_sisnr_improvement_db=X`` (the model's mean SI-SNR improvement on the test set).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pipeline import audio  # noqa: E402
from pipeline.data import enhance_corpus  # noqa: E402
from pipeline.enhancement import spectral_gating, utterance_metrics  # noqa: E402
from pipeline.io import write_json  # noqa: E402
from pipeline.models.unet import MaskUNet  # noqa: E402
from pipeline.stats import bootstrap_ci, wilcoxon_pairs  # noqa: E402
from pipeline.training.config import TrainerParams  # noqa: E402
from pipeline.training.enhance import EnhanceModule, PairedWaveDataModule  # noqa: E402
from pipeline.training.kfold import fit_fold, read_history, seed_all  # noqa: E402

RATE = enhance_corpus.SAMPLE_RATE
RESULTS = REPO / "benchmarks" / "results"
METRICS = ("si_snr_i", "pesq", "stoi")  # higher is better for all three
ENHANCERS = ("model", "spectral_gating")
# The goals; each is checked on the test set's means.
GOAL_SISNR_I_DB, GOAL_SISNR_OVER_REF_DB, GOAL_PESQ_OVER_REF = 8.0, 3.0, 0.3
HIGH_SNR_DB = 10  # inputs at or above this must not lose STOI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--corpus", type=Path, default=None, help="an existing paired corpus (default: build one in a tmp dir)")
    add("--speakers", type=int, default=8)
    add("--utterances", type=int, default=10)
    add("--val-speakers", type=int, default=1)
    add("--test-speakers", type=int, default=2)
    add("--channels", type=int, default=6)
    add("--depth", type=int, default=3)
    add("--mask", choices=("sigmoid", "bounded_relu"), default="sigmoid")
    add("--n-fft", type=int, default=256)
    add("--hop", type=int, default=128)
    add("--crop-s", type=float, default=1.0)
    add("--spectral-weight", type=float, default=0.0)
    add("--epochs", type=int, default=24)
    add("--patience", type=int, default=6)
    add("--batch-size", type=int, default=8)
    add("--lr", type=float, default=3e-3)
    add("--seed", type=int, default=0)
    add("--threads", type=int, default=1, help="torch.set_num_threads")
    add("--bootstrap", type=int, default=2000, help="bootstrap resamples per CI")
    add("--out", type=Path, default=RESULTS / "enhance.json")
    add("--csv", type=Path, default=RESULTS / "enhance_utterances.csv")
    return parser.parse_args(argv)


def split_by_speaker(meta: pd.DataFrame, n_val: int, n_test: int) -> dict[str, pd.DataFrame]:
    """Train / val / test rows with disjoint speakers: the last ``n_test`` groups test, the
    ``n_val`` before them validate, the rest train."""
    groups = sorted(meta["group"].unique())
    if len(groups) < n_val + n_test + 1:
        raise SystemExit(f"{len(groups)} speakers cannot give {n_val} val, {n_test} test and >= 1 train")
    test, val = groups[len(groups) - n_test:], groups[len(groups) - n_test - n_val:len(groups) - n_test]
    split = meta["group"].map(lambda g: "test" if g in test else "val" if g in val else "train")
    return {name: meta[split == name].reset_index(drop=True) for name in ("train", "val", "test")}


def train(args: argparse.Namespace, root: Path, splits: dict[str, pd.DataFrame], work: Path) -> tuple[MaskUNet, dict]:
    """Fit the recipe; return the network with its best-validation weights and the fit's record."""
    p = TrainerParams(max_epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, scheduler="one_cycle",
                      monitor="val/si_snr", monitor_mode="max", patience=args.patience, save_top_k=1,
                      accelerator="cpu", devices=1, seed=args.seed, progress_bar=False)
    seed_all(p.seed)
    network = MaskUNet(n_fft=args.n_fft, hop=args.hop, depth=args.depth, channels=args.channels, mask=args.mask)
    module = EnhanceModule(network, p, spectral_weight=args.spectral_weight)
    data = PairedWaveDataModule(root, splits["train"], splits["val"], None, p, RATE, args.crop_s)
    start = time.perf_counter()
    result = fit_fold("enhance", module, data, p, work)
    seconds = time.perf_counter() - start
    history = read_history(work / "history.csv")
    curve = history[["epoch", "val/si_snr", "train/loss"]].round(3).to_dict("records") if len(history) else []
    params = sum(t.numel() for t in network.parameters())
    return network.eval(), {"train_seconds": round(seconds, 1), "epochs_run": result["epochs"],
                            "best_val_si_snr_db": result["score"], "parameters": params, "curve": curve}


def score_test(network: MaskUNet, root: Path, rows: pd.DataFrame) -> pd.DataFrame:
    """One row per (test utterance, enhancer) with every utterance_metrics score."""
    records = []
    for row in rows.itertuples(index=False):
        noisy = audio.load(root / row.path, RATE, name=row.path)
        clean = audio.load(root / row.pair, RATE, name=row.pair)
        with torch.inference_mode():
            enhanced = network(torch.from_numpy(noisy)[None])[0].numpy()
        for name, wave in (("model", enhanced), ("spectral_gating", spectral_gating(noisy, RATE))):
            records.append({"path": row.path, "group": row.group, "snr_db": row.snr_db, "noise": row.noise,
                            "enhancer": name, **utterance_metrics(clean, noisy, wave, RATE)})
    return pd.DataFrame(records)


def describe(values: np.ndarray, n_resamples: int) -> dict[str, float]:
    """Mean, std and the 95% percentile-bootstrap CI of the mean of (n,) ``values``."""
    mean, low, high = bootstrap_ci(lambda v, _: float(np.mean(v)), values, values, n_resamples=n_resamples)
    return {"mean": round(mean, 3), "std": round(float(np.std(values, ddof=1)) if len(values) > 1 else 0.0, 3),
            "ci95": [round(low, 3), round(high, 3)], "n": int(len(values))}


def summarise(scores: pd.DataFrame, n_resamples: int) -> dict[str, Any]:
    """Per SNR bucket (and ``all``): each enhancer's metric summaries and the noisy input's."""
    buckets: dict[str, Any] = {}
    for bucket, part in [("all", scores), *((f"{snr:+d}dB", g) for snr, g in scores.groupby("snr_db"))]:
        model = part[part["enhancer"] == "model"]
        entry = {name: {m: describe(part.loc[part["enhancer"] == name, m].to_numpy(), n_resamples) for m in METRICS}
                 for name in ENHANCERS}
        entry["noisy"] = {m: describe(model[f"{m}_noisy"].to_numpy(), n_resamples) for m in ("pesq", "stoi")}
        buckets[bucket] = entry
    return buckets


def wilcoxon(scores: pd.DataFrame) -> dict[str, Any]:
    """Paired Wilcoxon signed-rank test of model vs spectral gating per metric, over test utterances."""
    wide = scores.pivot(index="path", columns="enhancer", values=list(METRICS))
    out = {}
    for metric in METRICS:
        row = wilcoxon_pairs({name: wide[metric][name].to_numpy() for name in ENHANCERS}).iloc[0]
        # pairs are sorted by name: a = model, b = spectral_gating, so mean_diff is gating - model
        out[metric] = {"mean_model_minus_gating": round(-float(row["mean_diff"]), 3), "n": int(row["n"]),
                       "statistic": float(row["statistic"]), "p_value": float(row["p_value"])}
    return out


def goals(scores: pd.DataFrame) -> dict[str, Any]:
    """The issue's goals, each with its figure and whether it is met."""
    model, gating = (scores[scores["enhancer"] == name] for name in ENHANCERS)
    sisnr_i = float(model["si_snr_i"].mean())
    over_ref = sisnr_i - float(gating["si_snr_i"].mean())
    pesq_over_ref = float(model["pesq"].mean() - gating["pesq"].mean())
    high = model[model["snr_db"] >= HIGH_SNR_DB]
    stoi_change = float((high["stoi"] - high["stoi_noisy"]).mean())
    return {"si_snr_i_db": {"value": round(sisnr_i, 3), "goal": f">= {GOAL_SISNR_I_DB}",
                            "met": sisnr_i >= GOAL_SISNR_I_DB},
            "si_snr_i_over_gating_db": {"value": round(over_ref, 3), "goal": f">= {GOAL_SISNR_OVER_REF_DB}",
                                        "met": over_ref >= GOAL_SISNR_OVER_REF_DB},
            "pesq_over_gating": {"value": round(pesq_over_ref, 3), "goal": f">= {GOAL_PESQ_OVER_REF}",
                                 "met": pesq_over_ref >= GOAL_PESQ_OVER_REF},
            f"stoi_change_vs_noisy_at_snr_ge_{HIGH_SNR_DB}db": {"value": round(stoi_change, 4), "goal": ">= 0",
                                                                "met": stoi_change >= 0}}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="enhance_bench_") as tmp:
        root = args.corpus or Path(tmp) / "corpus"
        if args.corpus is None:
            enhance_corpus.build(root, args.speakers, args.utterances)
        meta = pd.read_csv(root / "metadata.csv")
        splits = split_by_speaker(meta, args.val_speakers, args.test_speakers)
        network, fit = train(args, root, splits, Path(tmp) / "fit")
        start = time.perf_counter()
        scores = score_test(network, root, splits["test"])
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    scores.round(4).to_csv(args.csv, index=False, lineterminator="\n")
    result = {"recipe": {k: v for k, v in vars(args).items() if k not in ("out", "csv", "corpus")},
              "corpus": {"speakers": int(meta["group"].nunique()), "noisy_files": len(meta),
                         **{f"{name}_speakers": sorted(rows["group"].unique()) for name, rows in splits.items()},
                         **{f"{name}_pairs": len(rows) for name, rows in splits.items()}},
              "fit": fit, "score_seconds": round(time.perf_counter() - start, 1),
              "goals": goals(scores), "wilcoxon_model_vs_gating": wilcoxon(scores),
              "by_snr": summarise(scores, args.bootstrap), "per_utterance_csv": args.csv.name}
    write_json(args.out, result)
    for name, goal in result["goals"].items():
        print(f"{name}: {goal['value']} (goal {goal['goal']}: {'met' if goal['met'] else 'NOT met'})")
    print(f"train {fit['train_seconds']} s, {fit['epochs_run']} epochs; wrote {args.out} and {args.csv}")
    print(f"enhance_sisnr_improvement_db={result['goals']['si_snr_i_db']['value']}")


if __name__ == "__main__":
    main()
