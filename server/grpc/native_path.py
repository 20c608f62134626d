"""The native request path: plain ModelInfer calls answered with one Python step per chunk.

`server._native.InferRouter.take()` drains the front end like `GrpcFrontend.take()`, but parses
each ModelInfer request in C++ first. A request that is plain (no parameters, raw tensors,
every input present with its exact size, a valid shape, requested outputs a subset of the
model's) and goes to a version registered here is not handed over as an item: the calls to one
version and one non-batch shape taken together are coalesced into an `InferChunk`, one buffer
per input. Python runs a chunk as one batcher entry (`server/coalesced.py`); C++ cuts the
batched outputs into each call's ModelInferResponse (`InferRouter.respond`). Any other request
takes the Python path, which keeps its messages, errors and features.

Registration follows the model manager: whenever its `generation` moved (a version turned READY
or began unloading), the qualifying versions are registered again, before the next take, so a
chunk always names a version that serves. Should one not (or not fit in its queue) when the
chunk starts, or when its task runs (a version may begin unloading in between), each of its
calls takes the Python path with its original message.

Cancellation: a call cancelled (client gone, grpc-timeout passed) counts as a cancelled request;
when every call of a chunk is cancelled its task is cancelled, which takes the entry out of the
batcher's queue. A chunk partly cancelled still runs; answers to the gone calls are dropped.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable

import grpc

from server import _native, coalesced
from server.dataplane import DataPlane
from server.errors import ServingError
from server.grpc.server import STATUS
from server.metrics import NativePathCollector

log = logging.getLogger(__name__)

CODES = {code: status.value[0] for code, status in STATUS.items()}
INTERNAL = grpc.StatusCode.INTERNAL.value[0]

Item = tuple[int, str, bytes, int, tuple[tuple[str, str], ...] | None]
Fallback = Callable[[int, bytes], None]
"""Runs one call on the Python path: (call_id, its ModelInfer request message)."""


class _Running:
    """One chunk on its way through the batcher."""

    __slots__ = ("call_ids", "chunk", "queued", "request", "task")

    def __init__(
        self, chunk: _native.InferChunk, request: coalesced.CoalescedRequest, call_ids: list[int]
    ) -> None:
        self.chunk = chunk
        self.request = request
        self.call_ids = call_ids
        self.queued = False  # its task ran: the chunk went to the batcher
        self.task: asyncio.Task[None] | None = None


class NativeRequestPath:
    """Takes the front end's calls through an InferRouter and runs its chunks."""

    def __init__(
        self, dataplane: DataPlane, frontend: _native.GrpcFrontend, fallback: Fallback
    ) -> None:
        self._dataplane = dataplane
        self._fe = frontend
        self._fallback = fallback
        self._router = _native.InferRouter()
        self._models: dict[int, coalesced.PlainModel] = {}
        self._generation = -1
        self._next_token = 1
        self._calls: dict[int, _Running] = {}
        self._running: set[_Running] = set()
        self._fallbacks = 0
        # requests of chunks started but not yet queued (their task has not run), by token:
        # counted against the queue bound, so that chunks of one take cannot overfill it
        self._reserved: dict[int, int] = {}
        self._loop = asyncio.get_running_loop()
        metrics = dataplane.manager.metrics
        if metrics is not None:
            metrics.add_state_collector(NativePathCollector(self.stats))

    def take(self) -> list[Item]:
        """The items for the Python path; the chunks are started."""
        if self._dataplane.manager.generation != self._generation:
            self._register()
        items, chunks = self._router.take(self._fe)
        for chunk in chunks:
            try:
                self._start(chunk)
            except Exception as exc:  # never leave a call unanswered
                log.exception("gRPC ModelInfer (native request path): a chunk did not start")
                _native.InferRouter.fail(self._fe, chunk, INTERNAL, f"internal error: {exc}")
        return items

    def cancel(self, call_id: int) -> bool:
        """A call's client went away: True when the call was this path's."""
        running = self._calls.pop(call_id, None)
        if running is None:
            return False
        request = running.request
        request.cancelled += 1
        if request.cancelled == request.count and running.task is not None:
            running.task.cancel()  # nobody waits for it: leave the queue
        return True

    def tasks(self) -> list[asyncio.Task[None]]:
        return [r.task for r in self._running if r.task is not None and not r.task.done()]

    def stats(self) -> dict[str, int]:
        """calls and chunks the C++ side planned, and calls sent back to the Python path."""
        return {**self._router.stats(), "fallbacks": self._fallbacks}

    # -- internals ------------------------------------------------------------------------

    def _register(self) -> None:
        self._generation = self._dataplane.manager.generation
        models = coalesced.plain_models(self._dataplane.manager, self._next_token)
        self._next_token += len(models)
        self._models = {m.token: m for m in models}
        max_bytes = self._dataplane.settings.max_request_bytes
        self._router.set_models([
            (
                m.token, m.entry.name, str(m.entry.version), list(m.keys),
                m.batcher.spec.max_batch_size, max_bytes,
                [(t.name, t.datatype.value, list(t.dims), t.datatype.itemsize) for t in m.inputs],
                [(t.name, t.datatype.value, list(t.dims), t.datatype.itemsize) for t in m.outputs],
            )
            for m in models
        ])

    def _start(self, chunk: _native.InferChunk) -> None:
        model = self._models.get(chunk.token)
        reserved = self._reserved.get(chunk.token, 0)
        if model is None or not coalesced.admits(model, reserved + chunk.count):
            self._fallbacks += chunk.count
            for call_id, message in chunk.messages():
                self._fallback(call_id, message)
            return
        request = coalesced.CoalescedRequest(
            model,
            coalesced.input_arrays(model, chunk.inputs, chunk.shapes),
            [model.outputs[i].name for i in chunk.outputs],
            chunk.rows,
            chunk.count,
        )
        running = _Running(chunk, request, chunk.call_ids)
        self._reserved[chunk.token] = reserved + chunk.count
        running.task = self._loop.create_task(self._run(running))
        # also when the task is cancelled before it first runs (its body never does)
        running.task.add_done_callback(functools.partial(self._done, running))
        self._running.add(running)
        self._calls.update(dict.fromkeys(running.call_ids, running))

    async def _run(self, running: _Running) -> None:
        chunk, request = running.chunk, running.request
        running.queued = True  # queued in this same step, by coalesced.infer's submit
        self._unreserve(chunk)
        if not coalesced.admits(request.model, request.count):
            # the version began unloading (or its queue filled) since the take: the Python
            # path picks the version that serves now, as it would have for these calls
            self._send_back(running)
            return
        try:
            outputs = await coalesced.infer(request)
            self._router.respond(self._fe, chunk, coalesced.wire_outputs(request.model, outputs))
        except ServingError as exc:
            _native.InferRouter.fail(self._fe, chunk, CODES[exc.code], exc.message)
        except Exception as exc:
            log.exception("gRPC ModelInfer (native request path) failed")
            _native.InferRouter.fail(self._fe, chunk, INTERNAL, f"internal error: {exc}")

    def _send_back(self, running: _Running) -> None:
        """Each call still waiting takes the Python path; those cancelled count as such."""
        live = {c for c in running.call_ids if self._calls.get(c) is running}
        for call_id in live:
            del self._calls[call_id]  # a cancellation now goes to the Python path's task
        request = running.request
        coalesced.record_failures(
            request.model.entry.stats, time.monotonic_ns() - request.started_ns, "cancelled",
            request.cancelled,
        )
        self._fallbacks += len(live)
        for call_id, message in running.chunk.messages():
            if call_id in live:
                self._fallback(call_id, message)

    def _done(self, running: _Running, task: asyncio.Task[None]) -> None:
        self._running.discard(running)
        if not running.queued:
            self._unreserve(running.chunk)
        calls = self._calls
        for call_id in running.call_ids:
            if calls.get(call_id) is running:
                del calls[call_id]

    def _unreserve(self, chunk: _native.InferChunk) -> None:
        left = self._reserved.get(chunk.token, 0) - chunk.count
        if left > 0:
            self._reserved[chunk.token] = left
        else:
            self._reserved.pop(chunk.token, None)
