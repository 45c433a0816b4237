"""Serving benchmark of the speech-enhancement route: 5 s clips through /raw/enhance and /enhance.

    python benchmarks/enhance_serve.py [--model DIR | --random] [--concurrency 8] [--requests 300]
                                       [--workers N] [--torch-threads N] [--device cpu]

The enhancer (``--model``: an exported model folder of task enhance, default the repo's
models/train; ``--random``: a random-init MaskUNet of params.yaml's ``train.enhance.model``,
timing does not depend on weights) is imported into a temporary BentoML home and served from
source (serving.service) with the repo's params.yaml, ``serve.workers`` / ``serve.torch_threads``
overridable, through SOUNDLINE_PARAMS. Every request is one of 4 noisy 5 s, 16 kHz, PCM_16
mono clips: FSDD digit recordings (../shared/data/fsdd) resampled to 16 kHz and strung together,
in pink noise at 5 dB SNR; without FSDD, speech-like noise under a syllable envelope.

Measured, the load client on the same cores as the server (aiohttp, closed loop, a fresh
connection per request, as serve_load.py): (a) POST /raw/enhance (the clip as the body) at
``--concurrency``, (b) the same load on the multipart /enhance, (c) /raw/enhance one request at a
time (the server's latency with no queueing). Each answer must be 200, audio/wav and as long as
the clip, else it counts as an error. In-process, with serve.torch_threads threads: the model's
own time per clip (``ExportedEnhancer.enhance``) and the route's whole call
(``serving.enhance.enhance_file``: decode + enhance + clip + encode), and decode, clip + encode
alone, medians of ``--repeats`` (the machine is shared: the two medians' difference is noisier
than decode + encode measured alone).
``server_overhead_ms`` = (c)'s p50 - the model's own time: what HTTP, BentoML and the route add to
one request (near 0, and negative when the shared machine was busier during the in-process
timing). ``queueing_floor_ms`` = concurrency x the route's call / min(cores, workers x threads):
the mean latency a closed loop cannot beat on these cores even with a free server and client
(Little's law); where it exceeds the goal, no serve setting meets it.

Goal (the issue): p99 <= 200 ms on /raw/enhance at concurrency 8. Writes
benchmarks/results/enhance_serve.json; the last line is enhance_serve_p99_ms=X.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from pipeline import audio  # noqa: E402
from loadgen import Server, load  # noqa: E402

RATE, SECONDS, SNR_DB = 16000, 5.0, 5.0
FSDD = REPO.parent / "shared" / "data" / "fsdd" / "recordings"
GOAL_P99_MS = 200.0


def speech(seed: int, n: int) -> tuple[np.ndarray, str]:
    """(n,) clean speech at 16 kHz: FSDD recordings strung together with 50 ms gaps (a speaker
    per seed), else speech-like noise."""
    rng = np.random.default_rng(seed)
    files = sorted(FSDD.glob("*.wav")) if FSDD.is_dir() else []
    if files:
        speakers = sorted({f.stem.split("_")[1] for f in files})
        speaker = speakers[seed % len(speakers)]
        mine = [f for f in files if f.stem.split("_")[1] == speaker]
        parts, total = [], 0
        while total < n:
            wave = audio.load(mine[rng.integers(len(mine))], RATE)
            parts += [wave / max(float(np.abs(wave).max()), 1e-6) * 0.5, np.zeros(RATE // 20, np.float32)]
            total += len(wave) + RATE // 20
        return np.concatenate(parts)[:n], "FSDD digits (8 kHz, resampled to 16 kHz)"
    t = np.arange(n) / RATE
    noise = np.convolve(rng.standard_normal(n), np.hanning(24), mode="same")
    return 0.2 * noise * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2), "speech-like noise (no FSDD)"


def clip(seed: int) -> tuple[bytes, str]:
    """A noisy 5 s clip (PCM_16 WAV bytes) and where its speech came from."""
    from pipeline.data.enhance_corpus import coloured_noise, mix

    n = int(RATE * SECONDS)
    clean, source = speech(seed, n)
    noisy = mix(clean, coloured_noise(n, 1.0, np.random.default_rng(100 + seed)), SNR_DB)
    noisy = noisy * (0.9 / max(float(np.abs(noisy).max()), 1.0))  # inside full scale
    buf = io.BytesIO()
    audio.write_wav(buf, noisy.astype(np.float32), RATE)
    return buf.getvalue(), source


def check_answer(content_type: str, body: bytes) -> str | None:
    """A 200 answer's problem: not audio/wav, unreadable, or not the clip's length and rate."""
    if content_type != "audio/wav":
        return f"content-type {content_type}"
    try:
        info = sf.info(io.BytesIO(body))
    except sf.LibsndfileError:
        return "unreadable wav"
    if info.samplerate != RATE or info.frames != int(RATE * SECONDS) or info.channels != 1:
        return f"wrong shape {info.frames}@{info.samplerate}x{info.channels}"
    return None


def model_folder(arg: Path | None, random_init: bool, tmp: Path) -> Path:
    from pipeline.contracts import ModelFolder

    if random_init:
        import torch

        from pipeline.contracts import EnhancerInfo
        from pipeline.models.enhancer import export_enhancer
        from pipeline.models.networks import UNetParams, build_network, make_unet_spec

        torch.manual_seed(0)
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        spec = make_unet_spec(UNetParams.model_validate(params["train"]["enhance"]["model"]))
        export_enhancer(tmp / "model", build_network(spec).eval(), EnhancerInfo(spec=spec, sample_rate=RATE))
        return tmp / "model"
    folder = arg or REPO / "models" / "train"
    model = ModelFolder(folder)
    if not model.info_path.exists() or not model.weights_path.exists() or model.task() != "enhance":
        raise SystemExit(f"{folder}: no model of task enhance there (model.json + model.safetensors); "
                         "train one with `make demo TASK=enhance`, or pass --model DIR or --random")
    return folder


def in_process(folder: Path, clips: list[bytes], threads: int, device: str, repeats: int) -> dict:
    """Medians (ms) of the model alone and of the route's whole call, on ``threads`` torch threads."""
    import torch

    from pipeline.models.enhancer import ExportedEnhancer
    from serving.enhance import enhance_file

    torch.set_num_threads(threads)
    enhancer = ExportedEnhancer.load(folder, device=device)
    waves = [audio.to_mono(audio.decode(c)[0]) for c in clips]

    def median_ms(call) -> float:
        for i in range(3):
            call(i)
        times = []
        for i in range(repeats):
            t0 = time.perf_counter()
            call(i)
            times.append(time.perf_counter() - t0)
        return round(statistics.median(times) * 1000, 1)

    model = median_ms(lambda i: enhancer.enhance(waves[i % len(waves)], RATE))
    route = median_ms(lambda i: enhance_file(enhancer, clips[i % len(clips)], "clip.wav", 30.0))
    decode = median_ms(lambda i: audio.decode(clips[i % len(clips)]))
    encode = median_ms(lambda i: audio.write_wav(io.BytesIO(), np.clip(waves[i % len(waves)], -1, 1), RATE))
    return {"threads": threads, "repeats": repeats, "model_enhance_ms": model, "enhance_file_ms": route,
            "decode_ms": decode, "clip_encode_ms": encode}


