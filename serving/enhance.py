"""The service's speech-enhancement routes (a model of task enhance): WAV in, enhanced WAV out.

Mixed into ``serving.service.Soundline``. A recording is decoded by ``pipeline.audio`` (the same
checks and limits as classify's uploads), downmixed to mono and enhanced by
``ExportedEnhancer.enhance`` at its own rate, the call the evaluate stage scores, so a served
file equals evaluate's output up to the 16-bit WAV it is sent as. One wave per forward: several
requests are never padded into one batch, which would move each output at its edges. Decoding,
the network and encoding run in a worker thread, off the event loop.
"""
from __future__ import annotations

import asyncio
import base64
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

import bentoml
import numpy as np
from bentoml.validators import ContentType
from starlette.requests import Request
from starlette.responses import Response

from pipeline import audio
from pipeline.models.enhancer import ExportedEnhancer
from serving.guards import BadRequest, ClientError, TooLarge, WrongTask, client_errors, too_large, wrong_task
from serving.schemas import EnhancedBatch, EnhancedFile, ServeParams
from serving.uploads import read_body, upload_name

SUBTYPE = "PCM_16"
HEADERS = {"model": "X-Soundline-Model", "version": "X-Soundline-Version", "alias": "X-Soundline-Alias",
           "bento_model": "X-Soundline-Bento-Model"}  # the fields every JSON answer carries (schemas.Served)


@dataclass(frozen=True)
class Enhanced:
    name: str
    wav: bytes  # mono PCM_16 WAV at the input's rate
    sample_rate: int
    duration_s: float


def enhance_file(enhancer: ExportedEnhancer, data: bytes, name: str, max_duration_s: float) -> Enhanced:
    """One uploaded recording enhanced; raises ``audio.AudioError`` for a file it cannot use."""
    samples, info = audio.decode(data, name=name, max_duration_s=max_duration_s)
    wave = audio.to_mono(samples).astype(np.float32, copy=False)  # as audio.load at the file's own rate
    # PCM_16 holds [-1, 1]; libsndfile would wrap a sample past full scale around, not clip it.
    out = np.clip(enhancer.enhance(wave, info.sample_rate), -1.0, 1.0)
    buffer = io.BytesIO()
    audio.write_wav(buffer, out, info.sample_rate, subtype=SUBTYPE)
    return Enhanced(name, buffer.getvalue(), info.sample_rate, len(wave) / info.sample_rate)


def served_headers(model_info: dict) -> dict[str, str]:
    return {header: str(model_info[key]) for key, header in HEADERS.items() if model_info.get(key) is not None}


class Enhancing:
    """The enhance APIs; the service sets ``task``, ``enhancer``, ``settings``, ``model_info`` and
    ``max_upload_bytes``."""

    task: str
    enhancer: ExportedEnhancer
    settings: ServeParams
    max_upload_bytes: int
    model_info: dict

    def _serves(self, task: str) -> None:
        if self.task != task:
            raise WrongTask(wrong_task(self.task, task))

    def _enhance_one(self, data: bytes, name: str) -> Enhanced:
        if len(data) > self.max_upload_bytes:  # chunked uploads carry no Content-Length
            raise TooLarge(too_large(len(data), self.max_upload_bytes))
        try:
            return enhance_file(self.enhancer, data, name, self.settings.max_duration_s)
        except audio.AudioError as err:
            raise ClientError(err.problem, err.source) from err

    def _wav_response(self, result: Enhanced) -> Response:
        disposition = f"attachment; filename*=UTF-8''{quote(Path(result.name).stem + '_enhanced.wav', safe='')}"
        return Response(result.wav, media_type="audio/wav",
                        headers={**served_headers(self.model_info), "Content-Disposition": disposition})

    @bentoml.api
    @client_errors
    async def enhance(self, audio: Path) -> Annotated[Path, ContentType("audio/wav")]:
        """One WAV upload (form field ``audio``) → the enhanced recording: a mono PCM_16 WAV at the
        upload's own sample rate and length. Headers X-Soundline-Model, -Version, -Alias and
        -Bento-Model name the registered model that answered."""
        self._serves("enhance")
        return self._wav_response(await asyncio.to_thread(self._enhance_one, audio.read_bytes(), upload_name(audio)))

    @bentoml.api
    @client_errors
    async def enhance_batch(self, audios: list[Path]) -> EnhancedBatch:
        """Several WAV uploads (form field ``audios``, repeated) → JSON: the answering model, and per
        upload, in order, ``file``, ``sample_rate``, ``duration_s`` and ``wav_base64``, the enhanced
        WAV file (mono PCM_16, the upload's rate) in standard base64: decode it and save it as .wav.
        Any bad file rejects the request, naming it."""
        self._serves("enhance")
        if not audios:
            raise BadRequest("no files uploaded")
        results = await asyncio.gather(*(asyncio.to_thread(self._enhance_one, a.read_bytes(), upload_name(a))
                                         for a in audios))
        files = [EnhancedFile(file=r.name, sample_rate=r.sample_rate, duration_s=r.duration_s,
                              wav_base64=base64.b64encode(r.wav).decode("ascii")) for r in results]
        return EnhancedBatch(files=files, **self.model_info)

    async def enhance_raw(self, request: Request) -> Response:
        """POST /raw/enhance?name=<file name>: the body is one WAV file; the answer as /enhance's."""
        self._serves("enhance")
        body = await read_body(request, self.max_upload_bytes)
        name = request.query_params.get("name") or "upload"
        return self._wav_response(await asyncio.to_thread(self._enhance_one, body, name))
