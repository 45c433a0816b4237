"""Batching of classification requests inside one service worker.

One model thread per worker takes what the requests have queued (up to ``max_batch_size``
clips) and scores it in one call. A batch waits at most ``max_wait_ms`` after its first
request for more to arrive, then goes: a lone clip costs the model about twice as much as one in
a batch, and on shared cores the requests that would join a batch arrive while it waits.
Nothing polls: the thread sleeps until a request arrives or the wait is over.

BentoML's own adaptive batcher (the CorkDispatcher behind ``@bentoml.api(batchable=True)``)
was driven in-process here before, through a private import. While a batch ran, it woke the
event loop every millisecond to check its queue, and it sent each batch through a thread pool;
on shared cores that work competes with the requests themselves (README, "Serving").
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


class Overloaded(Exception):
    """The batcher shed a request that had waited longer than its latency bound."""


@dataclass(frozen=True)
class _Job:
    waves: np.ndarray
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    queued_at: float


class Batcher:
    """``await batcher(waves)``: (n, samples) waves in, ``forward``'s (n, K) rows for them out.

    Requests queued together are concatenated into one ``forward`` call of at most
    ``max_batch_size`` clips (a single larger request goes alone) and split back. A batch goes
    when it is full or ``max_wait_ms`` after its first request arrived; a request still queued
    ``max_latency_ms`` after it arrived raises :class:`Overloaded`. An exception in ``forward``
    is raised in every request of that batch.
    """

    def __init__(self, forward: Callable[[np.ndarray], np.ndarray], max_latency_ms: float, max_batch_size: int,
                 max_wait_ms: float = 0.0) -> None:
        self.forward = forward
        self.max_latency_s = max_latency_ms / 1000
        self.max_wait_s = max_wait_ms / 1000
        self.max_batch_size = max_batch_size
        self._queue: deque[_Job] = deque()
        self._clips = 0  # queued
        self._ready = threading.Condition()
        threading.Thread(target=self._run, name="soundline-batcher", daemon=True).start()

    async def __call__(self, waves: np.ndarray) -> np.ndarray:
        loop = asyncio.get_running_loop()
        job = _Job(waves, loop.create_future(), loop, time.monotonic())
        with self._ready:
            self._queue.append(job)
            self._clips += len(waves)
            self._ready.notify()
        return await job.future

    def _next_batch(self) -> tuple[list[_Job], list[_Job]]:
        """(jobs to score together, jobs shed as too late), taken from the queue's head."""
        with self._ready:
            while not self._queue:
                self._ready.wait()
            while self._clips < self.max_batch_size:
                left = self._queue[0].queued_at + self.max_wait_s - time.monotonic()
                if left <= 0:
                    break
                self._ready.wait(left)
            deadline = time.monotonic() - self.max_latency_s
            late = []
            while self._queue and self._queue[0].queued_at < deadline:
                late.append(self._pop())
            jobs, clips = [], 0
            while self._queue and (not jobs or clips + len(self._queue[0].waves) <= self.max_batch_size):
                jobs.append(self._pop())
                clips += len(jobs[-1].waves)
            return jobs, late

    def _pop(self) -> _Job:
        job = self._queue.popleft()
        self._clips -= len(job.waves)
        return job

    def _run(self) -> None:
        while True:
            jobs, late = self._next_batch()
            _answer(late, [Overloaded()] * len(late))
            if not jobs:
                continue
            try:
                waves = jobs[0].waves if len(jobs) == 1 else np.concatenate([j.waves for j in jobs])
                results = np.split(self.forward(waves), np.cumsum([len(j.waves) for j in jobs])[:-1])
            except Exception as err:  # every request of the batch gets it
                results = [err] * len(jobs)
            _answer(jobs, results)


def _answer(jobs: list[_Job], results: list[np.ndarray | Exception]) -> None:
    """Hand each job its result on its own event loop: one wake-up per loop, not per job."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future, np.ndarray | Exception]]] = {}
    for job, result in zip(jobs, results):
        by_loop.setdefault(job.loop, []).append((job.future, result))
    for loop, pairs in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle, pairs)
        except RuntimeError:  # that loop has closed: nobody waits for these answers any more
            pass


def _settle(pairs: list[tuple[asyncio.Future, np.ndarray | Exception]]) -> None:
    for future, result in pairs:
        if future.done():  # the request was cancelled (its client went away)
            continue
        if isinstance(result, Exception):
            future.set_exception(result)
        else:
            future.set_result(result)
