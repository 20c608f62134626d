"""The coordinator: prepares requests (checking everything before any load is sent), starts the
client processes, runs each point, reads the server's statistics around each measurement window,
and merges the processes' results."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from multiprocessing.connection import wait
from types import TracebackType
from typing import Any

from server import extras
from server.bench import inputs
from server.bench.client import Command, WorkerResult, WorkerSpec, worker_main
from server.bench.control import Control, connect
from server.bench.errors import BenchError
from server.bench.inputs import HttpRequest, ModelInfo
from server.bench.results import PointResult, ServerSplit, merge
from server.bench.scenario import Point, Scenario

LEAD_S = 0.2  # time for a command to reach every process before its start time
DRAIN_S = 10.0  # how long requests in flight at the end of a point may still take
READY_TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True)
class Target:
    """A checked model on a reachable server, with the requests to send it."""

    scenario: Scenario
    url: str
    model: ModelInfo
    payloads: tuple[bytes, ...]
    samples_per_request: int
    data_source: str


def prepare(scenario: Scenario, url: str, fallback: ModelInfo | None = None,
            headers: Mapping[str, str] | None = None) -> tuple[Control, Target]:
    """Connects, reads the model's metadata, builds and checks the requests and sends one probe.
    Every problem found here is a BenchError raised before any load is sent. `fallback`
    describes the model when the server's metadata lists no inputs (MLServer without declared
    inputs). `headers` go with the control calls (not the load): PyTriton's access token."""
    control = connect(scenario.protocol, url, headers)
    try:
        control.check_live()
        model = control.model_info(scenario.model, scenario.model_version)
        if not model.inputs:
            if fallback is None:
                raise BenchError(f"the metadata of model '{model.name}' on {url} lists no "
                                 "inputs, so no request can be built (MLServer: declare them "
                                 "in model-settings.json)")
            model = fallback
        note = "" if model is not fallback else " (tensors as the peers' model defines them: " \
            "the server's metadata lists none)"
        shapes = inputs.resolve_shapes(model, scenario.shape)
        if scenario.input_data is not None:
            requests = inputs.load_input_data(scenario.input_data, model, shapes)
            source = str(scenario.input_data)
        else:
            requests = [inputs.random_tensors(model, shapes, scenario.seed)]
            source = "random " + ", ".join(
                f"{name}{list(shape)}" for name, shape in shapes.items())
        if scenario.protocol == "grpc":
            probe: bytes | HttpRequest = inputs.grpc_payload(model, requests[0])
            payloads = tuple(inputs.grpc_payload(model, r) for r in requests)
        else:
            binary = scenario.http_format == "binary"
            http = [inputs.http_request(model, r, binary) for r in requests]
            probe = http[0]
            payloads = tuple(h.wire(url) for h in http)
        control.probe(probe)
    except BaseException:
        control.close()
        raise
    samples = inputs.samples_per_request(model, requests[0])
    return control, Target(scenario, url, model, payloads, samples, source + note)


