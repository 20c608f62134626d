"""server._native.GrpcFrontend in-process, driven by the real grpcio client: framing, batching,
statuses, limits, streaming, cancellation and shutdown, with the test playing the application
(take / respond / send_stream)."""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from server import _native
from server.grpc import native_frontend

pytestmark = pytest.mark.skipif(
    not getattr(_native, "HAVE_GRPC_FRONTEND", False), reason="built without nghttp2"
)

LIMIT = 1 << 20
SERVICE = "test.Echo"

Item = tuple[int, str, bytes, int]


@pytest.fixture
def frontend() -> Iterator[Any]:
    fe = _native.GrpcFrontend(
        "127.0.0.1", 0, LIMIT, service=SERVICE, streaming_methods=["Chat"]
    )
    fe.start()
    yield fe
    fe.stop(1.0)


@pytest.fixture
def channel(frontend: Any) -> Iterator[grpc.Channel]:
    options = [("grpc.max_receive_message_length", 64 << 20),
               ("grpc.max_send_message_length", 64 << 20)]
    with grpc.insecure_channel(f"127.0.0.1:{frontend.port}", options=options) as ch:
        yield ch


def readable(fe: Any, timeout: float) -> bool:
    return bool(select.select([fe.fileno()], [], [], timeout)[0])


def wait_items(fe: Any, count: int, timeout: float = 10.0) -> list[Item]:
    """Takes ready items until `count` arrived; waits on fileno() as an event loop would."""
    items: list[Item] = []
    deadline = time.monotonic() + timeout
    while len(items) < count:
        left = deadline - time.monotonic()
        assert left > 0, f"got {len(items)} of {count} items: {items}"
        if readable(fe, left):
            items.extend(fe.take())
    return items


def say(channel: grpc.Channel, method: str = "Say") -> Any:
    return channel.unary_unary(f"/{SERVICE}/{method}")


def test_unary_round_trip_and_eventfd_reset(frontend: Any, channel: grpc.Channel) -> None:
    future = say(channel).future(b"hello")
    [(call_id, method, message, kind)] = wait_items(frontend, 1)
    assert (method, message, kind) == ("Say", b"hello", 0)
    assert not readable(frontend, 0.05)  # take() reset the eventfd
    assert frontend.take() == []
    assert frontend.active_calls() == 1
    frontend.respond([(call_id, b"HELLO", 0, "")])
    assert future.result(timeout=5) == b"HELLO"


def test_many_calls_answered_in_one_respond(frontend: Any, channel: grpc.Channel) -> None:
    futures = {f"m{i}".encode(): say(channel).future(f"m{i}".encode()) for i in range(64)}
    items = wait_items(frontend, 64)
    assert len({item[0] for item in items}) == 64  # distinct call ids
    frontend.respond([(call_id, message[::-1], 0, "") for call_id, _, message, _ in items])
    for request, future in futures.items():
        assert future.result(timeout=5) == request[::-1]


def test_error_status_is_trailers_only_and_percent_encoded(
    frontend: Any, channel: grpc.Channel
) -> None:
    future = say(channel).future(b"x")
    [(call_id, *_)] = wait_items(frontend, 1)
    frontend.respond([(call_id, b"ignored", 5, "naïve 100% wrong\nline")])
    with pytest.raises(grpc.RpcError) as info:
        future.result(timeout=5)
    assert info.value.code() is grpc.StatusCode.NOT_FOUND
    assert info.value.details() == "naïve 100% wrong\nline"


def test_empty_and_large_messages(frontend: Any, channel: grpc.Channel) -> None:
    big = bytes(range(256)) * (3 * 4096 - 7)  # ~3 MB: the GIL-released copy paths
    empty = say(channel).future(b"")
    large = say(channel).future(big[: LIMIT - 1])
    items = {item[2][:8]: item for item in wait_items(frontend, 2)}
    assert items[b""][2] == b""
    assert items[big[:8]][2] == big[: LIMIT - 1]
    frontend.respond([(items[b""][0], b"", 0, ""), (items[big[:8]][0], big[:LIMIT], 0, "")])
    assert empty.result(timeout=5) == b""
    assert large.result(timeout=5) == big[:LIMIT]


