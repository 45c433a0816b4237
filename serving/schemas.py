"""The service's parameters (``params.yaml`` ``serve:``) and its typed responses.

Typed (pydantic) responses document the API in BentoML's OpenAPI page and spare BentoML from
building a JSON schema per response.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from pipeline.config import Section


class ServeParams(Section):
    max_batch_size: int = Field(32, ge=1)  # clips per model call
    max_latency_ms: int = Field(2000, gt=0)  # a clip still queued after this long is shed: 503
    max_wait_ms: float = Field(5.0, ge=0)  # a batch waits at most this long for more clips (0: none)
    torch_threads: int = Field(1, ge=1)  # per model call; the event loop and decoding need a core too
    workers: int = Field(1, ge=1)  # server processes, each with its own model copy and batcher
    access_log: bool = False  # a log line per request costs event-loop time; /metrics counts them
    # 0: tracing off, and every URL excluded from BentoML's OpenTelemetry middleware, whose
    # no-op spans cost CPU on every request. > 0 also needs an exporter in BentoML's config.
    tracing_sample_rate: float = Field(0.0, ge=0, le=1)
    max_upload_mb: float = Field(10.0, gt=0)
    max_duration_s: float = Field(30.0, gt=0)
    # an input outside the training data's profile (pipeline.profile): still labelled and flagged
    # (warn), or refused with a 422 naming the failed checks (reject)
    drift: Literal["warn", "reject"] = "warn"
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when the machine has it

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

    def process_config(self) -> dict:
        """``@bentoml.service`` arguments for the server processes (workers, timeout, tracing,
        access log); ``benchmarks/serve_floor.py`` serves its no-op route with the same."""
        return {"workers": self.workers, "traffic": {"timeout": 60}, "http": {"host": "127.0.0.1"},
                "tracing": {"sample_rate": self.tracing_sample_rate,
                            "excluded_urls": [] if self.tracing_sample_rate else [".*"]},
                "logging": {"access": {"enabled": self.access_log}}}


class Served(BaseModel):
    """Which registered model answered: every response carries it."""

    model: str
    version: str | None
    alias: str | None
    bento_model: str


class SegmentScore(BaseModel):
    start_s: float  # where the window starts in the file
    probabilities: dict[str, float]


class Prediction(Served):
    file: str
    label: str
    probabilities: dict[str, float]  # over the model's classes
    segments: list[SegmentScore] | None = None  # models that score long recordings as windows
    in_distribution: bool = True  # the input passed every check of the training data's profile
    drift: list[str] = []  # the checks it failed (pipeline.profile.CHECKS)


class Predictions(BaseModel):
    predictions: list[Prediction]


class Verdict(Served):
    group: str
    label: str  # majority vote over the group's files, as the evaluate stage votes
    votes: str  # "class:count,..."
    n_files: int
    files: list[Prediction]


class Embedding(Served):
    embedding: list[float]
    dim: int


class Features(Served):
    features: list[list[float]]  # (n_mels, frames)
    shape: list[int]


class EnhancedFile(BaseModel):
    file: str
    sample_rate: int  # the input's own rate, kept
    duration_s: float
    wav_base64: str  # the enhanced recording: a mono PCM_16 WAV file, base64 (RFC 4648)


class EnhancedBatch(Served):
    files: list[EnhancedFile]  # in the order of the uploads
