"""Every bundled model through the unmodified tritonclient (gRPC and HTTP, sync and aio);
outputs must equal ONNX Runtime run in-process on the same inputs."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcclient_aio
import tritonclient.http as httpclient
import tritonclient.http.aio as httpclient_aio

from tests.conftest import BUNDLED, RunningServer

RNG = np.random.default_rng(7)
DTYPES = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}


def latest(model: str) -> str:
    """The version a request without one gets: the highest (digits: 2, its int8 copy)."""
    return str(max(int(p.name) for p in (BUNDLED / model).iterdir() if p.name.isdigit()))


def reference(model: str, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The model run in-process by ONNX Runtime (strings as str, as ONNX Runtime wants)."""
    session = ort.InferenceSession(str(BUNDLED / model / latest(model) / "model.onnx"))
    ort_feed = {
        k: (
            np.array([x.decode() for x in v.ravel()], dtype=object).reshape(v.shape)
            if v.dtype == object
            else v
        )
        for k, v in feed.items()
    }
    names = [o.name for o in session.get_outputs()]
    results = session.run(names, ort_feed)
    out = {}
    for name, array in zip(names, results, strict=True):
        if array.dtype == object:
            array = np.array([x.encode() for x in array.ravel()], dtype=object).reshape(array.shape)
        out[name] = array
    return out


def random_array(datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    if datatype == "BYTES":
        words = ["", "tachyon", "grüße", "日本語", "x" * 40]
        flat = [words[i % len(words)].encode() for i in range(int(np.prod(shape)))]
        return np.array(flat, dtype=object).reshape(shape)
    if datatype == "BOOL":
        return RNG.integers(0, 2, shape).astype(np.bool_)
    dtype = np.dtype(DTYPES[datatype])
    if dtype.kind == "f":
        return RNG.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return RNG.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)


def digits_batch() -> np.ndarray:
    sample = json.loads((BUNDLED / "digits" / "sample.json").read_text())
    request = sample["request"]["inputs"][0]
    return np.array(request["data"], dtype=np.float32).reshape(request["shape"])


def cases() -> list[tuple[str, dict[str, np.ndarray]]]:
    all_types = {f"IN_{name}": random_array(name, (3, 5)) for name in DTYPES}
    return [
        ("digits", {"INPUT": digits_batch()}),
        ("identity_fp32", {"INPUT0": random_array("FP32", (2, 16))}),
        (
            "add_sub",
            {"INPUT0": random_array("FP32", (4, 16)), "INPUT1": random_array("FP32", (4, 16))},
        ),
        (
            "string_upper",
            {"TEXT": np.array([b"hello", b"Gr\xc3\xbc\xc3\x9fe", b"", b"mIxEd 1"], dtype=object)},
        ),
        ("identity_all", all_types),
    ]


def datatype_of(array: np.ndarray) -> str:
    if array.dtype == object:
        return "BYTES"
    return next(k for k, v in DTYPES.items() if np.dtype(v) == array.dtype)


def assert_outputs(model: str, feed: dict[str, np.ndarray], get: Any) -> None:
    expected = reference(model, feed)
    for name, want in expected.items():
        got = get(name)
        assert got is not None, f"{model}: output {name} missing"
        assert got.shape == want.shape, (model, name)
        if want.dtype == object:
            as_bytes = [x.encode() if isinstance(x, str) else bytes(x) for x in got.ravel()]
            assert as_bytes == list(want.ravel()), (model, name)
        else:
            assert got.dtype == want.dtype, (model, name)
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(("model", "feed"), cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_grpc_sync(bundled: RunningServer, model: str, feed: dict[str, np.ndarray]) -> None:
    client = grpcclient.InferenceServerClient(bundled.grpc_url)
    inputs = []
    for name, array in feed.items():
        tensor = grpcclient.InferInput(name, list(array.shape), datatype_of(array))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    result = client.infer(model, inputs)
    assert result.get_response().model_version == latest(model)
    assert_outputs(model, feed, result.as_numpy)


@pytest.mark.parametrize(("model", "feed"), cases(), ids=lambda v: v if isinstance(v, str) else "")
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_http_sync(
    bundled: RunningServer, model: str, feed: dict[str, np.ndarray], binary: bool
) -> None:
    client = httpclient.InferenceServerClient(bundled.http_url)
    inputs = []
    for name, array in feed.items():
        tensor = httpclient.InferInput(name, list(array.shape), datatype_of(array))
        # FP16 has no JSON form in tritonclient
        binary_input = binary or datatype_of(array) == "FP16"
        tensor.set_data_from_numpy(array, binary_data=binary_input)
        inputs.append(tensor)
    names = list(reference(model, feed))
    outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in names]
    if not binary:
        # FP16 outputs are sent as JSON numbers; tritonclient turns them back into float16
        outputs = [
            httpclient.InferRequestedOutput(n, binary_data=n.endswith("FP16")) for n in names
        ]
    result = client.infer(model, inputs, outputs=outputs)
    assert result.get_response()["model_version"] == latest(model)
    assert_outputs(model, feed, result.as_numpy)


