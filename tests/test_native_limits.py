"""server._native.GrpcFrontend's limits in-process, driven by bare HTTP/2 clients (tests/
h2_wire.py) with the test playing the application: flow-control windows given back only as calls
are taken, the request byte budget (a connection over it is not read until the application
drains), no allocation for a declared message size, rapid reset, CONTINUATION floods, oversized
header lists, the connection limit, keepalive and PING strikes, SO_REUSEPORT only on request,
and an I/O thread failure reported to the application."""

from __future__ import annotations

import contextlib
import select
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from server import _native
from tests.h2_wire import ENHANCE_YOUR_CALM, Wire, grpc_frame, grpc_prefix

pytestmark = pytest.mark.skipif(
    not getattr(_native, "HAVE_GRPC_FRONTEND", False), reason="built without nghttp2"
)

MiB = 1 << 20
LIMIT = 8 * MiB
SERVICE = "test.Echo"
WINDOW = 16 * MiB  # what the front end advertises, per stream and per connection


def make(**options: Any) -> Any:
    fe = _native.GrpcFrontend("127.0.0.1", 0, LIMIT, service=SERVICE, **options)
    fe.start()
    return fe


@pytest.fixture(autouse=True)
def _close_wires() -> Iterator[None]:
    yield
    Wire.close_all()


@pytest.fixture
def frontend() -> Iterator[Any]:
    fe = make()
    yield fe
    fe.stop(0.5)


def take_all(fe: Any, count: int, timeout: float = 10.0) -> list[Any]:
    items: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(items) < count:
        left = deadline - time.monotonic()
        assert left > 0, f"took {len(items)} of {count} items"
        if select.select([fe.fileno()], [], [], left)[0]:
            items.extend(fe.take())
    return items