class LoadClients:
    """`procs` client processes (spawned: each has its own interpreter and event loop),
    connected and waiting for commands."""

    def __init__(self, spec: WorkerSpec, procs: int, arrival: str) -> None:
        self._spec = spec
        self._procs = procs
        self._arrival = arrival
        ctx = mp.get_context("spawn")
        self.counter: Any = ctx.RawArray("q", procs)
        self._pipes = [ctx.Pipe() for _ in range(procs)]
        self._processes = [
            ctx.Process(target=worker_main, args=(i, spec, child, self.counter), daemon=True,
                        name=f"tachyon-bench-client-{i}")
            for i, (_, child) in enumerate(self._pipes)
        ]

    def __enter__(self) -> LoadClients:
        for process in self._processes:
            process.start()
        try:
            for i in range(self._procs):
                self._receive(i, READY_TIMEOUT_S, "ready")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        for parent, _ in self._pipes:
            with contextlib.suppress(OSError, ValueError):
                parent.send(None)
        for process in self._processes:
            if process.pid is None:
                continue
            process.join(5)
            if process.is_alive():
                process.terminate()
                process.join(5)

    def _receive(self, i: int, timeout: float, expected: str) -> Any:
        conn, process = self._pipes[i][0], self._processes[i]
        if not wait([conn, process.sentinel], timeout):
            raise BenchError(f"client process {i} did not answer in {timeout:.0f} s")
        if not conn.poll():
            raise BenchError(f"client process {i} exited with code {process.exitcode}")
        kind, value = conn.recv()
        if kind == "error":
            raise BenchError(f"client process {i} failed: {value}")
        if kind != expected:
            raise BenchError(f"client process {i} answered {kind!r}, expected {expected!r}")
        return value

    def start(self, point: Point, start_ns: int, measure_ns: int, stop_ns: int,
              seed: int) -> None:
        n = self._procs
        for i in range(n):
            self.counter[i] = 0
        for i, (parent, _) in enumerate(self._pipes):
            if point.mode == "closed":
                c = int(point.value)
                share = float(c // n + (1 if i < c % n else 0))
            else:
                share = point.value / n
            parent.send(Command(point.mode, share, self._arrival, i / n, start_ns, measure_ns,
                                stop_ns, DRAIN_S, seed * 1_000_003 + i))

    def collect(self, timeout: float) -> list[WorkerResult]:
        return [self._receive(i, timeout, "result") for i in range(self._procs)]

    def finished(self) -> int:
        return int(sum(self.counter))


class Progress:
    """A tqdm bar over the run's seconds, labelled with the current point and its finished
    requests (on a terminal only, unless asked for)."""

    def __init__(self, total_s: float, enabled: bool, label: str) -> None:
        try:
            from tqdm import tqdm
        except ImportError as exc:
            raise BenchError(extras.missing("tachyon bench", "bench", exc)) from None

        self._label = label
        self._bar = tqdm(total=round(total_s, 1), unit="s", desc=label, file=sys.stderr,
                         disable=None if enabled else True, leave=True, dynamic_ncols=True,
                         bar_format="{desc} {bar} {n:.1f}/{total:.1f} s")
        self._last = time.monotonic()

    def wait_until(self, t_ns: int, status: Callable[[], str]) -> None:
        while (delay := (t_ns - time.perf_counter_ns()) / 1e9) > 0:
            time.sleep(min(delay, 0.25))
            now = time.monotonic()
            self._bar.set_description_str(f"{self._label} {status()}", refresh=False)
            self._bar.update(min(now - self._last, self._bar.total - self._bar.n))
            self._last = now

    def close(self) -> None:
        self._bar.close()


def run_points(target: Target, control: Control, progress: bool = True,
               label: str = "") -> list[PointResult]:
    """Runs every point of the scenario against a prepared target."""
    scenario = target.scenario
    method = "/inference.GRPCInferenceService/ModelInfer"
    spec = WorkerSpec(scenario.protocol, target.url, method, target.payloads, scenario.timeout)
    points = scenario.points
    total = len(points) * (scenario.warmup + scenario.duration)
    results = []
    bar = Progress(total, progress, label or scenario.name)
    try:
        with LoadClients(spec, scenario.procs, scenario.arrival) as clients:
            for k, point in enumerate(points):
                results.append(_run_point(point, k, target, control, clients, bar))
    finally:
        bar.close()
    return results


def _run_point(point: Point, k: int, target: Target, control: Control, clients: LoadClients,
               bar: Progress) -> PointResult:
    scenario = target.scenario
    start = time.perf_counter_ns() + int(LEAD_S * 1e9)
    measure = start + int(scenario.warmup * 1e9)
    stop = measure + int(scenario.duration * 1e9)
    clients.start(point, start, measure, stop, scenario.seed + k)
    t0 = time.monotonic()

    def status() -> str:
        elapsed = max(time.monotonic() - t0 - LEAD_S, 1e-3)
        done = clients.finished()
        return f"{point.label}: {done:,} requests, {done / elapsed:,.0f}/s"

    bar.wait_until(measure, status)
    before = control.stats(scenario.model, scenario.model_version)
    bar.wait_until(stop, status)
    after = control.stats(scenario.model, scenario.model_version)
    worker_results = clients.collect(DRAIN_S + 30)
    return merge(point, worker_results, (stop - measure) / 1e9, target.samples_per_request,
                 ServerSplit.from_delta(before, after))