def test_grpc_aio_and_http_aio(bundled: RunningServer) -> None:
    feed = {"INPUT0": random_array("FP32", (1, 16)), "INPUT1": random_array("FP32", (1, 16))}

    async def run() -> None:
        grpc_client = grpcclient_aio.InferenceServerClient(bundled.grpc_url)
        http_client = httpclient_aio.InferenceServerClient(bundled.http_url)
        try:
            assert await grpc_client.is_server_live()
            assert await http_client.is_model_ready("add_sub")
            g_inputs, h_inputs = [], []
            for name, array in feed.items():
                g = grpcclient_aio.InferInput(name, [1, 16], "FP32")
                g.set_data_from_numpy(array)
                g_inputs.append(g)
                h = httpclient_aio.InferInput(name, [1, 16], "FP32")
                h.set_data_from_numpy(array)
                h_inputs.append(h)
            results = await asyncio.gather(
                *(grpc_client.infer("add_sub", g_inputs) for _ in range(8)),
                *(http_client.infer("add_sub", h_inputs) for _ in range(8)),
            )
            for result in results:
                assert_outputs("add_sub", feed, result.as_numpy)
        finally:
            await grpc_client.close()
            await http_client.close()

    asyncio.run(run())


TYPED_FIELDS = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


@pytest.fixture(scope="module")
def typed_server(start_server: Any, tmp_path_factory: pytest.TempPathFactory) -> RunningServer:
    """One identity model per datatype that has typed contents (all but FP16)."""
    import onnx
    from onnx import TensorProto, helper

    repo = tmp_path_factory.mktemp("typed_repo")
    onnx_types = {
        "BOOL": TensorProto.BOOL,
        "UINT8": TensorProto.UINT8,
        "UINT16": TensorProto.UINT16,
        "UINT32": TensorProto.UINT32,
        "UINT64": TensorProto.UINT64,
        "INT8": TensorProto.INT8,
        "INT16": TensorProto.INT16,
        "INT32": TensorProto.INT32,
        "INT64": TensorProto.INT64,
        "FP32": TensorProto.FLOAT,
        "FP64": TensorProto.DOUBLE,
        "BYTES": TensorProto.STRING,
    }
    for name, onnx_type in onnx_types.items():
        graph = helper.make_graph(
            [helper.make_node("Identity", ["IN"], ["OUT"])],
            name,
            [helper.make_tensor_value_info("IN", onnx_type, ["b", 3])],
            [helper.make_tensor_value_info("OUT", onnx_type, ["b", 3])],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        (repo / f"id_{name.lower()}" / "1").mkdir(parents=True)
        onnx.save(model, str(repo / f"id_{name.lower()}" / "1" / "model.onnx"))
    server: RunningServer = start_server(repo)
    return server


@pytest.mark.parametrize("datatype", sorted(TYPED_FIELDS))
def test_grpc_typed_contents(typed_server: RunningServer, datatype: str) -> None:
    """Inputs in typed `contents` instead of raw_input_contents (FP16 travels raw only)."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    array = random_array(datatype, (2, 3))
    request = service_pb2.ModelInferRequest(model_name=f"id_{datatype.lower()}")
    tensor = request.inputs.add(name="IN", datatype=datatype, shape=array.shape)
    getattr(tensor.contents, TYPED_FIELDS[datatype]).extend(array.ravel().tolist())
    with grpc.insecure_channel(typed_server.grpc_url) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    got = grpcclient.InferResult(response).as_numpy("OUT")
    assert got.shape == array.shape
    if array.dtype == object:
        assert list(got.ravel()) == list(array.ravel())
    else:
        np.testing.assert_array_equal(got, array)
