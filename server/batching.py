"""The dynamic batcher: the scheduler of one model version (Triton's semantics).

Requests queue here, one queue per priority level. Whenever a model instance is idle the
batcher takes queued requests, highest priority first, whose non-batch shapes match the first
one taken, up to `max_batch_size` rows; it hands the batch to the instance's own thread, which
gathers the inputs (one copy per input), runs the backend and splits the outputs back by
row ranges. The event loop then answers every request of the batch: with its rows, or with the
batch's error. Nothing here blocks the event loop.

Waiting for a fuller batch (`max_queue_delay_microseconds`, measured from the oldest request on
the monotonic clock) only happens while other requests are admitted (queued, executing or being
answered): a lone request on an idle instance is dispatched at once and pays no delay.

A request leaves the queue when its client cancels (its future is cancelled) or when its queue
timeout expires (answered UNAVAILABLE, as Triton does, unless the policy's timeout action is
DELAY). A full queue (`max_queue_size`, else the server's `--default-max-queue-size`) rejects
at once with RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from server.backends.base import Backend, Options
from server.errors import Code, ServingError, exhausted, internal, invalid, unavailable
from server.model_config import DynamicBatching, ModelSpec, QueuePolicy
from server.statistics import ModelStats
from server.tracing import RequestTrace
from server.types import Array

log = logging.getLogger(__name__)

Outputs = dict[str, Array]
MAX_TIMEOUT_US = 24 * 3600 * 1_000_000  # a queue timeout above a day is a mistake


class Scheduler(Protocol):
    """What the data plane calls: a model's DynamicBatcher, or an ensemble's scheduler."""

    def check_parameters(self, priority: object, timeout_us: object) -> tuple[int, int]: ...

    async def submit(
        self, inputs: dict[str, Array], outputs: list[str], rows: int, level: int,
        timeout_us: int, options: Options = (), trace: RequestTrace | None = None,
    ) -> Outputs: ...

    async def drain(self) -> None: ...

    @property
    def pending(self) -> int: ...


@dataclass(slots=True, eq=False)
class _Request:
    inputs: dict[str, Array]
    outputs: list[str]
    rows: int
    shape_key: tuple[object, ...]
    future: asyncio.Future[Outputs]
    level: int
    options: Options = ()
    trace: RequestTrace | None = None
    enqueued_ns: int = field(default_factory=time.monotonic_ns)
    timer: asyncio.TimerHandle | None = None
    count: int = 1  # client requests it stands for (a native request path chunk: several)


@dataclass(slots=True, eq=False)
class _Batch:
    requests: list[_Request]
    seq: int
    started_ns: int
    instance: _Instance
    # filled by the instance thread
    results: list[Outputs] | None = None
    error: BaseException | None = None
    times: tuple[int, int, int, int] = (0, 0, 0, 0)  # compute start; input, infer, output ns


class _Instance:
    """One backend instance and the one thread it executes on."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.jobs: queue.SimpleQueue[_Batch | None] = queue.SimpleQueue()
        self.busy = False
        self.thread: threading.Thread | None = None


