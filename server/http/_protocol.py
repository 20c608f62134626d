"""uvicorn's httptools protocol with the two bounds on a request head that it lacks.

uvicorn times out idle keep-alive connections (`timeout_keep_alive`) but nothing else: a client
that connects and sends nothing, or trickles its headers a byte at a time (slowloris), holds its
connection forever, and httptools keeps every header it is sent. Here a request head (request
line and headers) must be complete within `head_timeout` seconds of the connection or of the
request's first byte (else 408 and close), and at most `max_head_bytes` long (else 431 and close).
The rest, bodies included, is uvicorn's.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

HEAD_TIMEOUT = 30.0
"""Seconds a request head may take (nginx's client_header_timeout is 60)."""
MAX_HEAD_BYTES = 64 * 1024
"""Request line and headers, names and values (h11's default bound is 16 KiB)."""


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    head_timeout = HEAD_TIMEOUT
    max_head_bytes = MAX_HEAD_BYTES

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self._head_too_large = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()  # a connection that sends nothing is timed too

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        if self._head_timer is None:
            self._arm()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value))
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def send_400_response(self, msg: str) -> None:
        if not self._head_too_large:
            super().send_400_response(msg)
            return
        self._reply(431, "Request Header Fields Too Large",
                    f"the request line and headers exceed {self.max_head_bytes} bytes")

    def _count(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self.max_head_bytes:
            self._head_too_large = True
            raise ValueError("request head too large")  # httptools stops; send_400_response

    def _arm(self) -> None:
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self._reply(408, "Request Timeout",
                        f"the request head did not arrive within {self.head_timeout:g} s")

    def _reply(self, status: int, reason: str, text: str) -> None:
        body = text.encode()
        head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
        self.transport.write(head.encode() + body)
        self.transport.close()


def bounded_protocol(
    head_timeout: float = HEAD_TIMEOUT, max_head_bytes: int = MAX_HEAD_BYTES
) -> type[BoundedHttpToolsProtocol]:
    """The protocol class for uvicorn.Config(http=...), with these bounds."""
    return type("BoundedHttpToolsProtocol", (BoundedHttpToolsProtocol,),
                {"head_timeout": head_timeout, "max_head_bytes": max_head_bytes})
