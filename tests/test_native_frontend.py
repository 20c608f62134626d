"""The native gRPC front end end to end: a real server process (tests/native_frontend_server.py)
driven by the unmodified tritonclient (sync and aio), grpcio and perf_analyzer. Answers that do
not depend on the transport must equal the grpc.aio front end's (the `bundled` server)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcclient_aio
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from server import _native
from tests.conftest import (
    BUNDLED,
    ROOT,
    RunningServer,
    ServerFactory,
    assert_perf_analyzer_runs,
    free_port,
)
from tests.test_e2e_batching import slow_identity
from tests.test_e2e_infer import assert_outputs, cases, datatype_of, latest
from tests.test_native_grpc import RawH2, grpc_frame

pytestmark = pytest.mark.skipif(
    not getattr(_native, "HAVE_GRPC_FRONTEND", False), reason="built without nghttp2"
)

LIMIT = 100_000  # --max-request-bytes of the native server
MODELS = sorted(p.name for p in BUNDLED.iterdir() if p.is_dir() and not p.name.startswith("."))


def _wait_ready(server: RunningServer, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    client = grpcclient.InferenceServerClient(server.grpc_url)
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.log()}")
        try:
            if client.is_server_ready():
                return
        except InferenceServerException:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"server did not start in {timeout}s:\n{server.log()}")


@pytest.fixture(scope="module")
def native(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    http_port, grpc_port = free_port(), free_port()
    log_path = tmp_path_factory.mktemp("native") / "server.log"
    command = [
        sys.executable, "-m", "tests.native_frontend_server",
        "--model-repository", str(BUNDLED), "--host", "127.0.0.1",
        "--http-port", str(http_port), "--grpc-port", str(grpc_port),
        "--max-request-bytes", str(LIMIT),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            command, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT, env=env
        )
    server = RunningServer(process, http_port, grpc_port, 0, log_path)
    try:
        _wait_ready(server)
        yield server
    finally:
        code = server.stop()
    assert code == 0, server.log()
    assert "Traceback" not in server.log(), server.log()


def infer_inputs(module: Any, feed: dict[str, np.ndarray]) -> list[Any]:
    inputs = []
    for name, array in feed.items():
        tensor = module.InferInput(name, list(array.shape), datatype_of(array))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def error_of(call: Any) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value


def fp32_input(module: Any, array: np.ndarray) -> Any:
    tensor = module.InferInput("INPUT0", list(array.shape), "FP32")
    tensor.set_data_from_numpy(array)
    return tensor


# -- inference ----------------------------------------------------------------------------


@pytest.mark.parametrize(("model", "feed"), cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_infer_sync(native: RunningServer, model: str, feed: dict[str, np.ndarray]) -> None:
    client = grpcclient.InferenceServerClient(native.grpc_url)
    result = client.infer(model, infer_inputs(grpcclient, feed), request_id="r-1")
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == (
        model, latest(model), "r-1")
    assert_outputs(model, feed, result.as_numpy)


def test_infer_aio_every_model(native: RunningServer) -> None:
    all_cases = cases()

    async def run() -> None:
        client = grpcclient_aio.InferenceServerClient(native.grpc_url)
        try:
            results = await asyncio.gather(
                *(client.infer(m, infer_inputs(grpcclient_aio, feed)) for m, feed in all_cases)
            )
        finally:
            await client.close()
        for (model, feed), result in zip(all_cases, results, strict=True):
            assert_outputs(model, feed, result.as_numpy)

    asyncio.run(run())


def test_200_concurrent_aio_requests_each_get_their_own_answer(native: RunningServer) -> None:
    async def run() -> list[tuple[np.ndarray, Any]]:
        client = grpcclient_aio.InferenceServerClient(native.grpc_url)
        arrays = [np.full((1, 16), i, dtype=np.float32) for i in range(200)]
        try:
            results = await asyncio.gather(
                *(client.infer("identity_fp32", [fp32_input(grpcclient_aio, a)],
                               request_id=str(i)) for i, a in enumerate(arrays))
            )
        finally:
            await client.close()
        return list(zip(arrays, results, strict=True))

    pairs = asyncio.run(run())
    for i, (array, result) in enumerate(pairs):
        assert result.get_response().id == str(i)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), array)


# -- metadata, config, statistics, repository ---------------------------------------------


def test_health_and_metadata_match_grpc_aio(native: RunningServer, bundled: RunningServer) -> None:
    n = grpcclient.InferenceServerClient(native.grpc_url)
    a = grpcclient.InferenceServerClient(bundled.grpc_url)
    assert n.is_server_live() and n.is_server_ready()
    assert n.get_server_metadata(as_json=True) == a.get_server_metadata(as_json=True)
    for model in MODELS:
        assert n.is_model_ready(model) and n.is_model_ready(model, "1")
        assert n.get_model_metadata(model, as_json=True) == a.get_model_metadata(
            model, as_json=True
        )
        assert n.get_model_config(model, as_json=True) == a.get_model_config(model, as_json=True)
    assert not n.is_model_ready("nope") and not n.is_model_ready("digits", "9")
    assert n.get_model_config("digits", as_json=True)["config"]["name"] == "digits"


def test_repository_index_matches_grpc_aio(native: RunningServer, bundled: RunningServer) -> None:
    n = grpcclient.InferenceServerClient(native.grpc_url).get_model_repository_index(as_json=True)
    a = grpcclient.InferenceServerClient(bundled.grpc_url).get_model_repository_index(as_json=True)
    assert n == a
    assert sorted({m["name"] for m in n["models"]}) == MODELS


def test_statistics_count_the_requests(native: RunningServer) -> None:
    client = grpcclient.InferenceServerClient(native.grpc_url)

    def counts() -> tuple[int, int]:
        [stats] = client.get_inference_statistics("identity_fp32", as_json=True)["model_stats"]
        success = stats["inference_stats"]["success"]
        return int(stats.get("inference_count", 0)), int(success.get("count", 0))

    before = counts()
    for _ in range(5):
        client.infer("identity_fp32", [fp32_input(grpcclient, np.ones((1, 16), np.float32))])
    after = counts()
    assert (after[0] - before[0], after[1] - before[1]) == (5, 5)
    everything = client.get_inference_statistics(as_json=True)["model_stats"]
    index = client.get_model_repository_index(as_json=True)["models"]
    ready = sorted((m["name"], m["version"]) for m in index if m.get("state") == "READY")
    assert sorted((s["name"], s["version"]) for s in everything) == ready


# -- streaming ----------------------------------------------------------------------------


def test_stream_good_and_bad_requests_in_one_stream(native: RunningServer) -> None:
    results: list[Any] = []
    client = grpcclient.InferenceServerClient(native.grpc_url)
    client.start_stream(callback=lambda result, error: results.append(error or result))
    good = fp32_input(grpcclient, np.arange(16, dtype=np.float32).reshape(1, 16))
    bad = grpcclient.InferInput("INPUT0", [1, 16], "INT32")
    bad.set_data_from_numpy(np.arange(16, dtype=np.int32).reshape(1, 16))
    for i in range(4):
        client.async_stream_infer("identity_fp32", [good], request_id=f"g{i}")
    client.async_stream_infer("identity_fp32", [bad], request_id="bad")
    client.async_stream_infer("identity_fp32", [good], request_id="g4")
    client.stop_stream()  # half-closes and waits for the stream to end
    errors = [r for r in results if isinstance(r, InferenceServerException)]
    answers = [r for r in results if isinstance(r, grpcclient.InferResult)]
    assert len(answers) == 5 and len(errors) == 1, results
    assert "has datatype INT32, expected FP32" in errors[0].message()
    assert sorted(a.get_response().id for a in answers) == [f"g{i}" for i in range(5)]
    for answer in answers:
        np.testing.assert_array_equal(
            answer.as_numpy("OUTPUT0"), np.arange(16, dtype=np.float32).reshape(1, 16)
        )


def test_stream_aio(native: RunningServer) -> None:
    arrays = [np.full((1, 16), i, dtype=np.float32) for i in range(10)]

    async def requests() -> Any:
        for i, array in enumerate(arrays):
            yield {"model_name": "identity_fp32", "inputs": [fp32_input(grpcclient_aio, array)],
                   "request_id": str(i)}

    async def run() -> list[tuple[Any, Any]]:
        client = grpcclient_aio.InferenceServerClient(native.grpc_url)
        try:
            return [item async for item in client.stream_infer(requests())]
        finally:
            await client.close()

    items = asyncio.run(run())
    assert len(items) == 10
    for result, error in items:
        assert error is None
        index = int(result.get_response().id)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), arrays[index])


def test_empty_stream_ends_ok(native: RunningServer) -> None:
    with grpc.insecure_channel(native.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        responses = stub.ModelStreamInfer(iter([]))
        assert list(responses) == []
        assert responses.code() is grpc.StatusCode.OK


# -- errors -------------------------------------------------------------------------------


def test_wrong_datatype_is_invalid_argument(native: RunningServer, bundled: RunningServer) -> None:
    def send(url: str) -> InferenceServerException:
        client = grpcclient.InferenceServerClient(url)
        bad = grpcclient.InferInput("INPUT0", [2, 16], "FP64")
        bad.set_data_from_numpy(np.zeros((2, 16), np.float64))
        return error_of(lambda: client.infer("identity_fp32", [bad]))

    error = send(native.grpc_url)
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert error.message() == send(bundled.grpc_url).message()
    assert "input 'INPUT0' has datatype FP64, expected FP32" in error.message()


def test_unknown_model_is_not_found(native: RunningServer) -> None:
    client = grpcclient.InferenceServerClient(native.grpc_url)
    error = error_of(lambda: client.get_model_metadata("nope"))
    assert error.status() == "StatusCode.NOT_FOUND"
    assert "nope" in error.message()
    x = fp32_input(grpcclient, np.zeros((1, 16), np.float32))
    error = error_of(lambda: client.infer("nope", [x]))
    assert error.status() == "StatusCode.NOT_FOUND"


def test_unimplemented_rpc_matches_grpc_aio(native: RunningServer, bundled: RunningServer) -> None:
    def send(url: str) -> InferenceServerException:
        client = grpcclient.InferenceServerClient(url)
        return error_of(lambda: client.register_cuda_shared_memory("r", b"\0" * 64, 0, 64))

    error = send(native.grpc_url)
    assert error.status() == "StatusCode.UNIMPLEMENTED"
    assert error.message() == send(bundled.grpc_url).message()
    assert "CUDA shared memory is not supported" in error.message()


def test_unparsable_request_is_an_error(native: RunningServer) -> None:
    with grpc.insecure_channel(native.grpc_url) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as info:
            infer(b"\xff\xff\xff", timeout=10)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "ModelInferRequest does not parse" in str(info.value.details())


def test_request_above_limit_is_resource_exhausted(native: RunningServer) -> None:
    client = grpcclient.InferenceServerClient(native.grpc_url)
    big = grpcclient.InferInput("IN_UINT8", [8, 25_000], "UINT8")
    big.set_data_from_numpy(np.zeros((8, 25_000), np.uint8))
    error = error_of(lambda: client.infer("identity_all", [big]))
    assert error.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert "larger than max" in error.message() and str(LIMIT) in error.message()
    sizes = [int(n) for n in re.findall(r"\d+", error.message())]
    assert any(LIMIT < n < 2 * LIMIT + 1000 for n in sizes), error.message()
    x = np.ones((1, 16), np.float32)
    result = client.infer("identity_fp32", [fp32_input(grpcclient, x)])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x)


# -- clients that go away -----------------------------------------------------------------

FLOOD = textwrap.dedent(
    """
    import asyncio, sys
    import numpy as np
    import tritonclient.grpc.aio as g

    async def main():
        client = g.InferenceServerClient(sys.argv[1])
        x = g.InferInput("INPUT0", [1, 16], "FP32")
        x.set_data_from_numpy(np.ones((1, 16), np.float32))
        async def loop():
            while True:
                await client.infer("identity_fp32", [x])
        print("flooding", flush=True)
        await asyncio.gather(*(loop() for _ in range(64)))

    asyncio.run(main())
    """
)


def test_clients_that_disconnect_mid_call_do_not_break_the_server(native: RunningServer) -> None:
    log_start = len(native.log())
    # 1. A client process killed while 64 calls are in flight.
    with subprocess.Popen(
        [sys.executable, "-c", FLOOD, native.grpc_url], stdout=subprocess.PIPE, text=True
    ) as flood:
        assert flood.stdout is not None and flood.stdout.readline().strip() == "flooding"
        time.sleep(1.0)
        flood.send_signal(signal.SIGKILL)
        flood.wait(10)
    # 2. Calls cancelled by their client right after they were sent.
    request = service_pb2.ModelInferRequest(model_name="identity_fp32")
    tensor = request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
    request.raw_input_contents.append(np.ones((1, 16), np.float32).tobytes())
    with grpc.insecure_channel(native.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        futures = [stub.ModelInfer.future(request) for _ in range(50)]
        for future in futures:
            future.cancel()
    del tensor
    # 3. A connection that drops in the middle of a request message.
    with socket.create_connection(("127.0.0.1", native.grpc_port), timeout=5) as sock:
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
        path = b"/inference.GRPCInferenceService/ModelInfer"
        block = (b"\x83\x86"  # :method POST, :scheme http (static table)
                 + b"\x04" + bytes([len(path)]) + path  # :path, literal
                 + b"\x00\x0ccontent-type\x10application/grpc")
        headers = len(block).to_bytes(3, "big") + bytes([1, 4, 0, 0, 0, 1]) + block
        data = bytes([0, 0, 15, 0, 0, 0, 0, 0, 1]) + b"\x00\x00\x00\x03\xe8" + bytes(10)
        sock.sendall(headers + data)  # declares 1000 bytes, sends 10, then closes
    # The server still answers everything correctly, and logged no error.
    client = grpcclient.InferenceServerClient(native.grpc_url)
    for i in range(20):
        x = np.full((1, 16), i, np.float32)
        result = client.infer("identity_fp32", [fp32_input(grpcclient, x)])
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x)
    log = native.log()[log_start:]
    assert "Traceback" not in log and "ERROR" not in log, log


# -- compression --------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_tritonclient_compression(native: RunningServer, algorithm: str) -> None:
    client = grpcclient.InferenceServerClient(native.grpc_url)
    x = np.repeat(np.arange(16, dtype=np.float32)[None, :], 64, axis=0)  # compressible
    result = client.infer(
        "identity_fp32", [fp32_input(grpcclient, x)], compression_algorithm=algorithm
    )
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x)


def test_tritonclient_aio_compression(native: RunningServer) -> None:
    async def run() -> Any:
        client = grpcclient_aio.InferenceServerClient(native.grpc_url)
        try:
            x = np.zeros((32, 16), np.float32)
            return await client.infer(
                "identity_fp32", [fp32_input(grpcclient_aio, x)], compression_algorithm="gzip"
            )
        finally:
            await client.close()

    np.testing.assert_array_equal(asyncio.run(run()).as_numpy("OUTPUT0"), np.zeros((32, 16)))


def test_grpcio_gzip_channel(native: RunningServer) -> None:
    request = service_pb2.ModelInferRequest(model_name="identity_fp32")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[8, 16])
    request.raw_input_contents.append(np.ones((8, 16), np.float32).tobytes())
    with grpc.insecure_channel(native.grpc_url, compression=grpc.Compression.Gzip) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelInfer(request, timeout=10)
        stream = list(stub.ModelStreamInfer(iter([request, request]), timeout=10))
    assert response.raw_output_contents[0] == np.ones((8, 16), np.float32).tobytes()
    assert [r.error_message for r in stream] == ["", ""]


def test_zip_bomb_is_resource_exhausted(native: RunningServer) -> None:
    request = service_pb2.ModelInferRequest(model_name="identity_fp32")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[4096, 16])
    request.raw_input_contents.append(bytes(4096 * 16 * 4 * 4))  # 1 MiB of zeros, 10x LIMIT
    with grpc.insecure_channel(native.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request, timeout=10, compression=grpc.Compression.Gzip)
    assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"more than {LIMIT} bytes" in str(info.value.details())


# -- deadlines and shutdown, with a model whose queue is held -----------------------------

SLOW_CONFIG = """
name: "slow"
backend: "onnxruntime"
max_batch_size: 64
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
dynamic_batching { }
"""


@pytest.fixture(scope="module")
def slow_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One instance of a model that takes a while on a full batch (64 rows): a few such
    requests hold the queue, and a 1-row request waits behind them."""
    repo = tmp_path_factory.mktemp("slow_repo")
    slow_identity(repo / "slow" / "1" / "model.onnx")
    (repo / "slow" / "config.pbtxt").write_text(SLOW_CONFIG)
    return repo


