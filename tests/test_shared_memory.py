"""System shared memory (Triton's extension): the region registry in process, then real servers
driven by the unmodified tritonclient (gRPC on both front ends, HTTP) with its own shared memory
utilities, and by perf_analyzer --shared-memory system."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import queue
import re
import subprocess
import threading
import uuid
import warnings
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import (
    InferenceServerException,
    serialize_byte_tensor,
    serialized_byte_size,
)

from server.errors import Code, ServingError
from server.shared_memory import (
    MAX_REGIONS,
    SHM_DIR,
    SharedMemoryRegistry,
    admit,
    shared_input,
    tensor_ref,
)
from server.types import DataType, InferRequest, SharedMemoryRef
from tests.conftest import BUNDLED, PERF_ANALYZER, RunningServer, ServerFactory
from tests.test_e2e_infer import DTYPES, random_array

with warnings.catch_warnings():  # tritonclient 2.41 imports the deprecated pkg_resources
    warnings.simplefilter("ignore", UserWarning)
    import tritonclient.utils.shared_memory as shm

Handle = Any


@pytest.fixture
def regions() -> Iterator[Callable[[int], tuple[str, Handle]]]:
    """Creates POSIX shared memory objects (`/tachyon-test-<random>`) with tritonclient's
    utilities; each is destroyed at the end of the test. Returns (key, handle)."""
    made: list[Handle] = []

    def create(byte_size: int) -> tuple[str, Handle]:
        key = f"/tachyon-test-{uuid.uuid4().hex[:12]}"
        handle = shm.create_shared_memory_region(key[1:], key, byte_size)
        made.append(handle)
        return key, handle

    yield create
    for handle in made:
        shm.destroy_shared_memory_region(handle)


def fp32(rows: int, start: float = 0.0) -> np.ndarray:
    return (np.arange(rows * 16, dtype=np.float32) + start).reshape(rows, 16)


# -- the registry, in process ---------------------------------------------------------------


def serving_error(call: Callable[[], object]) -> ServingError:
    with pytest.raises(ServingError) as info:
        call()
    return info.value


def test_register_lease_status_unregister(regions: Any) -> None:
    key, handle = regions(4096 + 64)
    shm.set_shared_memory_region(handle, [fp32(1)], offset=4096 + 8)
    registry = SharedMemoryRegistry()
    registry.register("r", key, 4096, 64)  # an offset past the first page
    assert [(s.name, s.key, s.offset, s.byte_size) for s in registry.status()] == [
        ("r", key, 4096, 64)
    ]
    lease = registry.lease("input 'x'", SharedMemoryRef("r", 56, 8))
    assert np.frombuffer(lease.read(), np.float32).tolist() == list(range(14))
    lease.release()
    registry.unregister("r")
    assert registry.status() == []
    registry.unregister("r")  # unknown: not an error, as in Triton
    error = serving_error(lambda: registry.status("r"))
    assert error.code is Code.NOT_FOUND and "'r'" in error.message


def test_a_lease_keeps_its_region_mapped_after_unregister(regions: Any) -> None:
    key, handle = regions(64)
    shm.set_shared_memory_region(handle, [fp32(1)])
    registry = SharedMemoryRegistry()
    registry.register("r", key, 0, 64)
    lease = registry.lease("output 'y'", SharedMemoryRef("r", 64))
    registry.unregister()
    error = serving_error(lambda: registry.lease("input 'x'", SharedMemoryRef("r", 64)))
    assert error.code is Code.NOT_FOUND
    assert "input 'x'" in error.message and "'r'" in error.message
    lease.write(fp32(1, 100).tobytes())  # still mapped: the write reaches the object
    lease.release()
    np.testing.assert_array_equal(shm.get_contents_as_numpy(handle, np.float32, [1, 16]),
                                  fp32(1, 100))


@pytest.mark.parametrize("key", [
    "/../etc/passwd", "../x", "/a/b", "a/b", "/..", "..", "/.", "", "/", "/a\0b", "/a..b",
    "/" + "x" * 256, 7, None,
])
def test_a_key_names_a_shared_memory_object_and_nothing_else(key: Any) -> None:
    error = serving_error(lambda: SharedMemoryRegistry().register("r", key, 0, 8))
    assert error.code is Code.INVALID_ARGUMENT
    assert error.message.startswith(f"'key' is {key!r}, expected the key of a POSIX shared")


def test_keys_that_name_no_object_a_link_or_a_directory_are_refused(tmp_path: Any) -> None:
    registry = SharedMemoryRegistry()
    missing = f"/tachyon-test-missing-{uuid.uuid4().hex[:8]}"
    error = serving_error(lambda: registry.register("r", missing, 0, 8))
    assert error.code is Code.INVALID_ARGUMENT
    assert f"Unable to open shared memory region: '{missing}'" in error.message
    target = tmp_path / "secret"
    target.write_bytes(b"x" * 64)
    link = SHM_DIR / f"tachyon-test-link-{uuid.uuid4().hex[:8]}"
    link.symlink_to(target)
    try:
        error = serving_error(lambda: registry.register("r", f"/{link.name}", 0, 8))
    finally:
        link.unlink()
    assert error.code is Code.INVALID_ARGUMENT and "symbolic link" in error.message
    directory = SharedMemoryRegistry(tmp_path)
    (tmp_path / "dir").mkdir()
    error = serving_error(lambda: directory.register("r", "/dir", 0, 8))
    assert error.code is Code.INVALID_ARGUMENT
    assert registry.status() == [] and directory.status() == []


def test_regions_lie_inside_their_object_and_names_are_unique(regions: Any) -> None:
    key, _ = regions(64)
    registry = SharedMemoryRegistry()
    error = serving_error(lambda: registry.register("r", key, 32, 64))
    assert error.code is Code.INVALID_ARGUMENT
    assert "offset 32 + byte_size 64 = 96 bytes, expected at most the 64 bytes" in error.message
    for offset, size, field in ((-1, 8, "offset"), (0, 0, "byte_size"), (0, True, "byte_size")):
        error = serving_error(partial(registry.register, "r", key, offset, size))
        assert error.code is Code.INVALID_ARGUMENT and f"'{field}' is" in error.message
    error = serving_error(lambda: registry.register("", key, 0, 8))
    assert error.code is Code.INVALID_ARGUMENT and "'name' is empty" in error.message
    registry.register("r", key, 0, 64)
    registry.register("r2", key, 8, 8)  # several regions on one object
    error = serving_error(lambda: registry.register("r", key, 0, 8))
    assert error.code is Code.ALREADY_EXISTS
    assert "shared memory region 'r' already in manager" in error.message
    error = serving_error(lambda: registry.lease("input 'x'", SharedMemoryRef("r2", 8, 4)))
    assert error.code is Code.INVALID_ARGUMENT
    assert "shared_memory_offset 4 + shared_memory_byte_size 8 = 12 bytes" in error.message
    registry.close()


def test_an_object_truncated_after_registering_is_an_error_not_a_crash(regions: Any) -> None:
    key, _ = regions(2 * 4096)
    registry = SharedMemoryRegistry()
    registry.register("r", key, 0, 2 * 4096)
    os.truncate(SHM_DIR / key[1:], 16)  # touching the mapping past 16 bytes would be SIGBUS
    lease = registry.lease("input 'x'", SharedMemoryRef("r", 4096, 4096))
    error = serving_error(lease.read)
    assert error.code is Code.INVALID_ARGUMENT and "truncated" in error.message
    error = serving_error(lambda: lease.write(b"x" * 8))
    assert error.code is Code.INVALID_ARGUMENT
    lease.release()
    registry.close()


def test_a_server_keeps_a_bounded_number_of_regions(regions: Any) -> None:
    key, _ = regions(64)
    registry = SharedMemoryRegistry()
    for i in range(MAX_REGIONS):
        registry.register(f"r{i}", key, 0, 64)
    error = serving_error(lambda: registry.register("one-more", key, 0, 64))
    assert error.code is Code.RESOURCE_EXHAUSTED
    assert f"{MAX_REGIONS} regions are registered already" in error.message
    registry.unregister("r0")
    registry.register("one-more", key, 0, 64)
    registry.close()
    assert registry.status() == []


def test_inputs_read_from_regions_count_against_the_request_bound(regions: Any) -> None:
    key, handle = regions(128)
    shm.set_shared_memory_region(handle, [fp32(2)])
    registry = SharedMemoryRegistry()
    registry.register("r", key, 0, 128)
    ref = SharedMemoryRef("r", 64)
    request = InferRequest("identity_fp32", "", [
        shared_input("INPUT0", DataType.FP32, (1, 16), ref),
        shared_input("INPUT1", DataType.FP32, (1, 16), SharedMemoryRef("r", 64, 64)),
    ])
    error = serving_error(lambda: asyncio.run(admit(registry, request, max_bytes=100)))
    assert error.code is Code.RESOURCE_EXHAUSTED
    assert "input 'INPUT1': the request's inputs in shared memory add up to 128 bytes, more " \
           "than the 100 bytes a request may carry (--max-request-bytes)" in error.message
    asyncio.run(admit(registry, request, max_bytes=128)).close()
    np.testing.assert_array_equal(request.inputs[1].data, fp32(2)[1:])
    registry.close()


@pytest.mark.parametrize(("params", "expected"), [
    ({"shared_memory_region": "r"}, "parameter 'shared_memory_byte_size' is missing"),
    ({"shared_memory_byte_size": 8}, "parameter 'shared_memory_region' is missing"),
    ({"shared_memory_region": 3, "shared_memory_byte_size": 8},
     "parameter 'shared_memory_region' is 3, expected a region name"),
    ({"shared_memory_region": "r", "shared_memory_byte_size": "8"},
     "parameter 'shared_memory_byte_size' is '8', expected a non-negative integer"),
    ({"shared_memory_region": "r", "shared_memory_byte_size": 8, "shared_memory_offset": -1},
     "parameter 'shared_memory_offset' is -1, expected a non-negative integer"),
])
def test_tensor_parameters_are_checked(params: dict[str, object], expected: str) -> None:
    error = serving_error(lambda: tensor_ref("input 'INPUT0'", params))
    assert error.code is Code.INVALID_ARGUMENT
    assert error.message.startswith(f"input 'INPUT0': {expected}"), error.message
    assert tensor_ref("input 'INPUT0'", {"binary_data_size": 4}) is None


# -- real servers ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grpcio_server(start_server: ServerFactory) -> RunningServer:
    return start_server(BUNDLED, "--grpc-frontend", "grpcio")


@pytest.fixture(params=["grpc", "grpcio", "http"])
def target(request: pytest.FixtureRequest) -> Iterator[tuple[Any, Any]]:
    """(client module, client) on the native gRPC front end, the grpc.aio one, and HTTP."""
    if request.param == "grpcio":
        server = request.getfixturevalue("grpcio_server")
    else:
        server = request.getfixturevalue("bundled")
    module: Any = httpclient if request.param == "http" else grpcclient
    client = module.InferenceServerClient(
        server.http_url if request.param == "http" else server.grpc_url
    )
    yield module, client
    client.close()


def register(client: Any, name: str, key: str, byte_size: int, offset: int = 0) -> None:
    client.register_system_shared_memory(name, key, byte_size, offset)


def names(client: Any) -> dict[str, tuple[str, int, int]]:
    status = client.get_system_shared_memory_status()
    if isinstance(status, list):  # HTTP: Triton's JSON list
        return {r["name"]: (r["key"], int(r["offset"]), int(r["byte_size"])) for r in status}
    return {n: (r.key, r.offset, r.byte_size) for n, r in status.regions.items()}


def client_error(call: Callable[[], object]) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value


def is_status(error: InferenceServerException, grpc_code: str, http_code: int) -> bool:
    return error.status() in (f"StatusCode.{grpc_code}", str(http_code))


def test_inputs_and_outputs_in_shared_memory(target: Any, regions: Any) -> None:
    module, client = target
    key_in, handle_in = regions(3 * 64 + 16)
    key_out, handle_out = regions(3 * 64 + 32)
    x = fp32(3)
    shm.set_shared_memory_region(handle_in, [x], offset=16)
    tag = uuid.uuid4().hex[:8]
    register(client, f"in-{tag}", key_in, 3 * 64, offset=16)
    register(client, f"out-{tag}", key_out, 3 * 64 + 32)
    try:
        assert names(client)[f"in-{tag}"] == (key_in, 16, 3 * 64)
        tensor = module.InferInput("INPUT0", [3, 16], "FP32")
        tensor.set_shared_memory(f"in-{tag}", 3 * 64)
        output = module.InferRequestedOutput("OUTPUT0")
        output.set_shared_memory(f"out-{tag}", 3 * 64, offset=32)
        result = client.infer("identity_fp32", [tensor], outputs=[output])
        meta = result.get_output("OUTPUT0")
        shape = meta["shape"] if isinstance(meta, dict) else list(meta.shape)
        datatype = meta["datatype"] if isinstance(meta, dict) else meta.datatype
        assert (shape, datatype) == ([3, 16], "FP32")
        if isinstance(meta, dict):  # HTTP: no data in the answer, as in Triton
            assert "data" not in meta and "binary_data_size" not in meta.get("parameters", {})
        else:  # gRPC: an empty raw_output_contents entry keeps the others in place
            assert result.get_response().raw_output_contents == [b""]
        np.testing.assert_array_equal(
            shm.get_contents_as_numpy(handle_out, np.float32, [3, 16], offset=32), x
        )
    finally:
        client.unregister_system_shared_memory(f"in-{tag}")
        client.unregister_system_shared_memory(f"out-{tag}")
    assert f"in-{tag}" not in names(client)


def test_mixed_shared_memory_and_wire_tensors(target: Any, regions: Any) -> None:
    module, client = target
    a, b = fp32(2), np.full((2, 16), 0.5, np.float32)
    key_in, handle_in = regions(128)
    key_out, handle_out = regions(128)
    shm.set_shared_memory_region(handle_in, [b])
    tag = uuid.uuid4().hex[:8]
    register(client, f"b-{tag}", key_in, 128)
    register(client, f"sum-{tag}", key_out, 128)
    try:
        first = module.InferInput("INPUT0", [2, 16], "FP32")
        first.set_data_from_numpy(a)
        second = module.InferInput("INPUT1", [2, 16], "FP32")
        second.set_shared_memory(f"b-{tag}", 128)
        total = module.InferRequestedOutput("OUTPUT0")
        total.set_shared_memory(f"sum-{tag}", 128)
        difference = module.InferRequestedOutput("OUTPUT1")
        result = client.infer("add_sub", [first, second], outputs=[total, difference])
        np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
        np.testing.assert_array_equal(
            shm.get_contents_as_numpy(handle_out, np.float32, [2, 16]), a + b
        )
    finally:
        client.unregister_system_shared_memory(f"b-{tag}")
        client.unregister_system_shared_memory(f"sum-{tag}")


def test_bytes_tensors_in_shared_memory(target: Any, regions: Any) -> None:
    module, client = target
    text = np.array([b"hello", b"", b"shared memory"], dtype=np.object_)
    serialized = serialize_byte_tensor(text)
    size = serialized_byte_size(serialized)
    assert size == 3 * 4 + 5 + 13
    key_in, handle_in = regions(size)
    key_out, handle_out = regions(256)
    shm.set_shared_memory_region(handle_in, [serialized])
    tag = uuid.uuid4().hex[:8]
    register(client, f"text-{tag}", key_in, size)
    register(client, f"upper-{tag}", key_out, 256)
    try:
        tensor = module.InferInput("TEXT", [3], "BYTES")
        tensor.set_shared_memory(f"text-{tag}", size)
        output = module.InferRequestedOutput("UPPER")
        output.set_shared_memory(f"upper-{tag}", 256)
        client.infer("string_upper", [tensor], outputs=[output])
        upper = shm.get_contents_as_numpy(handle_out, np.object_, [3])
        assert [bytes(x) for x in upper] == [b"HELLO", b"", b"SHARED MEMORY"]
        short = module.InferInput("TEXT", [3], "BYTES")
        short.set_shared_memory(f"text-{tag}", size - 1)  # cuts the last element short
        error = client_error(lambda: client.infer("string_upper", [short]))
        assert is_status(error, "INVALID_ARGUMENT", 400)
        assert "input 'TEXT'" in error.message() and f"region 'text-{tag}'" in error.message()
    finally:
        client.unregister_system_shared_memory(f"text-{tag}")
        client.unregister_system_shared_memory(f"upper-{tag}")


def test_stream_infer_with_shared_memory(bundled: RunningServer, regions: Any) -> None:
    """ModelStreamInfer takes the same parameters: answers without data, outputs in regions."""
    key_in, handle_in = regions(64)
    key_out, handle_out = regions(64)
    shm.set_shared_memory_region(handle_in, [fp32(1, 7)])
    tag = uuid.uuid4().hex[:8]
    client = grpcclient.InferenceServerClient(bundled.grpc_url)
    register(client, f"in-{tag}", key_in, 64)
    register(client, f"out-{tag}", key_out, 64)
    answers: queue.Queue[Any] = queue.Queue()
    try:
        collect_http_clients()
        client.start_stream(callback=lambda result, error: answers.put(error or result))
        inputs, outputs = shm_request(grpcclient, f"in-{tag}", f"out-{tag}")
        client.async_stream_infer("identity_fp32", inputs, outputs=outputs, request_id="s1")
        inputs, outputs = shm_request(grpcclient, f"nope-{tag}", f"out-{tag}")
        client.async_stream_infer("identity_fp32", inputs, outputs=outputs, request_id="s2")
        client.stop_stream()
        results = [answers.get(timeout=10) for _ in range(2)]
    finally:
        client.unregister_system_shared_memory(f"in-{tag}")
        client.unregister_system_shared_memory(f"out-{tag}")
        client.close()
    errors = [r for r in results if isinstance(r, InferenceServerException)]
    assert len(errors) == 1 and f"Unable to find shared memory region: 'nope-{tag}'" in str(
        errors[0]
    )
    np.testing.assert_array_equal(
        shm.get_contents_as_numpy(handle_out, np.float32, [1, 16]), fp32(1, 7)
    )


def serialized(array: np.ndarray) -> bytes:
    """A BYTES tensor's wire bytes (tritonclient gives an empty array for no element)."""
    tensor = serialize_byte_tensor(array)
    return bytes(tensor.item()) if tensor.size else b""


