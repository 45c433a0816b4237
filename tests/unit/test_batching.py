"""serving.batching.Batcher: requests queued together share one model call and get their own rows back."""
from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from serving.batching import Batcher, Overloaded


class Recorder:
    """A forward that notes each call's batch size; ``gate`` holds calls until it is set."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.sizes: list[int] = []
        self.delay_s = delay_s
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, waves: np.ndarray) -> np.ndarray:
        self.gate.wait()
        time.sleep(self.delay_s)
        self.sizes.append(len(waves))
        return waves[:, :1] * 10  # row i's answer is built from row i alone


def requests(n: int, clips: int = 1) -> list[np.ndarray]:
    return [np.full((clips, 3), float(i), np.float32) for i in range(n)]


async def gather(batcher: Batcher, waves: list[np.ndarray]) -> list:
    return await asyncio.gather(*(batcher(w) for w in waves), return_exceptions=True)


def test_each_request_gets_its_own_rows_and_queued_requests_share_calls() -> None:
    forward = Recorder()
    forward.gate.clear()  # hold the first call, so the rest queue up behind it
    batcher = Batcher(forward, max_latency_ms=5000, max_batch_size=8)

    async def run() -> list:
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, forward.gate.set)
        return await gather(batcher, requests(20, clips=2))

    results = asyncio.run(run())
    for i, rows in enumerate(results):
        np.testing.assert_array_equal(rows, np.full((2, 1), 10.0 * i))
    assert sum(forward.sizes) == 40
    assert max(forward.sizes) <= 8 and len(forward.sizes) < 20


def test_a_batch_waits_up_to_max_wait_for_more_clips() -> None:
    forward = Recorder()
    batcher = Batcher(forward, max_latency_ms=5000, max_batch_size=32, max_wait_ms=200)

    async def staggered() -> list:
        async def late(w: np.ndarray, delay: float) -> np.ndarray:
            await asyncio.sleep(delay)
            return await batcher(w)
        return await asyncio.gather(*(late(w, 0.01 * i) for i, w in enumerate(requests(5))))

    asyncio.run(staggered())
    assert forward.sizes == [5]  # arrivals 10 ms apart all made the first batch


def test_without_max_wait_a_lone_request_goes_at_once() -> None:
    forward = Recorder()
    batcher = Batcher(forward, max_latency_ms=5000, max_batch_size=32)
    t0 = time.perf_counter()
    asyncio.run(gather(batcher, requests(1)))
    assert time.perf_counter() - t0 < 0.5 and forward.sizes == [1]


def test_a_request_larger_than_max_batch_size_goes_alone() -> None:
    forward = Recorder()
    batcher = Batcher(forward, max_latency_ms=5000, max_batch_size=4)
    rows = asyncio.run(gather(batcher, requests(1, clips=9)))[0]
    assert rows.shape == (9, 1) and forward.sizes == [9]


def test_requests_queued_past_max_latency_are_shed() -> None:
    forward = Recorder(delay_s=0.3)  # every call takes longer than the latency bound
    batcher = Batcher(forward, max_latency_ms=100, max_batch_size=1)
    results = asyncio.run(gather(batcher, requests(4)))
    assert not isinstance(results[0], Exception)  # taken at once
    assert all(isinstance(r, Overloaded) for r in results[1:])  # still queued after 100 ms
    assert forward.sizes == [1]


def test_an_error_in_forward_reaches_every_request_of_its_batch_and_the_batcher_goes_on() -> None:
    calls = []

    def forward(waves: np.ndarray) -> np.ndarray:
        calls.append(len(waves))
        if len(calls) == 1:
            raise RuntimeError("model failed")
        return waves[:, :1]

    batcher = Batcher(forward, max_latency_ms=5000, max_batch_size=32, max_wait_ms=100)
    first = asyncio.run(gather(batcher, requests(3)))
    assert [type(r) for r in first] == [RuntimeError] * 3
    second = asyncio.run(gather(batcher, requests(2)))
    assert all(isinstance(r, np.ndarray) for r in second)


def test_a_cancelled_request_does_not_disturb_the_others() -> None:
    forward = Recorder()
    forward.gate.clear()
    batcher = Batcher(forward, max_latency_ms=5000, max_batch_size=32)

    async def run() -> np.ndarray:
        gone = asyncio.ensure_future(batcher(requests(1)[0]))
        kept = asyncio.ensure_future(batcher(requests(2)[1]))
        await asyncio.sleep(0.02)
        gone.cancel()
        forward.gate.set()
        with pytest.raises(asyncio.CancelledError):
            await gone
        return await kept

    np.testing.assert_array_equal(asyncio.run(run()), np.full((1, 1), 10.0))
