"""BentoML service for the registered soundline model: thin glue over ``pipeline``.

Decoding (pipeline.audio), features (pipeline.features.log_mel_batch with the model's own
FeatureParams), scoring (pipeline.evaluation.ExportedModel, safetensors, no pickle) and the
group vote (pipeline.stats.group_vote) are the pipeline's functions, so the service scores a
file exactly as the evaluate stage does. The model call is one batchable API (``predict``);
the public endpoints reach it through BentoML's self-proxy, so concurrent requests share a
batch. Serve on loopback: ``bentoml serve serving.service:Soundline --host 127.0.0.1``.

Env: SOUNDLINE_MODEL_TAG (BentoML model tag, default soundline:latest), SOUNDLINE_PARAMS
(params file with the ``serve`` section, default params.yaml beside serving/),
SOUNDLINE_BATCHING=0 (call the model directly, one clip per call: the benchmark's baseline).
"""
from __future__ import annotations

import asyncio
import os
from pathlib import Path

import aiohttp
import bentoml
import numpy as np
import pandas as pd
import torch
import yaml
from pydantic import Field
from starlette.responses import JSONResponse

from pipeline import audio
from pipeline.config import Section, load_section
from pipeline.evaluation import ExportedModel
from pipeline.features import FeatureParams, log_mel_batch
from pipeline.stats import group_vote


class ServeParams(Section):
    max_batch_size: int = Field(32, ge=2)  # BentoML needs > 1; SOUNDLINE_BATCHING=0 disables batching
    max_latency_ms: int = Field(10000, gt=0)  # queued longer: 503 (BentoML sheds load)
    max_upload_mb: float = Field(10.0, gt=0)
    max_duration_s: float = Field(30.0, gt=0)


PARAMS_FILE = Path(os.environ.get("SOUNDLINE_PARAMS") or Path(__file__).resolve().parents[1] / "params.yaml")
SERVE = load_section("serve", ServeParams, PARAMS_FILE)
MAX_UPLOAD_BYTES = int(SERVE.max_upload_mb * 1024 * 1024)


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


def rejected(name: str, problem: str, status: int = 422) -> JSONResponse:
    return JSONResponse({"error": f"{name}: {problem}", "problem": problem, "file": name}, status_code=status)


@bentoml.service(name="soundline", workers=1, traffic={"timeout": 60}, http={"host": "127.0.0.1"})
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

    def _features(self, path: Path, name: str) -> np.ndarray:
        """(n_mels, frames) log-mel of one upload; raises AudioError (bad audio) or OverflowError."""
        data = path.read_bytes()
        if len(data) > MAX_UPLOAD_BYTES:  # chunked uploads carry no Content-Length
            raise OverflowError(len(data))
        wave = audio.load(data, self.features_params.sample_rate, name=name, max_duration_s=SERVE.max_duration_s)
        return log_mel_batch([wave], self.features_params)[0][0]

    async def _featurize(self, files: list[Path]) -> np.ndarray | JSONResponse:
        try:
            feats = await asyncio.gather(*(asyncio.to_thread(self._features, f, f.name) for f in files))
        except audio.AudioError as err:
            return rejected(err.source, err.problem)
        except OverflowError as err:
            return JSONResponse(too_large(err.args[0]), status_code=413)
        return np.stack(feats) if feats else JSONResponse({"error": "no files uploaded"}, status_code=400)

    async def _probabilities(self, feats: np.ndarray) -> np.ndarray:
        if not BATCHING:
            return await asyncio.to_thread(self._forward, feats)
        for attempt in range(3):  # predict is idempotent; the in-process proxy can drop a connection
            try:  # one entry in the adaptive batch
                return np.asarray(await self.to_async.predict(feats))
            except aiohttp.ClientConnectionError:
                if attempt == 2:
                    raise

    async def _scored(self, feats: np.ndarray) -> np.ndarray | JSONResponse:
        try:
            return await self._probabilities(feats)
        except (bentoml.exceptions.BentoMLException, aiohttp.ClientError) as err:  # shed by the batch queue
            return JSONResponse({"error": f"model overloaded, retry later: {err}"}, status_code=503)

    def _forward(self, feats: np.ndarray) -> np.ndarray:
        return self.model.class_probabilities(np.asarray(feats, np.float32), np.arange(len(feats)), batch_size=256)

    def _prediction(self, name: str, probs: np.ndarray) -> dict:
        classes = self.model.classes
        return {"file": name, "label": classes[int(np.argmax(probs))],
                "probabilities": {c: float(p) for c, p in zip(classes, probs)}, **self.model_info}

    @bentoml.api(batchable=True, max_batch_size=SERVE.max_batch_size, max_latency_ms=SERVE.max_latency_ms)
    def predict(self, features: np.ndarray) -> np.ndarray:
        """(B, n_mels, frames) log-mel features → (B, K) class probabilities (order: model classes)."""
        return self._forward(features)

    @bentoml.api
    async def classify(self, audio: Path) -> dict:
        """One WAV upload → {label, probabilities, model, version, alias}."""
        files = await self._classify([audio])
        return files if isinstance(files, JSONResponse) else files[0]

    @bentoml.api
    async def classify_batch(self, audios: list[Path]) -> list:
        """Several uploads → one prediction each (any bad file rejects the request, naming it)."""
        return await self._classify(audios)

    async def _classify(self, audios: list[Path]) -> list | JSONResponse:
        feats = await self._featurize(audios)
        if isinstance(feats, JSONResponse):
            return feats
        probs = await self._scored(feats)
        return probs if isinstance(probs, JSONResponse) else \
            [self._prediction(f.name, p) for f, p in zip(audios, probs)]

    @bentoml.api
    async def features(self, audio: Path) -> dict:
        """The log-mel features the model sees for one upload (for parity checks)."""
        feats = await self._featurize([audio])
        if isinstance(feats, JSONResponse):
            return feats
        return {"features": feats[0].tolist(), "shape": list(feats[0].shape), **self.model_info}

    @bentoml.api
    async def embed(self, audio: Path) -> dict:
        """One upload → the encoder embedding."""
        feats = await self._featurize([audio])
        if isinstance(feats, JSONResponse):
            return feats
        with torch.no_grad():
            emb = self.model.network.embed(torch.from_numpy(feats[:, None]))[0]
        return {"embedding": emb.tolist(), "dim": int(emb.numel()), **self.model_info}

    @bentoml.api
    async def group_verdict(self, audios: list[Path], group: str = "group") -> dict:
        """Recordings of one group (e.g. one patient) → per-file predictions and the majority vote."""
        files = await self._classify(audios)
        if isinstance(files, JSONResponse):
            return files
        positive = self.model.info.get("positive_class") or self.model.classes[-1]
        table = pd.DataFrame({"group": group, "predicted": [f["label"] for f in files], "label": "",
                              "kept": True, "p": [f["probabilities"][positive] for f in files]})
        vote = group_vote(table, all_filtered_class=positive, prob_col="p", positive_class=positive).iloc[0]
        return {"group": group, "label": vote["predicted"], "votes": vote["votes"], "n_files": int(vote["n_files"]),
                "files": files, **self.model_info}


Soundline.add_asgi_middleware(UploadLimit, limit=MAX_UPLOAD_BYTES)
