"""Every Prometheus metric Tachyon exports, in one place.

Triton's families under the `tachyon_` prefix, labelled `model` and `version`. Durations are
histograms (Triton users ask for these: triton#2685, #3060). The hot path touches only
pre-bound label children (`VersionMetrics`); gauges that describe state (pending requests,
model states, uptime, GPUs) are read at scrape time by a collector, costing requests nothing.

Request-level histograms (request, queue) observe once per request; compute histograms
(input, infer, output) and the batch-size histogram observe once per model execution, which is
what an operator tuning batching wants to see.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from server import gpus
from server.cache import CacheTotals

log = logging.getLogger(__name__)

DEFAULT_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
FAILURE_REASONS = ("rejected", "cancelled", "backend", "other")
LABELS = ("model", "version")


class Metrics:
    """The registry and metric families of one server."""

    def __init__(self, latency_buckets: Sequence[float] = DEFAULT_LATENCY_BUCKETS) -> None:
        disable_created_metrics()  # `_created` series double the output and help nobody here
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        buckets = tuple(latency_buckets)
        self.success = Counter(
            "tachyon_inference_request_success", "Successful inference requests", LABELS,
            registry=r,
        )
        self.failure = Counter(
            "tachyon_inference_request_failure", "Failed inference requests, by reason",
            (*LABELS, "reason"), registry=r,
        )
        self.inference_count = Counter(
            "tachyon_inference_count", "Inferences performed (rows: a batch of 8 counts 8)",
            LABELS, registry=r,
        )
        self.execution_count = Counter(
            "tachyon_inference_exec_count", "Model executions (batches)", LABELS, registry=r,
        )
        self.request_duration = Histogram(
            "tachyon_request_duration_seconds",
            "Time from a request's admission to its response, per request", LABELS,
            buckets=buckets, registry=r,
        )
        self.queue_duration = Histogram(
            "tachyon_queue_duration_seconds", "Time a request waited in the queue", LABELS,
            buckets=buckets, registry=r,
        )
        self.compute_input_duration = Histogram(
            "tachyon_compute_input_duration_seconds",
            "Time to gather a batch's inputs, per execution", LABELS, buckets=buckets, registry=r,
        )
        self.compute_infer_duration = Histogram(
            "tachyon_compute_infer_duration_seconds",
            "Time the backend ran a batch, per execution", LABELS, buckets=buckets, registry=r,
        )
        self.compute_output_duration = Histogram(
            "tachyon_compute_output_duration_seconds",
            "Time to split a batch's outputs, per execution", LABELS, buckets=buckets, registry=r,
        )
        self.batch_size = Histogram(
            "tachyon_batch_size", "Rows per model execution", LABELS, buckets=BATCH_BUCKETS,
            registry=r,
        )
        # Triton's nv_cache_*_per_model (durations as histograms in seconds, as ours are)
        self.cache_hits = Counter(
            "tachyon_cache_num_hits_per_model", "Requests answered from the response cache",
            LABELS, registry=r,
        )
        self.cache_misses = Counter(
            "tachyon_cache_num_misses_per_model",
            "Requests the response cache did not hold (executed, then inserted)", LABELS,
            registry=r,
        )
        self.cache_hit_duration = Histogram(
            "tachyon_cache_hit_duration_per_model_seconds",
            "Time to look up a cached response and copy it out, per hit", LABELS,
            buckets=buckets, registry=r,
        )
        self.cache_miss_duration = Histogram(
            "tachyon_cache_miss_duration_per_model_seconds",
            "Time to look up a request and insert its response, per miss", LABELS,
            buckets=buckets, registry=r,
        )

    def version(self, model: str, version: int) -> VersionMetrics:
        return VersionMetrics(self, model, str(version))

    def remove_version(self, model: str, version: int) -> None:
        """Drop the series of a version that is no longer served (unloaded, retired), so
        that loading and unloading models does not grow the registry or the scrape."""
        labels = (model, str(version))
        for family in (
            self.success, self.inference_count, self.execution_count, self.request_duration,
            self.queue_duration, self.compute_input_duration, self.compute_infer_duration,
            self.compute_output_duration, self.batch_size, self.cache_hits, self.cache_misses,
            self.cache_hit_duration, self.cache_miss_duration,
        ):
            family.remove(*labels)  # a label set that has no series is skipped
        for reason in FAILURE_REASONS:
            self.failure.remove(*labels, reason)

    def add_state_collector(self, collector: Collector) -> None:
        self.registry.register(collector)


class VersionMetrics:
    """The label children of one model version, bound once (`labels()` is slow)."""

    __slots__ = (
        "batch_size", "cache_hit_duration", "cache_hits", "cache_miss_duration", "cache_misses",
        "compute_infer", "compute_input", "compute_output", "executions", "failures",
        "inferences", "queue", "request", "success",
    )

    def __init__(self, metrics: Metrics, model: str, version: str) -> None:
        labels = (model, version)
        self.success = metrics.success.labels(*labels)
        self.failures = {
            reason: metrics.failure.labels(*labels, reason) for reason in FAILURE_REASONS
        }
        self.inferences = metrics.inference_count.labels(*labels)
        self.executions = metrics.execution_count.labels(*labels)
        self.request = metrics.request_duration.labels(*labels)
        self.queue = metrics.queue_duration.labels(*labels)
        self.compute_input = metrics.compute_input_duration.labels(*labels)
        self.compute_infer = metrics.compute_infer_duration.labels(*labels)
        self.compute_output = metrics.compute_output_duration.labels(*labels)
        self.batch_size = metrics.batch_size.labels(*labels)
        self.cache_hits = metrics.cache_hits.labels(*labels)
        self.cache_misses = metrics.cache_misses.labels(*labels)
        self.cache_hit_duration = metrics.cache_hit_duration.labels(*labels)
        self.cache_miss_duration = metrics.cache_miss_duration.labels(*labels)


class StateCollector(Collector):
    """Gauges read at scrape time: pending requests and state per version, uptime, GPUs."""

    def __init__(self, entries: Callable[[], Iterable[Any]], states: Sequence[str]) -> None:
        self._entries = entries
        self._states = states
        self._started = time.monotonic()
        self._nvml = _nvml()

    def collect(self) -> Iterable[GaugeMetricFamily]:
        pending = GaugeMetricFamily(
            "tachyon_inference_pending_requests", "Requests waiting in the queue",
            labels=LABELS,
        )
        state = GaugeMetricFamily(
            "tachyon_model_state", "1 for the state a model version is in, 0 for the others",
            labels=(*LABELS, "state"),
        )
        for entry in self._entries():
            if entry.retired:  # unloaded on purpose: its series went with it
                continue
            labels = [entry.name, str(entry.version)]
            batcher = entry.batcher
            pending.add_metric(labels, batcher.pending if batcher is not None else 0)
            for name in self._states:
                state.add_metric([*labels, name], 1.0 if entry.state.value == name else 0.0)
        yield pending
        yield state
        yield GaugeMetricFamily(
            "tachyon_server_uptime_seconds", "Seconds since the server started",
            value=time.monotonic() - self._started,
        )
        if self._nvml is not None:
            yield from _gpu_metrics(self._nvml)


class CacheCollector(Collector):
    """The server-wide response cache gauges and counters (Triton's nv_cache_num_entries,
    nv_cache_num_lookups, ..., nv_cache_util), read at scrape time."""

    def __init__(self, totals: Callable[[], CacheTotals]) -> None:
        self._totals = totals

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        t = self._totals()
        yield GaugeMetricFamily(
            "tachyon_cache_num_entries", "Responses held by the response cache", value=t.entries
        )
        yield GaugeMetricFamily(
            "tachyon_cache_bytes", "Bytes the response cache's entries are charged", value=t.bytes
        )
        yield GaugeMetricFamily(
            "tachyon_cache_size_bytes", "The response cache's bound (--cache-config size)",
            value=t.capacity,
        )
        yield GaugeMetricFamily(
            "tachyon_cache_util", "Fraction of the response cache in use (0..1)",
            value=t.bytes / t.capacity if t.capacity else 0.0,
        )
        for name, help_text, value in (
            ("tachyon_cache_num_lookups", "Response cache lookups", t.lookups),
            ("tachyon_cache_num_hits", "Response cache lookups that found a response", t.hits),
            ("tachyon_cache_num_misses", "Response cache lookups that found none", t.misses),
            ("tachyon_cache_num_inserts", "Responses inserted into the response cache", t.inserts),
            ("tachyon_cache_num_evictions",
             "Responses evicted (least recently used) to make room", t.evictions),
        ):
            yield CounterMetricFamily(name, help_text, value=value)


class NativePathCollector(Collector):
    """The native gRPC request path's counters (server/grpc/native_path.py), read at scrape
    time from its `stats()`: calls it planned, the chunks they formed, and calls it handed
    back to the Python path."""

    def __init__(self, stats: Callable[[], dict[str, int]]) -> None:
        self._stats = stats

    def collect(self) -> Iterable[CounterMetricFamily]:
        s = self._stats()
        for name, help_text, key in (
            ("tachyon_grpc_native_path_requests",
             "ModelInfer requests parsed, validated and coalesced in C++", "calls"),
            ("tachyon_grpc_native_path_chunks",
             "Chunks (one batcher entry each) the coalesced requests formed", "chunks"),
            ("tachyon_grpc_native_path_fallbacks",
             "Coalesced requests handed back to the Python path", "fallbacks"),
        ):
            yield CounterMetricFamily(name, help_text, value=s.get(key, 0))


def _nvml() -> Any:
    """nvidia-ml-py when a GPU is present; None (with a log line) otherwise."""
    lib, why = gpus.load_nvml()
    try:
        if lib is not None and lib.nvmlDeviceGetCount() == 0:
            why = "no GPU"
    except Exception as exc:  # NVMLError
        why = str(exc)
    if why:
        log.info("GPU metrics off: %s", why)
        return None
    return lib


def _gpu_metrics(nvml: Any) -> Iterable[GaugeMetricFamily]:
    util = GaugeMetricFamily("tachyon_gpu_utilization", "GPU utilization (0..1)", labels=["gpu"])
    used = GaugeMetricFamily("tachyon_gpu_memory_used_bytes", "GPU memory in use", labels=["gpu"])
    total = GaugeMetricFamily("tachyon_gpu_memory_total_bytes", "GPU memory", labels=["gpu"])
    power = GaugeMetricFamily("tachyon_gpu_power_watts", "GPU power draw", labels=["gpu"])
    for index in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        gpu = [str(index)]
        util.add_metric(gpu, nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        used.add_metric(gpu, float(memory.used))
        total.add_metric(gpu, float(memory.total))
        power.add_metric(gpu, nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0)
    yield from (util, used, total, power)
