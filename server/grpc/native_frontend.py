"""The native gRPC front end: HTTP/2 and gRPC framing in C++, the RPCs in Python.

`server._native.GrpcFrontend` runs one I/O thread (epoll + nghttp2) that accepts connections,
reads whole calls and writes responses; Python is touched once per group of calls, not per
frame. The RPCs themselves are `GrpcService`'s, as with the grpc.aio front end, so both answer
alike; only the transport differs.

Flow per event-loop iteration:

- The I/O thread queues complete calls and makes an eventfd readable. `_on_ready` (a loop
  reader on that eventfd) drains every waiting call with one `take()`; `take()` also resets the
  eventfd, under the same lock the I/O thread signals under, so `_on_ready` never reads it.
- Each call runs as a task; ModelInfer's is created directly with no dispatch in between.
  With the native request path (server/grpc/native_path.py, on unless
  --grpc-native-request-path false, tracing, --log-verbose or a restricted ModelInfer), `take()`
  goes through an InferRouter: plain ModelInfer calls to fixed-size tensor models never become
  items here, they arrive coalesced in chunks, one task per chunk, answered by C++.
- With --grpc-io-threads N the C++ side runs N I/O threads (one listener each on the port);
  `take()` drains them all through the one eventfd.
- Finished answers are appended to a list, flushed with one `respond()` (and one
  `send_stream()` for stream messages) per loop iteration by a `call_soon` callback.

Request metadata: the C++ side keeps a call's `triton-grpc-protocol-*` headers (bounded: 64 of
them, 8 KiB in all, beyond which it refuses the call) and hands them over with the call's first
item only. With `--grpc-restricted-protocol`, `_on_ready` checks a call to a restricted group
against them before anything is parsed or run, and answers UNAVAILABLE with Triton's message
(server/grpc/restricted.py maps methods to restrictions; server/restricted.py compares). A
refused stream's later items (metadata None, no state here) are dropped. TLS (`tls_settings`)
is done wholly on the C++ side, in its I/O thread.

The C++ side answers by itself, and never delivers: gzip / deflate messages (it inflates them,
bounded by the message limit, and compresses the answers when the client accepts it), oversized
messages, unknown encodings, malformed framing, non-gRPC content types (HTTP 415), unknown
services, and calls whose grpc-timeout passed (DEADLINE_EXCEEDED; the call's task here is
cancelled, which takes its request out of the batcher's queue).

More services than the inference one are served by registering handlers before `serve()`:

    server = NativeGrpcServer(dataplane)
    server.add_unary("grpc.health.v1.Health/Check", health.Check, HealthCheckRequest.FromString)
    server.add_stream("grpc.health.v1.Health/Watch", health.Watch,
                      HealthCheckRequest.FromString, client_streaming=False)
    server.serve(host, port, max_message)

A method is named "<package.Service>/<Method>"; `serve()` tells the C++ side which services and
streaming methods exist, and any other service stays UNIMPLEMENTED there. Handlers have grpc.aio
servicer signatures, with None for the context: a unary handler is `async (request, None) ->
response`; a stream handler is an async generator `(requests, None)` yielding responses, where
`requests` is an async iterator of the request messages, or the one request message with
`client_streaming=False` (server streaming). Requests are `parse(bytes)`; responses are protobuf
messages or bytes. Raise a ServingError for a gRPC status (its code), anything else is INTERNAL.
A stream handler may keep yielding after the client half-closed; returning ends the call OK.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from server import _native, proto
from server.config import GrpcConnections
from server.dataplane import DataPlane
from server.errors import ServingError
from server.grpc.health import HEALTH_SERVICE, REFLECTION_SERVICES, HealthService, ReflectionService
from server.grpc.native_path import NativeRequestPath
from server.grpc.restricted import by_native_method, metadata_value
from server.grpc.server import STATUS, UNIMPLEMENTED, GrpcService, parse_infer_request
from server.restricted import GRPC_HEADER_PREFIX, Restriction, Restrictions
from server.tls import TlsSettings

log = logging.getLogger(__name__)

# Kinds of ready items (see GrpcFrontend.take).
UNARY, STREAM_MESSAGE, HALF_CLOSED, CANCELLED = 0, 1, 2, 3

OK = grpc.StatusCode.OK.value[0]
UNIMPLEMENTED_CODE = grpc.StatusCode.UNIMPLEMENTED.value[0]
INTERNAL = grpc.StatusCode.INTERNAL.value[0]
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]
CODES = {code: status.value[0] for code, status in STATUS.items()}
MODEL_STREAM_INFER = "ModelStreamInfer"
INFER_STREAMING = [name for name, (_, _, cs, ss) in proto.METHODS.items() if cs or ss]

Response = tuple[int, bytes | None, int, str]
Metadata = tuple[tuple[str, str], ...]
TRACE_HEADERS = ("traceparent", "tracestate")  # W3C trace context, kept when tracing is on
Parse = Callable[[bytes], Any]
UnaryHandler = Callable[[Any, Any], Awaitable[Any]]
"""`async (request, context=None) -> response` (a protobuf message or bytes)."""
StreamHandler = Callable[[Any, Any], AsyncIterator[Any]]
"""`(requests or request, context=None)`, an async generator of responses."""
_InferHandler = Callable[[Any, Any], Coroutine[Any, Any, Any]]


def available() -> bool:
    """Whether this build of `server._native` has the native front end (nghttp2 found)."""
    return bool(getattr(_native, "HAVE_GRPC_FRONTEND", False))


@dataclass(frozen=True, slots=True)
class _UnaryMethod:
    handler: UnaryHandler
    parse: Parse


@dataclass(frozen=True, slots=True)
class _StreamMethod:
    handler: StreamHandler
    parse: Parse
    client_streaming: bool


class _BadRequest(Exception):
    """The request messages of a registered stream method are not what it takes."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