@pytest.mark.parametrize("shape", [(3, 5), (1, 0)], ids=["3x5", "empty"])
def test_every_datatype_in_shared_memory(
    target: Any, regions: Any, shape: tuple[int, ...]
) -> None:
    """identity_all: its 13 inputs read from one region and its 13 outputs written to another,
    at their own offsets (empty tensors too)."""
    module, client = target
    feed = {name: random_array(name, shape) for name in DTYPES}
    raw = {n: serialized(a) if n == "BYTES" else a.tobytes() for n, a in feed.items()}
    offsets, end = {}, 0
    for name, data in raw.items():
        offsets[name], end = end, end + (len(data) + 7) // 8 * 8
    key_in, handle_in = regions(max(end, 8))
    key_out, handle_out = regions(max(end, 8))
    for name, array in feed.items():
        value = serialize_byte_tensor(array) if name == "BYTES" else array
        if len(raw[name]):
            shm.set_shared_memory_region(handle_in, [value], offset=offsets[name])
    tag = uuid.uuid4().hex[:8]
    register(client, f"in-{tag}", key_in, max(end, 8))
    register(client, f"out-{tag}", key_out, max(end, 8))
    try:
        inputs, outputs = [], []
        for name in DTYPES:
            tensor = module.InferInput(f"IN_{name}", list(shape), name)
            tensor.set_shared_memory(f"in-{tag}", len(raw[name]), offsets[name])
            inputs.append(tensor)
            output = module.InferRequestedOutput(f"OUT_{name}")
            output.set_shared_memory(f"out-{tag}", len(raw[name]), offsets[name])
            outputs.append(output)
        result = client.infer("identity_all", inputs, outputs=outputs)
        for name, array in feed.items():
            meta = result.get_output(f"OUT_{name}")
            assert list(meta["shape"] if isinstance(meta, dict) else meta.shape) == list(shape)
            if not array.size:
                continue  # nothing to read (tritonclient divides by the element count)
            got = shm.get_contents_as_numpy(handle_out, DTYPES[name], list(shape),
                                            offset=offsets[name])
            if name == "BYTES":
                assert [bytes(x) for x in got.ravel()] == list(array.ravel())
            else:
                np.testing.assert_array_equal(got, array)
    finally:
        client.unregister_system_shared_memory(f"in-{tag}")
        client.unregister_system_shared_memory(f"out-{tag}")


