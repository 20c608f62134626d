"""atheris (libFuzzer for Python) targets over the request decoders that take client bytes.

    python tools/fuzz_python.py TARGET [libFuzzer flags and corpus folders]

Targets (`tools/fuzz.py` runs them; seeds in fuzz/corpus/<target>/):

- ``py_grpc_infer``: bytes -> ``parse_infer_request`` -> ``decode_infer_request``
  (server/grpc/server.py). Must return a request or raise ServingError(INVALID_ARGUMENT).
- ``py_http_infer``: ``decode_infer_request(model, version, body, header_length)``
  (server/http/server.py) over JSON and binary-extension bodies. Must return a request or raise
  ServingError.

Any other exception, or a decoded tensor whose array disagrees with its declared shape, is a
finding: libFuzzer saves the input as crash-<sha1> under -artifact_prefix.

Input layout of ``py_http_infer``: a flags byte, then the body. Flag 1 clear: the body is JSON (no
Inference-Header-Content-Length). Set: two more bytes (big-endian) give the JSON header's length,
clamped to the body, and the rest is the body (JSON, then binary tensors). Flag 2 hands the body
over as a memoryview, as the server does for large bodies.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import atheris

ROOT = Path(__file__).resolve().parent.parent


def _import_instrumented() -> None:
    """Imports the server package with atheris' coverage instrumentation.

    An editable install serves `server.*` through scikit-build-core's finder, whose loader
    atheris cannot instrument: the plain PathFinder, over the source tree, goes first while the
    package is imported (server._native, which is not in the tree, still comes from the finder).
    """
    editable = [f for f in sys.meta_path if type(f).__name__ == "ScikitBuildRedirectingFinder"]
    saved_meta, saved_path = list(sys.meta_path), list(sys.path)
    sys.meta_path[:] = [f for f in sys.meta_path if f not in editable] + editable
    sys.path.insert(0, str(ROOT))
    try:
        with atheris.instrument_imports(include=["server"], exclude=["server._native"]):
            import server.grpc.server
            import server.http.server  # noqa: F401
    finally:
        sys.meta_path[:], sys.path[:] = saved_meta, saved_path


_import_instrumented()

from server.errors import Code, ServingError  # noqa: E402
from server.grpc import server as grpc_server  # noqa: E402
from server.http import server as http_server  # noqa: E402
from server.types import DataType, InferRequest  # noqa: E402


def _check(request: InferRequest) -> None:
    """A decoded request keeps the InferInput contract: `data` has the declared shape and the
    datatype's dtype (object for BYTES)."""
    for tensor in request.inputs:
        dtype = object if tensor.datatype is DataType.BYTES else tensor.datatype.numpy
        if tuple(tensor.data.shape) != tuple(tensor.shape) or tensor.data.dtype != dtype:
            raise AssertionError(
                f"input {tensor.name!r}: array {tensor.data.dtype}{list(tensor.data.shape)}, "
                f"declared {tensor.datatype.value}{list(tensor.shape)}"
            )


def http_body(data: bytes) -> tuple[bytes | memoryview, int | None]:
    """The body and header length an input of py_http_infer stands for."""
    if not data:
        return b"", None
    flags, header_length = data[0], None
    body: bytes | memoryview = data[1:]
    if flags & 1:
        body = data[3:]
        header_length = min(int.from_bytes(data[1:3], "big"), len(body))
    if flags & 2:  # large bodies arrive as a memoryview (server/http/_body.py)
        body = memoryview(body)
    return body, header_length


def py_grpc_infer(data: bytes) -> None:
    try:
        message = grpc_server.parse_infer_request(data)
        _check(grpc_server.decode_infer_request(message))
    except ServingError as exc:
        if exc.code is not Code.INVALID_ARGUMENT:
            raise AssertionError(f"{exc!r}: expected INVALID_ARGUMENT") from exc


def py_http_infer(data: bytes) -> None:
    body, header_length = http_body(data)
    try:
        request, _ = http_server.decode_infer_request("model", "", body, header_length)
        _check(request)
    except ServingError:
        pass


TARGETS: dict[str, Callable[[bytes], None]] = {
    "py_grpc_infer": py_grpc_infer,
    "py_http_infer": py_http_infer,
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer flags] [corpus ...]")
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
