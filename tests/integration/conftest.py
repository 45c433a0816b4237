"""Shared integration fixtures: a real MLflow tracking server on loopback."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

SERVER_START_TIMEOUT_S = 60.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))  # port 0: the kernel picks an unused port
        return sock.getsockname()[1]


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    return _free_port()


def _wait_healthy(uri: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited ({process.returncode}):\n{log.read_text()}")
        try:
            if httpx.get(f"{uri}/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass  # not listening yet
        time.sleep(0.25)
    raise RuntimeError(
        f"mlflow server not healthy after {SERVER_START_TIMEOUT_S:.0f} s:\n{log.read_text()}"
    )


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URI of an ``mlflow server`` (SQLite backend, artifacts proxied over HTTP) for the session."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    log = root / "server.log"
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",  # the test machine has 2 cores; one worker starts fastest
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        # Proxied artifacts: clients upload over HTTP as they would to a remote server.
        "--serve-artifacts",
        "--artifacts-destination", str(root / "artifacts"),
    ]
    # The job runner (7 huey consumer processes, for GenAI evaluation jobs) would only compete
    # with the tests for the CPU.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with log.open("w") as log_file:
        # Own session, so teardown can signal the uvicorn worker together with its parent.
        process = subprocess.Popen(
            command, cwd=root, env=env, stdout=log_file, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_healthy(uri, process, log)
        yield uri
    finally:
        _stop(process)


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group, then SIGKILL whatever is left of it."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass  # already gone, or hanging: the SIGKILL below settles both
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # a worker may outlive its parent
    process.wait()


def wait_ready(process: subprocess.Popen, url: str, log: Path, timeout_s: float) -> None:
    """Poll ``url``/readyz until it answers 200; fail with the server's log if it exits or is late."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert process.poll() is None, f"the server exited:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"not ready in {timeout_s} s:\n{log.read_text()}"
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        time.sleep(0.5)


@contextlib.contextmanager
def packaged_and_served(root: Path, features: Path, params: Path, env: dict[str, str],
                        start_timeout_s: float) -> Iterator[tuple[str, dict, Path]]:
    """The package stage on ``root/register.json``, then ``bentoml serve`` of its Bento on a free
    loopback port until ``/readyz`` answers: yields (url, package.json, server log); stops it after."""
    subprocess.run([sys.executable, "-m", "pipeline.stages.package", "--decision", str(root / "register.json"),
                    "--features", str(features), "--bento", str(root / "soundline.bento"),
                    "--out", str(root / "package.json"), "--params", str(params)],
                   cwd=root, env=env, check=True, timeout=600)
    package = json.loads((root / "package.json").read_text())
    port = _free_port()
    log = root / "serve.log"
    with log.open("w") as log_file:
        process = subprocess.Popen(["bentoml", "serve", package["bento_tag"], "--host", "127.0.0.1",
                                    "--port", str(port)], cwd=root, env=env, stdout=log_file,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(process, url, log, start_timeout_s)
        yield url, package, log
    finally:
        _stop(process)
