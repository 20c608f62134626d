"""Bad requests against a real server, each through gRPC and HTTP: every one gets the right
status (gRPC StatusCode / HTTP status) and a message that names the field or input, what was
expected and what came; afterwards the server still serves correct results.

tritonclient sends what it can express; requests it refuses to build (raw sizes that disagree
with the shape, malformed bodies) go through the gRPC stub or http.client directly."""

from __future__ import annotations

import http.client
import json
import re
import struct
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.conftest import BUNDLED, RunningServer, ServerFactory

TRANSPORTS = ("grpc", "http")
HTTP_STATUS = {"INVALID_ARGUMENT": 400, "NOT_FOUND": 404, "RESOURCE_EXHAUSTED": 413}
LIMIT = 100_000  # --max-request-bytes of the `limited` server

Error = tuple[str, str]  # (status as the client reports it, message)
RawInput = tuple[str, str, list[int], bytes]  # name, datatype, shape, raw bytes


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module", autouse=True)
def log_start(bundled: RunningServer) -> int:
    """Where the shared server's log stood before this module's requests."""
    return len(bundled.log())


@pytest.fixture(scope="module")
def limited(start_server: ServerFactory) -> RunningServer:
    return start_server(BUNDLED, "--max-request-bytes", str(LIMIT))


# -- helpers ------------------------------------------------------------------------------


def status_of(transport: str, code: str) -> str:
    """The status as tritonclient reports it: "StatusCode.X" for gRPC, "400" for HTTP."""
    return f"StatusCode.{code}" if transport == "grpc" else str(HTTP_STATUS[code])


def check(error: Error, transport: str, code: str, *fragments: str) -> None:
    status, message = error
    assert status == status_of(transport, code), message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in the message {message!r}"


def client_error(
    server: RunningServer,
    transport: str,
    model: str,
    inputs: Sequence[tuple[str, str, np.ndarray]],
    outputs: Sequence[str] = (),
    version: str = "",
) -> Error:
    """Send through the unmodified tritonclient; the call must fail."""
    module: Any = grpcclient if transport == "grpc" else httpclient
    url = server.grpc_url if transport == "grpc" else server.http_url
    client = module.InferenceServerClient(url)
    try:
        tensors = []
        for name, datatype, array in inputs:
            tensor = module.InferInput(name, list(array.shape), datatype)
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        requested = [module.InferRequestedOutput(n) for n in outputs] or None
        with pytest.raises(InferenceServerException) as info:
            client.infer(model, tensors, model_version=version, outputs=requested)
    finally:
        client.close()
    return str(info.value.status()), str(info.value.message())


def grpc_error(server: RunningServer, request: Any) -> Error:
    """Send a hand-built ModelInferRequest through the generated stub; it must fail."""
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request, timeout=30)
    error = info.value
    assert isinstance(error, grpc.Call)
    return str(error.code()), str(error.details())


def http_post(
    server: RunningServer, path: str, body: Any, headers: dict[str, str] | None = None
) -> tuple[int, bytes, str | None]:
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    try:
        connection.request("POST", path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read(), response.getheader("Content-Type")
    finally:
        connection.close()


def http_error(
    server: RunningServer, path: str, body: Any, headers: dict[str, str] | None = None
) -> Error:
    """POST raw bytes; the answer must be an error with a JSON {"error": ...} body."""
    status, payload, content_type = http_post(server, path, body, headers)
    assert status != 200, payload[:200]
    assert content_type == "application/json", (status, payload[:200])
    return str(status), str(json.loads(payload)["error"])


def binary_request(inputs: Sequence[RawInput]) -> tuple[bytes, dict[str, str]]:
    """An HTTP body of the binary tensor extension: a JSON header, then the raw tensors."""
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": name,
                    "datatype": datatype,
                    "shape": shape,
                    "parameters": {"binary_data_size": len(data)},
                }
                for name, datatype, shape, data in inputs
            ]
        }
    ).encode()
    body = header + b"".join(data for *_, data in inputs)
    return body, {"Inference-Header-Content-Length": str(len(header))}


