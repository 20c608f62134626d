"""Shared fixtures: real `tachyon serve` processes on free loopback ports."""

from __future__ import annotations

import contextlib
import gc
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


@pytest.fixture(autouse=True, scope="module")
def _collect_clients_on_the_main_thread() -> Iterator[None]:
    """After each module, collect what its tests left unreferenced in cycles, tritonclient.http
    clients above all: collected later from another thread (a test's client or server
    threads), a client's gevent hub refuses to close there, and pytest turns that unraisable
    InvalidThreadUseError into a failure of whichever test happened to be running. Sockets
    the module's clients left open are closed by this collection too, without a warning (left
    to a later collection they would warn, or not, wherever that happened)."""
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "model_repository"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tachyon_command() -> list[str]:
    script = Path(sys.executable).parent / "tachyon"
    if script.exists():
        return [str(script)]
    found = shutil.which("tachyon")
    if found is None:
        raise RuntimeError("the `tachyon` console script is not installed (pip install -e .)")
    return [found]


@dataclass
class RunningServer:
    process: subprocess.Popen[bytes]
    http_port: int
    grpc_port: int
    metrics_port: int
    log_path: Path

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 20.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError(f"server did not stop on SIGTERM:\n{self.log()}") from None
        return int(self.process.returncode)


def _wait_started(
    server: RunningServer,
    expect_ready: bool,
    timeout: float = 60.0,
    ssl_context: ssl.SSLContext | None = None,
    headers: dict[str, str] | None = None,
) -> None:
    """Polls HTTP live; over HTTPS with `ssl_context`, with `headers` (a restricted health)."""
    deadline = time.monotonic() + timeout
    scheme = "http" if ssl_context is None else "https"
    probe = urllib.request.Request(
        f"{scheme}://{server.http_url}/v2/health/live", headers=headers or {}
    )
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.log()}")
        with contextlib.suppress(OSError), urllib.request.urlopen(
            probe, timeout=1, context=ssl_context
        ) as response:
            if response.status == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"server did not start in {timeout}s:\n{server.log()}")


ServerFactory = Callable[..., RunningServer]


def repository_index(server: RunningServer) -> dict[tuple[str, str], dict[str, str]]:
    """RepositoryIndex over gRPC, by (model, version); version "" for a model-level entry."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc_url)
    models = client.get_model_repository_index(as_json=True)["models"]
    return {(m["name"], m.get("version", "")): m for m in models}


PERF_ANALYZER = ROOT / ".tools" / "perf_analyzer" / "perf_analyzer"


def assert_perf_analyzer_runs(url: str, protocol: str, concurrency: int) -> None:
    """NVIDIA's perf_analyzer drives identity_fp32 at `url` and reports a throughput, no error.
    The stability window is wide on purpose: this checks the protocol, not the machine's noise
    (at 50% a busy 2-core VM made perf_analyzer give up with "Failed to obtain stable
    measurement", exit code 2, against a healthy server)."""
    if not PERF_ANALYZER.exists():
        pytest.fail("perf_analyzer is not installed: run scripts/setup --test")
    result = subprocess.run(
        [str(PERF_ANALYZER), "-m", "identity_fp32", "-u", url, "-i", protocol,
         "--concurrency-range", str(concurrency), "--measurement-interval", "1000",
         "--stability-percentage", "100", "--max-trials", "10"],
        capture_output=True, text=True, timeout=180,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert re.search(r"Throughput: [\d.]+ infer/sec", output), output
    assert "error" not in output.lower().replace("std error", ""), output


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll `condition` until it holds; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="session")
def start_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerFactory]:
    """Starts `tachyon serve` on free ports; every server is stopped at the end."""
    started: list[RunningServer] = []

    def start(
        repository: Path = BUNDLED,
        *extra: str,
        ssl_context: ssl.SSLContext | None = None,
        probe_headers: dict[str, str] | None = None,
    ) -> RunningServer:
        """`ssl_context`: the readiness probe's, for a server started with --http-use-ssl;
        `probe_headers`: its headers, for one that restricts health."""
        http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
        log_path = tmp_path_factory.mktemp("server") / "server.log"
        command = [
            *tachyon_command(),
            "serve",
            "--model-repository",
            str(repository),
            "--host",
            "127.0.0.1",
            "--http-port",
            str(http_port),
            "--grpc-port",
            str(grpc_port),
            "--metrics-port",
            str(metrics_port),
            *extra,
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        server = RunningServer(process, http_port, grpc_port, metrics_port, log_path)
        started.append(server)
        _wait_started(server, expect_ready=True, ssl_context=ssl_context, headers=probe_headers)
        return server

    yield start
    for server in started:
        with contextlib.suppress(AssertionError):
            server.stop()


@pytest.fixture(scope="session")
def bundled(start_server: ServerFactory) -> RunningServer:
    """One server on the bundled model repository, shared by the end-to-end tests."""
    return start_server(BUNDLED)