class _Stream:
    """Python-side state of one ModelStreamInfer call."""

    __slots__ = ("half_closed", "tasks")

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[None]] = set()
        self.half_closed = False


class _HandlerStream:
    """Python-side state of one call of a registered stream method: its request messages
    (None once the client half-closed) and the task running its handler."""

    __slots__ = ("queue", "task")

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None


def _serialized(response: Any) -> bytes:
    if isinstance(response, bytes):
        return response
    data: bytes = response.SerializeToString()
    return data


async def _requests(queue: asyncio.Queue[bytes | None], parse: Parse) -> AsyncIterator[Any]:
    while (message := await queue.get()) is not None:
        try:
            request = parse(message)
        except Exception:  # upb's DecodeError; grpc.aio's words for it
            raise _BadRequest(INTERNAL, "Exception deserializing request!") from None
        yield request


async def _single(requests: AsyncIterator[Any], method: str) -> Any:
    """The one request message of a server-streaming call, once the client half-closed."""
    found = [request async for request in requests]
    if len(found) != 1:
        # The C++ side's words (and code) for a unary call with the wrong message count.
        many = "no request message" if not found else "more than one request message"
        text = f"{method} takes one request message but the client sent {many}"
        raise _BadRequest(UNIMPLEMENTED_CODE, text)
    return found[0]