def test_bad_shared_memory_requests_are_errors(target: Any, regions: Any) -> None:
    module, client = target
    key, _ = regions(64)
    tag = uuid.uuid4().hex[:8]
    name = f"r-{tag}"

    def infer(region: str, byte_size: int, offset: int = 0, out: int | None = None) -> Any:
        tensor = module.InferInput("INPUT0", [1, 16], "FP32")
        tensor.set_shared_memory(region, byte_size, offset)
        outputs = None
        if out is not None:
            outputs = [module.InferRequestedOutput("OUTPUT0")]
            outputs[0].set_shared_memory(region, out)
        return lambda: client.infer("identity_fp32", [tensor], outputs=outputs)

    error = client_error(infer(name, 64))
    assert is_status(error, "NOT_FOUND", 404)
    assert f"input 'INPUT0': Unable to find shared memory region: '{name}'" in error.message()
    register(client, name, key, 64)
    try:
        error = client_error(lambda: register(client, name, key, 64))
        assert is_status(error, "ALREADY_EXISTS", 409)
        assert f"shared memory region '{name}' already in manager" in error.message()
        error = client_error(infer(name, 64, offset=8))
        assert is_status(error, "INVALID_ARGUMENT", 400)
        assert "shared_memory_offset 8 + shared_memory_byte_size 64 = 72 bytes, expected at " \
               f"most the 64 bytes of shared memory region '{name}'" in error.message()
        error = client_error(infer(name, 60))
        assert is_status(error, "INVALID_ARGUMENT", 400)
        assert "input 'INPUT0': shared_memory_byte_size is 60, expected 64 bytes (FP32 with " \
               "shape [1, 16])" in error.message()
        error = client_error(infer(name, 64, out=32))
        assert is_status(error, "INVALID_ARGUMENT", 400)
        assert "output 'OUTPUT0': shared_memory_byte_size is 32, expected at least 64 bytes" \
               in error.message()
        error = client_error(lambda: register(client, f"bad-{tag}", "/../../etc/passwd", 8))
        assert is_status(error, "INVALID_ARGUMENT", 400)
        assert "'key' is '/../../etc/passwd'" in error.message()
        error = client_error(lambda: register(client, f"big-{tag}", key, 64, offset=1))
        assert is_status(error, "INVALID_ARGUMENT", 400)
        assert f"failed to register shared memory region 'big-{tag}'" in error.message()
        error = client_error(lambda: client.get_system_shared_memory_status(f"nope-{tag}"))
        assert is_status(error, "NOT_FOUND", 404)
        assert set(names(client)) >= {name} and f"big-{tag}" not in names(client)
    finally:
        client.unregister_system_shared_memory(name)


