"""Model lifecycle through real servers: readiness as Triton defines it (strict readiness
counts only versions meant to be served), --exit-on-error, and the default queue bound."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcclient_aio
from tritonclient.utils import InferenceServerException

from tests.conftest import (
    BUNDLED,
    RunningServer,
    ServerFactory,
    free_port,
    repository_index,
    tachyon_command,
    wait_for,
)
from tests.test_e2e_batching import slow_identity
from tests.test_e2e_repository import add_version, infer_version, make_repo


def http_ready(server: RunningServer) -> bool:
    try:
        with urllib.request.urlopen(f"http://{server.http_url}/v2/health/ready", timeout=5) as r:
            return r.status == 200
    except urllib.error.HTTPError as exc:
        exc.close()
        return False


class ReadinessWatcher:
    """Asks HTTP /v2/health/ready and gRPC ServerReady over and over in a thread, and keeps
    every answer that was not ready."""

    def __init__(self, server: RunningServer) -> None:
        self.server = server
        self.checks = 0
        self.not_ready: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        client = grpcclient.InferenceServerClient(self.server.grpc_url)
        while not self._stop.is_set():
            if not http_ready(self.server):
                self.not_ready.append(f"HTTP after {self.checks} checks")
            if not client.is_server_ready():
                self.not_ready.append(f"gRPC after {self.checks} checks")
            self.checks += 1

    def __enter__(self) -> ReadinessWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


@pytest.mark.parametrize("frontend", ["native", "grpcio"])
def test_a_poll_rollout_never_makes_the_server_unready(
    start_server: ServerFactory, tmp_path: Path, frontend: str
) -> None:
    """Version 2 replaces version 1 (latest 1): version 1 stays in the index as UNAVAILABLE,
    retired by the policy, and readiness never flips to false (before: unready forever)."""
    repo = make_repo(tmp_path, (1,))
    server = start_server(repo, "--model-control-mode", "poll", "--repository-poll-secs", "0.2",
                          "--grpc-frontend", frontend)
    g = grpcclient.InferenceServerClient(server.grpc_url)
    assert infer_version(g, "adder") == "1"
    with ReadinessWatcher(server) as watcher:
        add_version(repo / "adder", 2)
        wait_for(lambda: repository_index(server).get(("adder", "1"), {}).get("state")
                 == "UNAVAILABLE", "version 1 retired")
        checks = watcher.checks
        wait_for(lambda: watcher.checks > checks + 20, "readiness checks after the rollout")
    assert watcher.not_ready == [], watcher.not_ready[:5]
    assert watcher.checks > 20
    entry = repository_index(server)[("adder", "1")]
    assert entry["reason"] == "unloaded: not selected by version_policy"
    assert repository_index(server)[("adder", "2")]["state"] == "READY"
    assert infer_version(g, "adder") == "2"
    assert g.is_server_ready() and http_ready(server)


def test_an_explicit_unload_keeps_the_server_ready(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    repo = make_repo(tmp_path, (1,))
    shutil.copytree(BUNDLED / "identity_fp32", repo / "identity_fp32")
    server = start_server(repo, "--model-control-mode", "explicit", "--load-model", "adder",
                          "--load-model", "identity_fp32")
    g = grpcclient.InferenceServerClient(server.grpc_url)
    assert g.is_server_ready()
    g.unload_model("identity_fp32")
    assert repository_index(server)[("identity_fp32", "1")]["reason"] == "unloaded"
    assert g.is_server_ready() and http_ready(server)
    g.load_model("identity_fp32")
    g.unload_model("adder")
    assert g.is_server_ready() and http_ready(server)


def broken_repo(root: Path) -> Path:
    repo = make_repo(root, (1,))
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"this is not an ONNX model")
    return repo


@pytest.mark.parametrize("frontend", ["native", "grpcio"])
def test_a_broken_model_is_unready_with_strict_readiness_only(
    start_server: ServerFactory, tmp_path: Path, frontend: str
) -> None:
    repo = broken_repo(tmp_path)
    strict = start_server(repo, "--exit-on-error", "false", "--grpc-frontend", frontend)
    loose = start_server(repo, "--exit-on-error", "false", "--strict-readiness", "false",
                         "--grpc-frontend", frontend)
    for server, ready in ((strict, False), (loose, True)):
        g = grpcclient.InferenceServerClient(server.grpc_url)
        assert g.is_server_live()
        assert g.is_server_ready() is ready and http_ready(server) is ready
        assert repository_index(server)[("broken", "1")]["state"] == "UNAVAILABLE"
        assert infer_version(g, "adder") == "1"  # the others serve


# -- --exit-on-error --------------------------------------------------------------------------


def serve_until_exit(repo: Path, *extra: str, timeout: float = 60) -> tuple[int | None, str]:
    """Run `tachyon serve`; its exit code (None: still running after `timeout`) and output."""
    command = [*tachyon_command(), "serve", "--model-repository", str(repo), "--host",
               "127.0.0.1", "--http-port", str(free_port()), "--grpc-port", str(free_port()),
               "--metrics-port", str(free_port()), *extra]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.terminate()
        output, _ = process.communicate(timeout=30)
        return None, output.decode(errors="replace")
    return process.returncode, output.decode(errors="replace")


def test_exit_on_error_exits_non_zero_naming_the_failed_model(tmp_path: Path) -> None:
    code, output = serve_until_exit(broken_repo(tmp_path))
    assert code not in (None, 0), output
    assert "failed to load at start" in output and "broken" in output, output
    assert "version 1" in output, output  # the reason, not only the name


def test_exit_on_error_covers_a_missing_explicit_model(tmp_path: Path) -> None:
    repo = make_repo(tmp_path, (1,))
    code, output = serve_until_exit(repo, "--model-control-mode", "explicit", "--load-model",
                                    "adder", "--load-model", "missing")
    assert code not in (None, 0), output
    assert "model 'missing' is not in the repository" in output, output


def test_exit_on_error_false_serves_the_others(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    server = start_server(broken_repo(tmp_path), "--exit-on-error", "false")
    assert infer_version(grpcclient.InferenceServerClient(server.grpc_url), "adder") == "1"
    assert server.process.poll() is None


# -- the default queue bound ---------------------------------------------------------------

HELD_CONFIG = """
name: "held"
platform: "onnxruntime_onnx"
max_batch_size: 0
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ -1, 16 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1, 16 ] } ]
"""


def test_default_max_queue_size_rejects_with_resource_exhausted(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    """A slow model whose config sets no max_queue_size: with --default-max-queue-size 2,
    one request runs, two wait, the others are refused at once."""
    slow_identity(tmp_path / "held" / "1" / "model.onnx", layers=160)
    (tmp_path / "held" / "config.pbtxt").write_text(HELD_CONFIG)
    server = start_server(tmp_path, "--default-max-queue-size", "2")

    async def flood() -> list[object]:
        client = grpcclient_aio.InferenceServerClient(server.grpc_url)

        async def one(i: int) -> object:
            tensor = grpcclient_aio.InferInput("INPUT0", [1, 16], "FP32")
            tensor.set_data_from_numpy(np.full((1, 16), i, np.float32))
            try:
                return await client.infer("held", [tensor])
            except InferenceServerException as exc:
                return exc

        try:
            return list(await asyncio.gather(*(one(i) for i in range(16))))
        finally:
            await client.close()

    start = time.monotonic()
    outcomes = asyncio.run(flood())
    rejected = [r for r in outcomes if isinstance(r, InferenceServerException)]
    served = [r for r in outcomes if not isinstance(r, InferenceServerException)]
    assert len(rejected) >= 8 and len(served) >= 3, (len(rejected), time.monotonic() - start)
    for error in rejected:
        assert error.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert "queue is full (2 requests, --default-max-queue-size)" in (error.message() or "")
