"""BentoML service for the registered soundline model: thin glue over ``pipeline``.

Decoding (pipeline.audio), features (pipeline.features.log_mel_batch with the model's own
FeatureParams), scoring (pipeline.evaluation.ExportedModel, safetensors, no pickle) and the
group vote (pipeline.stats.group_vote) are the pipeline's functions, so the service scores a
file exactly as the evaluate stage does.

Adaptive batching: every classification (classify, classify_batch, group_verdict, and
POST /raw/classify, which takes the audio file as the request body) goes through BentoML's own
adaptive batcher (the CorkDispatcher behind ``@bentoml.api(batchable=True)``), driven
in-process on the fixed-length waves: one call computes the features and scores the batch. A
batchable API reached through ``self.to_async`` would cost a JSON round trip of each array
through BentoML's in-process HTTP proxy, several times the model's own cost per clip.
Serve on loopback: ``bentoml serve serving.service:Soundline``.

Env: SOUNDLINE_MODEL_TAG (BentoML model tag, default soundline:latest), SOUNDLINE_PARAMS
(params file with the ``serve`` section, default params.yaml beside serving/),
SOUNDLINE_BATCHING=0 (call the model directly, one request per call: the benchmark's baseline).
"""
from __future__ import annotations

import asyncio
import gc
import logging
import os
import tempfile
from pathlib import Path

import bentoml
import numpy as np
import pandas as pd
import prometheus_client
import torch
import yaml
from bentoml._internal.marshal.dispatcher import CorkDispatcher  # pinned: bentoml==1.4.39
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pipeline import audio
from pipeline.config import load_section
from pipeline.evaluation import ExportedModel, fastest_batch_size
from pipeline.features import FeatureParams, fit_length, log_mel_batch
from pipeline.stats import group_vote
from serving.schemas import Embedding, Features, Prediction, Predictions, ServeParams, Verdict


PARAMS_FILE = Path(os.environ.get("SOUNDLINE_PARAMS") or Path(__file__).resolve().parents[1] / "params.yaml")
SERVE = load_section("serve", ServeParams, PARAMS_FILE)
MAX_UPLOAD_BYTES = int(SERVE.max_upload_mb * 1024 * 1024)
INLINE_DECODE_BYTES = 256 * 1024  # ~8 s of 16 kHz 16-bit mono: decoded on the event loop


def _model_tag() -> str:
    """SOUNDLINE_MODEL_TAG; else, served from a built Bento, the model it packed; else soundline:latest."""
    if tag := os.environ.get("SOUNDLINE_MODEL_TAG"):
        return tag
    bento_yaml = Path(__file__).resolve().parents[2] / "bento.yaml"  # <bento>/src/serving/service.py
    if bento_yaml.exists():
        services = yaml.safe_load(bento_yaml.read_text()).get("services") or []
        if tags := [m["tag"] for s in services for m in s.get("models") or []]:
            return tags[0]
    return "soundline:latest"


MODEL_TAG = _model_tag()
BATCHING = os.environ.get("SOUNDLINE_BATCHING", "1") != "0"