def test_cuda_shared_memory_lists_none_and_cannot_be_registered(target: Any) -> None:
    _, client = target
    client.unregister_cuda_shared_memory()  # nothing to do, as in Triton without regions
    status = client.get_cuda_shared_memory_status()
    assert (status == []) if isinstance(status, list) else not status.regions
    error = client_error(lambda: client.register_cuda_shared_memory("c", b"\0" * 64, 0, 64))
    assert is_status(error, "UNIMPLEMENTED", 501)
    assert "CUDA shared memory is not supported" in error.message()
    metadata = client.get_server_metadata()
    extensions = metadata["extensions"] if isinstance(metadata, dict) else metadata.extensions
    assert "system_shared_memory" in extensions


def shm_request(module: Any, region_in: str, region_out: str) -> tuple[Any, Any]:
    tensor = module.InferInput("INPUT0", [1, 16], "FP32")
    tensor.set_shared_memory(region_in, 64)
    output = module.InferRequestedOutput("OUTPUT0")
    output.set_shared_memory(region_out, 64)
    return [tensor], [output]


def collect_http_clients() -> None:
    """Other threads are about to allocate (gRPC callbacks, workers): collect any tritonclient.http
    client an earlier test left unreferenced now, on this thread, since its gevent hub refuses
    to be closed from another one (an unraisable InvalidThreadUseError)."""
    gc.collect()