class NativeGrpcServer:
    """Runs GrpcService's RPCs, and the handlers registered with add_unary / add_stream, for
    the calls a GrpcFrontend receives; with `restrictions`, refuses calls to a restricted group
    that lack its header."""

    def __init__(self, dataplane: DataPlane, restrictions: Restrictions | None = None) -> None:
        self._restricted: dict[str, Restriction] = (
            by_native_method(restrictions) if restrictions else {}
        )
        self._service = GrpcService(dataplane)
        self._model_infer = self._service.ModelInfer
        self._unary: dict[str, _UnaryMethod] = {}
        for name, (request_type, _, client_stream, server_stream) in proto.METHODS.items():
            if client_stream or server_stream:
                continue  # ModelStreamInfer, handled by _stream_message
            method = getattr(self._service, name, None)
            if method is not None:
                self._unary[name] = _UnaryMethod(method, request_type.FromString)
        self._stream_methods: dict[str, _StreamMethod] = {}
        self._fe: _native.GrpcFrontend | None = None
        self._path: NativeRequestPath | None = None  # plain ModelInfer calls, natively
        self._calls: dict[int, asyncio.Task[None]] = {}  # unary calls running (strong refs)
        self._streams: dict[int, _Stream] = {}
        self._handler_streams: dict[int, _HandlerStream] = {}
        self._done: list[Response] = []
        self._stream_out: list[tuple[int, bytes]] = []
        self._flush_scheduled = False
        self.on_failure: Callable[[str], None] | None = None
        """Called once, on the event loop, should the I/O thread die (with why)."""
        self._failed = False

    # -- registration (before serve) ------------------------------------------------------

    def add_unary(self, method: str, handler: UnaryHandler, parse: Parse) -> None:
        """Serve unary `method` ("<package.Service>/<Method>") with `handler`."""
        self._check_new(method)
        self._unary[method] = _UnaryMethod(handler, parse)

    def add_stream(
        self, method: str, handler: StreamHandler, parse: Parse, *, client_streaming: bool = True
    ) -> None:
        """Serve streaming `method` with `handler`: bidirectional or client streaming by
        default; `client_streaming=False` for a server-streaming method (one request)."""
        self._check_new(method)
        self._stream_methods[method] = _StreamMethod(handler, parse, client_streaming)

    def _check_new(self, method: str) -> None:
        if self._fe is not None:
            raise RuntimeError(f"cannot add {method}: register handlers before serve()")
        service, _, name = method.partition("/")
        if not service or not name or "/" in name or service == proto.SERVICE_NAME:
            raise ValueError(
                f"method '{method}' must be '<package.Service>/<Method>' of a service other "
                f"than {proto.SERVICE_NAME}"
            )
        if method in self._unary or method in self._stream_methods:
            raise ValueError(f"method '{method}' is registered already")

    def serve(
        self, host: str, port: int, max_message: int, tls_settings: TlsSettings | None = None,
        connections: GrpcConnections | None = None,
    ) -> None:
        """Bind host:port and serve (call on the event loop's thread), over TLS with
        `tls_settings`, treating connections by `connections` (default: GrpcConnections()).
        OSError when the port cannot be bound, ValueError when a TLS file does not load."""
        c = connections or GrpcConnections()
        if self._fe is not None:
            raise RuntimeError("serve() may be called once")
        registered = (m for m in (*self._unary, *self._stream_methods) if "/" in m)
        extra = sorted({m.partition("/")[0] for m in registered})
        tls = tls_settings
        frontend = _native.GrpcFrontend(
            host, port, max_message, service=proto.SERVICE_NAME,
            streaming_methods=[*INFER_STREAMING, *self._stream_methods],
            extra_services=extra,
            # W3C trace context only when tracing is on: the hot path keeps no headers otherwise
            metadata_prefixes=[GRPC_HEADER_PREFIX, *(
                TRACE_HEADERS if self._service.dataplane.tracer is not None else ()
            )],
            server_cert="" if tls is None else str(tls.server_cert),
            server_key="" if tls is None else str(tls.server_key),
            root_cert="" if tls is None or tls.root_cert is None else str(tls.root_cert),
            mutual=tls is not None and tls.mutual,
            reuse_port=c.reuse_port,
            max_connections=c.max_connections,
            keepalive=_native.GrpcKeepalive(
                c.keepalive_time_ms, c.keepalive_timeout_ms, c.keepalive_permit_without_calls,
                c.http2_max_pings_without_data, c.http2_min_recv_ping_interval_without_data_ms,
                c.http2_max_ping_strikes,
            ),
            io_threads=self._service.dataplane.settings.grpc_io_threads,
        )
        frontend.start()
        self._fe = frontend
        self._loop = asyncio.get_running_loop()
        dataplane = self._service.dataplane
        # tracing and a restricted ModelInfer need each request's headers, and verbose logs
        # (--log-verbose) a line per request: the Python path
        if (
            dataplane.settings.grpc_native_request_path and dataplane.tracer is None
            and "ModelInfer" not in self._restricted
            and not logging.getLogger(DataPlane.__module__).isEnabledFor(logging.DEBUG)
        ):
            self._path = NativeRequestPath(dataplane, frontend, self._python_infer)
        self._loop.add_reader(frontend.fileno(), self._on_ready)

    @property
    def port(self) -> int:
        return self._frontend().port

    def active_calls(self) -> int:
        return self._frontend().active_calls()

    def failure(self) -> str | None:
        """Why the I/O thread died (nothing is served any more), or None while it runs."""
        return None if self._fe is None else self._fe.failure()

    def inject_failure(self, message: str) -> None:
        """For tests: the I/O thread fails with `message`, as if its loop had raised."""
        self._frontend().inject_failure(message)

    def stats(self) -> dict[str, int]:
        """Connections, those paused for the request byte budget, and the bytes held."""
        return self._frontend().stats()

    def request_path_stats(self) -> dict[str, int] | None:
        """The native request path's counts (calls, chunks, fallbacks), None when it is off."""
        return None if self._path is None else self._path.stats()

    def _frontend(self) -> _native.GrpcFrontend:
        if self._fe is None:
            raise RuntimeError("the native gRPC server is not serving yet (call serve())")
        return self._fe

    # -- event loop side ------------------------------------------------------------------

    def _on_ready(self) -> None:
        assert self._fe is not None
        if not self._failed and (failure := self._fe.failure()) is not None:
            self._io_failed(failure)
        create_task = self._loop.create_task
        calls = self._calls
        infer = self._infer
        restricted = self._restricted
        items = self._fe.take() if self._path is None else self._path.take()
        for call_id, method, message, kind, metadata in items:
            if restricted and metadata is not None and self._refused(call_id, method, metadata):
                continue
            if kind == UNARY:
                if method == "ModelInfer":
                    calls[call_id] = create_task(infer(call_id, message, metadata))
                else:
                    self._start_unary(call_id, method, message)
            elif kind == CANCELLED:
                self._cancelled(call_id)
            elif method == MODEL_STREAM_INFER:
                if kind == STREAM_MESSAGE:
                    self._stream_message(call_id, message, metadata is not None)
                else:
                    self._half_closed(call_id, metadata is not None)
            else:
                request = message if kind == STREAM_MESSAGE else None
                self._handler_stream_item(call_id, method, request, metadata is not None)

    def _io_failed(self, failure: str) -> None:
        """The I/O thread died (its eventfd turned readable for it): nothing arrives or leaves
        any more. Its last items (the calls it cancelled) are still taken by _on_ready."""
        assert self._fe is not None
        self._failed = True
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self._fe.fileno())
        log.critical("gRPC (native front end): the I/O thread failed: %s", failure)
        if self.on_failure is not None:
            self.on_failure(failure)

    def _refused(self, call_id: int, method: str, metadata: Metadata) -> bool:
        """Answers a call to a restricted group without its header UNAVAILABLE (Triton's code
        and message), before anything runs; False when the call may go on."""
        restriction = self._restricted.get(method)
        if restriction is None or restriction.allows(metadata_value(metadata, restriction.header)):
            return False
        self._finish(call_id, None, UNAVAILABLE, restriction.grpc_message())
        return True

    def _finish(self, call_id: int, message: bytes | None, status: int, text: str) -> None:
        self._calls.pop(call_id, None)
        self._done.append((call_id, message, status, text))
        self._schedule_flush()

    def _fail(self, call_id: int, method: str, exc: Exception) -> None:
        """Ends a call with its error's status: a refused request's or a ServingError's code,
        anything else INTERNAL (logged with its traceback: call it from the except block)."""
        if isinstance(exc, _BadRequest):
            self._finish(call_id, None, exc.code, exc.text)
        elif isinstance(exc, ServingError):
            self._finish(call_id, None, CODES[exc.code], exc.message)
        else:
            log.exception("gRPC %s failed", method)
            self._finish(call_id, None, INTERNAL, f"internal error: {exc}")

    def _send(self, call_id: int, message: bytes) -> None:
        self._stream_out.append((call_id, message))
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        assert self._fe is not None
        # Stream messages first: a stream's final status is queued only after its last message.
        if self._stream_out:
            out, self._stream_out = self._stream_out, []
            self._fe.send_stream(out)
        if self._done:
            done, self._done = self._done, []
            respond_all(self._fe, done)

    # -- unary calls ----------------------------------------------------------------------

    async def _infer(self, call_id: int, message: bytes, metadata: Metadata | None) -> None:
        try:  # the call's kept headers stand for grpc.aio's context (tracing reads them)
            response = await self._model_infer(message, metadata)
        except Exception as exc:
            self._fail(call_id, "ModelInfer", exc)
        else:
            self._finish(call_id, response, OK, "")

    def _python_infer(self, call_id: int, message: bytes) -> None:
        """A call the native request path hands back: ModelInfer as for any other call."""
        self._calls[call_id] = self._loop.create_task(self._infer(call_id, message, ()))

    def _start_unary(self, call_id: int, method: str, message: bytes) -> None:
        entry = self._unary.get(method)
        if entry is None:
            why = UNIMPLEMENTED.get(method)
            text = f"{method}: {why}" if why is not None else "Method not found!"
            self._finish(call_id, None, UNIMPLEMENTED_CODE, text)
            return
        try:
            request = entry.parse(message)
        except Exception:  # upb's DecodeError; grpc.aio's words for it
            self._finish(call_id, None, INTERNAL, "Exception deserializing request!")
            return
        self._calls[call_id] = self._loop.create_task(
            self._run_unary(call_id, method, entry.handler, request)
        )

    async def _run_unary(
        self, call_id: int, method: str, handler: UnaryHandler, request: Any
    ) -> None:
        try:
            response = await handler(request, None)
            message = _serialized(response)
        except Exception as exc:
            self._fail(call_id, method, exc)
        else:
            self._finish(call_id, message, OK, "")

    # -- ModelStreamInfer -----------------------------------------------------------------

    def _stream_message(self, call_id: int, message: bytes, first: bool) -> None:
        stream = self._streams.get(call_id)
        if stream is None:
            if not first:
                return  # a later message of a stream answered already (refused)
            stream = self._streams[call_id] = _Stream()
        task = self._loop.create_task(self._stream_answer(call_id, stream, message))
        stream.tasks.add(task)

    async def _stream_answer(self, call_id: int, stream: _Stream, message: bytes) -> None:
        """Answers one request of a stream as soon as it completes; errors travel in-band in
        `error_message` and the stream goes on (GrpcService.ModelStreamInfer's semantics)."""
        try:
            try:
                answer = await self._service.stream_answer(parse_infer_request(message))
            except ServingError as exc:  # the request did not parse
                answer = proto.ModelStreamInferResponse(error_message=exc.message)
            except Exception as exc:
                log.exception("gRPC ModelStreamInfer failed")
                answer = proto.ModelStreamInferResponse(error_message=f"internal error: {exc}")
            self._send(call_id, answer.SerializeToString())
        finally:
            stream.tasks.discard(asyncio.current_task())
            # The last answer after the client half-closed ends the stream; a cancelled stream
            # is no longer in _streams and gets no status.
            if stream.half_closed and not stream.tasks and call_id in self._streams:
                del self._streams[call_id]
                self._finish(call_id, None, OK, "")

    def _half_closed(self, call_id: int, first: bool) -> None:
        stream = self._streams.get(call_id)
        if stream is None and not first:
            return  # a stream answered already (refused)
        if stream is None or not stream.tasks:
            self._streams.pop(call_id, None)
            self._finish(call_id, None, OK, "")  # every answer is out (or none was asked)
            return
        stream.half_closed = True

    # -- registered stream methods --------------------------------------------------------

    def _handler_stream_item(
        self, call_id: int, method: str, message: bytes | None, first: bool
    ) -> None:
        """One request message (None: the client half-closed) of a registered stream; `first`:
        the call's first item."""
        stream = self._handler_streams.get(call_id)
        if stream is None:
            if not first:
                return  # a stream answered already (refused, unknown or finished)
            entry = self._stream_methods.get(method)
            if entry is None:
                self._finish(call_id, None, UNIMPLEMENTED_CODE, "Method not found!")
                return
            stream = self._handler_streams[call_id] = _HandlerStream()
            stream.task = self._loop.create_task(
                self._run_stream(call_id, method, entry, stream.queue)
            )
        stream.queue.put_nowait(message)

    async def _run_stream(
        self, call_id: int, method: str, entry: _StreamMethod, queue: asyncio.Queue[bytes | None]
    ) -> None:
        requests = _requests(queue, entry.parse)
        responses: AsyncIterator[Any] | None = None
        try:
            if entry.client_streaming:
                responses = entry.handler(requests, None)
            else:
                responses = entry.handler(await _single(requests, method), None)
            async for response in responses:
                self._send(call_id, _serialized(response))
        except Exception as exc:
            self._fail(call_id, method, exc)
        else:
            self._finish(call_id, None, OK, "")
        finally:
            self._handler_streams.pop(call_id, None)
            for generator in (responses, requests):
                close = getattr(generator, "aclose", None)
                if close is not None:
                    with contextlib.suppress(Exception):
                        await close()

    # -- cancellation ---------------------------------------------------------------------

    def _cancelled(self, call_id: int) -> None:
        """The client reset or disconnected, or the call's deadline passed: stop the work done
        for it (cancellation reaches the batcher's queue through the awaiting task)."""
        if self._path is not None and self._path.cancel(call_id):
            return
        task = self._calls.pop(call_id, None)
        if task is not None:
            task.cancel()
        stream = self._streams.pop(call_id, None)
        if stream is not None:
            for task in list(stream.tasks):
                task.cancel()
        handler_stream = self._handler_streams.pop(call_id, None)
        if handler_stream is not None and handler_stream.task is not None:
            handler_stream.task.cancel()

    # -- lifecycle ------------------------------------------------------------------------

    def _running(self) -> list[asyncio.Task[None]]:
        streams = (t for s in self._streams.values() for t in s.tasks)
        handlers = (s.task for s in self._handler_streams.values() if s.task is not None)
        # A task cancelled before it first ran never removed itself: it is not running.
        native = self._path.tasks() if self._path is not None else ()
        running = (*self._calls.values(), *streams, *handlers, *native)
        return [t for t in running if not t.done()]

    async def stop(self, grace: float) -> None:
        """Refuse new calls (GOAWAY, in two steps), let running ones finish for up to `grace`
        seconds and flush their answers, then close every connection."""
        if self._fe is None:
            return
        deadline = self._loop.time() + grace
        self._fe.shutdown()
        # Calls keep arriving until the final GOAWAY (one round trip): wait for those too.
        while (running := self._running()) and (left := deadline - self._loop.time()) > 0:
            await asyncio.wait(running, timeout=left)
        for task in self._running():
            task.cancel()
        self._flush()
        remaining = max(0.0, deadline - self._loop.time())
        await asyncio.to_thread(self._fe.stop, remaining)
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self._fe.fileno())


