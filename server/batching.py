"""The dynamic batcher: the scheduler of one model version.

Requests queue here; whenever a model instance is idle, the batcher takes queued requests
whose non-batch shapes match the oldest one, up to `max_batch_size` rows, gathers their inputs
into one batch (one native call per input), runs it on the instance's own thread, splits the
outputs back by row ranges, and answers every request in the batch: with its rows, or with the
batch's error.

Waiting for a fuller batch (`max_queue_delay_microseconds`, measured from the oldest request
on the monotonic clock) only happens while more than one request arrived since the last
dispatch: a lone request on an idle instance never pays the delay.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from server import _native
from server.backends.base import Backend
from server.errors import Code, ServingError, exhausted, internal, unavailable
from server.model_config import ModelSpec
from server.statistics import ModelStats
from server.types import Array

log = logging.getLogger(__name__)

Outputs = dict[str, Array]


@dataclass(slots=True, eq=False)
class _Request:
    inputs: dict[str, Array]
    outputs: list[str]
    rows: int
    shape_key: tuple[tuple[int, ...], ...]
    future: asyncio.Future[Outputs]
    enqueued_ns: int = field(default_factory=time.monotonic_ns)


class _Instance:
    """One backend instance and the one thread it executes on."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.executor = ThreadPoolExecutor(
            1, thread_name_prefix=f"{backend.spec.name}-{backend.instance}"
        )
        self.busy = False


