"""Core request handling through real servers, on both gRPC front ends (native and grpcio) and
HTTP: optional inputs batch by input set, shapes are bounded before numpy, the classification
extension, and config sections Tachyon does not implement."""

from __future__ import annotations

import asyncio
import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcclient_aio
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.conftest import BUNDLED, RunningServer, ServerFactory, repository_index

LABELS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

OPTIONAL_CONFIG = """
name: "optional"
platform: "onnxruntime_onnx"
max_batch_size: 16
input [ { name: "A" data_type: TYPE_FP32 dims: [ 4 ] },
        { name: "B" data_type: TYPE_FP32 dims: [ 4 ] optional: true },
        { name: "C" data_type: TYPE_FP32 dims: [ 4 ] optional: true } ]
output [ { name: "OUT" data_type: TYPE_FP32 dims: [ 4 ] } ]
dynamic_batching { max_queue_delay_microseconds: 20000 }
"""

DYNAMIC_CONFIG = """
name: "dynamic"
platform: "onnxruntime_onnx"
max_batch_size: 0
input [ { name: "IN" data_type: TYPE_FP32 dims: [ -1, -1 ] } ]
output [ { name: "OUT" data_type: TYPE_FP32 dims: [ -1, -1 ] } ]
"""


def optional_inputs_model(path: Path) -> None:
    """OUT = A + B + C; B and C are graph inputs with a default (zeros), which ONNX Runtime
    lets a request override: optional inputs."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["A", "B"], ["AB"]),
         helper.make_node("Add", ["AB", "C"], ["OUT"])],
        "optional",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", 4]) for n in "ABC"],
        [helper.make_tensor_value_info("OUT", TensorProto.FLOAT, ["b", 4])],
        [numpy_helper.from_array(np.zeros((1, 4), np.float32), n) for n in "BC"],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def identity_model(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["IN"], ["OUT"])], "dynamic",
        [helper.make_tensor_value_info("IN", TensorProto.FLOAT, ["x", "y"])],
        [helper.make_tensor_value_info("OUT", TensorProto.FLOAT, ["x", "y"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("core_repo")
    for name in ("digits", "string_upper", "identity_fp32"):
        shutil.copytree(BUNDLED / name, root / name)
    config = root / "digits" / "config.pbtxt"
    config.write_text(config.read_text().replace(
        'name: "PROBABILITIES" data_type: TYPE_FP32 dims: [ 10 ]',
        'name: "PROBABILITIES" data_type: TYPE_FP32 dims: [ 10 ] label_filename: "labels.txt"'))
    (root / "digits" / "labels.txt").write_text("\n".join(LABELS) + "\n")
    optional_inputs_model(root / "optional" / "1" / "model.onnx")
    (root / "optional" / "config.pbtxt").write_text(OPTIONAL_CONFIG)
    identity_model(root / "dynamic" / "1" / "model.onnx")
    (root / "dynamic" / "config.pbtxt").write_text(DYNAMIC_CONFIG)
    shutil.copytree(BUNDLED / "identity_fp32", root / "stateful")
    stateful = root / "stateful" / "config.pbtxt"
    stateful.write_text(stateful.read_text().replace('name: "identity_fp32"', 'name: "stateful"')
                        .replace("dynamic_batching { }",
                                 "sequence_batching { max_sequence_idle_microseconds: 1000 }"))
    return root


@pytest.fixture(scope="module", params=["native", "grpcio"])
def server(
    request: pytest.FixtureRequest, start_server: ServerFactory, repo: Path
) -> RunningServer:
    return start_server(repo, "--grpc-frontend", request.param, "--exit-on-error", "false")


# -- optional inputs -------------------------------------------------------------------------


def test_concurrent_requests_with_different_optional_inputs(server: RunningServer) -> None:
    """{A, B} and {A, C} requests at once: each gets A + its own optional input (before: a
    batch mixing both failed with INTERNAL KeyError)."""

    async def run() -> list[str]:
        client = grpcclient_aio.InferenceServerClient(server.grpc_url)
        failures: list[str] = []

        async def one(i: int) -> None:
            other = "B" if i % 2 else "C"
            a = np.full((1, 4), float(i), np.float32)
            b = np.full((1, 4), 100.0 * i, np.float32)
            tensors = []
            for name, data in (("A", a), (other, b)):
                tensor = grpcclient_aio.InferInput(name, [1, 4], "FP32")
                tensor.set_data_from_numpy(data)
                tensors.append(tensor)
            try:
                result = await client.infer("optional", tensors)
            except InferenceServerException as exc:
                failures.append(f"{exc.status()}: {exc.message()}")
                return
            if not np.array_equal(result.as_numpy("OUT"), a + b):
                failures.append(f"request {i}: {result.as_numpy('OUT')}")

        try:
            for _ in range(3):
                await asyncio.gather(*(one(i) for i in range(32)))
        finally:
            await client.close()
        return failures

    assert asyncio.run(run()) == []
    stats = grpcclient.InferenceServerClient(server.grpc_url).get_inference_statistics(
        "optional", as_json=True)["model_stats"][0]
    assert int(stats["execution_count"]) < int(stats["inference_count"])  # batches formed


# -- shapes bounded before numpy ----------------------------------------------------------

HUGE_SHAPES = [[0, 2**62], [2**62, 2**62], [0, 2**30]]


def _assert_names_the_bound(message: str, shape: list[int]) -> None:
    assert "input 'IN'" in message and str(shape) in message and "bound" in message, message


@pytest.mark.parametrize("shape", HUGE_SHAPES)
@pytest.mark.parametrize("encoding", ["raw", "contents"])
def test_huge_shapes_are_invalid_argument_over_grpc(
    server: RunningServer, shape: list[int], encoding: str
) -> None:
    request = service_pb2.ModelInferRequest(model_name="dynamic")
    request.inputs.add(name="IN", datatype="FP32", shape=shape)
    if encoding == "raw":
        request.raw_input_contents.append(b"")
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request, timeout=10)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    _assert_names_the_bound(info.value.details() or "", shape)


@pytest.mark.parametrize("shape", HUGE_SHAPES)
@pytest.mark.parametrize("binary", [False, True])
def test_huge_shapes_are_invalid_argument_over_http(
    server: RunningServer, shape: list[int], binary: bool
) -> None:
    tensor: dict[str, object] = {"name": "IN", "shape": shape, "datatype": "FP32"}
    headers = {"Content-Type": "application/json"}
    if binary:
        tensor["parameters"] = {"binary_data_size": 0}
    else:
        tensor["data"] = []
    body = json.dumps({"inputs": [tensor]}).encode()
    if binary:
        headers["Inference-Header-Content-Length"] = str(len(body))
    request = urllib.request.Request(
        f"http://{server.http_url}/v2/models/dynamic/infer", data=body, headers=headers
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    assert info.value.code == 400
    _assert_names_the_bound(json.loads(info.value.read())["error"], shape)
    info.value.close()


# -- classification ---------------------------------------------------------------------------


def digits_sample() -> np.ndarray:
    sample = json.loads((BUNDLED / "digits" / "sample.json").read_text())["request"]["inputs"][0]
    return np.array(sample["data"], dtype=np.float32).reshape(sample["shape"])


def _check_classes(classes: np.ndarray, probabilities: np.ndarray, labels: np.ndarray) -> None:
    assert classes.shape == (len(probabilities), 3)
    for row, strings in enumerate(classes):
        # BYTES come back as bytes over gRPC and HTTP binary, as str from HTTP JSON
        parts = [(s if isinstance(s, str) else s.decode()).split(":") for s in strings]
        indices = [int(p[1]) for p in parts]
        assert indices == list(np.argsort(-probabilities[row], kind="stable")[:3])
        assert indices[0] == labels[row, 0]  # the top class is the model's LABEL
        for (value, index, label) in parts:
            assert value == f"{float(probabilities[row, int(index)]):f}"  # "0.984375", 6 places
            assert label == LABELS[int(index)]


def test_classification_over_grpc(server: RunningServer) -> None:
    x = digits_sample()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    tensor = grpcclient.InferInput("INPUT", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    plain = client.infer("digits", [tensor])
    classified = client.infer("digits", [tensor], outputs=[
        grpcclient.InferRequestedOutput("PROBABILITIES", class_count=3),
        grpcclient.InferRequestedOutput("LABEL"),
    ])
    output = classified.get_output("PROBABILITIES")
    assert output.datatype == "BYTES" and list(output.shape) == [len(x), 3]
    _check_classes(classified.as_numpy("PROBABILITIES"), plain.as_numpy("PROBABILITIES"),
                   plain.as_numpy("LABEL"))
    # more classes than the output has: all ten; an integer output prints its values as such
    wide = client.infer("digits", [tensor], outputs=[
        grpcclient.InferRequestedOutput("PROBABILITIES", class_count=50),
        grpcclient.InferRequestedOutput("LABEL", class_count=1)])
    assert wide.as_numpy("PROBABILITIES").shape == (len(x), 10)
    labels = plain.as_numpy("LABEL")
    assert [s.decode() for s in wide.as_numpy("LABEL")[:, 0]] == [
        f"{int(v)}:0" for v in labels[:, 0]]
    text = grpcclient.InferInput("TEXT", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"abc"], dtype=object))
    with pytest.raises(InferenceServerException) as info:
        client.infer("string_upper", [text], outputs=[
            grpcclient.InferRequestedOutput("UPPER", class_count=2)])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "output 'UPPER' is BYTES" in (info.value.message() or "")


def test_classification_over_http_json(server: RunningServer) -> None:
    x = digits_sample()
    client = httpclient.InferenceServerClient(server.http_url)
    tensor = httpclient.InferInput("INPUT", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=False)
    plain = client.infer("digits", [tensor])
    classified = client.infer("digits", [tensor], outputs=[
        httpclient.InferRequestedOutput("PROBABILITIES", binary_data=False, class_count=3)])
    output = classified.get_output("PROBABILITIES")
    assert output["datatype"] == "BYTES" and output["shape"] == [len(x), 3]
    _check_classes(classified.as_numpy("PROBABILITIES"), plain.as_numpy("PROBABILITIES"),
                   plain.as_numpy("LABEL"))


# -- config sections Tachyon does not implement ----------------------------------------------


def test_an_unsupported_config_section_makes_the_model_unavailable(server: RunningServer) -> None:
    entry = repository_index(server)[("stateful", "1")]
    assert entry["state"] == "UNAVAILABLE"
    assert "sequence_batching is not supported" in entry["reason"]
    assert not grpcclient.InferenceServerClient(server.grpc_url).is_model_ready("stateful")
    assert grpcclient.InferenceServerClient(server.grpc_url).is_model_ready("identity_fp32")
