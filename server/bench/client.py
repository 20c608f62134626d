"""The load itself: one client process with its own event loop, sending prebuilt request bytes.

The coordinator (runner.py) starts `procs` of these and sends each a `Command` per point; each
answers with a `WorkerResult` of raw timestamps reduced to what merging needs exactly (every
latency of the window, counts by status). Cheap per request on purpose: gRPC requests are
serialized once and sent through a generic (bytes in, bytes out) grpc.aio stub, HTTP requests
are whole prebuilt HTTP/1.1 messages written on kept-alive asyncio connections; responses are
not decoded, only their status is read.

Timing (one clock, CLOCK_MONOTONIC, shared by all processes):
- closed loop: latency = response - send; a request belongs to the window when sent in it;
- open loop: each request has a scheduled send time (constant spacing or Poisson arrivals) and
  latency = response - *scheduled* time, so a late send (client or server falling behind)
  counts against the server rather than being hidden (no coordinated omission);
- throughput counts successful responses that arrive inside the window.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

CONNECTION_ERROR = "CONNECTION_ERROR"
UNFINISHED = "UNFINISHED"
TIMEOUT = "TIMEOUT"
_STALE = "STALE"  # the connection closed before any byte of a response
HTTP_MAX_CONNECTIONS = 512  # beyond this, requests wait for a free connection (in their latency)
GRPC_OPTIONS = [("grpc.max_receive_message_length", 1 << 30),
                ("grpc.max_send_message_length", 1 << 30)]

clock = time.perf_counter_ns


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What a client process needs to build its connections."""

    protocol: str  # grpc | http
    address: str  # host:port
    method: str  # gRPC method path
    payloads: tuple[bytes, ...]  # round-robin
    timeout: float | None


@dataclass(frozen=True, slots=True)
class Command:
    """One point for one process; times are clock() nanoseconds."""

    mode: str  # closed | open
    share: float  # this process's concurrency, or its requests/s
    arrival: str  # constant | poisson
    phase: float  # constant arrivals: offset in intervals, so processes interleave
    start_ns: int
    measure_ns: int
    stop_ns: int
    drain_s: float
    seed: int


@dataclass(slots=True)
class WorkerResult:
    latencies_ns: np.ndarray  # successful requests of the window
    completed: int  # successful responses that arrived in the window
    errors: dict[str, int] = field(default_factory=dict)  # failed requests of the window
    sent: int = 0  # every request sent, warmup included
    lag_ns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # open loop

    @classmethod
    def empty(cls) -> WorkerResult:
        return cls(np.zeros(0, np.int64), 0)


Call = Callable[[bytes], Awaitable[str | None]]


class GrpcTransport:
    """One grpc.aio channel (HTTP/2 multiplexes every concurrent request)."""

    def __init__(self, spec: WorkerSpec) -> None:
        import grpc

        self._grpc = grpc
        self._timeout = spec.timeout
        self._channel = grpc.aio.insecure_channel(spec.address, options=GRPC_OPTIONS)
        self._rpc = self._channel.unary_unary(spec.method)

    async def connect(self) -> None:
        await asyncio.wait_for(self._channel.channel_ready(), 30)

    async def call(self, payload: bytes) -> str | None:
        try:
            await self._rpc(payload, timeout=self._timeout)
        except self._grpc.aio.AioRpcError as exc:
            return str(exc.code().name)
        return None

    async def close(self) -> None:
        await self._channel.close()