def grpc_async(client: Any, region_in: str, region_out: str) -> queue.Queue[Any]:
    """One gRPC call in flight; its result or error arrives on the returned queue."""
    answer: queue.Queue[Any] = queue.Queue()
    inputs, outputs = shm_request(grpcclient, region_in, region_out)
    client.async_infer("identity_fp32", inputs, lambda result, error: answer.put(error or result),
                       outputs=outputs)
    return answer


def http_async(client: Any, region_in: str, region_out: str) -> Any:
    """One HTTP call in flight (tritonclient.http's greenlets, on this thread: its gevent
    client must not be shared with other threads)."""
    inputs, outputs = shm_request(httpclient, region_in, region_out)
    return client.async_infer("identity_fp32", inputs, outputs=outputs)


def test_concurrent_requests_batch_with_their_own_regions(bundled: RunningServer,
                                                          regions: Any) -> None:
    """16 calls in flight at once, half gRPC, half HTTP, each with its own input and output
    regions, through the dynamic batcher: every one gets its own rows back."""
    collect_http_clients()
    tag = uuid.uuid4().hex[:8]
    handles = []
    grpc_client = grpcclient.InferenceServerClient(bundled.grpc_url)
    http_client = httpclient.InferenceServerClient(bundled.http_url, concurrency=8)
    for i in range(16):
        key_in, handle_in = regions(64)
        key_out, handle_out = regions(64)
        shm.set_shared_memory_region(handle_in, [fp32(1, 100 * i)])
        register(grpc_client, f"in{i}-{tag}", key_in, 64)
        register(grpc_client, f"out{i}-{tag}", key_out, 64)
        handles.append(handle_out)
    try:
        for _ in range(10):
            grpc_calls = [grpc_async(grpc_client, f"in{i}-{tag}", f"out{i}-{tag}")
                          for i in range(1, 16, 2)]
            http_calls = [http_async(http_client, f"in{i}-{tag}", f"out{i}-{tag}")
                          for i in range(0, 16, 2)]
            for call in http_calls:
                call.get_result()
            for answer in grpc_calls:
                result = answer.get(timeout=30)
                assert not isinstance(result, InferenceServerException), result
            for i in range(16):
                np.testing.assert_array_equal(
                    shm.get_contents_as_numpy(handles[i], np.float32, [1, 16]), fp32(1, 100 * i)
                )
                shm.set_shared_memory_region(handles[i], [np.zeros((1, 16), np.float32)])
    finally:
        for i in range(16):
            grpc_client.unregister_system_shared_memory(f"in{i}-{tag}")
            grpc_client.unregister_system_shared_memory(f"out{i}-{tag}")
        http_client.close()
        grpc_client.close()


