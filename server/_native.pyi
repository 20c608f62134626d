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

class GrpcKeepalive:
    """Keepalive and PING policy of every connection of a ``GrpcFrontend``: Triton's
    ``--grpc-keepalive-*`` / ``--grpc-http2-*`` flags with grpc-core's server semantics.

    A PING ``time_ms`` after the client was last heard from (only while calls are open unless
    ``permit_without_calls``; at most ``max_pings_without_data`` of them without HEADERS or DATA
    sent in between, 0: any number); no answer within ``timeout_ms`` closes the connection.
    A client PING sooner than ``min_recv_ping_interval_without_data_ms`` after its previous one
    (2 hours without calls unless ``permit_without_calls``) is a strike; more than
    ``max_ping_strikes`` (0: any number) earn GOAWAY(ENHANCE_YOUR_CALM, "too_many_pings").
    ValueError for a time or timeout under 1 ms or a negative limit."""

    def __init__(
        self,
        time_ms: int = 7_200_000,
        timeout_ms: int = 20_000,
        permit_without_calls: bool = False,
        max_pings_without_data: int = 2,
        min_recv_ping_interval_without_data_ms: int = 300_000,
        max_ping_strikes: int = 2,
    ) -> None: ...
    @property
    def time_ms(self) -> int: ...
    @property
    def timeout_ms(self) -> int: ...
    @property
    def permit_without_calls(self) -> bool: ...
    @property
    def max_pings_without_data(self) -> int: ...
    @property
    def min_recv_ping_interval_without_data_ms(self) -> int: ...
    @property
    def max_ping_strikes(self) -> int: ...