class HttpTransport:
    """HTTP/1.1 keep-alive connections, one per request in flight (a pool that grows)."""

    def __init__(self, spec: WorkerSpec) -> None:
        host, _, port = spec.address.rpartition(":")
        self._host, self._port = host, int(port)
        self._timeout = spec.timeout
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._all: set[asyncio.StreamWriter] = set()
        self._slots = asyncio.Semaphore(HTTP_MAX_CONNECTIONS)

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(self._host, self._port, limit=1 << 20)
        self._all.add(writer)
        return reader, writer

    async def connect(self) -> None:
        self._idle.append(await asyncio.wait_for(self._open(), 30))

    async def call(self, payload: bytes) -> str | None:
        async with self._slots:
            if self._timeout is None:
                return await self._call(payload)
            try:
                return await asyncio.wait_for(self._call(payload), self._timeout)
            except TimeoutError:
                return TIMEOUT

    async def _call(self, payload: bytes) -> str | None:
        reused = bool(self._idle)
        while True:
            try:
                reader, writer = self._idle.pop() if reused else await self._open()
            except OSError:
                return CONNECTION_ERROR
            status = await self._exchange(reader, writer, payload)
            if status is not _STALE:
                return status
            if not reused:
                return CONNECTION_ERROR
            reused = False  # a kept-alive connection the server had closed: once more, anew

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        payload: bytes) -> str | None:
        keep = False
        status = 0
        try:
            writer.write(payload)
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as exc:
                return _STALE if not exc.partial else CONNECTION_ERROR
            except ConnectionResetError:
                return _STALE
            status = int(head[9:12])
            lower = head.lower()
            at = lower.find(b"\r\ncontent-length:")
            if at >= 0:
                end = lower.index(b"\r\n", at + 2)
                await reader.readexactly(int(head[at + 17:end]))
                keep = b"\r\nconnection: close" not in lower
            elif b"\r\ntransfer-encoding: chunked" in lower:
                await _read_chunked(reader)
                keep = b"\r\nconnection: close" not in lower
            else:
                await reader.read()  # the body runs to the end of the connection
        except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return CONNECTION_ERROR
        finally:
            if keep:
                self._idle.append((reader, writer))
            else:
                self._all.discard(writer)
                writer.close()
        return None if status == 200 else f"HTTP {status}"

    async def close(self) -> None:
        for writer in self._all:
            writer.close()
        self._all.clear()
        self._idle.clear()


async def _read_chunked(reader: asyncio.StreamReader) -> None:
    while True:
        line = await reader.readuntil(b"\r\n")
        size = int(line.split(b";", 1)[0], 16)
        await reader.readexactly(size + 2)
        if size == 0:
            return


class _Progress:
    """Publishes the number of finished requests to the coordinator every 100 ms."""

    def __init__(self, counter: Any, index: int, count: Callable[[], int]) -> None:
        self._counter, self._index, self._count = counter, index, count
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            self._counter[self._index] = self._count()
            await asyncio.sleep(0.1)

    def stop(self) -> None:
        self._counter[self._index] = self._count()
        self._task.cancel()


async def _drain(tasks: Sequence[asyncio.Task[None]] | set[asyncio.Task[None]],
                 drain_s: float) -> None:
    """Waits for requests in flight; after `drain_s` they are cancelled (and count as
    UNFINISHED)."""
    tasks = list(tasks)
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=drain_s)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending)


def _errors(items: list[tuple[int, str]], lo: int, hi: int) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t, status in items:
        if lo <= t < hi:
            counts[status] = counts.get(status, 0) + 1
    return counts


async def _sleep_until(t_ns: int) -> None:
    delay = t_ns - clock()
    if delay > 0:
        await asyncio.sleep(delay / 1e9)


async def closed_loop(call: Call, payloads: Sequence[bytes], cmd: Command, counter: Any,
                      index: int) -> WorkerResult:
    """`share` requests always in flight: each worker sends its next request when its last
    response arrives."""
    concurrency = int(cmd.share)
    if concurrency == 0:
        return WorkerResult.empty()
    starts: list[int] = []
    ends: list[int] = []
    errors: list[tuple[int, str]] = []
    stop, count = cmd.stop_ns, len(payloads)

    async def worker(offset: int) -> None:
        i = offset
        append_start, append_end = starts.append, ends.append
        while True:
            t0 = clock()
            if t0 >= stop:
                return
            try:
                status = await call(payloads[i % count])
            except asyncio.CancelledError:
                errors.append((t0, UNFINISHED))
                raise
            except Exception as exc:  # a client-side failure counts like a failed request
                status = type(exc).__name__
            if status is None:
                append_end(clock())
                append_start(t0)
            else:
                errors.append((t0, status))
            i += 1

    await _sleep_until(cmd.start_ns)
    progress = _Progress(counter, index, lambda: len(ends) + len(errors))
    tasks = [asyncio.get_running_loop().create_task(worker(k)) for k in range(concurrency)]
    await _sleep_until(stop)
    await _drain(tasks, cmd.drain_s)
    progress.stop()
    t_start = np.array(starts, dtype=np.int64)
    t_end = np.array(ends, dtype=np.int64)
    window = (t_start >= cmd.measure_ns) & (t_start < stop)
    arrived = (t_end >= cmd.measure_ns) & (t_end < stop)
    return WorkerResult(
        latencies_ns=(t_end - t_start)[window],
        completed=int(np.count_nonzero(arrived)),
        errors=_errors(errors, cmd.measure_ns, stop),
        sent=len(starts) + len(errors),
    )


