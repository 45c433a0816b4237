"""Adaptive batching of classification requests inside one service worker.

BentoML's adaptive batcher (the CorkDispatcher behind ``@bentoml.api(batchable=True)``) is
driven in-process here on decoded waves. No public BentoML API does this: a batchable API
reached through ``self.to_async`` sends each array through BentoML's in-process HTTP proxy as
JSON, which costs more than the model, so the dispatcher is imported from its module (pinned
bentoml==1.4.39). The batch callback is synchronous, so BentoML runs it in a worker thread,
off the event loop.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
from bentoml._internal.marshal.dispatcher import CorkDispatcher  # no public equivalent (see above)


class Overloaded(Exception):
    """The batcher shed a request that would have waited longer than its latency bound."""


def _shed() -> np.ndarray:
    raise Overloaded


class Batcher:
    """``await batcher(waves)``: (n, samples) waves in, ``forward``'s (n, K) rows for them out.

    Requests queued together are concatenated into one ``forward`` call of at most
    ``max_batch_size`` clips and split back; a request that would wait longer than
    ``max_latency_ms`` raises :class:`Overloaded`.
    """

    def __init__(self, forward: Callable[[np.ndarray], np.ndarray], max_latency_ms: int, max_batch_size: int) -> None:
        self.forward = forward
        self._call = CorkDispatcher(max_latency_ms, max_batch_size, fallback=_shed,
                                    get_batch_size=len)(self._batch)

    def _batch(self, jobs: tuple[np.ndarray, ...]) -> list[np.ndarray]:
        waves = jobs[0] if len(jobs) == 1 else np.concatenate(jobs)
        return np.split(self.forward(waves), np.cumsum([len(j) for j in jobs])[:-1])

    async def __call__(self, waves: np.ndarray) -> np.ndarray:
        return await self._call(waves)
