"""HTTP compression through a real server: gzip and deflate request bodies (JSON and binary
tensors), compressed responses, bounded inflation, unknown encodings and corrupt data."""

from __future__ import annotations

import gzip
import http.client
import json
import re
import shutil
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as httpclient

from tests.conftest import BUNDLED, RunningServer, ServerFactory

LIMIT = 1_000_000  # --max-request-bytes of the `limited` server
IDENTITY = "/v2/models/identity_fp32/infer"
ALGORITHMS = ("gzip", "deflate")


def compress(encoding: str, data: bytes) -> bytes:
    return gzip.compress(data) if encoding == "gzip" else zlib.compress(data)


def decompress(encoding: str, data: bytes) -> bytes:
    return gzip.decompress(data) if encoding == "gzip" else zlib.decompress(data)


def post(
    server: RunningServer, path: str, body: bytes, headers: dict[str, str]
) -> tuple[int, bytes, http.client.HTTPResponse]:
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
    try:
        connection.request("POST", path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read(), response
    finally:
        connection.close()


def json_request(rows: int = 2) -> tuple[np.ndarray, bytes]:
    x = np.arange(rows * 16, dtype=np.float32).reshape(rows, 16)
    body = {"inputs": [{"name": "INPUT0", "shape": [rows, 16], "datatype": "FP32",
                        "data": x.ravel().tolist()}]}
    return x, json.dumps(body).encode()


def binary_request(x: np.ndarray, binary_output: bool) -> tuple[bytes, int]:
    raw = x.tobytes()
    header = json.dumps({
        "inputs": [{"name": "INPUT0", "shape": list(x.shape), "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)}}],
        "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": binary_output}}],
    }).encode()
    return header + raw, len(header)


@pytest.mark.parametrize("request_algorithm", [None, *ALGORITHMS])
@pytest.mark.parametrize("response_algorithm", [None, *ALGORITHMS])
@pytest.mark.parametrize("binary", [False, True])
def test_tritonclient_compression(
    bundled: RunningServer, request_algorithm: str | None, response_algorithm: str | None,
    binary: bool,
) -> None:
    client = httpclient.InferenceServerClient(bundled.http_url)
    x = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)
    tensor = httpclient.InferInput("INPUT0", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    outputs = [httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary)]
    result = client.infer(
        "identity_fp32", [tensor], outputs=outputs,
        request_compression_algorithm=request_algorithm,
        response_compression_algorithm=response_algorithm,
    )
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x)


@pytest.mark.parametrize("encoding", ALGORITHMS)
@pytest.mark.parametrize("binary_output", [False, True])
def test_compressed_binary_request_and_response(
    bundled: RunningServer, encoding: str, binary_output: bool
) -> None:
    """Inference-Header-Content-Length counts the decompressed body, both ways (Triton)."""
    x = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    body, header_length = binary_request(x, binary_output)
    headers = {"Content-Encoding": encoding, "Accept-Encoding": encoding,
               "Inference-Header-Content-Length": str(header_length)}
    status, payload, response = post(bundled, IDENTITY, compress(encoding, body), headers)
    assert status == 200, payload[:300]
    assert response.getheader("Content-Encoding") == encoding
    plain = decompress(encoding, payload)
    if not binary_output:
        assert response.getheader("Inference-Header-Content-Length") is None
        data = json.loads(plain)["outputs"][0]["data"]
        np.testing.assert_array_equal(np.array(data, np.float32).reshape(x.shape), x)
        return
    length = int(response.getheader("Inference-Header-Content-Length") or -1)
    output = json.loads(plain[:length])["outputs"][0]
    assert output["parameters"]["binary_data_size"] == x.nbytes
    np.testing.assert_array_equal(np.frombuffer(plain[length:], np.float32).reshape(x.shape), x)


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        ("gzip", "gzip"),
        ("deflate", "deflate"),
        ("deflate, gzip", "deflate"),  # ties: the first listed
        ("gzip;q=0.5, deflate;q=0.9", "deflate"),
        ("br, gzip", "gzip"),  # unknown ones are skipped
        ("identity", None),
        ("gzip;q=0", None),
        ("br", None),
    ],
)
def test_accept_encoding_choice(bundled: RunningServer, accept: str, expected: str | None) -> None:
    x, body = json_request()
    status, payload, response = post(bundled, IDENTITY, body, {"Accept-Encoding": accept})
    assert status == 200
    assert response.getheader("Content-Encoding") == expected
    plain = payload if expected is None else decompress(expected, payload)
    data = json.loads(plain)["outputs"][0]["data"]
    np.testing.assert_array_equal(np.array(data, np.float32).reshape(x.shape), x)


