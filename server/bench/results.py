"""One point's numbers: client results of every process merged exactly (latencies concatenated,
counts summed), percentiles, and the server-side split from ModelStatistics deltas."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from server.bench.client import WorkerResult
from server.bench.control import StatsSnapshot
from server.bench.scenario import Point

PERCENTILES = (50.0, 90.0, 95.0, 99.0, 99.9)
RAW_PERCENTILES = (*range(1, 100), 99.5, 99.9, 99.99)
HISTOGRAM_BINS = 60


def percentile_ns(sorted_ns: np.ndarray, p: float) -> float:
    """Nearest-rank percentile (the smallest value with at least p% of samples at or below it),
    as perf_analyzer reports them."""
    if sorted_ns.size == 0:
        return float("nan")
    rank = max(int(np.ceil(p / 100.0 * sorted_ns.size)), 1)
    return float(sorted_ns[rank - 1])


@dataclass(frozen=True, slots=True)
class ServerSplit:
    """Per-request averages over the point, in microseconds, as perf_analyzer's 'Server:' line:
    request = queue + compute input + compute infer + compute output + overhead."""

    requests: int
    inference_count: int
    execution_count: int
    request_us: float
    queue_us: float
    compute_input_us: float
    compute_infer_us: float
    compute_output_us: float

    @property
    def overhead_us(self) -> float:
        return self.request_us - self.queue_us - self.compute_input_us - self.compute_infer_us \
            - self.compute_output_us

    @property
    def avg_batch(self) -> float:
        return self.inference_count / self.execution_count if self.execution_count else 0.0

    @classmethod
    def from_delta(cls, before: StatsSnapshot | None,
                   after: StatsSnapshot | None) -> ServerSplit | None:
        if before is None or after is None:
            return None
        d = after - before
        if d.success_count <= 0:
            return None

        def avg(count: int, ns: int) -> float:
            return ns / count / 1e3 if count > 0 else 0.0

        return cls(
            requests=d.success_count, inference_count=d.inference_count,
            execution_count=d.execution_count,
            request_us=avg(d.success_count, d.success_ns),
            queue_us=avg(d.queue_count, d.queue_ns),
            compute_input_us=avg(d.compute_input_count, d.compute_input_ns),
            compute_infer_us=avg(d.compute_infer_count, d.compute_infer_ns),
            compute_output_us=avg(d.compute_output_count, d.compute_output_ns),
        )

    def to_json(self) -> dict[str, float]:
        return {
            "requests": self.requests, "inference_count": self.inference_count,
            "execution_count": self.execution_count, "avg_batch": round(self.avg_batch, 3),
            "request_us": round(self.request_us, 2), "queue_us": round(self.queue_us, 2),
            "compute_input_us": round(self.compute_input_us, 2),
            "compute_infer_us": round(self.compute_infer_us, 2),
            "compute_output_us": round(self.compute_output_us, 2),
            "overhead_us": round(self.overhead_us, 2),
        }


@dataclass(frozen=True, slots=True)
class PointResult:
    point: Point
    window_s: float
    requests: int  # successful responses that arrived in the window
    samples_per_request: int
    latencies_ns: np.ndarray  # sorted; successful requests sent (scheduled) in the window
    errors: dict[str, int]
    sent: int
    lag_ns: np.ndarray  # sorted; open loop: actual - scheduled send time
    server: ServerSplit | None
    procs: int

    @property
    def throughput(self) -> float:
        return self.requests / self.window_s

    @property
    def samples_per_s(self) -> float:
        return self.throughput * self.samples_per_request

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def latency_ms(self, p: float) -> float:
        return percentile_ns(self.latencies_ns, p) / 1e6

    @property
    def mean_ms(self) -> float:
        return float(self.latencies_ns.mean()) / 1e6 if self.latencies_ns.size else float("nan")

    def summary(self) -> dict[str, Any]:
        """Everything but the raw samples, JSON-friendly (times in ms unless named _us)."""
        lat = self.latencies_ns
        out: dict[str, Any] = {
            "mode": self.point.mode, "load": self.point.value, "label": self.point.label,
            "window_s": round(self.window_s, 4), "procs": self.procs,
            "requests": self.requests, "sent": self.sent,
            "infer_per_s": round(self.throughput, 2),
            "samples_per_s": round(self.samples_per_s, 2),
            "samples_per_request": self.samples_per_request,
            "latency_count": int(lat.size),
            "latency_ms": {
                "mean": _r(self.mean_ms),
                "min": _r(lat[0] / 1e6 if lat.size else float("nan")),
                "max": _r(lat[-1] / 1e6 if lat.size else float("nan")),
                "stdev": _r(float(lat.std()) / 1e6 if lat.size else float("nan")),
                **{f"p{p:g}": _r(self.latency_ms(p)) for p in PERCENTILES},
            },
            "errors": dict(self.errors), "error_count": self.error_count,
            "server": self.server.to_json() if self.server else None,
        }
        if self.point.mode == "open":
            out["send_lag_ms"] = {
                f"p{p:g}": _r(percentile_ns(self.lag_ns, p) / 1e6) for p in (50, 99, 100)
            }
        return out

    def raw(self) -> dict[str, Any]:
        """Raw percentiles and a log-spaced histogram of every latency of the window."""
        lat = self.latencies_ns
        raw: dict[str, Any] = {
            "percentiles_us": {f"p{p:g}": _r(percentile_ns(lat, p) / 1e3)
                               for p in RAW_PERCENTILES},
        }
        if lat.size:
            lo, hi = max(float(lat[0]), 1.0), max(float(lat[-1]), float(lat[0]) + 1.0)
            counts, edges = np.histogram(lat, bins=np.geomspace(lo, hi * 1.000001,
                                                                HISTOGRAM_BINS + 1))
            raw["histogram"] = {"edges_us": [_r(e / 1e3) for e in edges],
                                "counts": counts.tolist()}
        return raw


def _r(value: float, digits: int = 4) -> float | None:
    return None if value != value else round(float(value), digits)  # NaN -> null


def merge(point: Point, results: Sequence[WorkerResult], window_s: float,
          samples_per_request: int, server: ServerSplit | None) -> PointResult:
    """All processes' results as one: exact, since every sample is kept."""
    errors: dict[str, int] = {}
    for result in results:
        for status, n in result.errors.items():
            errors[status] = errors.get(status, 0) + n
    return PointResult(
        point=point, window_s=window_s,
        requests=sum(r.completed for r in results),
        samples_per_request=samples_per_request,
        latencies_ns=np.sort(np.concatenate([r.latencies_ns for r in results] or
                                            [np.zeros(0, np.int64)])),
        errors=dict(sorted(errors.items())), sent=sum(r.sent for r in results),
        lag_ns=np.sort(np.concatenate([r.lag_ns for r in results] or [np.zeros(0, np.int64)])),
        server=server, procs=len(results),
    )