def serve(env: dict, log: Path, clips: list[bytes], args: argparse.Namespace) -> dict:
    server = Server(env, log)
    try:
        def run(concurrency: int, requests: int, raw: bool = True) -> dict:
            return asyncio.run(load(server.url, clips, concurrency, requests=requests, raw=raw, route="enhance",
                                    check=check_answer))

        run(args.concurrency, 2 * args.concurrency)  # warm-up: both workers' first forwards
        run(args.concurrency, args.concurrency, raw=False)
        result = {"raw": run(args.concurrency, args.requests)}
        print("raw", json.dumps(result["raw"]), flush=True)
        result["multipart"] = run(args.concurrency, args.requests, raw=False)
        print("multipart", json.dumps(result["multipart"]), flush=True)
        result["unloaded"] = run(1, args.unloaded_requests)
        print("unloaded", json.dumps(result["unloaded"]), flush=True)
        result["rss_mb"] = round(server.rss_mb(), 1)
        return result
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="exported enhancer folder (default models/train)")
    parser.add_argument("--random", action="store_true", help="a random-init MaskUNet of train.enhance.model")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=300, help="per loaded route")
    parser.add_argument("--unloaded-requests", type=int, default=30, help="at concurrency 1")
    parser.add_argument("--repeats", type=int, default=30, help="in-process timings (median of)")
    parser.add_argument("--workers", type=int, default=None, help="serve.workers (default params.yaml's)")
    parser.add_argument("--torch-threads", type=int, default=None, help="serve.torch_threads (default params.yaml's)")
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/enhance_serve.json")
    args = parser.parse_args(argv)
    if args.random and args.model:
        parser.error("--model and --random exclude each other")

    tmp = Path(tempfile.mkdtemp(prefix="enhance_serve_"))
    try:
        os.environ.update(BENTOML_HOME=str(tmp / "bentoml"), BENTOML_DO_NOT_TRACK="True")
        from pipeline.stages.package import PackageParams, import_model

        folder = model_folder(args.model, args.random, tmp)
        tag = import_model(folder, PackageParams(), {"mlflow_model": "bench", "mlflow_version": "none"})
        document = yaml.safe_load((REPO / "params.yaml").read_text())
        settings = document["serve"]
        settings["device"] = args.device
        if args.workers is not None:
            settings["workers"] = args.workers
        if args.torch_threads is not None:
            settings["torch_threads"] = args.torch_threads
        params = tmp / "params.yaml"
        params.write_text(yaml.safe_dump(document, sort_keys=False))
        made = [clip(i) for i in range(4)]
        clips, source = [c for c, _ in made], made[0][1]
        timing = in_process(folder, clips, settings["torch_threads"], args.device, args.repeats)
        print("in-process", json.dumps(timing), flush=True)
        env = {**os.environ, "SOUNDLINE_MODEL_TAG": tag, "SOUNDLINE_PARAMS": str(params),
               "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        served = serve(env, tmp / "server.log", clips, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    cores = os.cpu_count() or 1
    lanes = min(cores, settings["workers"] * settings["torch_threads"])
    raw = served["raw"]
    result = {
        "machine": {"cpus": cores, "python": platform.python_version()},
        "model": "random MaskUNet (train.enhance.model)" if args.random else str(folder),
        "device": args.device,
        "clip": f"{SECONDS:g} s, {RATE} Hz, PCM_16 mono; {source} in pink noise at {SNR_DB:g} dB SNR",
        "serve": {k: settings[k] for k in ("workers", "torch_threads", "device")},
        "concurrency": args.concurrency,
        "in_process": timing,
        "raw_enhance": raw, "multipart_enhance": served["multipart"], "unloaded_raw_enhance": served["unloaded"],
        "server_overhead_ms": round(served["unloaded"]["p50_ms"] - timing["model_enhance_ms"], 1),
        "queueing_floor_ms": round(args.concurrency * timing["enhance_file_ms"] / lanes, 1),
        "rss_mb": served["rss_mb"],
        "goals": {f"p99_ms<={GOAL_P99_MS:g}": raw["p99_ms"] <= GOAL_P99_MS and not raw["errors"],
                  "0_errors": not (raw["errors"] or served["multipart"]["errors"] or served["unloaded"]["errors"])},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("serve", "server_overhead_ms", "queueing_floor_ms", "goals")}))
    print(f"enhance_serve_p99_ms={raw['p99_ms']}")


if __name__ == "__main__":
    main()
