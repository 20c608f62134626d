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
- Finished answers are appended to a list, flushed with one `respond()` (and one
  `send_stream()` for stream messages) per loop iteration by a `call_soon` callback.

Compressed messages, oversized messages and malformed framing are answered by the C++ side
and never reach Python.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import grpc

from server import _native, proto
from server.dataplane import DataPlane
from server.errors import ServingError
from server.grpc.server import STATUS, UNIMPLEMENTED, GrpcService, parse_infer_request

log = logging.getLogger(__name__)

# Kinds of ready items (see GrpcFrontend.take).
UNARY, STREAM_MESSAGE, HALF_CLOSED, CANCELLED = 0, 1, 2, 3

OK = grpc.StatusCode.OK.value[0]
UNIMPLEMENTED_CODE = grpc.StatusCode.UNIMPLEMENTED.value[0]
INTERNAL = grpc.StatusCode.INTERNAL.value[0]
CODES = {code: status.value[0] for code, status in STATUS.items()}

Response = tuple[int, bytes | None, int, str]
UnaryHandler = Callable[[Any, Any], Coroutine[Any, Any, Any]]


def available() -> bool:
    """Whether this build of `server._native` has the native front end (nghttp2 found)."""
    return bool(getattr(_native, "HAVE_GRPC_FRONTEND", False))


class _Stream:
    """Python-side state of one ModelStreamInfer call."""

    __slots__ = ("half_closed", "tasks")

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[None]] = set()
        self.half_closed = False


