"""Featurize throughput: the featurize stage's function vs a plain per-file librosa loop.

    python benchmarks/featurize.py [--files 1500] [--repeats 3] [--profile]

Both run in one process on the same FSDD recordings (8 kHz, read in place from
../shared/data/fsdd/recordings) with every parameter from params.yaml ``featurize``:

  ours:    pipeline.stages.featurize.featurize(..., workers=0 (all cores), chunk=featurize.chunk)
  librosa: for each file: librosa.load(sr=16000) -> fit_length -> librosa.feature.melspectrogram
           (same n_fft/hop/win/n_mels/fmin/fmax, power=2, center, constant pad)
           -> librosa.power_to_db(ref=1.0, amin=1e-10, top_db) -> the same normalization

Both are warmed up on a few files first (imports, numba JIT, filterbank caches), then timed
``--repeats`` times, alternating (ours, librosa, ours, ...) so both see the same machine load;
the median counts. The librosa loop is one process with numpy's BLAS limited to one thread
(``--librosa-blas-threads``): librosa projects on the mel filterbank with a BLAS einsum, and
on a busy 2-core machine OpenBLAS's spinning threads make it 4-10x slower and erratic, which
would flatter our speedup; one thread is the loop at its fastest and steadiest there.
Throughput is audio-seconds (of the source files) per wall-clock second. Writes
benchmarks/results/featurize.json; the last line printed is
``featurize_speedup_vs_librosa=X``. ``--profile`` adds a single-core breakdown of our path
(read+decode, resample, features, process-pool overhead).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import librosa
import numpy as np
import pandas as pd
import soundfile as sf
from threadpoolctl import threadpool_limits

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline import audio  # noqa: E402
from pipeline.config import load_section  # noqa: E402
from pipeline.contracts import FeaturesFolder  # noqa: E402
from pipeline.features import FeatureParams, fit_length, log_mel_batch  # noqa: E402
from pipeline.stages.featurize import FeaturizeParams, featurize  # noqa: E402
from pipeline.parallel import resolve_workers  # noqa: E402

FSDD = REPO.parent / "shared" / "data" / "fsdd" / "recordings"
RESULT = REPO / "benchmarks" / "results" / "featurize.json"
WARMUP_FILES = 16


def pick_files(count: int) -> list[str]:
    """``count`` FSDD files spread evenly over the sorted listing (every digit and speaker)."""
    names = sorted(p.name for p in FSDD.glob("*.wav"))
    if len(names) < count:
        raise SystemExit(f"need {count} files in {FSDD}, found {len(names)}")
    step = len(names) / count
    return [names[int(i * step)] for i in range(count)]


def librosa_features(path: Path, p: FeatureParams) -> np.ndarray:
    y, _ = librosa.load(path, sr=p.sample_rate)
    mel = librosa.feature.melspectrogram(y=fit_length(y, p), sr=p.sample_rate, n_fft=p.n_fft,
                                         hop_length=p.hop_length, win_length=p.win_length, n_mels=p.n_mels,
                                         fmin=p.fmin, fmax=p.fmax, power=2.0, center=True, pad_mode="constant")
    db = librosa.power_to_db(mel, ref=1.0, amin=1e-10, top_db=p.top_db)
    if p.normalize == "per_clip":
        db = (db - db.mean()) / max(db.std(ddof=1), 1e-5)
    elif p.normalize == "fixed":
        db = (db - p.norm_mean) / p.norm_std
    return db.astype(np.float32)


def librosa_loop(paths: list[Path], p: FeatureParams) -> np.ndarray:
    out = np.empty((len(paths), p.n_mels, p.frames), np.float32)
    for i, path in enumerate(paths):
        out[i] = librosa_features(path, p)
    return out


def ours(names: list[str], fp: FeaturizeParams, tmp: Path) -> np.ndarray:
    index = pd.DataFrame({"file": names})  # one row per file (no segments)
    featurize(FSDD, index, fp.features, None, 0, fp.chunk, FeaturesFolder(tmp))
    return FeaturesFolder(tmp).array()


def timed(fn, repeats: int) -> tuple[float, list[float], object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, result


def alternate(fns: dict[str, object], repeats: int) -> dict[str, tuple[float, list[float], object]]:
    """Time each function ``repeats`` times, round-robin; name -> (median, times, last result)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    results: dict[str, object] = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(t), t, results[name]) for name, t in times.items()}