class UploadLimit:
    """ASGI middleware: a body declared larger than max_upload_mb gets 413 before it is read."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            length = dict(scope["headers"]).get(b"content-length", b"0")
            if length.isdigit() and int(length) > self.limit:
                response = JSONResponse(too_large(int(length)), status_code=413)
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def too_large(size: int) -> dict:
    problem = f"upload of {size} bytes exceeds the limit of {SERVE.max_upload_mb:g} MB ({MAX_UPLOAD_BYTES} bytes)"
    return {"error": f"upload too large: {problem}", "problem": problem}


class Overloaded(Exception):
    """The batcher shed a request that would have waited longer than max_latency_ms."""


def _shed() -> np.ndarray:
    raise Overloaded


def upload_name(path: Path) -> str:
    """The client's file name of an upload that BentoML saved as a temporary file.

    BentoML (pinned 1.4.39) keeps the name as the suffix of ``tempfile.NamedTemporaryFile``:
    "tmp" + 8 random characters + name. Errors and predictions must name the client's file.
    """
    prefix = tempfile.gettempprefix()
    name = path.name
    return (name[len(prefix) + 8:] or "upload") if name.startswith(prefix) and len(name) >= len(prefix) + 8 else name


def rejected(name: str, problem: str, status: int = 422) -> JSONResponse:
    return JSONResponse({"error": f"{name}: {problem}", "problem": problem, "file": name}, status_code=status)


async def _classify_raw(request: Request) -> Response:
    return await bentoml.get_current_service().classify_raw(request)


# POST /raw/classify: a plain Starlette route, mounted beside the BentoML APIs. A FastAPI app
# (BentoML's class-view way) costs ~1.4 ms of CPU more per request, ~40% of the whole request.
raw_app = Starlette(routes=[Route("/classify", _classify_raw, methods=["POST"])])


@bentoml.service(name="soundline", workers=SERVE.workers, traffic={"timeout": 60}, http={"host": "127.0.0.1"},
                 tracing={"sample_rate": SERVE.tracing_sample_rate,
                          "excluded_urls": [] if SERVE.tracing_sample_rate else [".*"]},
                 logging={"access": {"enabled": SERVE.access_log}})
@bentoml.asgi_app(raw_app, path="/raw")
class Soundline:
    model_ref = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        ref = self.model_ref  # at serve time BentoML hands the instance the stored model itself
        stored = ref.resolve() if isinstance(ref, bentoml.models.BentoModel) else ref
        self.model = ExportedModel.load(Path(stored.path))
        self.features_params = FeatureParams.model_validate(self.model.info["features"])
        labels = stored.info.labels
        self.model_info = {"model": labels.get("mlflow_model", stored.tag.name),
                           "version": labels.get("mlflow_version"), "alias": labels.get("alias"),
                           "bento_model": str(stored.tag)}
        torch.set_num_threads(SERVE.torch_threads)
        # Clips per forward within one batcher call: timed, not guessed. Fewer distinct batch
        # shapes also keep oneDNN's per-shape kernel cache small (the CNN's RSS grew 20% in a
        # 60 s soak with forwards of every size 1..32, under 1% with its tuned chunk).
        self.chunk = fastest_batch_size(lambda waves: self._scores(waves, len(waves)),
                                        self.features_params.clip_samples, SERVE.max_batch_size)
        logging.getLogger("bentoml.soundline").info("model forward in chunks of %d clips", self.chunk)
        # The imports (torch, pandas, BentoML) leave ~10^6 long-lived objects; freezing them keeps
        # full collections from rescanning them (~170 ms each, a stall of every request in flight).
        gc.collect()
        gc.freeze()
        # Created here, not at import: BentoML sets up multiprocess Prometheus before __init__.
        self.batch_sizes = prometheus_client.Histogram(
            "soundline_model_batch_size", "Clips per model call (adaptive batching)",
            buckets=[2 ** i for i in range(SERVE.max_batch_size.bit_length() + 1)])
        self._batched = CorkDispatcher(SERVE.max_latency_ms, SERVE.max_batch_size, fallback=_shed,
                                       get_batch_size=len)(self._forward_batch)

    def _wave(self, data: bytes, name: str) -> np.ndarray:
        """(clip_samples,) model-rate mono wave of one upload; raises AudioError or OverflowError."""
        if len(data) > MAX_UPLOAD_BYTES:  # chunked uploads carry no Content-Length
            raise OverflowError(len(data))
        wave = audio.load(data, self.features_params.sample_rate, name=name, max_duration_s=SERVE.max_duration_s)
        return fit_length(wave, self.features_params)

    async def _waves(self, files: list[Path], names: list[str]) -> np.ndarray | JSONResponse:
        try:
            waves = await asyncio.gather(*(asyncio.to_thread(lambda f, n: self._wave(f.read_bytes(), n), f, n)
                                           for f, n in zip(files, names)))
        except audio.AudioError as err:
            return rejected(err.source, err.problem)
        except OverflowError as err:
            return JSONResponse(too_large(err.args[0]), status_code=413)
        return np.stack(waves) if waves else JSONResponse({"error": "no files uploaded"}, status_code=400)

    async def _featurize(self, files: list[Path], names: list[str]) -> np.ndarray | JSONResponse:
        waves = await self._waves(files, names)
        return waves if isinstance(waves, JSONResponse) else log_mel_batch(waves, self.features_params)[0]

    async def _probabilities(self, waves: np.ndarray) -> np.ndarray | JSONResponse:
        try:
            return await (self._batched(waves) if BATCHING else asyncio.to_thread(self._forward, waves))
        except Overloaded:
            return JSONResponse({"error": f"model overloaded: queued over {SERVE.max_latency_ms} ms, "
                                          "retry later", "problem": "overloaded"}, status_code=503)

    def _scores(self, waves: np.ndarray, chunk: int) -> np.ndarray:
        """(n, K) probabilities of (n, clip_samples) waves: features, then forwards of ``chunk`` clips."""
        feats = log_mel_batch(waves, self.features_params)[0]
        return self.model.class_probabilities(feats, np.arange(len(feats)), batch_size=chunk)

    def _forward(self, waves: np.ndarray) -> np.ndarray:
        return self._scores(waves, self.chunk)

    def _forward_batch(self, jobs: tuple[np.ndarray, ...]) -> list[np.ndarray]:
        """One features + model call for the queued requests' (n_i, clip_samples) waves; split back."""
        waves = jobs[0] if len(jobs) == 1 else np.concatenate(jobs)
        self.batch_sizes.observe(len(waves))
        return np.split(self._forward(waves), np.cumsum([len(j) for j in jobs])[:-1])

    def _prediction(self, name: str, probs: np.ndarray) -> Prediction:
        classes = self.model.classes
        return Prediction(file=name, label=classes[int(np.argmax(probs))],
                          probabilities={c: float(p) for c, p in zip(classes, probs)}, **self.model_info)

    # Typed (pydantic) responses also spare BentoML from rebuilding a JSON schema per response.
    @bentoml.api
    async def classify(self, audio: Path) -> Prediction:
        """One WAV upload → its label and class probabilities."""
        files = await self._classify([audio], [upload_name(audio)])
        return files if isinstance(files, JSONResponse) else files[0]

    @bentoml.api
    async def classify_batch(self, audios: list[Path]) -> Predictions:
        """Several uploads → one prediction each (any bad file rejects the request, naming it)."""
        files = await self._classify(audios, [upload_name(a) for a in audios])
        return files if isinstance(files, JSONResponse) else Predictions(predictions=files)

    async def _classify(self, audios: list[Path], names: list[str]) -> list[Prediction] | JSONResponse:
        waves = await self._waves(audios, names)
        if isinstance(waves, JSONResponse):
            return waves
        probs = await self._probabilities(waves)
        return probs if isinstance(probs, JSONResponse) else \
            [self._prediction(n, p) for n, p in zip(names, probs)]

    async def classify_raw(self, request: Request) -> Response:
        """POST /raw/classify?name=<file name>: the body is one audio file, no multipart form.

        The same prediction as /classify, without the form parsing, temporary file and
        BentoML's input/output models: under half the CPU time per request.
        """
        name = request.query_params.get("name") or "upload"
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_UPLOAD_BYTES:  # chunked uploads carry no Content-Length
                return JSONResponse(too_large(len(body)), status_code=413)
        try:
            # A short clip decodes faster than a hand-off to a thread; a long one would stall
            # every other request on this event loop.
            small = len(body) <= INLINE_DECODE_BYTES
            wave = self._wave(bytes(body), name) if small else await asyncio.to_thread(self._wave, bytes(body), name)
        except audio.AudioError as err:
            return rejected(err.source, err.problem)
        probs = await self._probabilities(wave[None])
        if isinstance(probs, JSONResponse):
            return probs
        return Response(self._prediction(name, probs[0]).model_dump_json(), media_type="application/json")

    @bentoml.api
    async def features(self, audio: Path) -> Features:
        """The log-mel features the model sees for one upload (for parity checks)."""
        feats = await self._featurize([audio], [upload_name(audio)])
        if isinstance(feats, JSONResponse):
            return feats
        return Features(features=feats[0].tolist(), shape=list(feats[0].shape), **self.model_info)

    @bentoml.api
    async def embed(self, audio: Path) -> Embedding:
        """One upload → the encoder embedding."""
        feats = await self._featurize([audio], [upload_name(audio)])
        if isinstance(feats, JSONResponse):
            return feats
        with torch.no_grad():
            emb = self.model.network.embed(torch.from_numpy(feats[:, None]))[0]
        return Embedding(embedding=emb.tolist(), dim=int(emb.numel()), **self.model_info)

    @bentoml.api
    async def group_verdict(self, audios: list[Path], group: str = "group") -> Verdict:
        """Recordings of one group (e.g. one patient) → per-file predictions and the majority vote."""
        files = await self._classify(audios, [upload_name(a) for a in audios])
        if isinstance(files, JSONResponse):
            return files
        positive = self.model.info.get("positive_class") or self.model.classes[-1]
        table = pd.DataFrame({"group": group, "predicted": [f.label for f in files], "label": "",
                              "kept": True, "p": [f.probabilities[positive] for f in files]})
        vote = group_vote(table, all_filtered_class=positive, prob_col="p", positive_class=positive).iloc[0]
        return Verdict(group=group, label=vote["predicted"], votes=vote["votes"], n_files=int(vote["n_files"]),
                       files=files, **self.model_info)


Soundline.add_asgi_middleware(UploadLimit, limit=MAX_UPLOAD_BYTES)
