"""Load generation against a ``bentoml serve`` process on loopback, for the serving benchmarks
(``serve_load.py``, ``enhance_serve.py``): start a service and wait until it is ready, drive it
with a closed loop of concurrent clients, and account the CPU time that server and client spend
per request.

Two clients: :func:`wrk_load` (wrk, the C load generator: ``apt-get install wrk``) measures
throughput, since the client shares the machine's cores with the server and wrk spends a
fraction of a Python client's CPU per request; :func:`load` (aiohttp) checks every answer's body,
and :func:`aiohttp_load` drives it as :func:`wrk_load` does wrk, for machines without wrk (a GPU
machine with no package registry).
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
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


# wrk's script: cycles through prebuilt requests, counts answers by status, and reports in JSON.
# "Connection: close" opens a fresh connection per request, for the reason given in :func:`load`.
_WRK_LUA = """
local bodies, requests, i = {BODIES}, {{}}, 0
init = function()
  for k, path in ipairs(bodies) do
    local f = io.open(path, "rb"); local body = f:read("*all"); f:close()
    requests[k] = wrk.format("POST", "{PATH}", {{["Content-Type"] = "{TYPE}", ["Connection"] = "close"}}, body)
  end
end
request = function() i = i % #requests + 1; return requests[i] end
statuses = {{}}
response = function(status) if status ~= 200 then statuses[status] = (statuses[status] or 0) + 1 end end
local threads = {{}}
setup = function(thread) table.insert(threads, thread) end
done = function(summary, latency)
  local errors = {{}}
  for _, t in ipairs(threads) do
    for status, n in pairs(t:get("statuses")) do errors[tostring(status)] = (errors[tostring(status)] or 0) + n end
  end
  for _, kind in ipairs({{"connect", "read", "write", "timeout"}}) do
    if summary.errors[kind] > 0 then errors[kind] = summary.errors[kind] end
  end
  local parts = {{}}
  for k, n in pairs(errors) do table.insert(parts, string.format('"%s": %d', k, n)) end
  io.write(string.format('WRK {{"requests": %d, "duration_us": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, ' ..
    '"max_us": %d, "errors": {{%s}}}}\\n', summary.requests, summary.duration, latency:percentile(50),
    latency:percentile(90), latency:percentile(99), latency.max, table.concat(parts, ", ")))
end
"""


def multipart(body: bytes, field: str = "audio", filename: str = "clip.wav") -> tuple[bytes, str]:
    """A one-file multipart/form-data body and its content type."""
    boundary = "soundline-load-boundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            "Content-Type: audio/wav\r\n\r\n").encode()
    return head + body + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def wrk_load(server: Server, clips: list[bytes], concurrency: int, duration_s: int, raw: bool = True,
             route: str = "classify") -> dict:
    """wrk's closed loop of ``concurrency`` connections for ``duration_s`` (whole seconds, as wrk
    takes them), cycling through ``clips``: POST /raw/<route> with the clip as the body (``raw``),
    else /<route> as a multipart form.

    Returns the counts, rate and latency percentiles, errors by status (or socket error), and the
    CPU milliseconds per request of the server's process tree and of wrk.
    """
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: the serving benchmarks' load client (Debian: apt-get install wrk; "
                         "or serve_load.py --client aiohttp, whose CPU per request is several times wrk's)")
    with tempfile.TemporaryDirectory(prefix="wrk_") as tmp:
        paths = []
        for k, clip in enumerate(clips):
            body, content_type = (clip, "audio/wav") if raw else multipart(clip)
            paths.append(Path(tmp) / f"body{k}")
            paths[-1].write_bytes(body)
        script = Path(tmp) / "load.lua"
        script.write_text(_WRK_LUA.format(BODIES="{" + ", ".join(f'"{p}"' for p in paths) + "}",
                                          PATH=f"/raw/{route}?name=clip.wav" if raw else f"/{route}", TYPE=content_type))
        server0, client0 = server.cpu_s(), resource.getrusage(resource.RUSAGE_CHILDREN)
        run = subprocess.run(["wrk", "-t1", f"-c{concurrency}", f"-d{duration_s}s", "--timeout", "60s", "-s", str(script),
                              server.url], capture_output=True, text=True)
        if run.returncode or "WRK " not in run.stdout:
            raise RuntimeError(f"wrk failed ({run.returncode}):\n{run.stdout}{run.stderr}")
        client1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = json.loads(run.stdout.split("WRK ", 1)[1].splitlines()[0])
    n = out["requests"]
    client_s = client1.ru_utime + client1.ru_stime - client0.ru_utime - client0.ru_stime
    return {"requests": n, "errors": out["errors"], "wall_s": round(out["duration_us"] / 1e6, 2),
            "rps": round(n / out["duration_us"] * 1e6, 1),
            **{f"{q}_ms": round(out[f"{q}_us"] / 1000, 1) for q in ("p50", "p90", "p99", "max")},
            "server_cpu_ms": round((server.cpu_s() - server0) / n * 1000, 3),
            "client_cpu_ms": round(client_s / n * 1000, 3)}


def aiohttp_load(server: Server, clips: list[bytes], concurrency: int, duration_s: int, raw: bool = True,
                 route: str = "classify") -> dict:
    """:func:`load` for ``duration_s``, with :func:`wrk_load`'s figures: the client is this process."""
    server0, client0 = server.cpu_s(), time.process_time()
    out = asyncio.run(load(server.url, clips, concurrency, duration_s=duration_s, raw=raw, route=route))
    n = out["requests"]
    return {**out, "server_cpu_ms": round((server.cpu_s() - server0) / n * 1000, 3),
            "client_cpu_ms": round((time.process_time() - client0) / n * 1000, 3)}


def model_calls(url: str) -> dict:
    """Clips per model call over every request so far, from the service's batch-size histogram on
    /metrics: the batch the load actually forms (the model costs more per clip in small ones)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text

    def total(series: str) -> float:  # summed over the worker processes
        return sum(float(v) for v in re.findall(rf"^soundline_model_batch_size_{series}\S* (\S+)$", text, re.M))

    calls, one = total("count"), total(r'bucket\{le="1\.0"\}')
    return {"calls": int(calls), "mean_clips": round(total("sum") / calls, 2), "one_clip_share": round(one / calls, 3)}
