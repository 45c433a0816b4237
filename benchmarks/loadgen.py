"""Load generation against a ``bentoml serve`` process on loopback, for the serving benchmarks
(``serve_load.py``, ``enhance_serve.py``): start a service and wait until it is ready, drive it
with a closed loop of concurrent clients, and account the CPU time that server and client spend
per request.
"""
from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import httpx
import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``bentoml serve <target>`` from ``cwd`` on a free port, ready when /readyz answers 200."""

    def __init__(self, env: dict, log: Path, target: str = "serving.service:Soundline", cwd: Path = REPO) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        with log.open("w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", target,
                                          "--host", "127.0.0.1", "--port", str(self.port)], cwd=cwd, env=env,
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server not ready:\n{log.read_text()[-3000:]}")

    def _tree(self) -> list[psutil.Process]:
        root = psutil.Process(self.proc.pid)
        return [root, *root.children(recursive=True)]

    def rss_mb(self) -> float:
        return sum(p.memory_info().rss for p in self._tree() if p.is_running()) / 2**20

    def cpu_s(self) -> float:
        """User + system CPU seconds of the server's process tree so far."""
        return sum(sum(p.cpu_times()[:2]) for p in self._tree() if p.is_running())

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


async def load(url: str, clips: list[bytes], concurrency: int, requests: int | None = None,
               duration_s: float | None = None, raw: bool = True, route: str = "classify",
               check: Callable[[str, bytes], str | None] | None = None) -> dict:
    """Closed loop: ``concurrency`` workers post a clip until ``requests`` are sent or time is up.

    ``raw``: to /raw/<route> as the body; else to /<route> as a multipart form (field ``audio``).
    ``check``: given a 200 answer's content type and body, the problem with it (counted as an
    error under that name), or None.

    aiohttp rather than httpx: the client shares the 2 cores with the server, and aiohttp
    spends a fraction of httpx's CPU time per request.
    """
    latencies: list[float] = []
    errors: dict[str, int] = {}
    sent = 0
    stop_at = time.perf_counter() + (duration_s or 1e9)

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal sent
        while (requests is None or sent < requests) and time.perf_counter() < stop_at:
            if raw:
                post = session.post(f"{url}/raw/{route}?name=clip.wav", data=clips[sent % len(clips)],
                                    headers={"Content-Type": "audio/wav"})
            else:
                form = aiohttp.FormData()
                form.add_field("audio", clips[sent % len(clips)], filename="clip.wav", content_type="audio/wav")
                post = session.post(f"{url}/{route}", data=form)
            sent += 1
            t0 = time.perf_counter()
            try:
                async with post as r:
                    body = await r.read()
                    key = None if r.status == 200 else str(r.status)
                    if key is None and check is not None:
                        key = check(r.content_type, body)
            except (aiohttp.ClientError, asyncio.TimeoutError) as err:
                key = type(err).__name__
            latencies.append(time.perf_counter() - t0)
            if key:
                errors[key] = errors.get(key, 0) + 1

    # A fresh connection per request, as from many independent clients: 32 long-lived keep-alive
    # connections get pinned to the server's workers by an accept race at the start (seen: 26
    # on one worker, 6 on the other), which would measure that race rather than the service.
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    ms = np.asarray(latencies) * 1000
    return {"requests": len(latencies), "errors": errors, "wall_s": round(wall, 2),
            "rps": round(len(latencies) / wall, 1), "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p90_ms": round(float(np.percentile(ms, 90)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1),
            "max_ms": round(float(ms.max()), 1)}


def timed_load(server: Server, clips: list[bytes], concurrency: int, **kwargs) -> dict:
    """:func:`load` against ``server``, with the CPU milliseconds per request that the server's
    process tree and this client each spent (both share the machine's cores)."""
    server0, client0 = server.cpu_s(), sum(psutil.Process().cpu_times()[:2])
    result = asyncio.run(load(server.url, clips, concurrency, **kwargs))
    server_s, client_s = server.cpu_s() - server0, sum(psutil.Process().cpu_times()[:2]) - client0
    return {**result, "server_cpu_ms": round(server_s / result["requests"] * 1000, 3),
            "client_cpu_ms": round(client_s / result["requests"] * 1000, 3)}


def model_calls(url: str) -> dict:
    """Clips per model call over every request so far, from the service's batch-size histogram on
    /metrics: the batch the load actually forms (the model costs more per clip in small ones)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text

    def total(series: str) -> float:  # summed over the worker processes
        return sum(float(v) for v in re.findall(rf"^soundline_model_batch_size_{series}\S* (\S+)$", text, re.M))

    calls, one = total("count"), total(r'bucket\{le="1\.0"\}')
    return {"calls": int(calls), "mean_clips": round(total("sum") / calls, 2), "one_clip_share": round(one / calls, 3)}