def raw_error(
    server: RunningServer, transport: str, model: str, inputs: Sequence[RawInput]
) -> Error:
    """Raw tensors: gRPC raw_input_contents, or HTTP binary parts whose binary_data_size is
    the length of the bytes given (so it may disagree with the shape)."""
    if transport == "grpc":
        request = service_pb2.ModelInferRequest(model_name=model)
        for name, datatype, shape, _ in inputs:
            request.inputs.add(name=name, datatype=datatype, shape=shape)
        request.raw_input_contents.extend(data for *_, data in inputs)
        return grpc_error(server, request)
    body, headers = binary_request(inputs)
    return http_error(server, f"/v2/models/{model}/infer", body, headers)


def fp32(*shape: int) -> np.ndarray:
    return np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)


def length_prefixed(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def json_input(data: Any, **override: Any) -> dict[str, Any]:
    tensor = {"name": "INPUT0", "datatype": "FP32", "shape": [1, 16], "data": data}
    tensor.update(override)
    return tensor


def json_body(payload: Any) -> bytes:
    return json.dumps(payload).encode()


IDENTITY = "/v2/models/identity_fp32/infer"
GOOD_JSON_INPUT = json_input([0.5] * 16)


# -- model and version --------------------------------------------------------------------


def test_unknown_model(bundled: RunningServer, transport: str) -> None:
    error = client_error(bundled, transport, "no_such_model", [("INPUT0", "FP32", fp32(1, 16))])
    check(error, transport, "NOT_FOUND", "'no_such_model'", "not found in the model repository")


@pytest.mark.parametrize("version", ["7", "abc"])
def test_unknown_version(bundled: RunningServer, transport: str, version: str) -> None:
    error = client_error(
        bundled, transport, "identity_fp32", [("INPUT0", "FP32", fp32(1, 16))], version=version
    )
    check(error, transport, "NOT_FOUND", "'identity_fp32'", version)
    if version == "7":
        assert "available: [1]" in error[1]


# -- inputs: names, datatypes, shapes -----------------------------------------------------


def test_wrong_datatype(bundled: RunningServer, transport: str) -> None:
    array = np.zeros((1, 16), np.float64)
    error = client_error(bundled, transport, "identity_fp32", [("INPUT0", "FP64", array)])
    check(error, transport, "INVALID_ARGUMENT", "'INPUT0'", "datatype FP64", "expected FP32")


SHAPE_CASES = [
    pytest.param(
        "identity_fp32", "INPUT0", [16], ["[16]", "expected rank 2", "[-1, 16]"], id="rank-too-low"
    ),
    pytest.param(
        "identity_fp32", "INPUT0", [1, 16, 1], ["[1, 16, 1]", "expected rank 2"], id="rank-too-high"
    ),
    pytest.param(
        "identity_fp32", "INPUT0", [1, 15], ["[1, 15]", "expected [-1, 16]"], id="wrong-dimension"
    ),
    pytest.param(
        "digits",
        "INPUT",
        [65, 64],
        ["batch size 65", "1..64", "max_batch_size"],
        id="batch-above-max",
    ),
    pytest.param("identity_fp32", "INPUT0", [0, 16], ["batch size 0", "1..64"], id="empty-batch"),
]


@pytest.mark.parametrize(("model", "name", "shape", "fragments"), SHAPE_CASES)
def test_wrong_shape(
    bundled: RunningServer,
    transport: str,
    model: str,
    name: str,
    shape: list[int],
    fragments: list[str],
) -> None:
    error = client_error(bundled, transport, model, [(name, "FP32", fp32(*shape))])
    check(error, transport, "INVALID_ARGUMENT", f"'{name}'", *fragments)


def test_wrong_rank_without_batching(bundled: RunningServer, transport: str) -> None:
    text = np.array([[b"a", b"b"]], dtype=np.object_)  # string_upper: max_batch_size 0, [-1]
    error = client_error(bundled, transport, "string_upper", [("TEXT", "BYTES", text)])
    check(error, transport, "INVALID_ARGUMENT", "'TEXT'", "[1, 2]", "expected rank 1")


def test_batch_sizes_disagree(bundled: RunningServer, transport: str) -> None:
    inputs = [("INPUT0", "FP32", fp32(2, 16)), ("INPUT1", "FP32", fp32(3, 16))]
    error = client_error(bundled, transport, "add_sub", inputs)
    check(error, transport, "INVALID_ARGUMENT", "'INPUT1'", "batch size 3", "other inputs have 2")


def test_missing_input(bundled: RunningServer, transport: str) -> None:
    error = client_error(bundled, transport, "add_sub", [("INPUT0", "FP32", fp32(1, 16))])
    check(error, transport, "INVALID_ARGUMENT", "missing input 'INPUT1'", "['INPUT0', 'INPUT1']")


def test_unknown_input(bundled: RunningServer, transport: str) -> None:
    inputs = [("INPUT0", "FP32", fp32(1, 16)), ("EXTRA", "FP32", fp32(1, 16))]
    error = client_error(bundled, transport, "identity_fp32", inputs)
    check(error, transport, "INVALID_ARGUMENT", "unexpected input 'EXTRA'", "['INPUT0']")


def test_duplicate_input(bundled: RunningServer, transport: str) -> None:
    inputs = [("INPUT0", "FP32", fp32(1, 16)), ("INPUT0", "FP32", fp32(1, 16))]
    error = client_error(bundled, transport, "identity_fp32", inputs)
    check(error, transport, "INVALID_ARGUMENT", "'INPUT0'", "appears twice")


def test_unknown_output(bundled: RunningServer, transport: str) -> None:
    error = client_error(
        bundled, transport, "identity_fp32", [("INPUT0", "FP32", fp32(1, 16))], outputs=["NOPE"]
    )
    check(error, transport, "INVALID_ARGUMENT", "requested output 'NOPE'", "['OUTPUT0']")


def test_unknown_datatype(bundled: RunningServer, transport: str) -> None:
    error = raw_error(bundled, transport, "identity_fp32", [("INPUT0", "FP128", [1, 16], b"")])
    check(error, transport, "INVALID_ARGUMENT", "'INPUT0'", "unknown datatype 'FP128'", "FP32")


def test_negative_dimension(bundled: RunningServer, transport: str) -> None:
    inputs: list[RawInput] = [("INPUT0", "FP32", [-1, 16], bytes(64))]
    error = raw_error(bundled, transport, "identity_fp32", inputs)
    check(error, transport, "INVALID_ARGUMENT", "'INPUT0'", "[-1, 16]", "negative dimension")


# -- raw data that disagrees with the shape -----------------------------------------------


@pytest.mark.parametrize("size", [60, 68, 0], ids=["short", "long", "empty"])
def test_raw_size_disagrees_with_shape(bundled: RunningServer, transport: str, size: int) -> None:
    inputs: list[RawInput] = [("INPUT0", "FP32", [1, 16], bytes(size))]
    error = raw_error(bundled, transport, "identity_fp32", inputs)
    check(
        error,
        transport,
        "INVALID_ARGUMENT",
        "'INPUT0'",
        f"has {size} bytes",
        "expected 64",
        "[1, 16]",
    )


BYTES_CASES = [
    pytest.param(
        [1],
        struct.pack("<I", 100) + b"abc",
        ["declares 100 bytes", "only 3 remain"],
        id="length-overruns",
    ),
    pytest.param(
        [1], b"\x05\x00", ["4-byte length prefix", "only 2 bytes remain"], id="prefix-cut-short"
    ),
    pytest.param(
        [3],
        length_prefixed(b"ab", b"c"),
        ["expected 3 elements", "only 2 fit"],
        id="too-few-elements",
    ),
    pytest.param(
        [1],
        length_prefixed(b"ab") + b"xyz",
        ["3 trailing bytes", "after 1 elements"],
        id="trailing-bytes",
    ),
]


@pytest.mark.parametrize(("shape", "data", "fragments"), BYTES_CASES)
def test_malformed_bytes(
    bundled: RunningServer, transport: str, shape: list[int], data: bytes, fragments: list[str]
) -> None:
    error = raw_error(bundled, transport, "string_upper", [("TEXT", "BYTES", shape, data)])
    check(error, transport, "INVALID_ARGUMENT", "'TEXT'", "BYTES data is malformed", *fragments)


# -- gRPC only ----------------------------------------------------------------------------


def grpc_request(model: str, *inputs: tuple[str, str, list[int]]) -> Any:
    request = service_pb2.ModelInferRequest(model_name=model)
    for name, datatype, shape in inputs:
        request.inputs.add(name=name, datatype=datatype, shape=shape)
    return request


@pytest.mark.parametrize("count", [2, 1], ids=["more", "fewer"])
def test_grpc_raw_contents_count(bundled: RunningServer, count: int) -> None:
    request = grpc_request("add_sub", ("INPUT0", "FP32", [1, 16]), ("INPUT1", "FP32", [1, 16]))
    if count == 2:
        request.inputs.pop()
    request.raw_input_contents.extend([bytes(64)] * count)
    inputs = len(request.inputs)
    error = grpc_error(bundled, request)
    check(
        error,
        "grpc",
        "INVALID_ARGUMENT",
        f"raw_input_contents has {count} entries",
        f"expected {inputs}",
    )


def test_grpc_typed_contents_count(bundled: RunningServer) -> None:
    request = grpc_request("identity_fp32", ("INPUT0", "FP32", [1, 16]))
    request.inputs[0].contents.fp32_contents.extend([1.0] * 15)
    error = grpc_error(bundled, request)
    check(
        error,
        "grpc",
        "INVALID_ARGUMENT",
        "'INPUT0'",
        "contents.fp32_contents has 15 elements",
        "expected 16",
    )


def test_grpc_fp16_in_typed_contents(bundled: RunningServer) -> None:
    request = grpc_request("identity_all", ("IN_FP16", "FP16", [1, 1]))
    request.inputs[0].contents.fp32_contents.append(1.0)
    error = grpc_error(bundled, request)
    check(error, "grpc", "INVALID_ARGUMENT", "'IN_FP16'", "FP16", "raw_input_contents")


# -- HTTP only: the body ------------------------------------------------------------------


HTTP_BODY_CASES = [
    pytest.param(b'{"inputs": [', ["not valid JSON"], id="malformed-json"),
    pytest.param(b"", ["not valid JSON"], id="empty-body"),
    pytest.param(b"[1, 2]", ["must be a JSON object", "list"], id="not-an-object"),
    pytest.param(
        json_body({"inputs": {"INPUT0": 1}}), ["'inputs' must be a list"], id="inputs-not-a-list"
    ),
    pytest.param(
        json_body({"inputs": ["INPUT0"]}),
        ["each input must be an object", "str"],
        id="input-not-an-object",
    ),
    pytest.param(
        json_body({"inputs": [json_input([0.5] * 16, name=7)]}),
        ["'name' must be a string", "7"],
        id="name-not-a-string",
    ),
    pytest.param(
        json_body({"inputs": [json_input([0.5] * 16, shape=[1, "16"])]}),
        ["'INPUT0'", "'shape' must be a list of integers", "[1, '16']"],
        id="shape-not-integers",
    ),
    pytest.param(
        json_body({"inputs": [json_input([0.5] * 15)]}),
        ["'INPUT0'", "data has 15 elements", "expected 16", "[1, 16]"],
        id="element-count",
    ),
    pytest.param(
        json_body({"inputs": [json_input([[0.5] * 8] * 3)]}),
        ["'INPUT0'", "data has 24 elements", "expected 16"],
        id="nested-element-count",
    ),
    pytest.param(
        json_body({"inputs": [json_input(["abc"] + [0.5] * 15)]}),
        ["'INPUT0'", "'abc' (str)", "expected FP32"],
        id="string-in-fp32",
    ),
    pytest.param(
        json_body({"inputs": [json_input([True] + [0.5] * 15)]}),
        ["'INPUT0'", "True (bool)", "expected FP32"],
        id="bool-in-fp32",
    ),
    pytest.param(
        json_body({"inputs": [json_input([None] * 16)]}),
        ["'INPUT0'", "None", "expected FP32"],
        id="null-in-fp32",
    ),
    pytest.param(
        json_body({"inputs": [{k: v for k, v in GOOD_JSON_INPUT.items() if k != "data"}]}),
        ["'INPUT0'", "neither 'data' nor parameters.binary_data_size"],
        id="no-data",
    ),
    pytest.param(
        json_body({"inputs": [json_input([0.5] * 16, parameters=[1])]}),
        ["'INPUT0'", "'parameters' must be an object", "[1]"],
        id="input-parameters-not-an-object",
    ),
    pytest.param(
        json_body({"inputs": [GOOD_JSON_INPUT], "parameters": "x"}),
        ["'parameters' must be an object", "'x'"],
        id="parameters-not-an-object",
    ),
    pytest.param(
        json_body({"inputs": [GOOD_JSON_INPUT], "outputs": 5}),
        ["'outputs' must be a list", "5"],
        id="outputs-not-a-list",
    ),
    pytest.param(
        json_body({"inputs": [GOOD_JSON_INPUT], "outputs": [{"binary_data": True}]}),
        ["each output needs a string 'name'"],
        id="output-without-name",
    ),
    pytest.param(
        json_body({"inputs": [GOOD_JSON_INPUT], "outputs": [{"name": "OUTPUT0", "parameters": 3}]}),
        ["output 'OUTPUT0'", "'parameters' must be an object", "3"],
        id="output-parameters-not-an-object",
    ),
    pytest.param(
        json_body({"inputs": [json_input(None, parameters={"binary_data_size": 64})]}),
        ["'INPUT0'", "binary_data_size given", "no Inference-Header-Content-Length"],
        id="binary-size-without-header",
    ),
]


@pytest.mark.parametrize(("body", "fragments"), HTTP_BODY_CASES)
def test_http_bad_body(bundled: RunningServer, body: bytes, fragments: list[str]) -> None:
    error = http_error(bundled, IDENTITY, body, {"Content-Type": "application/json"})
    check(error, "http", "INVALID_ARGUMENT", *fragments)


def test_http_number_in_bytes_tensor(bundled: RunningServer) -> None:
    body = json_body(
        {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [2], "data": ["ok", 5]}]}
    )
    error = http_error(bundled, "/v2/models/string_upper/infer", body)
    check(error, "http", "INVALID_ARGUMENT", "'TEXT'", "holds 5", "expected strings")