def _schedule(cmd: Command, rng: np.random.Generator) -> Iterator[int]:
    """Scheduled send times: evenly spaced (shifted by `phase` intervals), or Poisson arrivals
    (exponential gaps)."""
    mean_ns = 1e9 / cmd.share
    if cmd.arrival == "constant":
        k = 0
        while True:
            yield cmd.start_ns + int((cmd.phase + k) * mean_ns)
            k += 1
    t = float(cmd.start_ns)
    chunk = max(1024, int(cmd.share))
    while True:
        for gap in rng.exponential(mean_ns, chunk).tolist():
            t += gap
            yield int(t)


async def open_loop(call: Call, payloads: Sequence[bytes], cmd: Command, counter: Any,
                    index: int) -> WorkerResult:
    """Requests sent at scheduled times whatever the responses do; latency from the schedule."""
    if cmd.share <= 0:
        return WorkerResult.empty()
    scheduled: list[int] = []
    sends: list[int] = []
    ends: list[int] = []
    errors: list[tuple[int, str]] = []
    in_flight: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()
    stop, count = cmd.stop_ns, len(payloads)

    async def one(payload: bytes, t_sched: int) -> None:
        t_send = clock()
        try:
            status = await call(payload)
        except asyncio.CancelledError:
            errors.append((t_sched, UNFINISHED))
            raise
        except Exception as exc:  # a client-side failure counts like a failed request
            status = type(exc).__name__
        if status is None:
            ends.append(clock())
            sends.append(t_send)
            scheduled.append(t_sched)
        else:
            errors.append((t_sched, status))

    times = _schedule(cmd, np.random.default_rng(cmd.seed))
    t_next = next(times)
    progress = _Progress(counter, index, lambda: len(ends) + len(errors))
    i = 0
    while t_next < stop:
        delay = t_next - clock()
        if delay > 0:
            await asyncio.sleep(delay / 1e9)
            continue
        task = loop.create_task(one(payloads[i % count], t_next))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
        i += 1
        t_next = next(times)
    await _drain(in_flight, cmd.drain_s)
    progress.stop()
    t_sched = np.array(scheduled, dtype=np.int64)
    t_end = np.array(ends, dtype=np.int64)
    t_send = np.array(sends, dtype=np.int64)
    window = (t_sched >= cmd.measure_ns) & (t_sched < stop)
    arrived = (t_end >= cmd.measure_ns) & (t_end < stop)
    return WorkerResult(
        latencies_ns=(t_end - t_sched)[window],
        completed=int(np.count_nonzero(arrived)),
        errors=_errors(errors, cmd.measure_ns, stop),
        sent=i,
        lag_ns=(t_send - t_sched)[window],
    )


async def _serve(index: int, spec: WorkerSpec, conn: Connection, counter: Any) -> None:
    transport = GrpcTransport(spec) if spec.protocol == "grpc" else HttpTransport(spec)
    try:
        await transport.connect()
    except (OSError, TimeoutError) as exc:
        conn.send(("error", f"client {index} cannot connect to {spec.address}: {exc!r}"))
        return
    conn.send(("ready", None))
    loop = asyncio.get_running_loop()
    try:
        while True:
            cmd = await loop.run_in_executor(None, conn.recv)
            if cmd is None:
                return
            run = closed_loop if cmd.mode == "closed" else open_loop
            result = await run(transport.call, spec.payloads, cmd, counter, index)
            conn.send(("result", result))
    finally:
        await transport.close()


def worker_main(index: int, spec: WorkerSpec, conn: Connection, counter: Any) -> None:
    """A client process's entry point (multiprocessing spawn target)."""
    try:
        try:
            import uvloop
        except ImportError:
            asyncio.run(_serve(index, spec, conn, counter))
        else:
            uvloop.run(_serve(index, spec, conn, counter))
    except (KeyboardInterrupt, EOFError, BrokenPipeError):
        pass
    except Exception:
        with contextlib.suppress(OSError):
            conn.send(("error", traceback.format_exc()))