def until(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def connected(fe: Any) -> Wire:
    """A connection whose SETTINGS exchange and window opening are done."""
    wire = Wire(fe.port)
    assert wire.pump(lambda: wire.send_window >= WINDOW), "no 16 MiB window"
    return wire


# -- flow control and the budget --------------------------------------------------------


def test_window_is_given_back_only_as_calls_are_taken(frontend: Any) -> None:
    wire = connected(frontend)
    message = b"m" * MiB
    sent = 0
    for _ in range(3):  # what the server gives back before anything is taken, the client uses
        while wire.send_window >= len(message) + 5:
            wire.call(message)
            sent += 1
        wire.settle(0.3)
    # The window (16 MiB), and the first message's bytes given back as they arrived (nothing
    # waited for the application then); from its end on, nothing until the application takes.
    assert 15 <= sent <= 17, sent
    assert wire.send_window < len(message) + 5, "the window opened before anything was taken"
    items = take_all(frontend, sent)
    assert [len(item[2]) for item in items] == [MiB] * sent
    assert wire.pump(lambda: wire.send_window >= WINDOW // 2), "the window did not open"
    for item in items:
        frontend.respond([(item[0], b"ok", 0, "")])
    wire.close()


def test_declared_size_allocates_nothing_before_the_bytes_come(frontend: Any) -> None:
    wire = connected(frontend)
    stream_id, headers = wire.headers()
    wire.send(headers, *wire.data(stream_id, grpc_prefix(LIMIT - 1)))
    wire.settle(0.3)
    assert frontend.stats()["buffered_bytes"] == 0
    wire.send(*wire.data(stream_id, b"x" * (3 * MiB)))
    until(lambda: frontend.stats()["buffered_bytes"] == 3 * MiB, "3 MiB buffered")
    wire.close()
    until(lambda: frontend.stats()["buffered_bytes"] == 0, "the bytes freed on disconnect")


def test_a_connection_over_its_budget_is_not_read_until_the_application_takes() -> None:
    fe = make(max_connection_buffered_bytes=2 * MiB)
    try:
        wire = connected(fe)
        for _ in range(4):
            wire.call(b"c" * MiB)  # 4 MiB of whole calls: the window would allow 16
        until(lambda: fe.stats()["paused_connections"] == 1, "the connection paused")
        assert 2 * MiB <= fe.stats()["buffered_bytes"] <= 3 * MiB
        # Another connection is read meanwhile, with nothing taken yet.
        other = connected(fe)
        other.call(b"small")
        time.sleep(0.3)
        items = fe.take()
        assert b"small" in [item[2] for item in items]
        assert len(items) <= 4  # two or three 1 MiB calls: not all four before the take
        items += take_all(fe, 5 - len(items))
        assert sorted(len(item[2]) for item in items) == [5, MiB, MiB, MiB, MiB]
        until(lambda: fe.stats()["paused_connections"] == 0, "the connection resumed")
        wire.close()
        other.close()
    finally:
        fe.stop(0.5)


def test_a_connection_paused_longer_than_the_keepalive_timeout_is_closed() -> None:
    keepalive = _native.GrpcKeepalive(timeout_ms=1000)
    fe = make(max_connection_buffered_bytes=2 * MiB, keepalive=keepalive)
    try:
        wire = connected(fe)
        stream_id, headers = wire.headers()
        wire.send(headers, *wire.data(stream_id, grpc_prefix(7 * MiB) + b"p" * (3 * MiB)))
        until(lambda: fe.stats()["paused_connections"] == 1, "the connection paused")
        held = fe.stats()["buffered_bytes"]
        assert 2 * MiB <= held <= 2 * MiB + 512 * 1024, held  # read no further than the budget
        other = connected(fe)
        call = other.call(b"meanwhile")
        [(call_id, _, message, *_)] = take_all(fe, 1)
        assert message == b"meanwhile"
        fe.respond([(call_id, b"answered", 0, "")])
        assert other.answer(call).data == grpc_frame(b"answered")
        # Its client may be gone (a FIN would wait behind the bytes not read): after the
        # keepalive timeout the connection is closed and its bytes freed.
        until(lambda: fe.stats() == {"connections": 1, "paused_connections": 0,
                                     "buffered_bytes": 0}, "the paused connection closed")
        assert wire.wait_closed(2)
    finally:
        fe.stop(0.5)


# -- abuse ------------------------------------------------------------------------------


def test_rapid_reset_is_answered_with_enhance_your_calm(frontend: Any) -> None:
    wire = connected(frontend)
    frames = []
    for _ in range(300):
        stream_id, headers = wire.headers()
        frames += [headers, wire.rst(stream_id)]
    wire.send(*frames)
    assert wire.wait_closed(), "the connection stayed open"
    assert [(code, why) for _, code, why in wire.goaways] == [
        (ENHANCE_YOUR_CALM, b"too many streams reset")
    ]


def test_resets_at_a_modest_rate_are_fine(frontend: Any) -> None:
    wire = connected(frontend)
    for _ in range(100):  # 100 in well under a second: below the limit of 200 per second
        stream_id, headers = wire.headers()
        wire.send(headers, wire.rst(stream_id))
    call = wire.call(b"still welcome")
    [(call_id, *_)] = [i for i in take_all(frontend, 1) if i[3] == 0]
    frontend.respond([(call_id, b"yes", 0, "")])
    assert wire.answer(call).data == grpc_frame(b"yes")
    assert not wire.goaways


def test_continuation_flood_closes_the_connection(frontend: Any) -> None:
    wire = connected(frontend)
    stream_id, headers = wire.headers(end_headers=False)
    filler = wire.encoder.encode([("x-filler", "f" * 1000)])
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # closed meanwhile: fine
        wire.send(headers, *[wire.continuation(stream_id, filler) for _ in range(50)])
    assert wire.wait_closed(), "the connection stayed open"
    assert frontend.active_calls() == 0


def test_oversized_header_list_is_resource_exhausted(frontend: Any) -> None:
    wire = connected(frontend)
    many = [(f"x-meta-{i}", "v") for i in range(150)]  # 150 fields: over 100
    stream_id, headers = wire.headers(extra=many)
    wire.send(headers, *wire.data(stream_id, grpc_frame(b"hi"), end_stream=True))
    assert wire.answer(stream_id).status["grpc-status"] == "8"
    big = [("x-big", "b" * 17000)]  # one field over 16 KiB
    stream_id, headers = wire.headers(extra=big)
    wire.send(headers, *wire.data(stream_id, grpc_frame(b"hi"), end_stream=True))
    assert wire.answer(stream_id).status["grpc-status"] == "8"
    assert not select.select([frontend.fileno()], [], [], 0.2)[0], "a refused call was delivered"


def test_connections_beyond_the_limit_are_refused_with_a_goaway() -> None:
    fe = make(max_connections=2)
    try:
        first, second = connected(fe), connected(fe)
        third = Wire(fe.port)
        assert third.wait_closed()
        assert [(code, why) for _, code, why in third.goaways] == [
            (ENHANCE_YOUR_CALM, b"too many connections")
        ]
        first.close()
        until(lambda: fe.stats()["connections"] == 1, "the first connection gone")
        fourth = connected(fe)
        call = fourth.call(b"room again")
        [(call_id, *_)] = take_all(fe, 1)
        fe.respond([(call_id, b"yes", 0, "")])
        assert fourth.answer(call).data == grpc_frame(b"yes")
        second.close()
        fourth.close()
    finally:
        fe.stop(0.5)


# -- keepalive and PINGs ----------------------------------------------------------------


def keepalive_frontend() -> Any:
    keepalive = _native.GrpcKeepalive(time_ms=100, timeout_ms=150, permit_without_calls=True,
                                      max_pings_without_data=0)
    return make(keepalive=keepalive)


def test_keepalive_closes_a_connection_that_does_not_answer_pings() -> None:
    fe = keepalive_frontend()
    try:
        answering = Wire(fe.port)
        answering.settle(0.6)
        assert len(answering.pings) >= 3 and not answering.closed
        silent = Wire(fe.port, ack_pings=False)
        started = time.monotonic()
        assert silent.wait_closed(5), "the silent connection stayed open"
        assert len(silent.pings) == 1 and time.monotonic() - started < 2
    finally:
        fe.stop(0.5)


def test_ping_flood_gets_too_many_pings(frontend: Any) -> None:
    wire = connected(frontend)
    wire.send(*[wire.ping(bytes([i]) * 8) for i in range(10)])
    assert wire.wait_closed(), "the connection stayed open"
    goaways = [(code, why) for _, code, why in wire.goaways]
    assert goaways == [(ENHANCE_YOUR_CALM, b"too_many_pings")]


def test_pings_are_forgiven_by_answers() -> None:
    keepalive = _native.GrpcKeepalive(min_recv_ping_interval_without_data_ms=300_000,
                                      max_ping_strikes=2)
    fe = make(keepalive=keepalive)
    try:
        wire = connected(fe)
        for round_ in range(4):  # two pings a round (one strike), an answer in between
            call = wire.call(b"r%d" % round_)
            wire.send(wire.ping(), wire.ping())
            # answer every call handed over (a fresh-clone run once saw two items here)
            items = take_all(fe, 1)
            fe.respond([(item[0], b"ok", 0, "") for item in items if item[3] == 0])
            wire.answer(call)
        wire.settle(0.2)
        assert not wire.goaways and not wire.closed
        wire.close()
    finally:
        fe.stop(0.5)


# -- the listener and the I/O thread ----------------------------------------------------


def test_so_reuseport_only_when_asked() -> None:
    first = make()
    try:
        second = _native.GrpcFrontend("127.0.0.1", first.port, LIMIT, reuse_port=True)
        with pytest.raises(OSError):
            second.start()  # the first did not set SO_REUSEPORT
    finally:
        first.stop(0)
    first = make(reuse_port=True)
    second = _native.GrpcFrontend("127.0.0.1", first.port, LIMIT, reuse_port=True)
    try:
        second.start()
        assert second.port == first.port
    finally:
        first.stop(0)
        second.stop(0)


def test_io_thread_failure_is_reported_and_cancels_open_calls(frontend: Any) -> None:
    wire = connected(frontend)
    wire.call(b"in flight")
    [(call_id, *_)] = take_all(frontend, 1)
    assert frontend.failure() is None
    frontend.inject_failure("boom")
    items = take_all(frontend, 1)  # the cancellation of the call in flight
    assert [(item[0], item[3]) for item in items] == [(call_id, 3)]
    assert frontend.failure() == "boom"
    assert wire.wait_closed()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", frontend.port), 1):
        pass
