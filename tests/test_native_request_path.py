"""The native request path (server/grpc/native_path.py, native/src/infer_router.cpp): plain
ModelInfer requests parsed, validated and coalesced in C++.

Its reader and writer are checked against plain-Python references (tests/native_reference.py)
and upb; end to end, the same requests go to a server with the path (the default) and one
without it (--grpc-native-request-path false): answers must be byte-identical, successes and
errors alike, and the path's counters show which requests it took.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server import _native, proto
from tests import native_reference as ref
from tests.conftest import RunningServer, ServerFactory

METHOD = "/inference.GRPCInferenceService/ModelInfer"

# KServe datatype -> (numpy dtype, ONNX element type)
TYPES = {
    "BOOL": (np.bool_, 9), "UINT8": (np.uint8, 2), "UINT16": (np.uint16, 4),
    "UINT32": (np.uint32, 12), "UINT64": (np.uint64, 13), "INT8": (np.int8, 3),
    "INT16": (np.int16, 5), "INT32": (np.int32, 6), "INT64": (np.int64, 7),
    "FP16": (np.float16, 10), "FP32": (np.float32, 1), "FP64": (np.float64, 11),
}
CONFIG_TYPES = {"FP16": "TYPE_FP16", "FP32": "TYPE_FP32", "FP64": "TYPE_FP64"}
MAX_BATCH = 8
NOBATCH_CONFIG = """
name: "plain_nobatch"
platform: "onnxruntime_onnx"
max_batch_size: 0
input [ { name: "X" data_type: TYPE_FP32 dims: [ 2, -1 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 2, -1 ] } ]
"""

PROPS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- the reader and the writer against their references ---------------------------------------

names = st.text(st.characters(codec="utf-8"), max_size=8)
shapes = st.lists(st.integers(-3, 1 << 40), max_size=4)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    """ModelInferRequests, plain or not (parameters, contents, output parameters)."""
    message = proto.ModelInferRequest(
        model_name=draw(names), model_version=draw(names), id=draw(names)
    )
    for _ in range(draw(st.integers(0, 3))):
        tensor = message.inputs.add(name=draw(names), datatype=draw(names), shape=draw(shapes))
        if draw(st.integers(0, 9)) == 0:
            tensor.contents.fp32_contents.append(1.0)
        if draw(st.integers(0, 9)) == 0:
            tensor.parameters["binary_data_size"].int64_param = 4
    for _ in range(draw(st.integers(0, 2))):
        output = message.outputs.add(name=draw(names))
        if draw(st.integers(0, 9)) == 0:
            output.parameters["classification"].int64_param = 2
    for _ in range(draw(st.integers(0, 3))):
        message.raw_input_contents.append(draw(st.binary(max_size=16)))
    if draw(st.integers(0, 9)) == 0:
        message.parameters["priority"].int64_param = 1
    data: bytes = message.SerializeToString()
    return data


@PROPS
@given(requests())
def test_reader_matches_reference_and_upb(message: bytes) -> None:
    parsed = _native.plain_infer_request(message)
    assert parsed == ref.plain_infer_request(message)
    request = proto.ModelInferRequest.FromString(message)
    plain = not request.parameters and not any(
        t.HasField("contents") or t.parameters for t in request.inputs
    ) and not any(o.parameters for o in request.outputs)
    assert (parsed is not None) == plain
    if parsed is not None:
        name, version, request_id, inputs, outputs, raw = parsed
        assert (name, version, request_id) == (
            request.model_name, request.model_version, request.id
        )
        assert inputs == [(t.name, t.datatype, tuple(t.shape)) for t in request.inputs]
        assert outputs == [o.name for o in request.outputs]
        assert raw == list(request.raw_input_contents)


@PROPS
@given(requests(), st.integers(0, 400), st.binary(min_size=1, max_size=3))
def test_reader_on_damaged_messages_matches_reference(
    message: bytes, at: int, junk: bytes
) -> None:
    at = min(at, len(message))
    for damaged in (message[:at], message[:at] + junk + message[at + len(junk):]):
        assert _native.plain_infer_request(damaged) == ref.plain_infer_request(damaged)


outputs_strategy = st.lists(
    st.tuples(names, st.sampled_from(sorted(TYPES)), st.lists(st.integers(0, 1 << 40), max_size=3),
              st.binary(max_size=24)),
    max_size=3,
)


@PROPS
@given(names, names, names, outputs_strategy)
def test_writer_matches_reference_and_upb(
    model: str, version: str, request_id: str, outputs: list[tuple[str, str, list[int], bytes]]
) -> None:
    written = _native.infer_response(model, version, request_id, outputs)
    assert written == ref.infer_response(model, version, request_id, outputs)
    message = proto.ModelInferResponse(model_name=model, model_version=version, id=request_id)
    for name, datatype, shape, data in outputs:
        message.outputs.add(name=name, datatype=datatype, shape=shape)
        message.raw_output_contents.append(data)
    assert written == message.SerializeToString()


# -- end to end --------------------------------------------------------------------------------


def identity_model(path: Path) -> None:
    """OUT_<T> = IN_<T> for every fixed-size datatype, batched, dims [-1]."""
    import onnx
    from onnx import helper

    inputs = [
        helper.make_tensor_value_info(f"IN_{t}", e, ["b", "n"]) for t, (_, e) in TYPES.items()
    ]
    outputs = [
        helper.make_tensor_value_info(f"OUT_{t}", e, ["b", "n"]) for t, (_, e) in TYPES.items()
    ]
    nodes = [helper.make_node("Identity", [f"IN_{t}"], [f"OUT_{t}"]) for t in TYPES]
    graph = helper.make_graph(nodes, "plain_all", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def nobatch_model(path: Path) -> None:
    import onnx
    from onnx import helper

    x = helper.make_tensor_value_info("X", 1, [2, "n"])
    y = helper.make_tensor_value_info("Y", 1, [2, "n"])
    graph = helper.make_graph([helper.make_node("Neg", ["X"], ["Y"])], "nobatch", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def config(name: str) -> str:
    def tensor(prefix: str, t: str) -> str:
        kind = CONFIG_TYPES.get(t, f"TYPE_{t}")
        return f'{{ name: "{prefix}_{t}" data_type: {kind} dims: [ -1 ] }}'

    return (
        f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {MAX_BATCH}\n'
        f"input [ {', '.join(tensor('IN', t) for t in TYPES)} ]\n"
        f"output [ {', '.join(tensor('OUT', t) for t in TYPES)} ]\n"
        "dynamic_batching { max_queue_delay_microseconds: 2000 }\n"
    )


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("plain_repo")
    identity_model(repo / "plain_all" / "1" / "model.onnx")
    (repo / "plain_all" / "config.pbtxt").write_text(config("plain_all"))
    nobatch_model(repo / "plain_nobatch" / "1" / "model.onnx")
    (repo / "plain_nobatch" / "config.pbtxt").write_text(NOBATCH_CONFIG)
    return repo


@pytest.fixture(scope="module")
def native(repository: Path, start_server: ServerFactory) -> RunningServer:
    return start_server(repository, "--grpc-frontend", "native")


@pytest.fixture(scope="module")
def python(repository: Path, start_server: ServerFactory) -> RunningServer:
    return start_server(repository, "--grpc-frontend", "native",
                        "--grpc-native-request-path", "false")


@pytest.fixture(scope="module")
def channels(native: RunningServer, python: RunningServer) -> Iterator[tuple[Any, Any]]:
    with grpc.insecure_channel(native.grpc_url) as a, grpc.insecure_channel(python.grpc_url) as b:
        yield a.unary_unary(METHOD), b.unary_unary(METHOD)


Answer = tuple[str, str | bytes]


def call(stub: Any, message: bytes) -> Answer:
    """("OK", response bytes) or (status code name, details)."""
    try:
        return "OK", stub(message, timeout=30)
    except grpc.RpcError as exc:
        return exc.code().name, exc.details()


def counters(server: RunningServer) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics") as r:
        text = r.read().decode()
    found = re.findall(r"^tachyon_grpc_native_path_(\w+)_total (\S+)$", text, re.MULTILINE)
    return {name: float(value) for name, value in found}


def request(
    rows: int, width: int, types: list[str], outputs: list[str] | None = None,
    request_id: str = "", model: str = "plain_all", seed: int = 0, version: str = "",
) -> Any:
    """A request with every input (rows x width); `types` lists the inputs whose data is
    random (the others are zeros) so that messages differ."""
    rng = np.random.default_rng(seed)
    message = proto.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    for t, (dtype, _) in TYPES.items():
        message.inputs.add(name=f"IN_{t}", datatype=t, shape=[rows, width])
        data: np.ndarray[Any, Any] = (
            rng.integers(0, 100, (rows, width)).astype(dtype) if t in types
            else np.zeros((rows, width), dtype)
        )
        message.raw_input_contents.append(data.tobytes())
    for name in outputs or []:
        message.outputs.add(name=name)
    return message


def plain_requests(count: int) -> list[bytes]:
    rng = np.random.default_rng(1)
    out = []
    for i in range(count):
        kinds = sorted(TYPES)
        types = [kinds[j] for j in rng.choice(len(kinds), 3, replace=False)]
        wanted = None
        if i % 3 == 1:
            wanted = [f"OUT_{t}" for t in reversed(types)]  # a subset, in the request's order
        message = request(int(rng.integers(1, MAX_BATCH + 1)), int(rng.integers(1, 5)), types,
                          wanted, request_id=f"r{i}" if i % 2 else "", seed=i)
        out.append(message.SerializeToString())
    return out


def test_plain_requests_take_the_native_path_byte_identical(
    channels: tuple[Any, Any], native: RunningServer, python: RunningServer
) -> None:
    fast, slow = channels
    before = counters(native)
    messages = plain_requests(60)
    for message in messages:
        got, want = call(fast, message), call(slow, message)
        assert got[0] == "OK", got
        assert got == want
    after = counters(native)
    assert after["requests"] - before["requests"] == len(messages)
    assert after["fallbacks"] == before["fallbacks"]
    assert counters(python) == {}  # the path is off there: no counters at all


def bad_requests() -> list[bytes]:
    """Requests the native path must leave to Python, each for a different reason."""
    out = []
    base = request(2, 3, ["FP32"])
    with_priority = proto.ModelInferRequest()
    with_priority.CopyFrom(base)
    with_priority.parameters["priority"].int64_param = 0
    out.append(with_priority)
    classified = request(2, 3, ["FP32"], ["OUT_FP32"])
    classified.outputs[0].parameters["classification"].int64_param = 2
    out.append(classified)
    wrong_shape = request(2, 3, ["FP32"])
    wrong_shape.inputs[3].shape[:] = [2, 4]
    out.append(wrong_shape)
    wrong_type = request(2, 3, ["FP32"])
    wrong_type.inputs[0].datatype = "INT8"
    out.append(wrong_type)
    missing = request(2, 3, ["FP32"])
    del missing.inputs[5]
    del missing.raw_input_contents[5]
    out.append(missing)
    short = request(2, 3, ["FP32"])
    short.raw_input_contents[2] = b"\0" * 5
    out.append(short)
    out.append(request(2, 3, ["FP32"], ["OUT_NOPE"]))
    out.append(request(2, 3, ["FP32"], ["OUT_FP32", "OUT_FP32"]))
    out.append(request(MAX_BATCH + 1, 3, ["FP32"]))
    out.append(request(2, 3, ["FP32"], model="no_such_model"))
    out.append(request(2, 3, ["FP32"], version="7"))
    out.append(request(0, 3, ["FP32"]))
    contents = request(1, 1, ["FP32"])
    del contents.raw_input_contents[:]
    for tensor in contents.inputs:
        tensor.contents.int_contents.append(0)
    out.append(contents)
    messages = [m.SerializeToString() for m in out]
    messages.append(b"\x0a\xff")  # does not parse
    return messages


def test_other_requests_fall_back_with_todays_answers(
    channels: tuple[Any, Any], native: RunningServer
) -> None:
    fast, slow = channels
    before = counters(native)
    for message in bad_requests():
        got, want = call(fast, message), call(slow, message)
        assert got == want, (got, want)
    assert counters(native)["requests"] == before["requests"]


def test_mixed_concurrent_group(channels: tuple[Any, Any], native: RunningServer) -> None:
    """Plain and other requests arriving together (one take): every call gets the answer the
    Python path gives it, plain ones coalesced."""
    _, slow = channels
    messages = [m for pair in zip(plain_requests(48), bad_requests() * 4, strict=False)
                for m in pair]
    expected = [call(slow, m) for m in messages]

    async def all_at_once() -> list[Answer]:
        async with grpc.aio.insecure_channel(native.grpc_url) as channel:
            stub = channel.unary_unary(METHOD)

            async def one(message: bytes) -> Answer:
                try:
                    return "OK", await stub(message, timeout=30)
                except grpc.aio.AioRpcError as exc:
                    return exc.code().name, exc.details() or ""

            return await asyncio.gather(*(one(m) for m in messages))

    before = counters(native)
    assert asyncio.run(all_at_once()) == expected
    after = counters(native)
    assert after["requests"] - before["requests"] == 48
    assert after["chunks"] - before["chunks"] < 48  # some were coalesced


def stats(server: RunningServer, model: str) -> dict[str, Any]:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    [found] = client.get_inference_statistics(model, as_json=True)["model_stats"]
    return dict(found)


def test_chunks_respect_max_batch_size_and_statistics_count_requests(
    native: RunningServer,
) -> None:
    """40 requests of 3 rows at once: chunks of at most 8 rows (two requests), every request
    counted once as a success, every row as an inference."""
    messages = [request(3, 2, ["INT32"], ["OUT_INT32"], seed=i) for i in range(40)]
    before = stats(native, "plain_all")

    async def all_at_once() -> list[Any]:
        async with grpc.aio.insecure_channel(native.grpc_url) as channel:
            stub = channel.unary_unary(METHOD)
            return await asyncio.gather(*(stub(m.SerializeToString(), timeout=30)
                                          for m in messages))

    answers = asyncio.run(all_at_once())
    for message, data in zip(messages, answers, strict=True):
        response = proto.ModelInferResponse.FromString(data)
        assert [o.name for o in response.outputs] == ["OUT_INT32"]
        assert list(response.outputs[0].shape) == [3, 2]
        assert response.raw_output_contents[0] == message.raw_input_contents[7]
    after = stats(native, "plain_all")
    success = int(after["inference_stats"]["success"]["count"])
    assert success - int(before["inference_stats"]["success"].get("count", 0)) == 40
    rows = int(after["inference_count"]) - int(before.get("inference_count", 0))
    assert rows == 120
    assert all(int(b["batch_size"]) <= MAX_BATCH for b in after["batch_stats"])
    queue = after["inference_stats"]["queue"]["count"]
    assert int(queue) - int(before["inference_stats"]["queue"].get("count", 0)) == 40


def test_model_without_batching(channels: tuple[Any, Any], native: RunningServer) -> None:
    fast, slow = channels
    before = counters(native)
    for width in (1, 3):
        message = proto.ModelInferRequest(model_name="plain_nobatch", id="nb")
        message.inputs.add(name="X", datatype="FP32", shape=[2, width])
        data = np.arange(2 * width, dtype=np.float32)
        message.raw_input_contents.append(data.tobytes())
        got = call(fast, message.SerializeToString())
        assert got == call(slow, message.SerializeToString())
        response = proto.ModelInferResponse.FromString(got[1])
        assert np.array_equal(np.frombuffer(response.raw_output_contents[0], np.float32), -data)
    assert counters(native)["requests"] - before["requests"] == 2


def test_unload_and_load_while_requests_flow(
    repository: Path, start_server: ServerFactory
) -> None:
    """Requests keep coming while the model is unloaded and loaded again: each is answered,
    with its rows or UNAVAILABLE / NOT_FOUND, and the path serves the reloaded version."""
    server = start_server(repository, "--model-control-mode", "explicit",
                          "--load-model", "plain_all")
    message = request(2, 2, ["FP64"], ["OUT_FP64"]).SerializeToString()
    answers: list[Answer] = []
    stop = threading.Event()

    def hammer() -> None:
        with grpc.insecure_channel(server.grpc_url) as channel:
            stub = channel.unary_unary(METHOD)
            while not stop.is_set():
                answers.append(call(stub, message))

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        for _ in range(3):
            time.sleep(0.3)
            client.unload_model("plain_all")
            time.sleep(0.3)
            client.load_model("plain_all")
        time.sleep(0.3)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    codes = {code for code, _ in answers}
    assert codes <= {"OK", "UNAVAILABLE", "NOT_FOUND"}, codes
    assert "OK" in codes and codes != {"OK"}
    expected = proto.ModelInferRequest.FromString(message).raw_input_contents[11]
    for code, data in answers:
        if code == "OK":
            assert isinstance(data, bytes)
            assert proto.ModelInferResponse.FromString(data).raw_output_contents[0] == expected
    before = counters(server)["requests"]
    with grpc.insecure_channel(server.grpc_url) as channel:
        assert call(channel.unary_unary(METHOD), message)[0] == "OK"
    assert counters(server)["requests"] == before + 1


def listeners(port: int) -> int:
    """Listening TCP sockets on `port` (IPv4), from /proc/net/tcp."""
    with open("/proc/net/tcp") as table:
        rows = [line.split() for line in table.readlines()[1:]]
    return sum(1 for row in rows if row[3] == "0A" and int(row[1].split(":")[1], 16) == port)


def test_io_threads_share_the_port_and_answer_every_connection(
    repository: Path, start_server: ServerFactory
) -> None:
    """--grpc-io-threads 3: three listeners on the gRPC port; calls over many connections
    (spread over the threads by the kernel) all get their own answers, plain and not."""
    server = start_server(repository, "--grpc-io-threads", "3")
    assert listeners(server.grpc_port) == 3
    plain = plain_requests(8)
    other = bad_requests()[:4]
    with grpc.insecure_channel(server.grpc_url) as channel:  # the expected answers
        expected = [call(channel.unary_unary(METHOD), m) for m in [*plain, *other]]
    channels = [
        grpc.insecure_channel(server.grpc_url, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(12)
    ]
    try:
        for channel in channels:
            stub = channel.unary_unary(METHOD)
            assert [call(stub, m) for m in [*plain, *other]] == expected
    finally:
        for channel in channels:
            channel.close()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    assert client.is_server_live()


def test_io_threads_out_of_range_is_refused(repository: Path) -> None:
    import subprocess

    from tests.conftest import tachyon_command

    result = subprocess.run(
        [*tachyon_command(), "serve", "--model-repository", str(repository),
         "--grpc-io-threads", "0"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "--grpc-io-threads: expected 1..64 I/O threads, got '0'" in result.stderr


QUEUED_CONFIG = """
name: "queued"
platform: "onnxruntime_onnx"
max_batch_size: 64
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
dynamic_batching { default_queue_policy { max_queue_size: 4 } }
"""


def test_queue_bound_counts_each_coalesced_request(
    tmp_path: Path, start_server: ServerFactory
) -> None:
    """max_queue_size 4, the one instance busy: of 12 plain requests sent at once (taken
    together, so coalesced) exactly 4 are queued and answered, 8 get today's RESOURCE_EXHAUSTED."""
    from tests.test_e2e_batching import slow_identity

    slow_identity(tmp_path / "queued" / "1" / "model.onnx", width=2048, layers=64)  # ~1 s
    (tmp_path / "queued" / "config.pbtxt").write_text(QUEUED_CONFIG)
    server = start_server(tmp_path)

    def one(rows: int) -> bytes:
        message = proto.ModelInferRequest(model_name="queued")
        message.inputs.add(name="INPUT0", datatype="FP32", shape=[rows, 16])
        message.raw_input_contents.append(np.ones((rows, 16), np.float32).tobytes())
        data: bytes = message.SerializeToString()
        return data

    async def burst() -> list[Answer]:
        async with grpc.aio.insecure_channel(server.grpc_url) as channel:
            stub = channel.unary_unary(METHOD)
            await stub(one(1), timeout=60)  # warm up

            async def call_async(message: bytes) -> Answer:
                try:
                    return "OK", await stub(message, timeout=60)
                except grpc.aio.AioRpcError as exc:
                    return exc.code().name, exc.details() or ""

            holder = asyncio.ensure_future(call_async(one(64)))
            await asyncio.sleep(0.2)  # the holder runs on the one instance
            answers = await asyncio.gather(*(call_async(one(1)) for _ in range(12)))
            assert (await holder)[0] == "OK"
            return answers

    answers = asyncio.run(burst())
    assert sum(code == "OK" for code, _ in answers) == 4, answers
    full = "model 'queued': queue is full (4 requests, max_queue_size), retry later"
    assert sorted(set(answers) - {a for a in answers if a[0] == "OK"}) == [
        ("RESOURCE_EXHAUSTED", full)
    ]
    # a fresh server: the warm-up, the holder and the burst were all planned natively, and the
    # calls that did not fit the queue were handed back to the Python path, which refused them
    found = counters(server)
    assert found["requests"] == 14 and found["fallbacks"] >= 8, found