def test_request_above_the_limit_is_refused_natively(
    frontend: Any, channel: grpc.Channel
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        say(channel)(bytes(LIMIT + 1), timeout=5)
    assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.details() == f"Received message larger than max ({LIMIT + 1} vs. {LIMIT})"
    assert not readable(frontend, 0.1)  # never delivered


def test_response_above_the_limit_becomes_resource_exhausted(
    frontend: Any, channel: grpc.Channel
) -> None:
    future = say(channel).future(b"x")
    [(call_id, *_)] = wait_items(frontend, 1)
    frontend.respond([(call_id, bytes(LIMIT + 5), 0, "")])
    with pytest.raises(grpc.RpcError) as info:
        future.result(timeout=5)
    assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"({LIMIT + 5} vs. {LIMIT})" in str(info.value.details())


def test_compressed_messages_are_unimplemented(frontend: Any, channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as info:
        say(channel)(bytes(100_000), timeout=5, compression=grpc.Compression.Gzip)
    assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED
    assert "compression is not supported" in str(info.value.details())
    assert not readable(frontend, 0.1)


def test_other_services_are_unimplemented(frontend: Any, channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as info:
        channel.unary_unary("/other.Service/Say")(b"x", timeout=5)
    assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED
    assert "'/other.Service/Say'" in str(info.value.details())
    assert SERVICE in str(info.value.details())


def test_cancelled_call_is_reported_and_its_response_dropped(
    frontend: Any, channel: grpc.Channel
) -> None:
    future = say(channel).future(b"x")
    [(call_id, *_)] = wait_items(frontend, 1)
    future.cancel()
    [(gone_id, method, _, kind)] = wait_items(frontend, 1)
    assert (gone_id, method, kind) == (call_id, "Say", 3)
    frontend.respond([(call_id, b"late", 0, "")])  # dropped silently
    deadline = time.monotonic() + 5
    while frontend.active_calls() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert frontend.active_calls() == 0
    following = say(channel).future(b"next")  # the connection still works
    [(next_id, _, message, _)] = wait_items(frontend, 1)
    assert message == b"next"
    frontend.respond([(next_id, b"ok", 0, "")])
    assert following.result(timeout=5) == b"ok"


def test_bidirectional_stream(frontend: Any, channel: grpc.Channel) -> None:
    chat = channel.stream_stream(f"/{SERVICE}/Chat")
    responses = chat(iter([b"a", b"bb", b"ccc"]))
    items = wait_items(frontend, 4)
    call_ids = {item[0] for item in items}
    assert len(call_ids) == 1
    assert [(m, k) for _, _, m, k in items] == [(b"a", 1), (b"bb", 1), (b"ccc", 1), (b"", 2)]
    call_id = call_ids.pop()
    frontend.send_stream([(call_id, b"A"), (call_id, b"BB")])
    frontend.send_stream([(call_id, b"CCC")])
    frontend.respond([(call_id, None, 0, "")])
    assert list(responses) == [b"A", b"BB", b"CCC"]
    assert responses.code() is grpc.StatusCode.OK


def test_stream_answered_before_the_client_half_closes(
    frontend: Any, channel: grpc.Channel
) -> None:
    """Messages go out while the client keeps its side open; an error status ends it."""
    release = threading.Event()

    def requests() -> Iterator[bytes]:
        yield b"first"
        release.wait(10)

    chat = channel.stream_stream(f"/{SERVICE}/Chat")
    responses = chat(requests())
    [(call_id, _, message, kind)] = wait_items(frontend, 1)
    assert (message, kind) == (b"first", 1)
    frontend.send_stream([(call_id, b"reply")])
    assert next(responses) == b"reply"
    frontend.respond([(call_id, None, 9, "stop here")])
    with pytest.raises(grpc.RpcError) as info:
        next(responses)
    assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert info.value.details() == "stop here"
    release.set()


def test_cancelled_stream_is_reported(frontend: Any, channel: grpc.Channel) -> None:
    release = threading.Event()

    def requests() -> Iterator[bytes]:
        yield b"one"
        release.wait(10)

    responses = channel.stream_stream(f"/{SERVICE}/Chat")(requests())
    [(call_id, _, _, kind)] = wait_items(frontend, 1)
    assert kind == 1
    responses.cancel()
    [(gone_id, method, _, kind)] = wait_items(frontend, 1)
    assert (gone_id, method, kind) == (call_id, "Chat", 3)
    frontend.send_stream([(call_id, b"late")])  # dropped silently
    frontend.respond([(call_id, None, 0, "")])
    release.set()


def test_respond_rejects_malformed_items(frontend: Any) -> None:
    with pytest.raises(TypeError, match="bytes or None"):
        frontend.respond([(1, "text", 0, "")])
    with pytest.raises(ValueError, match=r"0\.\.16, got 99"):
        frontend.respond([(1, None, 99, "")])
    with pytest.raises(TypeError, match="tuples"):
        frontend.respond([(1, None, 0)])
    with pytest.raises(TypeError, match="str"):
        frontend.respond([(1, None, 0, b"bytes")])
    with pytest.raises(TypeError):
        frontend.send_stream([(1, None)])
    frontend.respond([(12345, b"nobody", 0, "")])  # an unknown call is dropped


def test_garbage_on_the_port_does_not_hurt(frontend: Any, channel: grpc.Channel) -> None:
    with socket.create_connection(("127.0.0.1", frontend.port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(5)
        with contextlib.suppress(ConnectionResetError):
            while sock.recv(4096):  # until the server closes the connection
                pass
    with socket.create_connection(("127.0.0.1", frontend.port), timeout=5) as sock:
        # A valid preface and SETTINGS, then the connection drops in the middle of a frame.
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
        sock.sendall(bytes([0, 0, 100, 1, 4, 0, 0, 0, 1]) + b"\x00" * 10)
    future = say(channel).future(b"still here")
    [(call_id, _, message, _)] = wait_items(frontend, 1)
    assert message == b"still here"
    frontend.respond([(call_id, b"yes", 0, "")])
    assert future.result(timeout=5) == b"yes"


def test_bind_conflict_raises_oserror() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        fe = _native.GrpcFrontend("127.0.0.1", taken.getsockname()[1], LIMIT)
        with pytest.raises(OSError, match="cannot bind"):
            fe.start()
        fe.stop(0)


def test_stop_refuses_new_calls_and_is_idempotent(frontend: Any, channel: grpc.Channel) -> None:
    future = say(channel).future(b"pending")
    wait_items(frontend, 1)
    started = time.monotonic()
    frontend.stop(0.3)  # the pending call never gets an answer: stop waits out its grace
    assert 0.25 < time.monotonic() - started < 3
    with pytest.raises(grpc.RpcError):
        future.result(timeout=5)
    frontend.stop(0)
    frontend.respond([(1, b"after stop", 0, "")])  # queued, never sent, harmless
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", frontend.port), 1):
        pass


def test_stop_flushes_answers_given_during_grace(frontend: Any, channel: grpc.Channel) -> None:
    future = say(channel).future(b"pending")
    [(call_id, *_)] = wait_items(frontend, 1)
    answer = threading.Timer(0.2, frontend.respond, [[(call_id, b"in time", 0, "")]])
    answer.start()
    started = time.monotonic()
    frontend.stop(5.0)
    assert time.monotonic() - started < 4  # returned once the call was done, not at grace
    assert future.result(timeout=5) == b"in time"


def test_respond_all_answers_every_call_when_one_item_is_refused(
    frontend: Any, channel: grpc.Channel
) -> None:
    futures = [say(channel).future(f"m{i}".encode()) for i in range(3)]
    items = sorted(wait_items(frontend, 3), key=lambda item: item[2])
    done: list[Any] = [(call_id, message.upper(), 0, "") for call_id, _, message, _ in items]
    done[1] = (done[1][0], "not bytes", 0, "")  # respond() refuses the whole group for this
    with pytest.raises(TypeError):
        frontend.respond(list(done))
    native_frontend.respond_all(frontend, done)
    assert futures[0].result(timeout=5) == b"M0"
    assert futures[2].result(timeout=5) == b"M2"
    with pytest.raises(grpc.RpcError) as failed:
        futures[1].result(timeout=5)
    assert failed.value.code() == grpc.StatusCode.INTERNAL
    assert "a message must be bytes or None" in failed.value.details()