def test_unregister_during_requests_never_crashes(bundled: RunningServer, regions: Any) -> None:
    """Regions unregistered and registered again while requests read and write them: each
    request either succeeds or is told the region is unknown; the server keeps serving."""
    key_in, handle_in = regions(64)
    key_out, _ = regions(64)
    shm.set_shared_memory_region(handle_in, [fp32(1)])
    tag = uuid.uuid4().hex[:8]
    names_in_out = (f"in-{tag}", f"out-{tag}")
    control = grpcclient.InferenceServerClient(bundled.grpc_url)
    http_client = httpclient.InferenceServerClient(bundled.http_url, concurrency=4)
    stop = threading.Event()
    outcomes: list[str] = []

    def outcome(result: Any) -> str:
        if not isinstance(result, InferenceServerException):
            return "ok"
        return "not found" if is_status(result, "NOT_FOUND", 404) else str(result)

    def run() -> None:
        client = grpcclient.InferenceServerClient(bundled.grpc_url)
        while not stop.is_set():
            outcomes.append(outcome(grpc_async(client, *names_in_out).get(timeout=30)))
        client.close()

    collect_http_clients()
    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(40):
            in_flight = [http_async(http_client, *names_in_out) for _ in range(2)]
            register(control, names_in_out[0], key_in, 64)
            register(control, names_in_out[1], key_out, 64)
            control.unregister_system_shared_memory(names_in_out[1])
            control.unregister_system_shared_memory(names_in_out[0])
            for call in in_flight:
                try:
                    call.get_result()
                    outcomes.append("ok")
                except InferenceServerException as exc:
                    outcomes.append(outcome(exc))
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        http_client.close()
    assert set(outcomes) <= {"ok", "not found"}, set(outcomes) - {"ok", "not found"}
    assert "ok" in outcomes and control.is_server_live()
    assert names_in_out[0] not in names(control)
    control.close()