def test_http_json_value_out_of_range(bundled: RunningServer) -> None:
    body = json_body(
        {"inputs": [{"name": "IN_INT8", "datatype": "INT8", "shape": [1, 1], "data": [300]}]}
    )
    error = http_error(bundled, "/v2/models/identity_all/infer", body)
    check(error, "http", "INVALID_ARGUMENT", "'IN_INT8'", "out of range for INT8")


# -- HTTP only: the binary tensor extension -----------------------------------------------


@pytest.mark.parametrize("header", ["abc", "-5", "1.5", "", "100000"])
def test_http_bad_header_length(bundled: RunningServer, header: str) -> None:
    body, _ = binary_request([("INPUT0", "FP32", [1, 16], bytes(64))])
    error = http_error(bundled, IDENTITY, body, {"Inference-Header-Content-Length": header})
    check(
        error,
        "http",
        "INVALID_ARGUMENT",
        "Inference-Header-Content-Length",
        repr(header),
        f"({len(body)} bytes)",
    )


def test_http_header_length_cuts_the_json(bundled: RunningServer) -> None:
    body, headers = binary_request([("INPUT0", "FP32", [1, 16], bytes(64))])
    length = int(headers["Inference-Header-Content-Length"])
    headers["Inference-Header-Content-Length"] = str(length - 5)
    error = http_error(bundled, IDENTITY, body, headers)
    check(error, "http", "INVALID_ARGUMENT", "not valid JSON")


