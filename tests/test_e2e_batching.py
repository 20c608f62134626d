"""Batching behaviour through a real server: queue limits under a flood, request parameters."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcclient_aio
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.conftest import RunningServer, ServerFactory

FLOOD_CONFIG = """
name: "queued"
platform: "onnxruntime_onnx"
max_batch_size: 64
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ]
dynamic_batching {
  preferred_batch_size: [ 64 ]
  max_queue_delay_microseconds: 400000
  priority_levels: 2
  default_priority_level: 2
  default_queue_policy { max_queue_size: 8 allow_timeout_override: true }
}
"""


def slow_identity(path: Path, width: int = 1024, layers: int = 48) -> None:
    """OUTPUT0 = INPUT0, after real work (a stack of MatMul+Tanh whose result is multiplied
    by zero and added): a model slow enough for a queue to build up behind it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(
        (rng.standard_normal((16, width)) * 0.05).astype(np.float32), "w_in")]
    inits.append(numpy_helper.from_array(
        (rng.standard_normal((width, width)) * 0.05).astype(np.float32), "w"))
    nodes = [helper.make_node("MatMul", ["INPUT0", "w_in"], ["h0"])]
    for i in range(layers):
        nodes.append(helper.make_node("MatMul", [f"h{i}", "w"], [f"m{i}"]))
        nodes.append(helper.make_node("Tanh", [f"m{i}"], [f"h{i + 1}"]))
    inits.append(numpy_helper.from_array(np.zeros((width, 16), np.float32), "zero"))
    nodes.append(helper.make_node("MatMul", [f"h{layers}", "zero"], ["z"]))
    nodes.append(helper.make_node("Add", ["INPUT0", "z"], ["OUTPUT0"]))
    graph = helper.make_graph(
        nodes, "slow_identity",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["b", 16])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["b", 16])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


@pytest.fixture(scope="module")
def queued(start_server: ServerFactory, tmp_path_factory: pytest.TempPathFactory) -> RunningServer:
    repo = tmp_path_factory.mktemp("queued_repo")
    slow_identity(repo / "queued" / "1" / "model.onnx")
    (repo / "queued" / "config.pbtxt").write_text(FLOOD_CONFIG)
    return start_server(repo)


def test_flood_beyond_max_queue_size_is_rejected_fast(queued: RunningServer) -> None:
    """40 concurrent clients against a slow model with a queue of 8: the overflow is
    rejected at once, everything admitted completes correctly."""

    async def flood() -> list[tuple[float, object, np.ndarray]]:
        client = grpcclient_aio.InferenceServerClient(queued.grpc_url)

        async def one(i: int) -> tuple[float, object, np.ndarray]:
            data = np.full((1, 16), i, dtype=np.float32)
            tensor = grpcclient_aio.InferInput("INPUT0", [1, 16], "FP32")
            tensor.set_data_from_numpy(data)
            start = time.monotonic()
            try:
                result: object = await client.infer("queued", [tensor])
            except InferenceServerException as exc:
                result = exc
            return time.monotonic() - start, result, data

        try:
            return await asyncio.gather(*(one(i) for i in range(40)))
        finally:
            await client.close()

    outcomes = asyncio.run(flood())
    rejected = [(t, r) for t, r, _ in outcomes if isinstance(r, InferenceServerException)]
    served = [(r, d) for _, r, d in outcomes if not isinstance(r, InferenceServerException)]
    assert len(rejected) + len(served) == 40
    assert len(served) >= 8 and len(rejected) >= 20
    for seconds, error in rejected:
        assert isinstance(error, InferenceServerException)
        assert error.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert "max_queue_size" in (error.message() or "")
        assert seconds < 0.35  # rejected at once, not after waiting in line
    for result, data in served:
        assert isinstance(result, grpcclient.InferResult)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data)


def _raw_grpc(url: str, params: dict[str, int]) -> grpc.RpcError | None:
    request = service_pb2.ModelInferRequest(model_name="queued")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
    request.raw_input_contents.append(np.zeros(16, np.float32).tobytes())
    for key, value in params.items():
        request.parameters[key].int64_param = value
    with grpc.insecure_channel(url) as channel:
        try:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
        except grpc.RpcError as exc:
            return exc
    return None


def _raw_http(url: str, params: dict[str, object]) -> tuple[int, str]:
    body = json.dumps({
        "parameters": params,
        "inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": [0.0] * 16}],
    }).encode()
    request = urllib.request.Request(f"http://{url}/v2/models/queued/infer", data=body)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.parametrize(
    ("params", "needle"),
    [({"priority": -1}, "parameter 'priority' is -1"),
     ({"priority": 7}, "expected 0..2"),
     ({"timeout": -10}, "parameter 'timeout' is -10"),
     ({"timeout": 10**16}, "parameter 'timeout'")],
)
def test_bad_priority_and_timeout_both_transports(
    queued: RunningServer, params: dict[str, int], needle: str
) -> None:
    error = _raw_grpc(queued.grpc_url, params)
    assert error is not None and error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert needle in (error.details() or "")
    status, body = _raw_http(queued.http_url, params)
    assert status == 400 and needle in json.loads(body)["error"]


def test_priority_and_timeout_are_accepted(queued: RunningServer) -> None:
    client = grpcclient.InferenceServerClient(queued.grpc_url)
    tensor = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
    data = np.arange(16, dtype=np.float32).reshape(1, 16)
    tensor.set_data_from_numpy(data)
    result = client.infer("queued", [tensor], priority=1, timeout=5_000_000)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data)
    status, _ = _raw_http(queued.http_url, {"priority": 2, "timeout": 5_000_000})
    assert status == 200


def test_queue_timeout_answers_unavailable(queued: RunningServer) -> None:
    """A 5 ms queue timeout expires behind a 64-row batch that keeps the instance busy."""

    async def two() -> list[object]:
        client = grpcclient_aio.InferenceServerClient(queued.grpc_url)
        big = grpcclient_aio.InferInput("INPUT0", [64, 16], "FP32")
        big.set_data_from_numpy(np.zeros((64, 16), dtype=np.float32))
        small = grpcclient_aio.InferInput("INPUT0", [1, 16], "FP32")
        small.set_data_from_numpy(np.zeros((1, 16), dtype=np.float32))
        try:
            first = asyncio.ensure_future(client.infer("queued", [big]))
            await asyncio.sleep(0.005)
            second = client.infer("queued", [small], timeout=5_000)
            return list(await asyncio.gather(first, second, return_exceptions=True))
        finally:
            await client.close()

    results = asyncio.run(two())
    assert isinstance(results[0], grpcclient.InferResult)
    error = results[1]
    assert isinstance(error, InferenceServerException), error
    assert error.status() == "StatusCode.UNAVAILABLE"
    assert "timed out" in (error.message() or "")
