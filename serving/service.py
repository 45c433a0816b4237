"""BentoML service for the registered soundline model: thin glue over ``pipeline``.

Decoding (pipeline.audio), features (pipeline.features.log_mel_batch with the model's own
FeatureParams), scoring (pipeline.models.inference.ExportedModel, safetensors, no pickle) and
the group vote (pipeline.stats.group_vote) are the pipeline's functions, so the service scores a
file exactly as the evaluate stage does.

A model of task enhance (a speech enhancer) is served by ``serving.enhance`` instead: POST
/enhance, /enhance_batch and /raw/enhance; the classify routes then answer 409 naming the task,
as /enhance does for a classifier.

Every classification (classify, classify_batch, group_verdict, and POST /raw/classify, which
takes the audio file as the request body) goes through one batcher (``serving.batching``): its
model thread computes the features and scores the batch. Short uploads are decoded on the event
loop, longer ones in worker threads (``INLINE_DECODE_BYTES``). A client mistake raises a
``ClientError``, which ``serving.guards`` turns into a 4xx answer naming the problem, in one
place for every route; its ``RequestGuard`` answers mistakes in the request's framing before
BentoML parses it.

Env: SOUNDLINE_MODEL_TAG (BentoML model tag, default: the model the Bento packed, else
soundline:latest), SOUNDLINE_PARAMS (params file with the ``serve`` section, default params.yaml
beside serving/), SOUNDLINE_BATCHING=0 (call the model directly, one request per call: the
benchmark's baseline).
"""
from __future__ import annotations

import asyncio
import gc
import logging
import os
from pathlib import Path

import bentoml
import numpy as np
import pandas as pd
import prometheus_client
import torch
import yaml
from bentoml import get_current_service  # bentoml.<name> is resolved by a module __getattr__ on every use
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from pipeline import audio, profile
from pipeline.config import load_section
from pipeline.contracts import ModelFolder
from pipeline.features import FeatureParams, log_mel_batch
from pipeline.models.enhancer import ExportedEnhancer
from pipeline.models.inference import ExportedModel, fastest_batch_size
from pipeline.scoring import Upload, answer, prepare, score_clips
from pipeline.stats import group_vote
from serving.batching import Batcher, Overloaded
from serving.enhance import Enhancing
from serving.guards import BadRequest, Busy, ClientError, RequestGuard, TooLarge, client_errors, too_large
from serving.schemas import Embedding, Features, Prediction, Predictions, SegmentScore, ServeParams, Verdict
from serving.uploads import read_body, upload_name


def params_file() -> Path:
    return Path(os.environ.get("SOUNDLINE_PARAMS") or Path(__file__).resolve().parents[1] / "params.yaml")


def model_tag() -> str:
    """SOUNDLINE_MODEL_TAG; else, served from a built Bento, the model it packed; else soundline:latest."""
    if tag := os.environ.get("SOUNDLINE_MODEL_TAG"):
        return tag
    bento_yaml = Path(__file__).resolve().parents[2] / "bento.yaml"  # <bento>/src/serving/service.py
    if bento_yaml.exists():
        services = yaml.safe_load(bento_yaml.read_text()).get("services") or []
        if tags := [m["tag"] for s in services for m in s.get("models") or []]:
            return tags[0]
    return "soundline:latest"


@client_errors
async def _classify_raw(request: Request) -> Response:
    return await get_current_service().classify_raw(request)


@client_errors
async def _enhance_raw(request: Request) -> Response:
    return await get_current_service().enhance_raw(request)


# POST /raw/classify and /raw/enhance: plain Starlette routes beside the BentoML APIs; a FastAPI
# app (BentoML's class-view way) costs noticeably more CPU per request.
raw_app = Starlette(routes=[Route("/classify", _classify_raw, methods=["POST"]),
                            Route("/enhance", _enhance_raw, methods=["POST"])])
# Uploads up to this size (2 s of 16-bit 16 kHz mono) are decoded on the event loop: a clip that
# short decodes in less CPU time than a trip through a worker thread costs, and holds the loop for
# well under a millisecond. Larger ones go to a thread, so a long upload never stalls the others.
INLINE_DECODE_BYTES = 64 * 1024
# BentoML reads a service's process-level configuration (workers, tracing, access log) when the
# class is defined, so the serve section is read once, at import: those settings, the request
# guard's upload limit and the service's own all come from it.
_PROCESS = load_section("serve", ServeParams, params_file())