def test_http_binary_body_longer_than_sizes(bundled: RunningServer) -> None:
    body, headers = binary_request([("INPUT0", "FP32", [1, 16], bytes(64))])
    error = http_error(bundled, IDENTITY, body + bytes(6), headers)
    check(error, "http", "INVALID_ARGUMENT", "binary body has 70 bytes", "add up to 64")


def test_http_binary_size_overruns_body(bundled: RunningServer) -> None:
    body, headers = binary_request([("INPUT0", "FP32", [1, 16], bytes(64))])
    error = http_error(bundled, IDENTITY, body[:-32], headers)
    check(
        error,
        "http",
        "INVALID_ARGUMENT",
        "'INPUT0'",
        "binary_data_size 64 overruns",
        "32 bytes left",
    )


def test_http_binary_sizes_overrun_across_inputs(bundled: RunningServer) -> None:
    inputs: list[RawInput] = [
        ("INPUT0", "FP32", [1, 16], bytes(64)),
        ("INPUT1", "FP32", [1, 16], bytes(64)),
    ]
    body, headers = binary_request(inputs)
    error = http_error(bundled, "/v2/models/add_sub/infer", body[:-1], headers)
    check(
        error,
        "http",
        "INVALID_ARGUMENT",
        "'INPUT1'",
        "binary_data_size 64 overruns",
        "63 bytes left",
    )