def respond_all(frontend: _native.GrpcFrontend, done: list[Response]) -> None:
    """Answers every call in `done` with one respond(). respond() checks every item before it
    sends any, so should one be refused (a message over 4 GiB, say), the others are answered
    one by one and the refused one gets INTERNAL: a call is never left without its answer."""
    try:
        frontend.respond(done)
    except Exception:
        for item in done:
            try:
                frontend.respond([item])
            except Exception as exc:
                log.exception("gRPC: the answer to call %d could not be sent", item[0])
                frontend.respond([(item[0], None, INTERNAL, f"internal error: {exc}")])


def add_health_and_reflection(server: NativeGrpcServer, health: HealthService) -> None:
    """grpc.health.v1.Health (Check, Watch) over `health`, and server reflection (v1alpha and
    v1, the same messages): the grpc.aio front end's handlers, registered on `server`."""
    parse_check = health_pb2.HealthCheckRequest.FromString
    server.add_unary(f"{HEALTH_SERVICE}/Check", health.Check, parse_check)
    server.add_stream(f"{HEALTH_SERVICE}/Watch", health.Watch, parse_check, client_streaming=False)
    reflection = ReflectionService()
    parse_reflection = reflection_pb2.ServerReflectionRequest.FromString
    for service in REFLECTION_SERVICES:
        server.add_stream(
            f"{service}/ServerReflectionInfo", reflection.ServerReflectionInfo, parse_reflection
        )


