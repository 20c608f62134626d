"""Per model-version statistics, with Triton's ModelStatistics fields.

Counters are plain integers updated on the event loop thread (the batcher delivers results
there), so no locks are needed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from server.metrics import VersionMetrics


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


@dataclass(slots=True)
class BatchStats:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass(slots=True)
class ModelStats:
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    cache_hit: Duration = field(default_factory=Duration)
    cache_miss: Duration = field(default_factory=Duration)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    batches: dict[int, BatchStats] = field(default_factory=dict)
    metrics: VersionMetrics | None = None  # the Prometheus side of the same numbers

    def record_success(self, ns: int) -> None:
        self.success.add(ns)
        if self.metrics is not None:
            self.metrics.success.inc()
            self.metrics.request.observe(ns / 1e9)

    def record_failure(self, ns: int, reason: str) -> None:
        """`reason`: rejected, cancelled, backend or other."""
        self.fail.add(ns)
        if self.metrics is not None:
            self.metrics.failures[reason].inc()

    def record_cache_hit(self, ns: int) -> None:
        """A response answered from the cache: `ns` to look it up and copy it out. It counts
        in `queue` with no wait (Triton: queue "includes cache hits"); the data plane counts
        it in `success`; compute, inference and execution counts exclude it."""
        self.cache_hit.add(ns)
        self.queue.add(0)
        if self.metrics is not None:
            self.metrics.cache_hits.inc()
            self.metrics.cache_hit_duration.observe(ns / 1e9)
            self.metrics.queue.observe(0.0)

    def record_cache_miss(self, ns: int) -> None:
        """A request the cache did not hold, executed and inserted: `ns` to look it up and
        insert its response."""
        self.cache_miss.add(ns)
        if self.metrics is not None:
            self.metrics.cache_misses.inc()
            self.metrics.cache_miss_duration.observe(ns / 1e9)

    def record_batch(
        self, rows: int, requests: int, queue_ns: list[int], input_ns: int, infer_ns: int,
        output_ns: int,
    ) -> None:
        """One executed batch of `requests` requests and `rows` rows. Each request is charged
        the whole batch's compute time, as Triton does."""
        for ns in queue_ns:
            self.queue.add(ns)
        self.compute_input.add(input_ns * requests, requests)
        self.compute_infer.add(infer_ns * requests, requests)
        self.compute_output.add(output_ns * requests, requests)
        self.inference_count += rows
        self.execution_count += 1
        self.last_inference_ms = time.time_ns() // 1_000_000
        batch = self.batches.get(rows)
        if batch is None:
            batch = self.batches[rows] = BatchStats()
        batch.compute_input.add(input_ns)
        batch.compute_infer.add(infer_ns)
        batch.compute_output.add(output_ns)
        m = self.metrics
        if m is not None:
            for ns in queue_ns:
                m.queue.observe(ns / 1e9)
            m.compute_input.observe(input_ns / 1e9)
            m.compute_infer.observe(infer_ns / 1e9)
            m.compute_output.observe(output_ns / 1e9)
            m.batch_size.observe(rows)
            m.inferences.inc(rows)
            m.executions.inc()
