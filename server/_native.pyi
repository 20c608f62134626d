"""C++ hot paths for Tachyon (``native/``): BYTES (de)serialization and the gRPC front end.

Every function takes a whole batch per call, accepts any object exposing the buffer protocol
(bytes, bytearray, memoryview, numpy arrays; read-only buffers are fine), copies with the GIL
released once a call moves at least ``GIL_RELEASE_THRESHOLD`` bytes, and keeps no reference to
its arguments after it returns. Reference implementations: ``tests/native_reference.py``.
"""

from collections.abc import Iterable, Sequence
from typing import Any, Final, TypeAlias

import numpy as np
from typing_extensions import Buffer

GIL_RELEASE_THRESHOLD: Final[int]
"""Byte count from which a call releases the GIL around its copy loop (65536)."""

HAVE_GRPC_FRONTEND: Final[bool]
"""Whether this build has ``GrpcFrontend`` (nghttp2 was found when it was compiled)."""

_BytesElement: TypeAlias = bytes | bytearray | memoryview | str | Buffer

def encode_bytes(items: Iterable[_BytesElement] | np.ndarray[Any, Any]) -> bytes:
    """Serialize a KServe v2 / Triton BYTES tensor.

    Per element: a 4-byte little-endian uint32 length, then the bytes (str as UTF-8, other
    buffers as their raw bytes). ``items`` may be any iterable; a numpy array (object,
    ``bytes_`` or ``str_`` dtype, any shape) is flattened in C order first.

    Raises:
        TypeError: an element is neither str nor a buffer, or ``items`` is a single
            bytes/bytearray/memoryview/str object.
        UnicodeEncodeError: a str cannot be encoded as UTF-8 (lone surrogates).
        ValueError: an element exceeds 4294967295 bytes.
    """

def decode_bytes(buf: Buffer, count: int = -1) -> list[bytes]:
    """Parse a KServe v2 / Triton BYTES tensor into its elements.

    Exactly ``count`` elements are parsed; ``count=-1`` parses as many as the buffer holds
    (which must then end on an element boundary).

    Raises:
        ValueError: with a message naming the element, offset and sizes, when a length prefix
            is cut short ("element 1 needs a 4-byte length prefix at offset 6 but only 2 bytes
            remain"), overruns the buffer ("element 3 declares 100 bytes at offset 16 but only
            5 remain"), the buffer holds fewer elements ("expected 3 elements but only 2 fit in
            10 bytes") or more bytes ("3 trailing bytes after 2 elements"), or count < -1.
    """

def bytes_sizes(buf: Buffer) -> int:
    """Number of elements in a BYTES tensor buffer, without creating them.

    Raises ValueError exactly as ``decode_bytes(buf, -1)`` does.
    """

class GrpcFrontend:
    """A gRPC server transport (cleartext HTTP/2 on nghttp2) on its own I/O thread.

    Only present when ``HAVE_GRPC_FRONTEND``. The I/O thread accepts connections, reads whole
    calls and queues them as ready items, announced on ``fileno()``; the application drains
    them with ``take()`` and answers many calls per ``respond()`` / ``send_stream()``, which
    queue the responses and wake the I/O thread to write them.

    Natively, never delivered: gzip / deflate request messages are inflated (never beyond
    ``max_message_bytes``) and answers compressed alike when the client accepts it; messages
    above ``max_message_bytes`` (RESOURCE_EXHAUSTED, "Received message larger than max (N vs.
    M)"), an unknown grpc-encoding (UNIMPLEMENTED), a compressed flag without one (INTERNAL),
    a malformed grpc-timeout (INTERNAL), a non-gRPC content-type (HTTP 415) and malformed
    framing are answered here. A call whose grpc-timeout passes before its answer gets
    DEADLINE_EXCEEDED and is handed over as kind 3 (cancelled).
    No call keeps a Python object past its return; copies of 64 KiB or more release the GIL.
    """

    def __init__(
        self,
        host: str,
        port: int,
        max_message_bytes: int,
        service: str = "inference.GRPCInferenceService",
        streaming_methods: Sequence[str] = ("ModelStreamInfer",),
        extra_services: Sequence[str] = (),
    ) -> None:
        """Configure; nothing is opened until ``start()``. ValueError for a port outside
        0..65535, a zero ``max_message_bytes`` or a service name with a '/'. Calls to paths
        other than ``/<service>/<method>`` and ``/<extra service>/<method>`` are answered
        UNIMPLEMENTED natively. ``streaming_methods`` (named as ``take()`` names them) are
        delivered message by message then half-closed, whatever their streaming kind."""

    def start(self) -> None:
        """Bind (SO_REUSEADDR, SO_REUSEPORT), listen and start the I/O thread. OSError when
        the address cannot be bound; RuntimeError when called twice."""

    @property
    def port(self) -> int:
        """The bound port after ``start()`` (useful with port 0), the configured one before."""

    def fileno(self) -> int:
        """An eventfd that is readable while ready items wait; ``take()`` resets it."""

    def take(self) -> list[tuple[int, str, bytes, int]]:
        """Drain the ready items, without blocking: ``(call_id, method, message, kind)``.

        ``method`` is the RPC name without the service for the primary service
        ("ModelInfer"), ``"<service>/<method>"`` for an extra one
        ("grpc.health.v1.Health/Check"). ``kind``: 0 a unary request (answer with
        ``respond()``); 1 one message of a streaming call; 2 the client of a streaming call
        half-closed (finish it with ``respond()`` once answered; ``send_stream()`` still works
        until then); 3 the call is gone (client reset or disconnected, its grpc-timeout passed,
        or failed in the transport): forget it, responses to it are dropped. ``message`` is
        empty for kinds 2 and 3.
        """

    def respond(self, items: Sequence[tuple[int, bytes | None, int, str]]) -> None:
        """Finish calls: ``(call_id, message or None, status, status_message)`` each.

        Status 0: HEADERS, the message (if any), then trailers ``grpc-status: 0``. Status != 0:
        trailers-only with the percent-encoded ``grpc-message`` (the message is ignored). On a
        streaming call the message follows the ones sent with ``send_stream()``. Calls that
        are unknown, finished or whose client went away are dropped silently. TypeError /
        ValueError for malformed items (status outside 0..16, message not bytes).
        """

    def send_stream(self, items: Sequence[tuple[int, bytes]]) -> None:
        """Send ``(call_id, message)`` on streaming calls, keeping them open."""

    def shutdown(self) -> None:
        """Stop accepting, then shut every connection down in two steps: GOAWAY with the last
        stream id 2^31-1 and a PING; once the PING is acknowledged (at most 1 s), GOAWAY with
        the real last stream id. Started calls go on; streams opened after the final GOAWAY
        get RST_STREAM(REFUSED_STREAM). Non-blocking."""

    def stop(self, grace_s: float = 0.0) -> None:
        """``shutdown()``, wait up to ``grace_s`` seconds for the open calls to finish and
        flush, then close every socket and join the I/O thread. Blocks (GIL released);
        idempotent; also run, without grace, when the object is destroyed."""

    def active_calls(self) -> int:
        """Calls whose HTTP/2 stream is open (received and not yet closed)."""