class DynamicBatcher:
    def __init__(
        self, spec: ModelSpec, backends: Sequence[Backend], stats: ModelStats,
        default_max_queue_size: int = 0,
    ) -> None:
        """`default_max_queue_size` bounds each priority level's queue whose policy sets no
        max_queue_size (the server's --default-max-queue-size; 0: unbounded)."""
        self.spec = spec
        self.stats = stats
        self._instances = [_Instance(b) for b in backends]
        settings = spec.dynamic_batching or DynamicBatching()
        self._settings = settings
        self._batching = spec.max_batch_size > 0
        self._max_rows = max(spec.max_batch_size, 1)
        self._delay_ns = settings.max_queue_delay_us * 1000 if self._batching else 0
        preferred = settings.preferred_batch_sizes
        self._target_rows = max(preferred) if preferred else self._max_rows
        levels = max(settings.priority_levels, 1)
        self._queues: list[collections.deque[_Request]] = [
            collections.deque() for _ in range(levels)
        ]
        self._policies: list[QueuePolicy] = [
            settings.priority_queue_policy.get(level + 1, settings.default_queue_policy)
            for level in range(levels)
        ]
        self._queue_limits = [p.max_queue_size or default_max_queue_size for p in self._policies]
        self._default_level = max(settings.default_priority_level, 1) - 1
        self._queued = 0
        self._level_requests = [0] * levels  # client requests queued per level (see count)
        self._delay_timer: asyncio.TimerHandle | None = None
        self._seq = 0
        self._next_delivery = 0
        self._finished: dict[int, _Batch] = {}
        self._closed = False
        self._in_flight = 0
        self._idle: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- public -------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._idle = asyncio.Event()
        self._idle.set()
        for instance in self._instances:
            name = f"{self.spec.name}-{instance.backend.instance}"
            instance.thread = threading.Thread(
                target=self._work, args=(instance,), name=name, daemon=True
            )
            instance.thread.start()

    def check_parameters(self, priority: object, timeout_us: object) -> tuple[int, int]:
        """Validate the request parameters `priority` and `timeout` (microseconds); returns
        the queue level and the effective timeout (0: none)."""
        levels = self._settings.priority_levels
        level = self._default_level
        if priority is not None:
            if not isinstance(priority, int) or isinstance(priority, bool) or priority < 0:
                raise invalid(
                    f"parameter 'priority' is {priority!r}, expected an integer >= 0 "
                    f"(0: the default level{f', 1..{levels}' if levels else ''})"
                )
            if levels and priority > levels:
                raise invalid(
                    f"parameter 'priority' is {priority}, expected 0..{levels} "
                    f"(model '{self.spec.name}' has {levels} priority_levels)"
                )
            if levels and priority:
                level = priority - 1
        policy = self._policies[level]
        timeout = policy.default_timeout_us
        if timeout_us is not None:
            if (
                not isinstance(timeout_us, int)
                or isinstance(timeout_us, bool)
                or not 0 <= timeout_us <= MAX_TIMEOUT_US
            ):
                raise invalid(
                    f"parameter 'timeout' is {timeout_us!r}, expected microseconds in "
                    f"0..{MAX_TIMEOUT_US}"
                )
            if policy.allow_timeout_override and timeout_us:
                timeout = min(timeout, timeout_us) if timeout else timeout_us
        return level, timeout

    async def submit(
        self,
        inputs: dict[str, Array],
        outputs: list[str],
        rows: int,
        level: int | None = None,
        timeout_us: int = 0,
        options: Options = (),
        trace: RequestTrace | None = None,
        count: int = 1,
    ) -> Outputs:
        """Queue one request; returns its output rows or raises its ServingError. Requests
        share a batch only when they have the same inputs (names, in the same order, and
        non-batch shapes) and equal `options`. A traced request's queue and compute times go
        to `trace`. `count` > 1: the entry stands for that many client requests (their rows
        coalesced), in the queue bound and the statistics."""
        if self._closed:
            raise unavailable(f"model '{self.spec.name}' is unloading, retry")
        level = self._default_level if level is None else level
        policy = self._policies[level]
        waiting = self._queues[level]
        limit = self._queue_limits[level]
        if not self.admits(level, count):
            where = "max_queue_size" if policy.max_queue_size else "--default-max-queue-size"
            raise exhausted(
                f"model '{self.spec.name}': queue is full ({limit} requests, {where}), "
                "retry later"
            )
        assert self._loop is not None and self._idle is not None
        # the input names belong to the key: requests that leave out different optional
        # inputs cannot share a batch
        shapes = (
            tuple((n, a.shape[1:]) for n, a in inputs.items()) if self._batching else ()
        )
        request = _Request(
            inputs, outputs, rows, (shapes, options), self._loop.create_future(), level, options,
            trace, count=count,
        )
        if timeout_us and policy.timeout_action_reject:
            request.timer = self._loop.call_later(timeout_us / 1e6, self._expire, request)
        waiting.append(request)
        self._queued += 1
        self._level_requests[level] += count
        self._in_flight += 1
        self._idle.clear()
        self._dispatch()
        try:
            return await request.future
        except asyncio.CancelledError:
            self._remove(request)  # the client went away: leave the queue
            raise
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()

    async def drain(self) -> None:
        """Stop admitting, wait until everything admitted is answered, stop the threads."""
        self._closed = True
        if self._idle is not None:
            await self._idle.wait()
        for instance in self._instances:
            instance.jobs.put(None)
        for instance in self._instances:
            if instance.thread is not None:
                await asyncio.to_thread(instance.thread.join)

    def admits(self, level: int, count: int = 1) -> bool:
        """Whether `count` more requests fit in the queue of `level`."""
        limit = self._queue_limits[level]
        return not limit or self._level_requests[level] + count <= limit

    @property
    def pending(self) -> int:
        return sum(self._level_requests)

    # -- queue ----------------------------------------------------------------------------

    def _remove(self, request: _Request) -> None:
        if request.timer is not None:
            request.timer.cancel()
        try:
            self._queues[request.level].remove(request)
        except ValueError:
            return  # already taken into a batch
        self._left(request)

    def _left(self, request: _Request) -> None:
        self._queued -= 1
        self._level_requests[request.level] -= request.count

    def _expire(self, request: _Request) -> None:
        request.timer = None
        if request.future.done():
            return
        try:
            self._queues[request.level].remove(request)
        except ValueError:
            return  # executing: it will be answered with its result
        self._left(request)
        waited = (time.monotonic_ns() - request.enqueued_ns) // 1000
        request.future.set_exception(
            unavailable(
                f"model '{self.spec.name}': request timed out after {waited} us in the queue "
                "(timeout)"
            )
        )

    # -- dispatch -------------------------------------------------------------------------

    def _dispatch(self) -> None:
        """Hand batches to idle instances while there is work (event loop thread)."""
        while self._queued:
            instance = next((i for i in self._instances if not i.busy), None)
            if instance is None:
                return  # a finishing batch calls _dispatch again
            if self._should_wait():
                return
            requests = self._take()
            if not requests:
                return
            instance.busy = True
            batch = _Batch(requests, self._seq, time.monotonic_ns(), instance)
            self._seq += 1
            instance.jobs.put(batch)

    def _should_wait(self) -> bool:
        """Wait for a fuller batch until the oldest request's delay expires."""
        if not self._delay_ns:
            return False
        lone = self._queued == 1 and self._in_flight == 1  # nothing else admitted anywhere
        if lone or self._queued_rows() >= self._target_rows:
            return False
        oldest = min(q[0].enqueued_ns for q in self._queues if q)
        remaining = oldest + self._delay_ns - time.monotonic_ns()
        if remaining <= 0:
            return False
        if self._delay_timer is None:
            assert self._loop is not None
            self._delay_timer = self._loop.call_later(remaining / 1e9, self._delay_expired)
        return True

    def _delay_expired(self) -> None:
        self._delay_timer = None
        self._dispatch()

    def _queued_rows(self) -> int:
        return sum(r.rows for q in self._queues for r in q)

    def _take(self) -> list[_Request]:
        """The next batch: highest priority first, one shape, at most max_batch_size rows."""
        batch: list[_Request] = []
        rows = 0
        key = None
        for waiting in self._queues:
            kept: list[_Request] = []
            while waiting:
                request = waiting.popleft()
                if request.future.done():  # cancelled or expired
                    self._left(request)
                    continue
                if key is None:
                    key = request.shape_key
                if (
                    not self._batching and batch
                ) or request.shape_key != key or rows + request.rows > self._max_rows:
                    kept.append(request)
                    if len(kept) > 64:  # do not scan a long queue for a better fit
                        break
                    continue
                batch.append(request)
                self._left(request)
                if request.timer is not None:
                    request.timer.cancel()
                rows += request.rows
                if rows >= self._max_rows or not self._batching:
                    break
            waiting.extendleft(reversed(kept))
            if rows >= self._max_rows or (batch and not self._batching):
                break
        return batch

    # -- instance thread ------------------------------------------------------------------

    def _work(self, instance: _Instance) -> None:
        assert self._loop is not None
        while (batch := instance.jobs.get()) is not None:
            try:
                batch.results, batch.times = self._execute(instance.backend, batch.requests)
            except BaseException as exc:  # delivered to every waiter of the batch
                batch.error = exc
            try:
                self._loop.call_soon_threadsafe(self._finish, batch)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                return

    def _execute(
        self, backend: Backend, requests: list[_Request]
    ) -> tuple[list[Outputs], tuple[int, int, int, int]]:
        """Instance thread: gather, execute, split."""
        t0 = time.monotonic_ns()
        names = _union_outputs(requests)
        inputs = backend.gather([r.inputs for r in requests])  # a backend's own buffers
        if inputs is None:
            inputs = requests[0].inputs if len(requests) == 1 else _gather(requests)
        t1 = time.monotonic_ns()
        try:
            outputs = backend.execute(inputs, names, requests[0].options)
        except ValueError as exc:
            raise ServingError(Code.INVALID_ARGUMENT, str(exc)) from None
        t2 = time.monotonic_ns()
        results = self._split(requests, names, outputs)
        t3 = time.monotonic_ns()
        return results, (t0, t1 - t0, t2 - t1, t3 - t2)

    def _split(self, requests: list[_Request], names: list[str], outputs: Outputs) -> list[Outputs]:
        """Check the batch's outputs (`names`: every output a request asked for) and cut
        them into each request's rows."""
        rows = sum(r.rows for r in requests)
        for name in names:
            array = outputs.get(name)
            if array is None:
                raise internal(f"model '{self.spec.name}' did not produce output '{name}'")
            if self._batching and (array.ndim == 0 or array.shape[0] != rows):
                raise internal(
                    f"model '{self.spec.name}': output '{name}' has shape {list(array.shape)}, "
                    f"expected {rows} rows (the batch size)"
                )
        if len(requests) == 1:
            return [{n: outputs[n] for n in requests[0].outputs}]
        results = []
        offset = 0
        for request in requests:
            end = offset + request.rows
            results.append({n: outputs[n][offset:end] for n in request.outputs})
            offset = end
        return results

    # -- completion (event loop thread) ---------------------------------------------------

    def _finish(self, batch: _Batch) -> None:
        batch.instance.busy = False
        if self._settings.preserve_ordering:
            self._finished[batch.seq] = batch
            while self._next_delivery in self._finished:
                self._deliver(self._finished.pop(self._next_delivery))
                self._next_delivery += 1
        else:
            self._deliver(batch)
        self._dispatch()

    def _deliver(self, batch: _Batch) -> None:
        requests = batch.requests
        if batch.error is not None:
            error = batch.error
            if not isinstance(error, ServingError):
                log.error(
                    "model '%s': batch of %d failed: %r", self.spec.name, len(requests), error,
                    exc_info=error,
                )
                error = internal(f"model '{self.spec.name}' failed: {error}")
            for request in requests:
                if not request.future.done():
                    request.future.set_exception(error)
            return
        assert batch.results is not None
        _, input_ns, infer_ns, output_ns = batch.times
        rows = sum(r.rows for r in requests)
        self.stats.record_batch(
            rows,
            sum(r.count for r in requests),
            [batch.started_ns - r.enqueued_ns for r in requests for _ in range(r.count)],
            input_ns,
            infer_ns,
            output_ns,
        )
        for request, outputs in zip(requests, batch.results, strict=True):
            if request.trace is not None:
                request.trace.scheduled(
                    self.spec.name, request.enqueued_ns, batch.started_ns, batch.times, rows
                )
            if not request.future.done():
                request.future.set_result(outputs)


