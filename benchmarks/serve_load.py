"""Load benchmark of the BentoML service on loopback: batching vs none vs the raw model.

    python benchmarks/serve_load.py [--model trained] [--device cpu] [--burst-s 5] [--concurrency 32] [--soak-s 60]
                                    [--client wrk]

(a) POST /raw/classify (the clip as the request body) with batching (serving/batching.py), and the same
load on the multipart /classify; (b) the same service started with SOUNDLINE_BATCHING=0 (each
request calls features + model itself, one clip per call); (c) the service's batched call alone
(features + forward of 32 fixed-length waves), in serve.workers processes of serve.torch_threads
threads as the service runs it: the ceiling; and (d) that call on one clip at a time. c/d is the
model's own batching gain: a/b can exceed it only by what batching saves outside the model, so
where c/d < 3 the a/b goal is out of reach for that model on these cores. Then a soak of (a):
errors and the server process tree's RSS growth. Every request is a 1 s, 16 kHz, 16-bit
speech-like clip, and each request opens a fresh connection. The load client is wrk (C; needs
``apt-get install wrk``): it runs on the same cores as the server, and a Python client would take
several times its CPU; ``--client aiohttp`` does without it (a GPU machine with no package
registry, where the server has cores to spare). Each load phase also
reports the CPU milliseconds per request of the server's processes and of the client; and the
same load on ``serve_floor.py`` (the framework alone: a no-op route in the same configuration)
gives the highest a/c these cores allow for this model (``batched_over_raw_bound``); the
service's batch-size histogram gives the clips per model call that the load formed.

``--model``: ``trained`` (default), the champion ``make demo`` trains (models/train); or, with
random weights (timing does not depend on them), ``resnet`` / ``cnn`` (train.model of params.yaml
with that arch), ``mae-<preset>``. ``--device`` sets ``serve.device`` (``cuda``: a GPU). The
model is imported into a temporary BentoML home and served from source (serving.service).
Goals: on a CPU, p99 <= 150 ms at concurrency 32, a/c >= 0.6 and the soak (0 errors, RSS
growth < 10%); on a GPU also a/b >= 3 (on 2 CPU cores the model's own gain from batching, c/d,
is below 3, which bounds a/b). Writes benchmarks/results/serve_load[_<model>][_<device>].json;
the last line is batched_over_raw=X.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline import audio  # noqa: E402
from pipeline.features import FeatureParams, fit_length  # noqa: E402
from pipeline.models.inference import ExportedModel, fastest_batch_size  # noqa: E402
from pipeline.scoring import score_clips  # noqa: E402

from loadgen import Server, aiohttp_load, model_calls, wrk_load  # noqa: E402


def clip(seed: int) -> bytes:
    """1 s of speech-like noise: band-limited noise under a 4 Hz syllable envelope."""
    rng = np.random.default_rng(seed)
    t = np.arange(16000) / 16000
    noise = np.convolve(rng.standard_normal(16000), np.hanning(24), mode="same")
    wave = (0.2 * noise * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2)).astype(np.float32)
    buf = io.BytesIO()
    audio.write_wav(buf, np.clip(wave, -1, 1), 16000)
    return buf.getvalue()


def model_folder(tmp: Path, model: str) -> Path:
    """An exported model folder: ``trained`` (models/train), or an architecture with random weights.

    ``cnn`` is train.model as in params.yaml; ``mae-<preset>`` is the MAE-ViT encoder + head.
    """
    if model == "trained":
        if not (REPO / "models/train/model.safetensors").exists():
            raise SystemExit("no models/train: run `make demo` first, or pick --model cnn|mae-tiny")
        return REPO / "models/train"
    import torch
    from safetensors.torch import save_file

    from pipeline.models.networks import ModelParams
    from pipeline.models.networks import build_network, make_spec

    torch.manual_seed(0)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    fp = FeatureParams.model_validate(params["featurize"]["features"])
    arch = {"arch": model} if model in ("cnn", "resnet") else {"arch": "mae", "mae_preset": model.removeprefix("mae-")}
    mp = ModelParams.model_validate({**params["train"]["model"], **arch})
    spec = make_spec(mp, fp.n_mels, fp.frames, "classifier", num_outputs=1)
    folder = tmp / "model"
    folder.mkdir()
    save_file(build_network(spec).state_dict(), str(folder / "model.safetensors"))
    (folder / "model.json").write_text(json.dumps({"spec": spec, "classes": ["bad", "good"], "binary": True,
                                                   "positive_class": "good", "features": fp.model_dump(mode="json")}))
    return folder


def serve_run(env: dict, log: Path, clips: list[bytes], args: argparse.Namespace, soak: bool = False,
              target: str = "serving.service:Soundline", cwd: Path = REPO) -> dict:
    """The service at ``target`` under load; ``soak`` (the batched service's run) adds the
    multipart route, a soak and the clips per model call."""
    drive = wrk_load if args.client == "wrk" else aiohttp_load
    server = Server(env, log, target, cwd)
    try:
        drive(server, clips, args.concurrency, duration_s=1)  # warm-up
        result = drive(server, clips, args.concurrency, args.burst_s)
        if soak:
            result["multipart"] = drive(server, clips, args.concurrency, args.burst_s, raw=False)
            rss0 = server.rss_mb()
            s = drive(server, clips, args.concurrency, args.soak_s)
            rss1 = server.rss_mb()
            result["soak"] = {**s, "duration_s": args.soak_s, "rss_start_mb": round(rss0, 1),
                              "rss_end_mb": round(rss1, 1), "rss_growth": round(rss1 / rss0 - 1, 4)}
            result["model_calls"] = model_calls(server.url)
        return result
    finally:
        server.stop()


def _forward_loop(task: tuple[Path, list[bytes], int, int, float, str]) -> tuple[int, float]:
    """Clips scored by one process in ``seconds`` (batches of ``batch``, ``threads`` torch threads),
    and the CPU seconds that took."""
    import torch

    folder, clips, batch, threads, seconds, device = task
    torch.set_num_threads(threads)
    model = ExportedModel.load(folder, device=device)
    fp = model.info.features
    waves = np.stack([fit_length(audio.load(clips[i % len(clips)], fp.sample_rate), fp) for i in range(batch)])

    def call(w: np.ndarray, chunk: int) -> np.ndarray:  # the service's batcher call itself
        return score_clips(model, w, chunk)

    chunk = fastest_batch_size(lambda w: call(w, len(w)), fp.clip_samples, batch)  # as the service picks it
    n, t0, cpu0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        call(waves, chunk)
        n += batch
    return n, time.process_time() - cpu0


def raw_forward(folder: Path, clips: list[bytes], batch: int, device: str, seconds: float = 10.0) -> dict:
    """The service's model call alone (features + forward of ``batch`` decoded waves per call),
    laid out as the service runs it (serve.workers processes of serve.torch_threads threads each).
    ``batch`` = concurrency: the ceiling of (a); 1: the model unbatched."""
    from concurrent.futures import ProcessPoolExecutor

    serve = yaml.safe_load((REPO / "params.yaml").read_text())["serve"]
    workers, threads = serve["workers"], serve["torch_threads"]
    with ProcessPoolExecutor(workers) as pool:
        counts, cpu = zip(*pool.map(_forward_loop, [(folder, clips, batch, threads, seconds, device)] * workers))
    return {"batch_size": batch, "processes": workers, "threads": threads,
            "clips_per_s": round(sum(counts) / seconds, 1), "cpu_ms_per_clip": round(sum(cpu) / sum(counts) * 1000, 3)}


def floor_bound(raw: dict, floor: dict) -> float:
    """The highest a/c these cores allow: every served request costs at least the model's CPU per
    clip (batched) plus the framework's and the client's CPU per request on a no-op route, and
    all of it shares ``os.cpu_count()`` cores."""
    per_request_ms = raw["cpu_ms_per_clip"] + floor["server_cpu_ms"] + floor["client_cpu_ms"]
    return round(os.cpu_count() * 1000 / per_request_ms / raw["clips_per_s"], 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burst-s", type=int, default=5, help="seconds of each load phase but the soak")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--soak-s", type=int, default=60)
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu")
    parser.add_argument("--client", choices=["wrk", "aiohttp"], default="wrk",
                        help="load client: wrk (apt-get install wrk), or aiohttp where wrk is missing")
    parser.add_argument("--model", default="trained",
                        help="mae-<preset> | cnn (random weights) | trained (models/train)")
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/serve_load[_<model>].json")
    args = parser.parse_args()
    suffix = ("" if args.model == "trained" else f"_{args.model}") + ("" if args.device == "cpu" else f"_{args.device}")
    args.out = args.out or REPO / f"benchmarks/results/serve_load{suffix}.json"
    tmp = Path(tempfile.mkdtemp(prefix="serve_load_"))
    try:
        os.environ.update(BENTOML_HOME=str(tmp / "bentoml"), BENTOML_DO_NOT_TRACK="True")
        from pipeline.stages.package import PackageParams, import_model

        folder = model_folder(tmp, args.model)
        tag = import_model(folder, PackageParams(), {"mlflow_model": "bench", "mlflow_version": "none"})
        params = tmp / "params.yaml"  # the repo's, with serve.device set
        document = yaml.safe_load((REPO / "params.yaml").read_text())
        document["serve"]["device"] = args.device
        params.write_text(yaml.safe_dump(document))
        env = {**os.environ, "SOUNDLINE_MODEL_TAG": tag, "SOUNDLINE_PARAMS": str(params),
               "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        clips = [clip(i) for i in range(16)]
        batched = serve_run({**env, "SOUNDLINE_BATCHING": "1"}, tmp / "batched.log", clips, args, soak=True)
        print("batched", json.dumps(batched), flush=True)
        unbatched = serve_run({**env, "SOUNDLINE_BATCHING": "0"}, tmp / "unbatched.log", clips, args)
        print("unbatched", json.dumps(unbatched), flush=True)
        floor = serve_run(env, tmp / "floor.log", clips, args, target="serve_floor:Floor", cwd=REPO / "benchmarks")
        print("framework floor", json.dumps(floor), flush=True)
        raw = raw_forward(folder, clips, args.concurrency, args.device)
        print("raw", json.dumps(raw), flush=True)
        raw_single = raw_forward(folder, clips, 1, args.device)
        print("raw one clip per call", json.dumps(raw_single), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratio = batched["rps"] / unbatched["rps"]
    result = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
              "clip": "1 s, 16 kHz, PCM_16", "concurrency": args.concurrency, "model": args.model,
              "device": args.device, "client": args.client,
              "route": "/raw/classify (batched.multipart: /classify)",
              "batched": batched, "unbatched": unbatched, "raw_forward": raw, "raw_forward_one_clip": raw_single,
              "model_batching_gain": round(raw["clips_per_s"] / raw_single["clips_per_s"], 2),
              "batched_over_unbatched": round(ratio, 2),
              "batched_over_raw": round(batched["rps"] / raw["clips_per_s"], 3),
              "framework_floor": floor,
              **({"batched_over_raw_bound": floor_bound(raw, floor)} if args.device == "cpu" else {}),
              "goals": {**({"batched_over_unbatched>=3": ratio >= 3} if args.device != "cpu" else {}),
                        "batched_over_raw>=0.6": batched["rps"] / raw["clips_per_s"] >= 0.6,
                        "p99_ms<=150": batched["p99_ms"] <= 150,
                        "soak_0_errors": not batched["soak"]["errors"],
                        "soak_rss_growth<10%": batched["soak"]["rss_growth"] < 0.10}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["goals"]))
    print(f"batched_over_raw={result['batched_over_raw']:.3f}")


if __name__ == "__main__":
    main()
