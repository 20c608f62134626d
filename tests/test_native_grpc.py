"""server._native.GrpcFrontend in-process, driven by the real grpcio client: framing, batching,
statuses, limits, streaming, cancellation and shutdown, with the test playing the application
(take / respond / send_stream)."""

from __future__ import annotations

import contextlib
import gzip
import resource
import select
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from hpack import Decoder, Encoder
from hyperframe.frame import (
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

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
            items.extend(item[:4] for item in fe.take())  # metadata: see test_native_tls
    return items


def say(channel: grpc.Channel, method: str = "Say") -> Any:
    return channel.unary_unary(f"/{SERVICE}/{method}")


# -- a bare HTTP/2 client, for what grpcio cannot be made to do ---------------------------

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
REFUSED_STREAM = 7


def grpc_frame(message: bytes, compressed: bool = False) -> bytes:
    return bytes([int(compressed)]) + len(message).to_bytes(4, "big") + message


def grpc_messages(data: bytes) -> list[tuple[int, bytes]]:
    """(compressed flag, payload) of every message in a response body."""
    out = []
    while data:
        size = int.from_bytes(data[1:5], "big")
        out.append((data[0], data[5 : 5 + size]))
        data = data[5 + size :]
    return out


@dataclass
class Answer:
    """What the server sent on one stream."""

    headers: dict[str, str] = field(default_factory=dict)
    trailers: dict[str, str] = field(default_factory=dict)
    data: bytes = b""
    reset: int | None = None  # RST_STREAM's error code
    ended: bool = False

    @property
    def status(self) -> dict[str, str]:
        """grpc-status and grpc-message, from the trailers or a trailers-only response."""
        return self.trailers or self.headers


class RawH2:
    """Sends exactly the frames a test asks for and records every frame the server sends.
    Unlike grpcio it enforces no deadline of its own, and acknowledges PINGs only when told."""

    def __init__(self, port: int, ack_pings: bool = True) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.encoder, self.decoder = Encoder(), Decoder()
        self.ack_pings = ack_pings
        self.answers: dict[int, Answer] = {}
        self.goaways: list[tuple[int, int]] = []  # (last stream id, error code)
        self.pings: list[bytes] = []  # opaque data of the server's PINGs
        self.closed = False
        self._settings = False
        self._buffer = b""
        self._next_stream = 1
        self.sock.sendall(PREFACE + SettingsFrame(0).serialize())
        # Acknowledging the server's SETTINGS first opens its 16 MiB windows to our DATA.
        self.pump(lambda: self._settings)

    def close(self) -> None:
        self.sock.close()

    def request(
        self, path: str, body: bytes | None, headers: tuple[tuple[str, str], ...] = (),
        content_type: str = "application/grpc", end: bool = True,
    ) -> int:
        """Opens a stream: HEADERS, then `body` in DATA frames; END_STREAM when `end`."""
        stream_id = self._next_stream
        self._next_stream += 2
        block = [(":method", "POST"), (":scheme", "http"), (":path", path),
                 (":authority", "localhost"), ("content-type", content_type), ("te", "trailers"),
                 *headers]
        frame = HeadersFrame(stream_id, self.encoder.encode(block), flags=["END_HEADERS"])
        frames: list[Frame] = [frame]
        if body is None:
            if end:
                frame.flags.add("END_STREAM")
        else:
            pieces = [body[i : i + 16384] for i in range(0, len(body), 16384)] or [b""]
            frames += [DataFrame(stream_id, piece) for piece in pieces]
            if end:
                frames[-1].flags.add("END_STREAM")
        self.sock.sendall(b"".join(f.serialize() for f in frames))
        self.answers[stream_id] = Answer()
        return stream_id

    def ack_ping(self, opaque: bytes) -> None:
        self.sock.sendall(PingFrame(0, opaque, flags=["ACK"]).serialize())

    def answer(self, stream_id: int, timeout: float = 10.0) -> Answer:
        """Reads until the stream ended (END_STREAM or RST_STREAM)."""
        self.pump(lambda: self.answers[stream_id].ended, timeout)
        return self.answers[stream_id]

    def pump(self, done: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            assert left > 0 and not self.closed, f"timed out: {self.answers} {self.goaways}"
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            if not chunk:
                self.closed = True
                return
            self._buffer += chunk
            while len(self._buffer) >= 9:
                frame, length = Frame.parse_frame_header(memoryview(self._buffer[:9]))
                if len(self._buffer) < 9 + length:
                    break
                frame.parse_body(memoryview(self._buffer[9 : 9 + length]))
                self._buffer = self._buffer[9 + length :]
                self._on_frame(frame)

    def _reply(self, data: bytes) -> None:
        """Frames sent on our own initiative; the server may have closed meanwhile."""
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.sock.sendall(data)

    def _on_frame(self, frame: Frame) -> None:
        if isinstance(frame, SettingsFrame) and "ACK" not in frame.flags:
            self._reply(SettingsFrame(0, flags=["ACK"]).serialize())
            self._settings = True
        elif isinstance(frame, PingFrame) and "ACK" not in frame.flags:
            self.pings.append(frame.opaque_data)
            if self.ack_pings:
                self._reply(PingFrame(0, frame.opaque_data, flags=["ACK"]).serialize())
        elif isinstance(frame, GoAwayFrame):
            self.goaways.append((frame.last_stream_id, frame.error_code))
        elif isinstance(frame, HeadersFrame):
            answer = self.answers[frame.stream_id]
            block = {k: v for k, v in self.decoder.decode(frame.data)}
            if answer.headers:
                answer.trailers = block
            else:
                answer.headers = block
            answer.ended = "END_STREAM" in frame.flags
        elif isinstance(frame, DataFrame):
            answer = self.answers[frame.stream_id]
            answer.data += frame.data
            answer.ended = "END_STREAM" in frame.flags
            if frame.flow_controlled_length:  # keep both windows open
                size = frame.flow_controlled_length
                self._reply(WindowUpdateFrame(0, size).serialize()
                            + WindowUpdateFrame(frame.stream_id, size).serialize())
        elif isinstance(frame, RstStreamFrame):
            answer = self.answers[frame.stream_id]
            answer.reset, answer.ended = frame.error_code, True


@pytest.fixture
def h2(frontend: Any) -> Iterator[RawH2]:
    client = RawH2(frontend.port)
    yield client
    client.close()


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


# -- compression --------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", [grpc.Compression.Gzip, grpc.Compression.Deflate])
def test_compressed_requests_are_inflated_and_answers_compressed(
    frontend: Any, channel: grpc.Channel, algorithm: grpc.Compression
) -> None:
    request = b"tachyon " * 20_000  # compressible: grpcio sends it compressed
    future = say(channel).future(request, timeout=10, compression=algorithm)
    [(call_id, method, message, kind)] = wait_items(frontend, 1)
    assert (method, message, kind) == ("Say", request, 0)
    frontend.respond([(call_id, request.upper(), 0, "")])
    assert future.result(timeout=5) == request.upper()


def test_gzip_channel_streams_both_ways(frontend: Any) -> None:
    with grpc.insecure_channel(
        f"127.0.0.1:{frontend.port}", compression=grpc.Compression.Gzip
    ) as channel:
        responses = channel.stream_stream(f"/{SERVICE}/Chat")(iter([b"a" * 5000, b"b" * 7000]))
        items = wait_items(frontend, 3)
        assert [(m, k) for _, _, m, k in items] == [(b"a" * 5000, 1), (b"b" * 7000, 1), (b"", 2)]
        call_id = items[0][0]
        frontend.send_stream([(call_id, b"A" * 5000), (call_id, b"B" * 7000)])
        frontend.respond([(call_id, None, 0, "")])
        assert list(responses) == [b"A" * 5000, b"B" * 7000]


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_answer_uses_the_request_encoding_when_accepted(
    frontend: Any, h2: RawH2, encoding: str
) -> None:
    pack = gzip.compress if encoding == "gzip" else zlib.compress
    unpack = gzip.decompress if encoding == "gzip" else zlib.decompress
    stream = h2.request(
        f"/{SERVICE}/Say", grpc_frame(pack(b"hello " * 1000), compressed=True),
        headers=(("grpc-encoding", encoding), ("grpc-accept-encoding", f"identity, {encoding}")),
    )
    [(call_id, _, message, _)] = wait_items(frontend, 1)
    assert message == b"hello " * 1000
    frontend.respond([(call_id, b"world " * 1000, 0, "")])
    answer = h2.answer(stream)
    assert answer.headers["grpc-encoding"] == encoding
    assert answer.headers["grpc-accept-encoding"] == "identity,deflate,gzip"
    [(flag, payload)] = grpc_messages(answer.data)
    assert flag == 1 and len(payload) < 6000
    assert unpack(payload) == b"world " * 1000
    assert answer.trailers["grpc-status"] == "0"


def test_answer_is_plain_when_the_client_does_not_accept_the_encoding(
    frontend: Any, h2: RawH2
) -> None:
    stream = h2.request(
        f"/{SERVICE}/Say", grpc_frame(gzip.compress(b"hi" * 500), compressed=True),
        headers=(("grpc-encoding", "gzip"), ("grpc-accept-encoding", "identity")),
    )
    [(call_id, _, message, _)] = wait_items(frontend, 1)
    frontend.respond([(call_id, message, 0, "")])
    answer = h2.answer(stream)
    assert "grpc-encoding" not in answer.headers
    assert grpc_messages(answer.data) == [(0, b"hi" * 500)]


def test_zip_bomb_stops_at_the_limit(frontend: Any, channel: grpc.Channel, h2: RawH2) -> None:
    # grpcio's own: 64 MiB of zeros, about 64 KiB on the wire.
    with pytest.raises(grpc.RpcError) as info:
        say(channel)(bytes(64 << 20), timeout=10, compression=grpc.Compression.Gzip)
    assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "Received message larger than max" in str(info.value.details())
    assert f"more than {LIMIT} bytes" in str(info.value.details())
    # 512 MiB of zeros in 0.5 MB (under the limit): inflating it whole would show in the peak RSS.
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunk = bytes(1 << 20)
    bomb = b"".join(packer.compress(chunk) for _ in range(512)) + packer.flush()
    assert len(bomb) < LIMIT
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    stream = h2.request(f"/{SERVICE}/Say", grpc_frame(bomb, compressed=True),
                        headers=(("grpc-encoding", "gzip"),))
    answer = h2.answer(stream)
    assert answer.status["grpc-status"] == "8"  # RESOURCE_EXHAUSTED
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024
    assert grown_mib < 64, f"peak RSS grew by {grown_mib:.0f} MiB"
    assert not readable(frontend, 0.1)  # never delivered


def test_unknown_encoding_is_unimplemented_and_says_what_is_accepted(
    frontend: Any, h2: RawH2
) -> None:
    stream = h2.request(f"/{SERVICE}/Say", grpc_frame(b"\x00snappy?", compressed=True),
                        headers=(("grpc-encoding", "snappy"),))
    answer = h2.answer(stream)
    assert answer.status["grpc-status"] == "12"  # UNIMPLEMENTED
    assert "'snappy'" in answer.status["grpc-message"]
    assert answer.headers["grpc-accept-encoding"] == "identity,deflate,gzip"
    # An unknown encoding is harmless while the messages are not compressed.
    plain = h2.request(f"/{SERVICE}/Say", grpc_frame(b"plain"),
                       headers=(("grpc-encoding", "snappy"),))
    [(call_id, _, message, _)] = wait_items(frontend, 1)
    assert message == b"plain"
    frontend.respond([(call_id, b"ok", 0, "")])
    assert grpc_messages(h2.answer(plain).data) == [(0, b"ok")]


@pytest.mark.parametrize("encoding", [None, "identity"])
def test_compressed_flag_without_an_encoding_is_internal(
    frontend: Any, h2: RawH2, encoding: str | None
) -> None:
    headers = (("grpc-encoding", encoding),) if encoding else ()
    stream = h2.request(f"/{SERVICE}/Say", grpc_frame(gzip.compress(b"x"), compressed=True),
                        headers=headers)
    answer = h2.answer(stream)
    assert answer.status["grpc-status"] == "13"  # INTERNAL
    assert "compressed flag" in answer.status["grpc-message"]
    assert not readable(frontend, 0.1)


def test_corrupt_compressed_data_is_internal(frontend: Any, h2: RawH2) -> None:
    truncated = gzip.compress(b"abc" * 1000)[:-9]
    stream = h2.request(f"/{SERVICE}/Say", grpc_frame(truncated, compressed=True),
                        headers=(("grpc-encoding", "gzip"),))
    answer = h2.answer(stream)
    assert answer.status["grpc-status"] == "13"
    assert "could not decompress a gzip message" in answer.status["grpc-message"]


# -- deadlines ----------------------------------------------------------------------------


def test_deadline_answers_deadline_exceeded_and_cancels_the_call(
    frontend: Any, h2: RawH2
) -> None:
    """The bare client keeps its stream open: only the server's own timer ends the call."""
    started = time.monotonic()
    stream = h2.request(f"/{SERVICE}/Say", grpc_frame(b"slow"),
                        headers=(("grpc-timeout", "300m"),))
    [(call_id, _, _, kind)] = wait_items(frontend, 1)
    assert kind == 0
    [(gone_id, method, _, kind)] = wait_items(frontend, 1, timeout=5)
    assert (gone_id, method, kind) == (call_id, "Say", 3)
    answer = h2.answer(stream)
    assert 0.25 < time.monotonic() - started < 3
    assert answer.status["grpc-status"] == "4"  # DEADLINE_EXCEEDED
    assert answer.status["grpc-message"] == "Deadline Exceeded"
    frontend.respond([(call_id, b"late", 0, "")])  # dropped
    wait_for_idle(frontend)
    assert answer.data == b""


def test_deadline_while_the_request_is_still_arriving(frontend: Any, h2: RawH2) -> None:
    stream = h2.request(f"/{SERVICE}/Say", grpc_frame(b"half")[:4], end=False,
                        headers=(("grpc-timeout", "100000u"),))
    answer = h2.answer(stream)
    assert answer.status["grpc-status"] == "4"
    assert not readable(frontend, 0.1)  # never delivered, so no cancellation either


def test_answer_before_the_deadline_is_kept(frontend: Any, channel: grpc.Channel) -> None:
    future = say(channel).future(b"quick", timeout=30)
    [(call_id, *_)] = wait_items(frontend, 1)
    frontend.respond([(call_id, b"in time", 0, "")])
    assert future.result(timeout=5) == b"in time"


@pytest.mark.parametrize("timeout", ["1x", "S", "123456789S", "-1S", "1.5S", ""])
def test_malformed_grpc_timeout_is_internal(frontend: Any, h2: RawH2, timeout: str) -> None:
    stream = h2.request(f"/{SERVICE}/Say", grpc_frame(b"x"), headers=(("grpc-timeout", timeout),))
    answer = h2.answer(stream)
    assert answer.status["grpc-status"] == "13"
    assert "malformed grpc-timeout" in answer.status["grpc-message"]
    assert not readable(frontend, 0.1)


def test_very_long_timeouts_are_no_deadline(frontend: Any, h2: RawH2) -> None:
    longest = (("grpc-timeout", "99999999H"),)  # 11,000 years
    stream = h2.request(f"/{SERVICE}/Say", grpc_frame(b"x"), headers=longest)
    [(call_id, *_)] = wait_items(frontend, 1)
    frontend.respond([(call_id, b"y", 0, "")])
    assert h2.answer(stream).trailers["grpc-status"] == "0"


# -- HTTP ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/json", "application/grpc-web", ""]
)
def test_non_grpc_content_type_is_http_415(frontend: Any, h2: RawH2, content_type: str) -> None:
    stream = h2.request(f"/{SERVICE}/Say", grpc_frame(b"x"), content_type=content_type)
    answer = h2.answer(stream)
    assert answer.headers[":status"] == "415"
    assert answer.headers["grpc-status"] == "13"
    assert not readable(frontend, 0.1)


@pytest.mark.parametrize("content_type", ["application/grpc+proto", "application/grpc;charset=x"])
def test_grpc_content_type_variants_are_accepted(
    frontend: Any, h2: RawH2, content_type: str
) -> None:
    stream = h2.request(f"/{SERVICE}/Say", grpc_frame(b"x"), content_type=content_type)
    [(call_id, *_)] = wait_items(frontend, 1)
    frontend.respond([(call_id, b"y", 0, "")])
    answer = h2.answer(stream)
    assert answer.headers[":status"] == "200"
    assert answer.trailers["grpc-status"] == "0"


# -- shutdown -----------------------------------------------------------------------------


def test_shutdown_goes_away_in_two_steps_and_refuses_later_streams(frontend: Any) -> None:
    client = RawH2(frontend.port, ack_pings=False)
    try:
        first = client.request(f"/{SERVICE}/Say", grpc_frame(b"one"))
        [(first_call, *_)] = wait_items(frontend, 1)
        frontend.shutdown()
        client.pump(lambda: bool(client.goaways and client.pings))
        assert client.goaways == [(2**31 - 1, 0)]  # the notice: NO_ERROR, "any stream"
        # Until the final GOAWAY, streams are still taken (they were on their way).
        second = client.request(f"/{SERVICE}/Say", grpc_frame(b"two"))
        [(second_call, _, message, _)] = wait_items(frontend, 1)
        assert message == b"two"
        client.ack_ping(client.pings[0])  # one round trip: now the final GOAWAY
        client.pump(lambda: len(client.goaways) == 2)
        assert client.goaways[1] == (second, 0)
        third = client.request(f"/{SERVICE}/Say", grpc_frame(b"three"))
        assert client.answer(third).reset == REFUSED_STREAM  # safe to retry elsewhere
        assert not readable(frontend, 0.1)  # never delivered
        frontend.respond([(first_call, b"ONE", 0, ""), (second_call, b"TWO", 0, "")])
        for stream, expected in ((first, b"ONE"), (second, b"TWO")):
            answer = client.answer(stream)
            assert grpc_messages(answer.data) == [(0, expected)]
            assert answer.trailers["grpc-status"] == "0"
        client.pump(lambda: client.closed)  # every call done: the server closes
    finally:
        client.close()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", frontend.port), 1):
        pass  # no longer accepting


def test_a_finished_connection_closes_without_a_reset(frontend: Any) -> None:
    """Once every call is answered after the final GOAWAY, the server half-closes and reads
    what the client still sends: closing at once would answer it with RST, which may destroy
    answers the client has not read yet."""
    client = RawH2(frontend.port)
    try:
        stream = client.request(f"/{SERVICE}/Say", grpc_frame(b"one"))
        [(call_id, *_)] = wait_items(frontend, 1)
        frontend.shutdown()
        client.pump(lambda: len(client.goaways) == 2)
        frontend.respond([(call_id, b"ONE", 0, "")])
        assert grpc_messages(client.answer(stream).data) == [(0, b"ONE")]
        time.sleep(0.2)  # the server has finished the connection
        client.sock.sendall(PingFrame(0, b"late one").serialize())  # a frame after that
        client.pump(lambda: client.closed)  # FIN, not ECONNRESET
    finally:
        client.close()


def test_final_goaway_comes_without_a_ping_ack(frontend: Any) -> None:
    client = RawH2(frontend.port, ack_pings=False)
    try:
        stream = client.request(f"/{SERVICE}/Say", grpc_frame(b"one"))
        [(call_id, *_)] = wait_items(frontend, 1)
        started = time.monotonic()
        frontend.shutdown()
        client.pump(lambda: len(client.goaways) == 2, timeout=5)
        assert 0.5 < time.monotonic() - started < 3  # the 1 s fallback
        assert client.goaways == [(2**31 - 1, 0), (stream, 0)]
        frontend.respond([(call_id, b"ok", 0, "")])
        assert client.answer(stream).trailers["grpc-status"] == "0"
    finally:
        client.close()


def test_calls_in_flight_at_shutdown_are_answered(frontend: Any, channel: grpc.Channel) -> None:
    futures = [say(channel).future(f"m{i}".encode(), timeout=10) for i in range(20)]
    items = wait_items(frontend, 20)
    frontend.shutdown()
    time.sleep(0.2)  # both GOAWAYs are out
    frontend.respond([(call_id, message.upper(), 0, "") for call_id, _, message, _ in items])
    assert sorted(f.result(timeout=5) for f in futures) == sorted(
        f"M{i}".encode() for i in range(20)
    )
    with pytest.raises(grpc.RpcError) as info:  # a new call has nowhere to go
        say(channel)(b"late", timeout=2)
    assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


# -- services -----------------------------------------------------------------------------

HEALTH = "grpc.health.v1.Health"


@pytest.fixture
def multi() -> Iterator[Any]:
    fe = _native.GrpcFrontend(
        "127.0.0.1", 0, LIMIT, service=SERVICE, extra_services=[HEALTH, "other.Service"],
        streaming_methods=["Chat", f"{HEALTH}/Watch"],
    )
    fe.start()
    yield fe
    fe.stop(1.0)


def test_extra_services_are_routed_with_their_name(multi: Any) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{multi.port}") as channel:
        check = channel.unary_unary(f"/{HEALTH}/Check").future(b"c", timeout=10)
        other = channel.unary_unary("/other.Service/Do").future(b"o", timeout=10)
        primary = say(channel).future(b"p", timeout=10)
        items = {message: (call_id, method, kind) for call_id, method, message, kind
                 in wait_items(multi, 3)}
        assert {m: (method, kind) for m, (_, method, kind) in items.items()} == {
            b"c": (f"{HEALTH}/Check", 0), b"o": ("other.Service/Do", 0), b"p": ("Say", 0),
        }
        multi.respond([(call_id, m.upper(), 0, "") for m, (call_id, _, _) in items.items()])
        assert (check.result(5), other.result(5), primary.result(5)) == (b"C", b"O", b"P")


def test_server_streaming_method_sends_after_the_half_close(multi: Any) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{multi.port}") as channel:
        watch = channel.unary_stream(f"/{HEALTH}/Watch")(b"w", timeout=10)
        items = wait_items(multi, 2)
        assert [(method, m, k) for _, method, m, k in items] == [
            (f"{HEALTH}/Watch", b"w", 1), (f"{HEALTH}/Watch", b"", 2)
        ]
        call_id = items[0][0]
        multi.send_stream([(call_id, b"SERVING")])
        assert next(watch) == b"SERVING"
        multi.send_stream([(call_id, b"NOT_SERVING")])
        assert next(watch) == b"NOT_SERVING"
        multi.respond([(call_id, None, 0, "")])
        assert list(watch) == []
        assert watch.code() is grpc.StatusCode.OK


@pytest.mark.parametrize(
    "path", [f"/{HEALTH}x/Check", f"/{HEALTH}/Check/more", f"/{HEALTH}/", "/Check", "//Check"]
)
def test_unknown_services_stay_unimplemented(multi: Any, path: str) -> None:
    with (
        grpc.insecure_channel(f"127.0.0.1:{multi.port}") as channel,
        pytest.raises(grpc.RpcError) as info,
    ):
        channel.unary_unary(path)(b"x", timeout=5)
    assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED
    assert f"this server implements {SERVICE}, {HEALTH}, other.Service" in str(
        info.value.details()
    )
    assert not readable(multi, 0.1)


def test_service_names_are_checked() -> None:
    with pytest.raises(ValueError, match="without '/'"):
        _native.GrpcFrontend("127.0.0.1", 0, LIMIT, service="a/b")
    with pytest.raises(ValueError, match="extra_services"):
        _native.GrpcFrontend("127.0.0.1", 0, LIMIT, service=SERVICE, extra_services=[SERVICE])


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


def wait_for_idle(fe: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while fe.active_calls() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fe.active_calls() == 0


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
