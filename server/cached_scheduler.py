"""A model's scheduler behind the response cache.

`CachedScheduler` wraps a model version's DynamicBatcher (or an ensemble's scheduler) when its
config enables `response_cache` and the server has a cache (`--cache-config`). A request whose
key is cached is answered from the cache and never enters the queue; any other request goes
to the wrapped scheduler and its successful outputs are inserted. Because ensemble steps call
their models' schedulers too, a composing model that enables the cache uses it inside an
ensemble as well, as in Triton.

Statistics follow Triton: a hit counts in `cache_hit` (the lookup and the copy of the cached
outputs) and in `queue` (zero time: it never waited), not in the compute statistics, the
inference count or the execution count; a miss counts in `cache_miss` (the lookup plus the
insert). The data plane counts both in `success`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

from server.backends.base import Options
from server.batching import Outputs, Scheduler
from server.cache import ResponseCache, request_key
from server.model_config import ModelSpec
from server.statistics import ModelStats
from server.tracing import RequestTrace
from server.types import Array

log = logging.getLogger(__name__)

# Inputs or outputs larger than this are hashed / copied on a worker thread, off the loop
# (hashlib and numpy release the GIL).
_OFF_LOOP_BYTES = 1 << 20


def wrap(
    scheduler: Scheduler, spec: ModelSpec, version: int, stats: ModelStats,
    cache: ResponseCache | None,
) -> Scheduler:
    """The scheduler a model version serves through: behind the cache when its config enables
    the cache and the server has one; as it is otherwise (with a warning when the config asks
    for a cache the server was started without, as Triton serves such a model uncached)."""
    if not spec.response_cache:
        return scheduler
    if cache is None:
        log.warning(
            "model '%s' version %d enables response_cache, but the server has no cache "
            "(--cache-config local,size=BYTES): served without caching", spec.name, version,
        )
        return scheduler
    return CachedScheduler(scheduler, spec, version, stats, cache)


class CachedScheduler:
    """The Scheduler interface, answering repeated requests from `cache`."""

    def __init__(
        self, inner: Scheduler, spec: ModelSpec, version: int, stats: ModelStats,
        cache: ResponseCache,
    ) -> None:
        self.inner = inner
        self.spec = spec
        self.version = version
        self.stats = stats
        self.cache = cache
        self._ensemble = spec.backend == "ensemble"

    def check_parameters(self, priority: object, timeout_us: object) -> tuple[int, int]:
        return self.inner.check_parameters(priority, timeout_us)

    @property
    def pending(self) -> int:
        return self.inner.pending

    async def drain(self) -> None:
        await self.inner.drain()

    async def submit(
        self, inputs: dict[str, Array], outputs: list[str], rows: int, level: int = 0,
        timeout_us: int = 0, options: Options = (), trace: RequestTrace | None = None,
    ) -> Outputs:
        start = time.monotonic_ns()
        key = await self._key(inputs, outputs, options)
        entry = self.cache.lookup(key)
        if entry is not None:
            self.stats.record_cache_hit(time.monotonic_ns() - start)
            return dict(entry.outputs)
        generation = self.cache.generation  # a model change from here on refuses the insert
        lookup_ns = time.monotonic_ns() - start
        result = await self.inner.submit(inputs, outputs, rows, level, timeout_us, options, trace)
        insert_start = time.monotonic_ns()
        if _nbytes(result.values()) > _OFF_LOOP_BYTES:
            await asyncio.to_thread(
                self.cache.insert, key, self.spec.name, result, generation, self._ensemble
            )
        else:
            self.cache.insert(key, self.spec.name, result, generation, self._ensemble)
        self.stats.record_cache_miss(lookup_ns + time.monotonic_ns() - insert_start)
        return result

    async def _key(self, inputs: dict[str, Array], outputs: list[str], options: Options) -> bytes:
        keyed = []
        for name in sorted(inputs):
            tensor = self.spec.input(name)
            assert tensor is not None, "the data plane checked the input names"
            keyed.append((name, tensor.datatype, inputs[name]))
        args = (self.spec.name, self.version, keyed, outputs, options)
        if _nbytes(inputs.values()) > _OFF_LOOP_BYTES:
            return await asyncio.to_thread(request_key, *args)
        return request_key(*args)


def _nbytes(arrays: Iterable[Array]) -> int:
    return sum(int(a.nbytes) for a in arrays)