@pytest.fixture
def slow(slow_repository: Path, start_server: ServerFactory) -> RunningServer:
    return start_server(slow_repository, "--grpc-frontend", "native")


def slow_input(module: Any, rows: int, value: float = 1.0) -> Any:
    return fp32_input(module, np.full((rows, 16), value, np.float32))


class QueueHolder:
    """Full-batch requests, enough of them to keep the single instance busy for about
    `seconds` (measured on this machine), each in its own thread."""

    def __init__(self, server: RunningServer, seconds: float = 2.0) -> None:
        self.client = grpcclient.InferenceServerClient(server.grpc_url)
        started = time.monotonic()
        self.client.infer("slow", [slow_input(grpcclient, 64)])  # also warms the model up
        took = max(time.monotonic() - started, 0.01)
        self.count = min(40, max(2, int(seconds / took) + 1))
        self.pool = ThreadPoolExecutor(self.count)
        self.results = [
            self.pool.submit(self.client.infer, "slow", [slow_input(grpcclient, 64)])
            for _ in range(self.count)
        ]
        time.sleep(0.2)  # the first is running, the others queued

    def wait(self) -> None:
        for result in self.results:
            np.testing.assert_array_equal(result.result(120).as_numpy("OUTPUT0"),
                                          np.ones((64, 16), np.float32))
        self.pool.shutdown()