@bentoml.service(name="soundline", **_PROCESS.process_config())
@bentoml.asgi_app(raw_app, path="/raw")
class Soundline(Enhancing):
    model_ref = bentoml.models.BentoModel(model_tag())

    def __init__(self) -> None:
        self.settings = _PROCESS
        self.max_upload_bytes = self.settings.max_upload_bytes
        ref = self.model_ref  # at serve time BentoML hands the instance the stored model itself
        stored = ref.resolve() if isinstance(ref, bentoml.models.BentoModel) else ref
        labels = stored.info.labels
        self.model_info = {"model": labels.get("mlflow_model", stored.tag.name),
                           "version": labels.get("mlflow_version"), "alias": labels.get("alias"),
                           "bento_model": str(stored.tag)}
        torch.set_num_threads(self.settings.torch_threads)
        self.task = ModelFolder(Path(stored.path)).task()
        if self.task == "enhance":
            self.enhancer = ExportedEnhancer.load(Path(stored.path), device=self.settings.device)
        else:
            self._load_classifier(Path(stored.path))
        # The imports leave ~10^6 long-lived objects; freezing them keeps full collections from
        # rescanning them (a stall of every request in flight).
        gc.collect()
        gc.freeze()

    def _load_classifier(self, path: Path) -> None:
        self.model = ExportedModel.load(path, device=self.settings.device)
        self.profile = ModelFolder(path).profile()  # None: a model exported without one
        self.features_params: FeatureParams = self.model.info.features
        # Clips per forward within one batcher call: timed, not guessed. Fewer distinct batch
        # shapes also keep oneDNN's per-shape kernel cache (and so the RSS) small.
        self.chunk = fastest_batch_size(lambda waves: score_clips(self.model, waves, len(waves)),
                                        self.features_params.clip_samples, self.settings.max_batch_size)
        logging.getLogger("bentoml.soundline").info("model forward in chunks of %d clips", self.chunk)
        # Created here, not at import: BentoML sets up multiprocess Prometheus before __init__.
        self.batch_sizes = prometheus_client.Histogram(
            "soundline_model_batch_size", "Clips per model call (serving.batching)",
            buckets=[2 ** i for i in range(self.settings.max_batch_size.bit_length() + 1)])
        # Every series is bound once: each shows from the start (at 0), and a request skips the label lookups.
        failures = prometheus_client.Counter(
            "soundline_drift_failures", "Inputs outside the training data's profile, per failed check", ["check"])
        self.drift_failures = {check: failures.labels(check=check) for check in profile.CHECKS}
        inputs = prometheus_client.Counter(
            "soundline_drift_inputs", "Inputs checked by the drift guard", ["in_distribution"])
        self.drift_inputs = {flag: inputs.labels(in_distribution=str(flag).lower()) for flag in (True, False)}
        self.batching = os.environ.get("SOUNDLINE_BATCHING", "1") != "0"
        self._batcher = Batcher(self._forward_batch, self.settings.max_latency_ms, self.settings.max_batch_size,
                                self.settings.max_wait_ms)

    def _upload(self, source: bytes | Path, name: str) -> Upload:
        """One upload decoded and cut as the featurize stage does (the file, or its windows)."""
        data = source if isinstance(source, bytes) else source.read_bytes()
        if len(data) > self.max_upload_bytes:  # chunked uploads carry no Content-Length
            raise TooLarge(too_large(len(data), self.max_upload_bytes))
        try:
            return prepare(data, name, self.model, self.settings.max_duration_s)
        except audio.AudioError as err:
            raise ClientError(err.problem, err.source) from err

    async def _decode(self, source: bytes | Path, name: str) -> Upload:
        """:meth:`_upload`, on the event loop for a small upload, else in a worker thread."""
        size = len(source) if isinstance(source, bytes) else source.stat().st_size
        if size <= INLINE_DECODE_BYTES:
            return self._upload(source, name)
        return await asyncio.to_thread(self._upload, source, name)

    async def _uploads(self, files: list[Path], names: list[str]) -> list[Upload]:
        self._serves("classify")
        if not files:
            raise BadRequest("no files uploaded")
        return list(await asyncio.gather(*(self._decode(f, n) for f, n in zip(files, names))))

    async def _scores(self, clips: np.ndarray) -> np.ndarray:
        try:
            return await (self._batcher(clips) if self.batching else asyncio.to_thread(self._forward, clips))
        except Overloaded as err:
            raise Busy(f"model overloaded: queued over {self.settings.max_latency_ms} ms, retry later") from err

    def _forward(self, clips: np.ndarray) -> np.ndarray:
        return score_clips(self.model, clips, self.chunk)

    def _forward_batch(self, clips: np.ndarray) -> np.ndarray:
        self.batch_sizes.observe(len(clips))
        return self._forward(clips)

    def _prediction(self, upload: Upload, scores: np.ndarray) -> Prediction:
        """One file's answer (segments aggregate as in evaluate), after the drift guard."""
        scored = answer(self.model, upload, scores, self.profile)
        self.drift_inputs[scored.in_distribution].inc()
        for check in scored.drift:
            self.drift_failures[check].inc()
        if scored.drift and self.settings.drift == "reject":
            raise ClientError(f"outside the training data's profile ({', '.join(scored.drift)}); "
                              "serve.drift: reject", upload.name)
        segments = None if scored.segments is None else [SegmentScore(start_s=s, probabilities=p)
                                                         for s, p in scored.segments]
        return Prediction(file=upload.name, label=scored.label, probabilities=scored.probabilities, segments=segments,
                          in_distribution=scored.in_distribution, drift=scored.drift, **self.model_info)

    async def _classify(self, audios: list[Path], names: list[str]) -> list[Prediction]:
        uploads = await self._uploads(audios, names)
        scores = await self._scores(np.concatenate([u.clips for u in uploads]))
        per_file = np.split(scores, np.cumsum([len(u.clips) for u in uploads])[:-1])
        return [self._prediction(u, s) for u, s in zip(uploads, per_file)]

    @bentoml.api
    @client_errors
    async def classify(self, audio: Path) -> Prediction:
        """One WAV upload → its label and class probabilities."""
        return (await self._classify([audio], [upload_name(audio)]))[0]

    @bentoml.api
    @client_errors
    async def classify_batch(self, audios: list[Path]) -> Predictions:
        """Several uploads → one prediction each (any bad file rejects the request, naming it)."""
        return Predictions(predictions=await self._classify(audios, [upload_name(a) for a in audios]))

    async def classify_raw(self, request: Request) -> Response:
        """POST /raw/classify?name=<file name>: the body is one audio file, no multipart form.

        The same prediction as /classify, without the form parsing, temporary file and
        BentoML's input/output models.
        """
        self._serves("classify")
        name = request.query_params.get("name") or "upload"
        body = await read_body(request, self.max_upload_bytes)
        upload = await self._decode(body, name)
        scores = await self._scores(upload.clips)
        return Response(self._prediction(upload, scores).model_dump_json(exclude_none=True), media_type="application/json")

    @bentoml.api
    @client_errors
    async def features(self, audio: Path) -> Features:
        """The log-mel features of one upload (its first window, with segments), as the features
        folder holds them (for parity checks)."""
        clips = (await self._uploads([audio], [upload_name(audio)]))[0].clips
        feats = await asyncio.to_thread(log_mel_batch, clips[:1], self.features_params)
        return Features(features=feats[0][0].tolist(), shape=list(feats[0][0].shape), **self.model_info)

    @bentoml.api
    @client_errors
    async def embed(self, audio: Path) -> Embedding:
        """One upload → the encoder embedding (the mean over its windows, with segments)."""
        clips = (await self._uploads([audio], [upload_name(audio)]))[0].clips
        emb = await asyncio.to_thread(self._embed, clips)
        return Embedding(embedding=emb.tolist(), dim=len(emb), **self.model_info)

    def _embed(self, clips: np.ndarray) -> np.ndarray:
        feats = log_mel_batch(clips, self.features_params)[0]
        return self.model.embeddings(feats, np.arange(len(feats))).mean(axis=0)

    @bentoml.api
    @client_errors
    async def group_verdict(self, audios: list[Path], group: str = "group") -> Verdict:
        """Recordings of one group (e.g. one patient) → per-file predictions and the majority vote."""
        files = await self._classify(audios, [upload_name(a) for a in audios])
        positive = self.model.info.positive_class or self.model.classes[-1]
        table = pd.DataFrame({"group": group, "predicted": [f.label for f in files], "label": "",
                              "kept": True, "p": [f.probabilities[positive] for f in files]})
        vote = group_vote(table, all_filtered_class=positive, prob_col="p", positive_class=positive).iloc[0]
        return Verdict(group=group, label=vote["predicted"], votes=vote["votes"], n_files=int(vote["n_files"]),
                       files=files, **self.model_info)


Soundline.add_asgi_middleware(
    RequestGuard, limit=_PROCESS.max_upload_bytes,
    fields={f"/{name}": {field: field in api.input_spec.multipart_fields for field in api.input_spec.model_fields}
            for name, api in Soundline.apis.items()})
