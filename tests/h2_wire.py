"""A bare HTTP/2 client for abusing a gRPC server on purpose: it sends exactly the frames a test
builds (rapid resets, endless CONTINUATION, PING floods, stalled messages, zero windows), never
acknowledges a PING unless told, and tracks the send windows the server grants it."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from hpack import Decoder, Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
ENHANCE_YOUR_CALM = 0xB
CANCEL = 0x8
DEFAULT_WINDOW = 65_535


def grpc_frame(message: bytes) -> bytes:
    return b"\x00" + len(message).to_bytes(4, "big") + message


def grpc_prefix(size: int) -> bytes:
    """The 5-byte prefix of a message of `size` bytes (the bytes themselves may never come)."""
    return b"\x00" + size.to_bytes(4, "big")


@dataclass
class Stream:
    headers: dict[str, str] = field(default_factory=dict)
    trailers: dict[str, str] = field(default_factory=dict)
    data: bytes = b""
    reset: int | None = None
    ended: bool = False

    @property
    def status(self) -> dict[str, str]:
        return self.trailers or self.headers


class Wire:
    """One HTTP/2 connection. `settings`: our SETTINGS (e.g. {INITIAL_WINDOW_SIZE: 0} for a
    client that reads nothing); `ack_pings`: answer the server's PINGs. close_all() closes every
    one still open (a test fixture calls it)."""

    opened: list[Wire] = []

    def __init__(
        self, port: int, settings: dict[int, int] | None = None, ack_pings: bool = True,
        timeout: float = 10.0,
    ) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        Wire.opened.append(self)
        self.encoder, self.decoder = Encoder(), Decoder()
        self.ack_pings = ack_pings
        self.streams: dict[int, Stream] = {}
        self.goaways: list[tuple[int, int, bytes]] = []  # (last stream id, error code, debug)
        self.pings: list[bytes] = []  # opaque data of the server's PINGs
        self.window_updates = 0
        self.closed = False
        self.send_window = DEFAULT_WINDOW  # the connection's, for our DATA
        self.stream_window_initial = DEFAULT_WINDOW
        self.stream_windows: dict[int, int] = {}
        self._settings_seen = False
        self._buffer = b""
        self.next_stream = 1
        self.sock.sendall(PREFACE + SettingsFrame(0, settings=settings or {}).serialize())

    # -- sending ------------------------------------------------------------------------

    def send(self, *frames: Frame) -> None:
        self.sock.sendall(b"".join(f.serialize() for f in frames))

    def headers(
        self, path: str = "/test.Echo/Say", extra: Sequence[tuple[str, str]] = (),
        end_stream: bool = False, end_headers: bool = True,
    ) -> tuple[int, HeadersFrame]:
        """A request HEADERS frame on a new stream (not sent)."""
        stream_id = self.next_stream
        self.next_stream += 2
        block = [(":method", "POST"), (":scheme", "http"), (":path", path),
                 (":authority", "localhost"), ("content-type", "application/grpc"),
                 ("te", "trailers"), *extra]
        flags = (["END_HEADERS"] if end_headers else []) + (["END_STREAM"] if end_stream else [])
        self.streams[stream_id] = Stream()
        self.stream_windows[stream_id] = self.stream_window_initial
        return stream_id, HeadersFrame(stream_id, self.encoder.encode(block), flags=flags)

    def data(self, stream_id: int, payload: bytes, end_stream: bool = False) -> list[Frame]:
        """DATA frames (16 KiB each) for `payload`, counted against our send windows."""
        pieces = [payload[i : i + 16384] for i in range(0, len(payload), 16384)] or [b""]
        frames: list[Frame] = [DataFrame(stream_id, piece) for piece in pieces]
        if end_stream:
            frames[-1].flags.add("END_STREAM")
        self.send_window -= len(payload)
        self.stream_windows[stream_id] -= len(payload)
        return frames

    def call(self, message: bytes, path: str = "/test.Echo/Say") -> int:
        """A whole unary call, sent."""
        stream_id, frame = self.headers(path)
        self.send(frame, *self.data(stream_id, grpc_frame(message), end_stream=True))
        return stream_id

    def can_send(self, stream_id: int, size: int) -> bool:
        return self.send_window >= size and self.stream_windows[stream_id] >= size

    def rst(self, stream_id: int, code: int = CANCEL) -> RstStreamFrame:
        return RstStreamFrame(stream_id, error_code=code)

    def continuation(self, stream_id: int, block: bytes, end: bool = False) -> ContinuationFrame:
        return ContinuationFrame(stream_id, block, flags=["END_HEADERS"] if end else [])

    def ping(self, opaque: bytes = b"12345678") -> PingFrame:
        return PingFrame(0, opaque)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    @classmethod
    def close_all(cls) -> None:
        for wire in cls.opened:
            wire.close()
        cls.opened.clear()

    # -- receiving ----------------------------------------------------------------------

    def pump(self, done: Callable[[], bool], timeout: float = 10.0) -> bool:
        """Reads frames until `done()` or the server closed; False on timeout."""
        deadline = time.monotonic() + timeout
        while not done() and not self.closed:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(1 << 20)
            except TimeoutError:
                return False
            except (ConnectionResetError, BrokenPipeError):
                chunk = b""
            if not chunk:
                self.closed = True
                break
            self._buffer += chunk
            self._parse()
        return done() or self.closed

    def settle(self, seconds: float) -> None:
        """Reads whatever the server sends for `seconds`."""
        self.pump(lambda: False, seconds)

    def wait_closed(self, timeout: float = 10.0) -> bool:
        return self.pump(lambda: self.closed, timeout) and self.closed

    def answer(self, stream_id: int, timeout: float = 10.0) -> Stream:
        assert self.pump(lambda: self.streams[stream_id].ended, timeout), "no answer in time"
        return self.streams[stream_id]

    def _parse(self) -> None:
        while len(self._buffer) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(self._buffer[:9]))
            if len(self._buffer) < 9 + length:
                return
            frame.parse_body(memoryview(self._buffer[9 : 9 + length]))
            self._buffer = self._buffer[9 + length :]
            self._on_frame(frame)

    def _reply(self, data: bytes) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(data)

    def _on_frame(self, frame: Frame) -> None:
        if isinstance(frame, SettingsFrame):
            if "ACK" not in frame.flags:
                initial = frame.settings.get(SettingsFrame.INITIAL_WINDOW_SIZE)
                if initial is not None:
                    delta = initial - self.stream_window_initial
                    self.stream_window_initial = initial
                    for stream_id in self.stream_windows:
                        self.stream_windows[stream_id] += delta
                self._reply(SettingsFrame(0, flags=["ACK"]).serialize())
                self._settings_seen = True
        elif isinstance(frame, WindowUpdateFrame):
            self.window_updates += 1
            if frame.stream_id == 0:
                self.send_window += frame.window_increment
            elif frame.stream_id in self.stream_windows:
                self.stream_windows[frame.stream_id] += frame.window_increment
        elif isinstance(frame, PingFrame) and "ACK" not in frame.flags:
            self.pings.append(frame.opaque_data)
            if self.ack_pings:
                self._reply(PingFrame(0, frame.opaque_data, flags=["ACK"]).serialize())
        elif isinstance(frame, GoAwayFrame):
            self.goaways.append((frame.last_stream_id, frame.error_code, frame.additional_data))
        elif isinstance(frame, HeadersFrame) and frame.stream_id in self.streams:
            stream = self.streams[frame.stream_id]
            block = {k: v for k, v in self.decoder.decode(frame.data)}
            if stream.headers:
                stream.trailers = block
            else:
                stream.headers = block
            stream.ended = stream.ended or "END_STREAM" in frame.flags
        elif isinstance(frame, DataFrame) and frame.stream_id in self.streams:
            stream = self.streams[frame.stream_id]
            stream.data += frame.data
            stream.ended = stream.ended or "END_STREAM" in frame.flags
        elif isinstance(frame, RstStreamFrame) and frame.stream_id in self.streams:
            stream = self.streams[frame.stream_id]
            stream.reset, stream.ended = frame.error_code, True