async def start(
    dataplane: DataPlane,
    host: str,
    port: int,
    max_message: int,
    health: HealthService | None = None,
    *,
    tls_settings: TlsSettings | None = None,
    restrictions: Restrictions | None = None,
    connections: GrpcConnections | None = None,
    on_failure: Callable[[str], None] | None = None,
) -> NativeGrpcServer:
    """Serves GrpcService on host:port through the native front end, with the health service
    and reflection when `health` is given, over TLS with `tls_settings`, refusing calls to
    groups in `restrictions` without their header. Raises RuntimeError when this build lacks
    the front end (no nghttp2 or OpenSSL at build time), OSError when the port cannot be bound,
    ValueError when a TLS file does not load. `connections`: reuse-port, connection limit and
    keepalive policy; `on_failure(why)` runs should the I/O thread die."""
    if not available():
        raise RuntimeError(
            "this build of server._native has no native gRPC front end (nghttp2, zlib or OpenSSL "
            "was not found at build time: apt-get install libnghttp2-dev zlib1g-dev libssl-dev, "
            "then reinstall); use grpcio"
        )
    server = NativeGrpcServer(dataplane, restrictions)
    server.on_failure = on_failure
    if health is not None:
        add_health_and_reflection(server, health)
    server.serve(host, port, max_message, tls_settings, connections)
    tls = "" if tls_settings is None else " (mutual TLS)" if tls_settings.mutual else " (TLS)"
    log.info("gRPC (native front end) listening on %s:%d%s", host, server.port, tls)
    return server
