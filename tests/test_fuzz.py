"""Fuzzing and sanitizers, bounded, inside the test command (`tools/fuzz.py run` goes longer).

- ``test_fuzz_target[...]``: every fuzz target of tools/fuzz.py (libFuzzer + ASan + UBSan over
  the native wire code and HTTP/2 front end, atheris over the Python request decoders) for
  FUZZ_SECONDS (env TACHYON_FUZZ_SECONDS, default 30), from the seeds in fuzz/corpus/. A finding
  fails the test and prints the input that caused it.
- ``test_native_tests_under_sanitizers``: tests/test_native.py, tests/test_native_grpc.py and
  the native front end's TLS and metadata tests against server._native built with
  -fsanitize=address,undefined (build/sanitized), libasan preloaded into the interpreter; any
  sanitizer report fails it.
- The reproducers of what the fuzzers found, as plain unit tests.

The builds are incremental CMake builds (scripts/setup --test runs them first), so the tests
always fuzz the current sources.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from server import proto
from server.errors import Code, ServingError
from server.grpc import server as grpc_server
from server.http import server as http_server
from tests.conftest import RunningServer

ROOT = Path(__file__).resolve().parent.parent
FUZZ = ROOT / "tools" / "fuzz.py"
FUZZ_SECONDS = int(os.environ.get("TACHYON_FUZZ_SECONDS", "30"))
TARGETS = [
    "grpc_message_reader", "bytes_wire", "bytes_codec", "grpc_http2", "infer_router",
    "py_grpc_infer", "py_http_infer",
]
# Built only where the platform allows (native/fuzz/CMakeLists.txt says why when it is not).
OPTIONAL = {"bytes_codec": "no libpython to embed (Debian: python3-dev)"}
SANITIZER_REPORT = re.compile(r"AddressSanitizer|UndefinedBehaviorSanitizer|runtime error:")
# Loads the sanitized extension as server._native before pytest imports any test module.
SANITIZED_PYTEST = """
import importlib.util, sys
path = sys.argv[1]
spec = importlib.util.spec_from_file_location("server._native", path)
module = importlib.util.module_from_spec(spec)
sys.modules["server._native"] = module
spec.loader.exec_module(module)
import server
server._native = module
import pytest
sys.exit(pytest.main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def built() -> None:
    """The libFuzzer targets and the sanitized extension, brought up to date with the sources."""
    if shutil.which("clang++") is None:
        pytest.fail("clang++ is missing: scripts/setup --test installs clang and libclang-rt-dev")
    proc = subprocess.run([sys.executable, str(FUZZ), "build"], cwd=ROOT, capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        output = proc.stdout[-4000:] + proc.stderr[-4000:]
        pytest.fail(f"building the fuzz targets failed:\n{output}")


@pytest.mark.timeout(FUZZ_SECONDS + 900)  # the first build of a clean clone included
@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_target(target: str, built: None, tmp_path: Path) -> None:
    if target in OPTIONAL and not (ROOT / "build" / "fuzz" / f"fuzz_{target}").exists():
        pytest.skip(f"fuzz_{target} is not built: {OPTIONAL[target]}")
    proc = subprocess.run(
        [sys.executable, str(FUZZ), "once", target, str(FUZZ_SECONDS), str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )
    report = proc.stdout + proc.stderr
    print(report.splitlines()[0] if report else "")
    if proc.returncode != 0:
        pytest.fail(f"the {target} fuzzer found a failure:\n{report}", pytrace=False)


def _runtime_library(name: str) -> str:
    path = subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True, text=True,
                          check=True).stdout.strip()
    if not os.path.isabs(path):
        pytest.fail(f"gcc has no {name} (Debian: libgcc-12-dev)")
    return path


@pytest.mark.timeout(900)
def test_native_tests_under_sanitizers(built: None) -> None:
    build = ROOT / "build" / "sanitized" / sys.implementation.cache_tag  # as tools/fuzz.py has it
    module = build / f"_native{sysconfig.get_config_var('EXT_SUFFIX')}"
    assert module.exists(), f"{module} was not built"
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(_runtime_library(n) for n in ("libasan.so", "libubsan.so"))
    # CPython keeps memory alive at exit by design: leaks are not findings here.
    env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=1"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    tests = ["tests/test_native.py", "tests/test_native_grpc.py", "tests/test_native_tls.py",
             "tests/test_native_metadata.py",
             *(f"tests/test_native_request_path.py::test_{name}" for name in (
                 "reader_matches_reference_and_upb",
                 "reader_on_damaged_messages_matches_reference",
                 "writer_matches_reference_and_upb"))]
    proc = subprocess.run(
        [sys.executable, "-c", SANITIZED_PYTEST, str(module), *tests, "-q", "-p",
         "no:cacheprovider", "-o", "addopts=", "--timeout=300"],
        cwd=ROOT, env=env, capture_output=True, text=True, check=False, timeout=800,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0 and not SANITIZER_REPORT.search(output), output[-8000:]
    assert re.search(r"\d+ passed", output), output[-4000:]


# --------------------------------------------------------------------------------------------
# Reproducers of findings


def _grpc_request(datatype: str, shape: list[int], raw: bytes | None) -> bytes:
    message = proto.ModelInferRequest(model_name="m")
    message.inputs.add(name="IN", datatype=datatype, shape=shape)
    if raw is not None:
        message.raw_input_contents.append(raw)
    return bytes(message.SerializeToString())


def _grpc_error(data: bytes) -> ServingError:
    with pytest.raises(ServingError) as caught:
        grpc_server.decode_infer_request(grpc_server.parse_infer_request(data))
    return caught.value


# py_grpc_infer (at d986bd8): an empty tensor whose shape spans more than numpy can index
# (a 0 dimension beside huge ones) reached numpy's reshape, whose ValueError escaped the decoder.
@pytest.mark.parametrize(
    ("datatype", "raw"), [("INT32", None), ("FP32", b""), ("BYTES", b""), ("BYTES", None)]
)
def test_grpc_empty_tensor_with_huge_shape_is_invalid_argument(
    datatype: str, raw: bytes | None
) -> None:
    shape = [3, 42, 14, 18, 12, 1, 3058016714750, 0, 32767, 3]
    assert _grpc_error(_grpc_request(datatype, shape, raw)).code is Code.INVALID_ARGUMENT


@pytest.mark.parametrize("datatype", ["INT32", "FP16", "BYTES"])
def test_http_empty_tensor_with_huge_shape_is_invalid_argument(datatype: str) -> None:
    body = b'{"inputs":[{"name":"IN","shape":[0,%d,%d],"datatype":"%s","data":[]}]}' % (
        1 << 62, 1 << 62, datatype.encode())
    with pytest.raises(ServingError) as caught:
        http_server.decode_infer_request("m", "", body, None)
    assert caught.value.code is Code.INVALID_ARGUMENT


def test_grpc_small_empty_tensor_still_decodes() -> None:
    request = grpc_server.decode_infer_request(
        grpc_server.parse_infer_request(_grpc_request("FP32", [0, 3], b""))
    )
    assert request.inputs[0].data.shape == (0, 3)
    assert request.inputs[0].data.dtype == np.float32


# Found while writing py_http_infer (the header is parsed in the route, outside the decoder it
# fuzzes): "²" is a digit to str.isdigit but not to int(), so the route answered 500.
@pytest.mark.parametrize("value", ["\u00b2", "1\u00b9", "-1", "", "99999999999999999999"])
def test_http_bad_header_length_is_400(bundled: RunningServer, value: str) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", bundled.http_port, timeout=30)
    try:
        connection.request("POST", "/v2/models/identity_fp32/infer", body=b'{"inputs":[]}',
                           headers={"Inference-Header-Content-Length": value})
        response = connection.getresponse()
        status, payload = response.status, json.loads(response.read())
    finally:
        connection.close()
    assert status == 400, payload
    assert "Inference-Header-Content-Length" in payload["error"], payload