@pytest.mark.parametrize("size", ["64", -1, True, 6.4])
def test_http_binary_size_not_an_integer(bundled: RunningServer, size: Any) -> None:
    header = json_body({"inputs": [json_input(None, parameters={"binary_data_size": size})]})
    headers = {"Inference-Header-Content-Length": str(len(header))}
    error = http_error(bundled, IDENTITY, header + bytes(64), headers)
    check(
        error,
        "http",
        "INVALID_ARGUMENT",
        "'INPUT0'",
        "binary_data_size must be a non-negative integer",
        repr(size),
    )


# -- size limit ---------------------------------------------------------------------------


def big_inputs() -> list[tuple[str, str, np.ndarray]]:
    """About 200 KB in one input; the size check comes before any other."""
    return [("IN_UINT8", "UINT8", np.zeros((8, 25_000), np.uint8))]


def test_request_above_limit(limited: RunningServer, transport: str) -> None:
    error = client_error(limited, transport, "identity_all", big_inputs())
    check(error, transport, "RESOURCE_EXHAUSTED", str(LIMIT))
    sizes = [int(n) for n in re.findall(r"\d+", error[1])]
    assert any(LIMIT < n < 2 * LIMIT + 1000 for n in sizes), error  # what came, ~200 KB
    assert ("--max-request-bytes" if transport == "http" else "larger than max") in error[1]
    assert_serves(limited, transport)


