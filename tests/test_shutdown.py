"""SIGTERM under load: readiness turns false at once, new calls are refused, every request
admitted before the signal is answered correctly, and the server exits 0."""

from __future__ import annotations

import contextlib
import gc
import http.client
import json
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.conftest import RunningServer, ServerFactory, wait_for
from tests.test_e2e_batching import slow_identity

CONFIG = """
name: "slow"
backend: "onnxruntime"
max_batch_size: 1
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ]
dynamic_batching { }
"""

CLIENTS = 6


@dataclass
class Outcome:
    started: float
    ended: float
    ok: bool
    error: str = ""


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("shutdown_repo")
    slow_identity(repo / "slow" / "1" / "model.onnx", layers=384)
    (repo / "slow" / "config.pbtxt").write_text(CONFIG)
    return repo


def _grpc_client(server: RunningServer, outcomes: list[Outcome], stop: threading.Event,
                 seed: int) -> None:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    i = seed * 1000
    while not stop.is_set():
        i += 1
        data = np.full((1, 16), i, dtype=np.float32)
        tensor = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
        tensor.set_data_from_numpy(data)
        started = time.monotonic()
        try:
            result = client.infer("slow", [tensor], client_timeout=30)
            ok = np.array_equal(result.as_numpy("OUTPUT0"), data)
            outcomes.append(Outcome(started, time.monotonic(), ok, "" if ok else "wrong answer"))
        except InferenceServerException as exc:
            outcomes.append(Outcome(started, time.monotonic(), False, str(exc)))
            time.sleep(0.01)
    with contextlib.suppress(Exception):
        client.close()


def _http_client(server: RunningServer, outcomes: list[Outcome], stop: threading.Event,
                 seed: int) -> None:
    """JSON inference over the standard library's HTTP client (gevent's, under tritonclient.http,
    cannot be used from several threads), a new connection per request: whether a request was
    sent is then unambiguous."""
    i = seed * 1000
    while not stop.is_set():
        i += 1
        data = [float(i)] * 16
        body = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 16],
                                       "data": data}]})
        started = time.monotonic()
        connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
        try:
            connection.request("POST", "/v2/models/slow/infer", body,
                               {"Content-Type": "application/json"})
            response = connection.getresponse()
            answer = json.loads(response.read())
            ok = response.status == 200 and answer["outputs"][0]["data"] == data
            error = "" if ok else f"{response.status} {answer}"
            outcomes.append(Outcome(started, time.monotonic(), ok, error))
        except (OSError, http.client.HTTPException, ValueError) as exc:  # refused once closed
            outcomes.append(Outcome(started, time.monotonic(), False, repr(exc)))
            time.sleep(0.01)
        finally:
            connection.close()


def _ready(server: RunningServer) -> bool:
    try:
        with urllib.request.urlopen(f"http://{server.http_url}/v2/health/ready", timeout=2) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@pytest.mark.parametrize("frontend", ["native", "grpcio"])
def test_sigterm_under_load_loses_no_admitted_request(
    frontend: str, repository: Path, start_server: ServerFactory
) -> None:
    server = start_server(repository, "--grpc-frontend", frontend, "--exit-timeout-secs", "20")
    gc.collect()  # not in the client threads (see conftest's _collect_clients_on_the_main_thread)
    outcomes: list[Outcome] = []
    stop = threading.Event()
    threads = [
        threading.Thread(target=_grpc_client, args=(server, outcomes, stop, n), daemon=True)
        for n in range(CLIENTS)
    ] + [
        threading.Thread(target=_http_client, args=(server, outcomes, stop, n + 100), daemon=True)
        for n in range(CLIENTS)
    ]
    for thread in threads:
        thread.start()
    wait_for(lambda: sum(o.ok for o in outcomes) >= 8 * CLIENTS, "traffic to flow", 60)
    signalled = time.monotonic()
    server.process.send_signal(15)
    wait_for(lambda: not _ready(server), "readiness to turn false", 5)
    assert server.process.wait(60) == 0, server.log()
    stop.set()
    for thread in threads:
        thread.join(40)
    # Requests whose call began well before the signal were admitted (the queue of a slow
    # model holds them): each one must have been answered, and correctly.
    admitted = [o for o in outcomes if o.started < signalled - 0.05]
    lost = [o for o in admitted if not o.ok]
    assert not lost, (lost[:5], server.log()[-3000:])
    in_flight = [o for o in admitted if o.ended > signalled]
    assert len(in_flight) >= CLIENTS, "too few requests were in flight to test the drain"
    # Calls made after the signal were answered or refused, never left hanging.
    late = [o for o in outcomes if o.started >= signalled]
    assert all(o.ended - o.started < 25 for o in late)
    assert "stopped" in server.log()