class DynamicBatcher:
    def __init__(self, spec: ModelSpec, backends: Sequence[Backend], stats: ModelStats) -> None:
        self.spec = spec
        self.stats = stats
        self._instances = [_Instance(b) for b in backends]
        self._queue: collections.deque[_Request] = collections.deque()
        batching = spec.dynamic_batching
        self._batching = spec.max_batch_size > 0
        self._max_rows = max(spec.max_batch_size, 1)
        self._delay_ns = batching.max_queue_delay_us * 1000 if batching else 0
        preferred = batching.preferred_batch_sizes if batching else ()
        self._target_rows = max(preferred) if preferred else self._max_rows
        self._max_queue = batching.default_queue_policy.max_queue_size if batching else 0
        self._arrivals = 0  # requests queued since the last dispatch
        self._closed = False
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._in_flight = 0
        self._idle: asyncio.Event | None = None

    # -- public -------------------------------------------------------------------------

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task = asyncio.get_running_loop().create_task(self._dispatch_loop())

    async def submit(self, inputs: dict[str, Array], outputs: list[str], rows: int) -> Outputs:
        """Queue one request; returns its output rows or raises its ServingError."""
        if self._closed:
            raise unavailable(f"model '{self.spec.name}' is unloading, retry")
        if self._max_queue and len(self._queue) >= self._max_queue:
            raise exhausted(
                f"model '{self.spec.name}': queue is full ({self._max_queue} requests, "
                "max_queue_size), retry later"
            )
        shape_key = tuple(a.shape[1:] for a in inputs.values()) if self._batching else ()
        loop = asyncio.get_running_loop()
        request = _Request(inputs, outputs, rows, shape_key, loop.create_future())
        self._queue.append(request)
        self._arrivals += 1
        self._in_flight += 1
        assert self._wakeup is not None and self._idle is not None
        self._idle.clear()
        self._wakeup.set()
        try:
            return await request.future
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()

    async def drain(self) -> None:
        """Stop admitting, wait for everything admitted to be answered, stop the threads."""
        self._closed = True
        if self._idle is not None:
            await self._idle.wait()
        if self._task is not None:
            self._task.cancel()
        for instance in self._instances:
            instance.executor.shutdown(wait=True)

    @property
    def pending(self) -> int:
        return len(self._queue)

    # -- dispatch -----------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        assert self._wakeup is not None
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                instance = next((i for i in self._instances if not i.busy), None)
                if instance is None:
                    break  # an instance finishing sets the event again
                if await self._should_wait():
                    continue
                batch = self._take_batch()
                if batch:
                    self._run(instance, batch)

    async def _should_wait(self) -> bool:
        """Wait (at most until the oldest request's delay expires) for a fuller batch."""
        if not self._delay_ns or self._arrivals <= 1:
            return False
        queued_rows = sum(r.rows for r in self._queue)
        if queued_rows >= self._target_rows:
            return False
        deadline = self._queue[0].enqueued_ns + self._delay_ns
        remaining = deadline - time.monotonic_ns()
        if remaining <= 0:
            return False
        assert self._wakeup is not None
        try:
            await asyncio.wait_for(self._wakeup.wait(), remaining / 1e9)
        except TimeoutError:
            self._arrivals = 0  # the delay expired: dispatch what is there
            return True
        self._wakeup.clear()
        return True

    def _take_batch(self) -> list[_Request]:
        batch: list[_Request] = []
        rows = 0
        queue = self._queue
        if not self._batching:
            while queue:
                request = queue.popleft()
                if not request.future.done():  # cancelled while queued
                    return [request]
            return batch
        key = None
        kept: list[_Request] = []
        while queue:
            request = queue.popleft()
            if request.future.done():
                continue
            if key is None:
                key = request.shape_key
            if request.shape_key != key or rows + request.rows > self._max_rows:
                kept.append(request)
                if rows + request.rows > self._max_rows and request.shape_key == key:
                    break
                continue
            batch.append(request)
            rows += request.rows
            if rows >= self._max_rows:
                break
        queue.extendleft(reversed(kept))
        self._arrivals = len(queue)
        return batch

    def _run(self, instance: _Instance, batch: list[_Request]) -> None:
        instance.busy = True
        loop = asyncio.get_running_loop()
        start_ns = time.monotonic_ns()
        queue_ns = [start_ns - r.enqueued_ns for r in batch]
        work = loop.run_in_executor(instance.executor, self._execute, instance.backend, batch)

        def done(work: asyncio.Future[tuple[list[Outputs], int, int, int]]) -> None:
            instance.busy = False
            assert self._wakeup is not None
            self._wakeup.set()
            try:
                results, input_ns, infer_ns, output_ns = work.result()
            except ServingError as exc:
                _fail(batch, exc)
                return
            except Exception as exc:  # the backend's error reaches every waiter
                log.exception("model '%s': batch of %d failed", self.spec.name, len(batch))
                _fail(batch, internal(f"model '{self.spec.name}' failed: {exc}"))
                return
            rows = sum(r.rows for r in batch)
            self.stats.record_batch(rows, len(batch), queue_ns, input_ns, infer_ns, output_ns)
            for request, outputs in zip(batch, results, strict=True):
                if not request.future.done():
                    request.future.set_result(outputs)

        work.add_done_callback(done)

    def _execute(
        self, backend: Backend, batch: list[_Request]
    ) -> tuple[list[Outputs], int, int, int]:
        """Runs on the instance thread: gather, execute, split."""
        t0 = time.monotonic_ns()
        names = batch[0].outputs if len(batch) == 1 else _union_outputs(batch)
        inputs = batch[0].inputs if len(batch) == 1 else _gather(batch)
        t1 = time.monotonic_ns()
        try:
            outputs = backend.execute(inputs, names)
        except ValueError as exc:
            raise ServingError(Code.INVALID_ARGUMENT, str(exc)) from None
        t2 = time.monotonic_ns()
        results = self._split(batch, outputs)
        t3 = time.monotonic_ns()
        return results, t1 - t0, t2 - t1, t3 - t2

    def _split(self, batch: list[_Request], outputs: Outputs) -> list[Outputs]:
        if len(batch) == 1:
            return [{n: outputs[n] for n in batch[0].outputs}]
        rows = sum(r.rows for r in batch)
        for name, array in outputs.items():
            if array.ndim == 0 or array.shape[0] != rows:
                raise internal(
                    f"model '{self.spec.name}': output '{name}' has shape {list(array.shape)}, "
                    f"expected {rows} rows (the batch size)"
                )
        results = []
        offset = 0
        for request in batch:
            end = offset + request.rows
            results.append({n: outputs[n][offset:end] for n in request.outputs})
            offset = end
        return results


def _union_outputs(batch: list[_Request]) -> list[str]:
    names: dict[str, None] = {}
    for request in batch:
        names.update(dict.fromkeys(request.outputs))
    return list(names)


def _gather(batch: list[_Request]) -> dict[str, Array]:
    """One contiguous array per input: a native concatenation of the requests' buffers."""
    gathered = {}
    rows = sum(r.rows for r in batch)
    for name, first in batch[0].inputs.items():
        parts = [r.inputs[name] for r in batch]
        if first.dtype == object:
            gathered[name] = np.concatenate(parts)
            continue
        flat = _native.gather([np.ascontiguousarray(p).data for p in parts])
        gathered[name] = flat.view(first.dtype).reshape((rows, *first.shape[1:]))
    return gathered


def _fail(batch: list[_Request], error: ServingError) -> None:
    for request in batch:
        if not request.future.done():
            request.future.set_exception(error)