def test_http_chunked_request_above_limit(limited: RunningServer) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 16], "data": ['
        for _ in range(50_000):  # 200 KB of "0.0," without a Content-Length
            yield b"0.0,"
        yield b"0.0]}]}"

    connection = http.client.HTTPConnection("127.0.0.1", limited.http_port, timeout=30)
    try:
        connection.request("POST", IDENTITY, body=chunks(), encode_chunked=True)
        response = connection.getresponse()
        status, payload = response.status, response.read()
    finally:
        connection.close()
    assert status == 413, payload[:200]
    message = json.loads(payload)["error"]
    assert str(LIMIT) in message and "--max-request-bytes" in message, message
    assert_serves(limited, "http")


# -- the server survived ------------------------------------------------------------------


def assert_serves(server: RunningServer, transport: str) -> None:
    module: Any = grpcclient if transport == "grpc" else httpclient
    client = module.InferenceServerClient(
        server.grpc_url if transport == "grpc" else server.http_url
    )
    try:
        a, b = fp32(3, 16), np.full((3, 16), 0.25, np.float32)
        tensors = []
        for name, array in (("INPUT0", a), ("INPUT1", b)):
            tensor = module.InferInput(name, [3, 16], "FP32")
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        result = client.infer("add_sub", tensors)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
        text = module.InferInput("TEXT", [2], "BYTES")
        text.set_data_from_numpy(np.array([b"still", b"serving"], dtype=np.object_))
        upper = client.infer("string_upper", [text]).as_numpy("UPPER")
        assert [bytes(x) for x in upper] == [b"STILL", b"SERVING"]
    finally:
        client.close()


def test_server_still_serves(bundled: RunningServer, transport: str) -> None:
    assert_serves(bundled, transport)
    body = json_body({"inputs": [GOOD_JSON_INPUT]})
    status, payload, _ = http_post(bundled, IDENTITY, body)
    assert status == 200, payload
    assert json.loads(payload)["outputs"][0]["data"] == [0.5] * 16


def test_server_alive_without_crashes(bundled: RunningServer, log_start: int) -> None:
    assert bundled.process.poll() is None, bundled.log()
    log = bundled.log()[log_start:]
    assert "Traceback" not in log, log