class NativeGrpcServer:
    """Runs GrpcService's RPCs for the calls a GrpcFrontend receives."""

    def __init__(
        self, dataplane: DataPlane, frontend: _native.GrpcFrontend, loop: asyncio.AbstractEventLoop
    ) -> None:
        self._fe = frontend
        self._loop = loop
        self._service = GrpcService(dataplane)
        self._model_infer = self._service.ModelInfer
        self._unary: dict[str, tuple[UnaryHandler, Callable[[bytes], Any]]] = {}
        for name, (request_type, _, client_stream, server_stream) in proto.METHODS.items():
            if client_stream or server_stream:
                continue  # ModelStreamInfer, handled by _stream_message
            method = getattr(self._service, name, None)
            if method is not None:
                self._unary[name] = (method, request_type.FromString)
        self._calls: dict[int, asyncio.Task[None]] = {}  # unary calls running (strong refs)
        self._streams: dict[int, _Stream] = {}
        self._done: list[Response] = []
        self._stream_out: list[tuple[int, bytes]] = []
        self._flush_scheduled = False
        loop.add_reader(frontend.fileno(), self._on_ready)

    @property
    def port(self) -> int:
        return self._fe.port

    def active_calls(self) -> int:
        return self._fe.active_calls()

    # -- event loop side ------------------------------------------------------------------

    def _on_ready(self) -> None:
        create_task = self._loop.create_task
        calls = self._calls
        infer = self._infer
        for call_id, method, message, kind in self._fe.take():
            if kind == UNARY:
                if method == "ModelInfer":
                    calls[call_id] = create_task(infer(call_id, message))
                else:
                    self._start_unary(call_id, method, message)
            elif kind == STREAM_MESSAGE:
                self._stream_message(call_id, message)
            elif kind == HALF_CLOSED:
                self._half_closed(call_id)
            else:
                self._cancelled(call_id)

    def _finish(self, call_id: int, message: bytes | None, status: int, text: str) -> None:
        self._calls.pop(call_id, None)
        self._done.append((call_id, message, status, text))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        # Stream messages first: a stream's final status is queued only after its last message.
        if self._stream_out:
            out, self._stream_out = self._stream_out, []
            self._fe.send_stream(out)
        if self._done:
            done, self._done = self._done, []
            respond_all(self._fe, done)

    # -- unary calls ----------------------------------------------------------------------

    async def _infer(self, call_id: int, message: bytes) -> None:
        try:
            response = await self._model_infer(message, None)
        except ServingError as exc:
            self._finish(call_id, None, CODES[exc.code], exc.message)
        except Exception as exc:
            log.exception("gRPC ModelInfer failed")
            self._finish(call_id, None, INTERNAL, f"internal error: {exc}")
        else:
            self._finish(call_id, response, OK, "")

    def _start_unary(self, call_id: int, method: str, message: bytes) -> None:
        entry = self._unary.get(method)
        if entry is None:
            why = UNIMPLEMENTED.get(method)
            text = f"{method}: {why}" if why is not None else "Method not found!"
            self._finish(call_id, None, UNIMPLEMENTED_CODE, text)
            return
        handler, parse = entry
        try:
            request = parse(message)
        except Exception:  # upb's DecodeError; grpc.aio's words for it
            self._finish(call_id, None, INTERNAL, "Exception deserializing request!")
            return
        self._calls[call_id] = self._loop.create_task(
            self._run_unary(call_id, method, handler, request)
        )

    async def _run_unary(
        self, call_id: int, method: str, handler: UnaryHandler, request: Any
    ) -> None:
        try:
            response = await handler(request, None)
        except ServingError as exc:
            self._finish(call_id, None, CODES[exc.code], exc.message)
        except Exception as exc:
            log.exception("gRPC %s failed", method)
            self._finish(call_id, None, INTERNAL, f"internal error: {exc}")
        else:
            self._finish(call_id, response.SerializeToString(), OK, "")

    # -- ModelStreamInfer -----------------------------------------------------------------

    def _stream_message(self, call_id: int, message: bytes) -> None:
        stream = self._streams.get(call_id)
        if stream is None:
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
            self._stream_out.append((call_id, answer.SerializeToString()))
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self._loop.call_soon(self._flush)
        finally:
            stream.tasks.discard(asyncio.current_task())
            # The last answer after the client half-closed ends the stream; a cancelled stream
            # is no longer in _streams and gets no status.
            if stream.half_closed and not stream.tasks and call_id in self._streams:
                del self._streams[call_id]
                self._finish(call_id, None, OK, "")

    def _half_closed(self, call_id: int) -> None:
        stream = self._streams.get(call_id)
        if stream is None or not stream.tasks:
            self._streams.pop(call_id, None)
            self._finish(call_id, None, OK, "")  # every answer is out (or none was asked)
            return
        stream.half_closed = True

    def _cancelled(self, call_id: int) -> None:
        """The client reset or disconnected: stop the work done for it (cancellation reaches
        the batcher's queue through the awaiting task)."""
        task = self._calls.pop(call_id, None)
        if task is not None:
            task.cancel()
        stream = self._streams.pop(call_id, None)
        if stream is not None:
            for task in list(stream.tasks):
                task.cancel()

    # -- lifecycle ------------------------------------------------------------------------

    async def stop(self, grace: float) -> None:
        """Refuse new calls (GOAWAY), let running ones finish for up to `grace` seconds and
        flush their answers, then close every connection."""
        deadline = self._loop.time() + grace
        self._fe.shutdown()
        running = [*self._calls.values(), *(t for s in self._streams.values() for t in s.tasks)]
        if running:
            await asyncio.wait(running, timeout=grace)
        for task in running:
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


async def start(dataplane: DataPlane, host: str, port: int, max_message: int) -> NativeGrpcServer:
    """Serves GrpcService on host:port through the native front end. Raises RuntimeError when
    this build lacks it (no nghttp2 at build time), OSError when the port cannot be bound."""
    if not available():
        raise RuntimeError(
            "this build of server._native has no native gRPC front end (nghttp2 was not found "
            "at build time: apt-get install libnghttp2-dev, then reinstall); use grpcio"
        )
    loop = asyncio.get_running_loop()
    streaming = [name for name, (_, _, cs, ss) in proto.METHODS.items() if cs or ss]
    frontend = _native.GrpcFrontend(
        host, port, max_message, service=proto.SERVICE_NAME, streaming_methods=streaming
    )
    frontend.start()
    server = NativeGrpcServer(dataplane, frontend, loop)
    log.info("gRPC (native front end) listening on %s:%d", host, frontend.port)
    return server