def test_the_shared_memory_group_can_be_restricted(
    start_server: ServerFactory, regions: Any
) -> None:
    server = start_server(
        BUNDLED, "--grpc-restricted-protocol=shared-memory:shm-key=s3cret",
        "--http-restricted-api=shared-memory:shm-key=s3cret",
    )
    key, _ = regions(64)
    for module, url, headers in (
        (grpcclient, server.grpc_url, {"triton-grpc-protocol-shm-key": "s3cret"}),
        (httpclient, server.http_url, {"shm-key": "s3cret"}),
    ):
        client = module.InferenceServerClient(url)
        error = client_error(partial(client.register_system_shared_memory, "r", key, 64))
        assert is_status(error, "UNAVAILABLE", 403)
        assert "restricted, expecting header" in error.message()
        client.register_system_shared_memory("r", key, 64, headers=headers)
        error = client_error(client.get_system_shared_memory_status)
        assert is_status(error, "UNAVAILABLE", 403)
        client.unregister_system_shared_memory(headers=headers)
        client.close()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_perf_analyzer_with_system_shared_memory(bundled: RunningServer, protocol: str) -> None:
    if not PERF_ANALYZER.exists():
        pytest.fail("perf_analyzer is not installed: run scripts/setup --test")
    url = bundled.grpc_url if protocol == "grpc" else bundled.http_url
    result = subprocess.run(
        [str(PERF_ANALYZER), "-m", "identity_fp32", "-u", url, "-i", protocol,
         "--shared-memory", "system", "--concurrency-range", "4",
         "--measurement-interval", "1000", "--stability-percentage", "100", "--max-trials", "10"],
        capture_output=True, text=True, timeout=180,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert re.search(r"Throughput: [\d.]+ infer/sec", output), output
    lowered = output.lower().replace("std error", "")
    assert "error" not in lowered and "unable" not in lowered, output
    with contextlib.closing(grpcclient.InferenceServerClient(bundled.grpc_url)) as client:
        assert not client.get_system_shared_memory_status().regions  # it unregistered its own