def slow_stats(server: RunningServer) -> tuple[int, int]:
    """(inference_count, success count) of the slow model."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    [stats] = client.get_inference_statistics("slow", as_json=True)["model_stats"]
    success = stats["inference_stats"]["success"]
    return int(stats.get("inference_count", 0)), int(success.get("count", 0))


def pending_requests(server: RunningServer) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics") as r:
        text = r.read().decode()
    found = re.findall(r'^tachyon_inference_pending_requests\{[^}]*model="slow"[^}]*\} (\S+)',
                       text, re.MULTILINE)
    assert found, text
    return sum(float(v) for v in found)


def test_server_deadline_takes_the_request_out_of_the_queue(slow: RunningServer) -> None:
    """A bare HTTP/2 client that never cancels: only the server's own grpc-timeout ends the
    call, and the request behind the busy instance is never run."""
    holder = QueueHolder(slow)
    request = service_pb2.ModelInferRequest(model_name="slow", id="probe")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
    request.raw_input_contents.append(np.ones((1, 16), np.float32).tobytes())
    client = RawH2(slow.grpc_port)
    try:
        started = time.monotonic()
        stream = client.request("/inference.GRPCInferenceService/ModelInfer",
                                grpc_frame(request.SerializeToString()),
                                headers=(("grpc-timeout", "300m"),))
        answer = client.answer(stream, timeout=60)
        took = time.monotonic() - started
    finally:
        client.close()
    assert answer.status["grpc-status"] == "4", answer  # DEADLINE_EXCEEDED
    assert answer.status["grpc-message"] == "Deadline Exceeded"
    assert took < 1.5, f"answered after {took:.2f}s: the queue, not the deadline, ended it"
    holder.wait()
    # The probe left the queue: only the warm-up and the holders ran, 64 rows each.
    assert slow_stats(slow) == (64 * (holder.count + 1), holder.count + 1)
    assert pending_requests(slow) == 0


def test_tritonclient_client_timeout(slow: RunningServer) -> None:
    holder = QueueHolder(slow)
    client = grpcclient.InferenceServerClient(slow.grpc_url)
    error = error_of(
        lambda: client.infer("slow", [slow_input(grpcclient, 1)], client_timeout=0.3)
    )
    assert error.status() == "StatusCode.DEADLINE_EXCEEDED"
    holder.wait()
    assert slow_stats(slow) == (64 * (holder.count + 1), holder.count + 1)
    assert pending_requests(slow) == 0


def test_sigterm_answers_every_call_in_flight(slow: RunningServer) -> None:
    """Requests queued behind a busy instance when SIGTERM arrives are all answered (the
    server sends GOAWAY, then waits for them), and the server exits 0."""
    holder = QueueHolder(slow, seconds=1.0)
    client = grpcclient.InferenceServerClient(slow.grpc_url)
    with ThreadPoolExecutor(8) as pool:
        probes = [
            pool.submit(client.infer, "slow", [slow_input(grpcclient, 1, float(i))],
                        request_id=str(i), client_timeout=60)
            for i in range(8)
        ]
        time.sleep(0.3)  # all sent, waiting in the queue
        slow.process.send_signal(signal.SIGTERM)
        for i, probe in enumerate(probes):
            result = probe.result(60)
            assert result.get_response().id == str(i)
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"),
                                          np.full((1, 16), float(i), np.float32))
    holder.wait()
    assert slow.process.wait(60) == 0, slow.log()
    assert "Traceback" not in slow.log(), slow.log()


def test_perf_analyzer_runs_without_errors(native: RunningServer) -> None:
    assert_perf_analyzer_runs(native.grpc_url, "grpc", concurrency=4)