def profile(names: list[str], fp: FeaturizeParams, tmp: Path, repeats: int) -> dict[str, float]:
    """Seconds spent by our path in each step, on one core (no process pool), plus the pool."""
    p = fp.features
    paths = [FSDD / n for n in names]
    data = [path.read_bytes() for path in paths]
    t_read, _, _ = timed(lambda: [path.read_bytes() for path in paths], repeats)
    t_decode, _, decoded = timed(lambda: [audio.decode(d, name="x") for d in data], repeats)
    monos = [audio.to_mono(s) for s, _ in decoded]
    t_resample, _, waves = timed(lambda: [audio.resample(m, 8000, p.sample_rate) for m in monos], repeats)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t_fit, _, _ = timed(lambda: [fit_length(w, p) for w in waves], repeats)
    t_feat, _, _ = timed(lambda: [log_mel_batch(waves[i:i + fp.chunk], p) for i in range(0, len(waves), fp.chunk)],
                         repeats)
    torch.set_num_threads(threads)
    t_one, _, _ = timed(lambda: featurize(FSDD, names, p, 1, fp.chunk, tmp / "f1.npy"), repeats)
    t_all, _, _ = timed(lambda: featurize(FSDD, names, p, 0, fp.chunk, tmp / "f0.npy"), repeats)
    return {"read_s": t_read, "decode_s": t_decode, "resample_s": t_resample, "fit_length_s": t_fit,
            "stft_mel_db_s": t_feat, "featurize_workers1_s": t_one, "featurize_all_cores_s": t_all}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--profile", action="store_true", help="also time each step of our path")
    parser.add_argument("--librosa-blas-threads", type=int, default=1,
                        help="BLAS threads for the librosa loop (0: numpy's default)")
    args = parser.parse_args(argv)
    if not FSDD.is_dir():
        raise SystemExit(f"FSDD not found at {FSDD} (the `shared` folder beside the repo)")
    fp = load_section("featurize", FeaturizeParams, args.params)
    p = fp.features
    names = pick_files(args.files)
    paths = [FSDD / n for n in names]
    audio_seconds = sum(sf.info(path).duration for path in paths)
    cores = resolve_workers(0)

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)

        def plain_loop() -> np.ndarray:
            with threadpool_limits(args.librosa_blas_threads or None, user_api="blas"):
                return librosa_loop(paths, p)

        load_before = os.getloadavg()[0]
        ours(names[:2 * fp.chunk], fp, tmp)  # two tasks: the process pool path, as timed
        librosa_loop(paths[:WARMUP_FILES], p)
        timings = alternate({"ours": lambda: ours(names, fp, tmp), "librosa": plain_loop}, args.repeats)
        (t_ours, ours_times, ours_out), (t_lib, lib_times, lib_out) = timings["ours"], timings["librosa"]
        load_after = os.getloadavg()[0]
        breakdown = profile(names, fp, tmp, 1) if args.profile else None

    diff = np.abs(np.asarray(ours_out) - np.asarray(lib_out))
    scale = p.norm_std if p.normalize == "fixed" else 1.0  # report the difference in dB where we can
    result = {
        "files": len(names),
        "audio_seconds": round(audio_seconds, 3),
        "ours_audio_s_per_s": round(audio_seconds / t_ours, 2),
        "librosa_audio_s_per_s": round(audio_seconds / t_lib, 2),
        "speedup": round(t_lib / t_ours, 2),
        "cores": cores,
        "details": {
            "ours_seconds": [round(t, 3) for t in ours_times],
            "librosa_seconds": [round(t, 3) for t in lib_times],
            "max_abs_diff_db": round(float(diff.max()) * scale, 5),
            "mean_abs_diff_db": round(float(diff.mean()) * scale, 6),
            "params": p.model_dump(),
            "chunk": fp.chunk,
            "librosa_blas_threads": args.librosa_blas_threads or "default",
            "load_average_before_after": [round(load_before, 2), round(load_after, 2)],
            "source": "FSDD 8 kHz, resampled to featurize.features.sample_rate",
            **({"profile_single_core_seconds": {k: round(v, 3) for k, v in breakdown.items()}} if breakdown else {}),
        },
    }
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "details"}))
    if breakdown:
        print("profile (one core, seconds):", json.dumps(result["details"]["profile_single_core_seconds"]))
    print(f"featurize_speedup_vs_librosa={t_lib / t_ours:.2f}")


if __name__ == "__main__":
    main()