def test_large_compressed_round_trip(bundled: RunningServer) -> None:
    """Megabytes both ways, BYTES in binary: the server inflates and deflates large bodies on
    worker threads."""
    client = httpclient.InferenceServerClient(bundled.http_url, network_timeout=120)
    text = np.array([b"tachyon %d" % (i % 1000) for i in range(400_000)], dtype=object)
    tensor = httpclient.InferInput("TEXT", [len(text)], "BYTES")
    tensor.set_data_from_numpy(text, binary_data=True)
    outputs = [httpclient.InferRequestedOutput("UPPER", binary_data=True)]
    result = client.infer("string_upper", [tensor], outputs=outputs,
                          request_compression_algorithm="gzip",
                          response_compression_algorithm="deflate")
    upper = result.as_numpy("UPPER")
    assert upper is not None
    assert upper.tolist() == [t.upper() for t in text.tolist()]


# -- refusals -----------------------------------------------------------------------------


def error_of(status: int, payload: bytes, response: http.client.HTTPResponse) -> str:
    assert response.getheader("Content-Type") == "application/json", (status, payload[:200])
    message: Any = json.loads(payload)["error"]
    return str(message)


def test_unknown_encoding_is_415(bundled: RunningServer) -> None:
    _, body = json_request()
    status, payload, response = post(bundled, IDENTITY, body, {"Content-Encoding": "br"})
    assert status == 415
    message = error_of(status, payload, response)
    assert "'br'" in message and "gzip" in message and "deflate" in message, message


@pytest.mark.parametrize("encoding", ALGORITHMS)
@pytest.mark.parametrize("damage", ["garbage", "truncated", "trailing"])
def test_corrupt_compressed_body_is_400(bundled: RunningServer, encoding: str, damage: str) -> None:
    _, body = json_request()
    packed = compress(encoding, body)
    bad = {"garbage": b"this is not compressed at all",
           "truncated": packed[: len(packed) // 2],
           "trailing": packed + b"junk"}[damage]
    status, payload, response = post(bundled, IDENTITY, bad, {"Content-Encoding": encoding})
    assert status == 400, payload[:200]
    message = error_of(status, payload, response)
    assert encoding in message, message


@pytest.fixture(scope="module")
def limited(start_server: ServerFactory, tmp_path_factory: pytest.TempPathFactory) -> RunningServer:
    repo = tmp_path_factory.mktemp("limited_repo")
    shutil.copytree(BUNDLED / "identity_fp32", repo / "identity_fp32")
    return start_server(repo, "--max-request-bytes", str(LIMIT))


def peak_rss_mb(server: RunningServer) -> float:
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status)[1]) / 1024  # type: ignore[index]


@pytest.mark.parametrize("encoding", ALGORITHMS)
def test_zip_bomb_is_413(limited: RunningServer, encoding: str) -> None:
    """64 MB of zeros in about 64 KB: refused once the inflated body passes the limit."""
    bomb = compress(encoding, bytes(64 * 1024 * 1024))
    assert len(bomb) < LIMIT
    peak = peak_rss_mb(limited)
    status, payload, response = post(limited, IDENTITY, bomb, {"Content-Encoding": encoding})
    assert status == 413, payload[:200]
    message = error_of(status, payload, response)
    assert str(LIMIT) in message and "--max-request-bytes" in message, message
    assert peak_rss_mb(limited) - peak < 16, "inflating allocated far beyond the limit"
    # the server is fine and still serves compressed requests within the limit
    _, body = json_request()
    status, payload, _ = post(limited, IDENTITY, compress(encoding, body),
                              {"Content-Encoding": encoding})
    assert status == 200, payload[:200]