class GrpcFrontend:
    """A gRPC server transport (HTTP/2 on nghttp2, cleartext or TLS) on its own I/O thread.

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
        metadata_prefixes: Sequence[str] = (),
        server_cert: str = "",
        server_key: str = "",
        root_cert: str = "",
        mutual: bool = False,
        tls_handshake_timeout_s: float = 10.0,
        reuse_port: bool = False,
        max_connections: int = 10_000,
        max_buffered_bytes: int = 0,
        max_connection_buffered_bytes: int = 0,
        keepalive: GrpcKeepalive = ...,
        io_threads: int = 1,
    ) -> None:
        """Configure; nothing is opened until ``start()``. ValueError for a port outside
        0..65535, a zero ``max_message_bytes`` or a service name with a '/'. Calls to paths
        other than ``/<service>/<method>`` and ``/<extra service>/<method>`` are answered
        UNIMPLEMENTED natively. ``streaming_methods`` (named as ``take()`` names them) are
        delivered message by message then half-closed, whatever their streaming kind.

        Request headers whose names start with one of ``metadata_prefixes`` (e.g.
        "triton-grpc-protocol-") reach ``take()`` with the call's first item; a call with more
        than 64 of them or 8 KiB in all is answered RESOURCE_EXHAUSTED natively.

        TLS: with ``server_cert`` and ``server_key`` (PEM files; the key not encrypted) every
        connection is TLS 1.2 or later, negotiated without blocking on the I/O thread; a
        client must offer ALPN "h2" and finish its handshake within ``tls_handshake_timeout_s``
        (0 < s <= 3600), else it is disconnected. ``mutual`` also requires a client
        certificate that chains to ``root_cert``. ValueError when a file does not load (naming
        it and OpenSSL's reason) or the arguments disagree (a key without a certificate,
        ``mutual`` without a root).

        ``io_threads`` (1..64): I/O threads, each with its own listener on the port
        (SO_REUSEPORT, so the kernel spreads the connections), epoll loop and connections;
        ``take()`` drains them all, ``respond()`` routes each answer to its call's thread.
        ``max_connections`` is shared out among them; each keeps the whole byte budget.

        Limits: ``reuse_port`` sets SO_REUSEPORT (other processes may bind the port too).
        Connections beyond ``max_connections`` (0: no limit) are closed at once with
        GOAWAY(ENHANCE_YOUR_CALM, "too many connections"). Request bytes held for ``take()``
        (messages arriving, complete ones not taken) are bounded in all by
        ``max_buffered_bytes`` and per connection by ``max_connection_buffered_bytes`` (0:
        4x / 2x ``max_message_bytes``, at least 256 / 16 MiB); beyond them a connection is
        not read until ``take()`` drains (a connection holding under 1 MiB is always read).
        Flow-control windows are given back as ``take()`` takes the bytes, so a client sending
        faster than the application takes calls is stopped by them. ``keepalive``: the PING
        policy (default: Triton's)."""

    def start(self) -> None:
        """Bind (SO_REUSEADDR; SO_REUSEPORT with ``reuse_port``), listen and start the I/O
        thread. OSError when the address cannot be bound; RuntimeError when called twice."""

    @property
    def port(self) -> int:
        """The bound port after ``start()`` (useful with port 0), the configured one before."""

    def fileno(self) -> int:
        """An eventfd that is readable while ready items wait; ``take()`` resets it."""

    def take(
        self,
    ) -> list[tuple[int, str, bytes, int, tuple[tuple[str, str], ...] | None]]:
        """Drain the ready items, without blocking: ``(call_id, method, message, kind,
        metadata)``.

        ``method`` is the RPC name without the service for the primary service
        ("ModelInfer"), ``"<service>/<method>"`` for an extra one
        ("grpc.health.v1.Health/Check"). ``kind``: 0 a unary request (answer with
        ``respond()``); 1 one message of a streaming call; 2 the client of a streaming call
        half-closed (finish it with ``respond()`` once answered; ``send_stream()`` still works
        until then); 3 the call is gone (client reset or disconnected, its grpc-timeout passed,
        or failed in the transport): forget it, responses to it are dropped. ``message`` is
        empty for kinds 2 and 3. ``metadata``: on a call's first item (whatever its kind but
        3), the request headers named by ``metadata_prefixes``, ``((name, value), ...)`` as
        latin-1 str in arrival order, ``()`` when none; None on every later item, so a stream
        item whose call is unknown and whose metadata is None belongs to a call already
        answered.
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

    def failure(self) -> str | None:
        """Why the I/O thread stopped on its own (an exception escaped its loop, epoll
        failed; ``fileno()`` turns readable when it does), or None. After a failure nothing is
        served: the application should exit."""

    def stats(self) -> dict[str, int]:
        """As of the I/O thread's last turn: ``connections`` (open, closing included),
        ``paused_connections`` (not read until ``take()`` drains them), ``buffered_bytes``
        (request bytes held for ``take()``)."""

    def inject_failure(self, message: str) -> None:
        """For tests: the I/O thread fails with ``message`` on its next turn."""

_Item: TypeAlias = tuple[int, str, bytes, int, tuple[tuple[str, str], ...] | None]
_Tensor: TypeAlias = tuple[str, str, Sequence[int], int]

class InferChunk:
    """ModelInfer calls to one model version, answered by the native request path: their
    inputs coalesced row-wise, one buffer per model input (server/grpc/native_path.py)."""

    @property
    def token(self) -> int:
        """The registration token of the model version (``InferRouter.set_models``)."""

    @property
    def count(self) -> int:
        """How many calls (requests) the chunk holds."""

    @property
    def rows(self) -> int:
        """Rows in all (the batch dimension; 1 per call for a model without batching)."""

    @property
    def call_ids(self) -> list[int]: ...
    @property
    def inputs(self) -> list[bytes]:
        """One buffer per model input (the model's order): every call's rows, in call order."""

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        """The shape of each input buffer."""

    @property
    def outputs(self) -> list[int]:
        """Indexes of the model outputs some call asked for (the model's order)."""

    def messages(self) -> list[tuple[int, bytes]]:
        """Each call's ModelInferRequest message, for the Python path."""

class InferRouter:
    """Plans the native request path: ``take()`` parses plain ModelInfer requests to
    registered model versions (C++, GIL released) and coalesces them into ``InferChunk``s;
    ``respond()`` cuts the batched outputs into each call's ModelInferResponse.
    Reference: ``tests/native_reference.py`` (``plain_request``, ``infer_response``)."""

    def __init__(self) -> None: ...
    def set_models(
        self,
        models: Sequence[
            tuple[int, str, str, Sequence[str], int, int, Sequence[_Tensor], Sequence[_Tensor]]
        ],
    ) -> None:
        """Replace the registered versions: ``(token, name, version, keys, max_batch_size,
        max_request_bytes, inputs, outputs)``, each tensor ``(name, datatype, dims without the
        batch dimension, itemsize)``. A request's model_version is looked up in ``keys``
        (``""`` stands for an empty model_version and ``"-1"``)."""

    def take(self, frontend: GrpcFrontend) -> tuple[list[_Item], list[InferChunk]]:
        """``frontend.take()``, with the plain ModelInfer calls to registered versions taken
        out as chunks (at most max_batch_size rows, one non-batch shape, each)."""

    def respond(
        self,
        frontend: GrpcFrontend,
        chunk: InferChunk,
        outputs: Sequence[Buffer | np.ndarray[Any, Any] | None],
    ) -> None:
        """Answer every call of ``chunk`` from the batched outputs: one C-contiguous buffer per
        model output in its wire datatype, None where ``chunk.outputs`` lacks it. ValueError
        when an output has the wrong element size or row count."""

    @staticmethod
    def fail(frontend: GrpcFrontend, chunk: InferChunk, status: int, message: str) -> None:
        """Answer every call of ``chunk`` with a gRPC error status and message."""

    def stats(self) -> dict[str, int]:
        """``calls`` and ``chunks`` planned natively so far."""

def plain_infer_request(
    message: bytes,
) -> tuple[str, str, str, list[tuple[str, str, tuple[int, ...]]], list[str], list[bytes]] | None:
    """The native request path's ModelInferRequest reader (for tests): None unless the
    message parses and is plain (no parameters, no typed contents), else ``(model_name,
    model_version, id, inputs, outputs, raw_input_contents)``."""

def infer_response(
    model_name: str,
    model_version: str,
    id: str,
    outputs: Sequence[tuple[str, str, Sequence[int], bytes]],
) -> bytes:
    """The native request path's ModelInferResponse writer (for tests): raw outputs
    ``(name, datatype, shape, bytes)``, as upb serializes the message."""
