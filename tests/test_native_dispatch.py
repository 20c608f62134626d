"""NativeGrpcServer's table of handlers for services beside the inference one (add_unary,
add_stream), in-process on its own event loop, driven by the real grpcio client: the C++ side
routes "/<service>/<method>" to them, unknown ones stay UNIMPLEMENTED."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from server import _native, proto
from server.config import ServerSettings
from server.dataplane import DataPlane
from server.errors import not_found
from server.grpc.native_frontend import NativeGrpcServer
from server.manager import ModelManager

pytestmark = pytest.mark.skipif(
    not getattr(_native, "HAVE_GRPC_FRONTEND", False), reason="built without nghttp2"
)

ECHO = "tachyon.test.Echo"


class Echo:
    """The test's handlers: bytes in, bytes out (parse is the identity)."""

    def __init__(self) -> None:
        self.watch_cancelled = threading.Event()

    async def upper(self, request: bytes, context: Any) -> bytes:
        assert context is None
        return request.upper()

    async def missing(self, request: bytes, context: Any) -> bytes:
        raise not_found(f"no such thing: {request.decode()}")

    async def broken(self, request: bytes, context: Any) -> bytes:
        raise RuntimeError("it broke")

    async def chat(self, requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        """Answers each message, then two more after the client half-closed."""
        count = 0
        async for request in requests:
            count += 1
            yield request.upper()
        await asyncio.sleep(0.05)
        yield b"that was %d" % count
        yield b"bye"

    async def countdown(self, request: bytes, context: Any) -> AsyncIterator[bytes]:
        for n in range(int(request), 0, -1):
            await asyncio.sleep(0.01)
            yield b"%d" % n

    async def watch(self, request: bytes, context: Any) -> AsyncIterator[bytes]:
        try:
            while True:
                yield request
                await asyncio.sleep(0.05)
        finally:
            self.watch_cancelled.set()


def identity(message: bytes) -> bytes:
    return message


@pytest.fixture
def echo() -> Echo:
    return Echo()


@pytest.fixture
def served(tmp_path: Path, echo: Echo) -> Iterator[NativeGrpcServer]:
    """A NativeGrpcServer with the Echo handlers, on an event loop in a thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    settings = ServerSettings(model_repository=tmp_path)
    server = NativeGrpcServer(DataPlane(settings, ModelManager(settings)))
    server.add_unary(f"{ECHO}/Upper", echo.upper, identity)
    server.add_unary(f"{ECHO}/Missing", echo.missing, identity)
    server.add_unary(f"{ECHO}/Broken", echo.broken, identity)
    server.add_stream(f"{ECHO}/Chat", echo.chat, identity)
    server.add_stream(f"{ECHO}/Countdown", echo.countdown, identity, client_streaming=False)
    server.add_stream(f"{ECHO}/Watch", echo.watch, identity, client_streaming=False)

    async def serve() -> None:
        server.serve("127.0.0.1", 0, 1 << 20)

    asyncio.run_coroutine_threadsafe(serve(), loop).result(10)
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(1.0), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture
def channel(served: NativeGrpcServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{served.port}") as ch:
        yield ch


def test_registered_unary_handler_answers(channel: grpc.Channel) -> None:
    assert channel.unary_unary(f"/{ECHO}/Upper")(b"abc", timeout=10) == b"ABC"


def test_the_inference_service_still_answers(channel: grpc.Channel) -> None:
    live = channel.unary_unary(
        f"/{proto.SERVICE_NAME}/ServerLive",
        request_serializer=proto.ServerLiveRequest.SerializeToString,
        response_deserializer=proto.ServerLiveResponse.FromString,
    )
    assert live(proto.ServerLiveRequest(), timeout=10).live


@pytest.mark.parametrize(
    ("method", "code", "details"),
    [
        ("Missing", grpc.StatusCode.NOT_FOUND, "no such thing: x"),
        ("Broken", grpc.StatusCode.INTERNAL, "internal error: it broke"),
        ("Nothing", grpc.StatusCode.UNIMPLEMENTED, "Method not found!"),
    ],
)
def test_handler_errors_become_statuses(
    channel: grpc.Channel, method: str, code: grpc.StatusCode, details: str
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        channel.unary_unary(f"/{ECHO}/{method}")(b"x", timeout=10)
    assert info.value.code() is code
    assert info.value.details() == details


def test_unregistered_services_are_unimplemented_natively(channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as info:
        channel.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=10)
    assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED
    assert f"this server implements {proto.SERVICE_NAME}, {ECHO}" in str(info.value.details())


def test_bidirectional_handler_answers_after_the_half_close(channel: grpc.Channel) -> None:
    answers = channel.stream_stream(f"/{ECHO}/Chat")(iter([b"a", b"b", b"c"]), timeout=10)
    assert list(answers) == [b"A", b"B", b"C", b"that was 3", b"bye"]
    assert answers.code() is grpc.StatusCode.OK


def test_server_streaming_handler_gets_its_one_request(channel: grpc.Channel) -> None:
    answers = channel.unary_stream(f"/{ECHO}/Countdown")(b"5", timeout=10)
    assert list(answers) == [b"5", b"4", b"3", b"2", b"1"]


def test_server_streaming_with_two_requests_is_refused(channel: grpc.Channel) -> None:
    answers = channel.stream_stream(f"/{ECHO}/Countdown")(iter([b"1", b"2"]), timeout=10)
    with pytest.raises(grpc.RpcError) as info:
        list(answers)
    assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED
    assert "more than one request message" in str(info.value.details())


def test_a_cancelled_stream_stops_its_handler(channel: grpc.Channel, echo: Echo) -> None:
    answers = channel.unary_stream(f"/{ECHO}/Watch")(b"SERVING", timeout=10)
    assert next(answers) == b"SERVING"
    assert next(answers) == b"SERVING"
    answers.cancel()
    assert echo.watch_cancelled.wait(5)


def test_handlers_are_registered_before_serving(served: NativeGrpcServer, echo: Echo) -> None:
    with pytest.raises(RuntimeError, match="before serve"):
        served.add_unary(f"{ECHO}/Late", echo.upper, identity)


@pytest.mark.parametrize(
    "method", ["Upper", f"{ECHO}/", f"/{ECHO}/Upper", f"{ECHO}/a/b", f"{proto.SERVICE_NAME}/X"]
)
def test_method_names_are_checked(tmp_path: Path, echo: Echo, method: str) -> None:
    settings = ServerSettings(model_repository=tmp_path)
    server = NativeGrpcServer(DataPlane(settings, ModelManager(settings)))
    with pytest.raises(ValueError, match="must be"):
        server.add_unary(method, echo.upper, identity)
    server.add_unary(f"{ECHO}/Upper", echo.upper, identity)
    with pytest.raises(ValueError, match="registered already"):
        server.add_stream(f"{ECHO}/Upper", echo.chat, identity)