def _union_outputs(requests: list[_Request]) -> list[str]:
    if len(requests) == 1:
        return requests[0].outputs
    names: dict[str, None] = {}
    for request in requests:
        names.update(dict.fromkeys(request.outputs))
    return list(names)


def _gather(requests: list[_Request]) -> dict[str, Array]:
    """One contiguous array per input, the requests' rows in order.

    `b"".join` reads each part through the buffer protocol and copies once; on the batcher's
    parts (C-contiguous arrays) it measured 2-3x faster than np.concatenate and as fast as a
    native gather (benchmarks/results/batch-assembly-20261127.md). The result views the joined
    bytes and is read-only, which backends accept (they never write their inputs). Parts that
    are not C-contiguous, and object (BYTES) arrays, are concatenated by numpy.
    """
    gathered = {}
    rows = sum(r.rows for r in requests)
    for name, first in requests[0].inputs.items():
        parts = [r.inputs[name] for r in requests]
        if first.dtype != object:
            try:
                # ndarrays are buffers; numpy declares it to mypy on Python >= 3.12 only
                joined = b"".join(parts)  # type: ignore[arg-type,unused-ignore]
            except (BufferError, TypeError, ValueError):  # a part that is not C-contiguous
                pass
            else:
                shape = (rows, *first.shape[1:])
                gathered[name] = np.frombuffer(joined, first.dtype).reshape(shape)
                continue
        gathered[name] = np.concatenate(parts)
    return gathered
