"""The response cache (Triton's `--cache-config local,size=BYTES` and `response_cache`).

One server-wide cache shared by every model that enables `response_cache { enable: true }`:
a least-recently-used map from a request's key (a BLAKE2b hash of the model, version, inputs,
requested outputs and the parameters that change the result) to the response's output
tensors, bounded by the bytes it holds. An entry's size is its output bytes plus a fixed
overhead; an entry larger than the whole cache is not kept.

Safe to call from any thread (one lock); the data plane calls it on the event loop. Entries
are dropped when their model (or, for an ensemble, any model) loads or unloads a version, and
an insert computed before such a change is refused (`generation`), so a new version never
answers from an old version's cache.
"""

from __future__ import annotations

import hashlib
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from server.types import Array, DataType

ENTRY_OVERHEAD = 256
"""Bytes charged per entry on top of its outputs (key, bookkeeping)."""
OUTPUT_OVERHEAD = 64
"""Bytes charged per output tensor on top of its data (name, datatype, shape)."""
_BYTES_ELEMENT = 4  # BYTES elements are charged their length plus this (their wire prefix)


class CacheConfigError(ValueError):
    """A --cache-config value Tachyon cannot use; the message names it and what is expected."""


@dataclass(frozen=True, slots=True)
class CacheSettings:
    """--cache-config local,size=BYTES: a local cache of `size` bytes (0: no cache)."""

    size: int = 0


_EXPECTED = "expected local,size=BYTES (for example --cache-config local,size=1048576)"


def parse_cache_config(values: Sequence[str]) -> CacheSettings | None:
    """Triton's repeatable `--cache-config <cache>,<key>=<value>`; None when not given or the
    size is 0 (Triton enables the local cache only for a non-zero size)."""
    if not values:
        return None
    size: int | None = None
    for value in values:
        cache, _, setting = value.partition(",")
        if cache != "local":
            raise CacheConfigError(
                f"--cache-config '{value}': cache '{cache}' is not available (Tachyon has the "
                f"local cache only), {_EXPECTED}"
            )
        key, equals, number = setting.partition("=")
        if key != "size" or not equals:
            raise CacheConfigError(
                f"--cache-config '{value}': setting '{setting}' is not known, {_EXPECTED}"
            )
        if not number.isdigit():
            raise CacheConfigError(
                f"--cache-config '{value}': size '{number}' is not a whole number of bytes, "
                f"{_EXPECTED}"
            )
        size = int(number)
    if size is None:
        raise CacheConfigError(f"--cache-config {list(values)}: no size given, {_EXPECTED}")
    return CacheSettings(size) if size > 0 else None


# -- keys -----------------------------------------------------------------------------------


def request_key(
    model: str,
    version: int,
    inputs: Iterable[tuple[str, DataType, Array]],
    outputs: Sequence[str],
    options: Iterable[tuple[str, object]],
) -> bytes:
    """The 128-bit key of a request: model, version, each input's name, datatype, shape and
    bytes (pass them in a fixed order, e.g. sorted by name), the requested outputs in order,
    and the backend options derived from the request's parameters (FAISS `k`, `nprobe`, ...;
    parameters such as priority or timeout do not change a result and are not in the key).
    Every part is length-prefixed so that no two different requests hash the same bytes."""
    h = hashlib.blake2b(digest_size=16)
    _text(h, model)
    h.update(struct.pack("<q", version))
    for name, datatype, data in inputs:
        _text(h, name)
        _text(h, datatype.value)
        h.update(struct.pack(f"<{data.ndim + 1}q", data.ndim, *data.shape))
        _data(h, datatype, data)
    h.update(struct.pack("<q", len(outputs)))
    for name in outputs:
        _text(h, name)
    for option, value in options:
        _text(h, option)
        _text(h, f"{type(value).__name__}:{value!r}")
    return h.digest()


def _text(h: hashlib.blake2b, text: str) -> None:
    data = text.encode()
    h.update(struct.pack("<q", len(data)))
    h.update(data)


def _data(h: hashlib.blake2b, datatype: DataType, data: Array) -> None:
    if datatype is DataType.BYTES:
        for item in data.reshape(-1):
            value = item if isinstance(item, bytes) else str(item).encode()
            h.update(struct.pack("<q", len(value)))
            h.update(value)
        return
    array = np.ascontiguousarray(data)
    if array.size:  # an empty one has no bytes (and memoryview cannot cast it)
        h.update(array.data.cast("B"))


# -- the cache ------------------------------------------------------------------------------


Outputs = dict[str, Array]


@dataclass(frozen=True, slots=True)
class Entry:
    """One cached response: its output arrays (read-only copies the cache owns), the model
    that produced it, and the bytes it is charged."""

    model: str
    ensemble: bool
    outputs: Outputs
    size: int


@dataclass(frozen=True, slots=True)
class CacheTotals:
    """Server-wide counts, for the metrics endpoint."""

    capacity: int
    entries: int
    bytes: int
    lookups: int
    hits: int
    misses: int
    inserts: int
    evictions: int


def entry_size(outputs: Outputs) -> int:
    """Output bytes (a BYTES element: its length plus its 4-byte wire prefix) plus overhead."""
    size = ENTRY_OVERHEAD
    for name, data in outputs.items():
        size += OUTPUT_OVERHEAD + len(name)
        if data.dtype.kind == "O":
            size += sum(len(v) + _BYTES_ELEMENT for v in data.reshape(-1))
        else:
            size += int(data.nbytes)
    return size


def _owned(data: Array) -> Array:
    """A copy the cache alone holds (outputs are often views of a whole batch's array, which
    would keep the batch alive), read-only so that no reader can change a cached answer."""
    copy = np.array(data, copy=True)
    copy.flags.writeable = False
    return copy


class ResponseCache:
    """An LRU map of request keys to responses, bounded by `capacity` bytes."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[bytes, Entry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._generation = 0
        self._lookups = self._hits = self._inserts = self._evictions = 0

    @property
    def generation(self) -> int:
        """Changes whenever entries are dropped for a model change: an insert passes the value
        it read before computing its response and is refused if it changed since."""
        return self._generation

    def lookup(self, key: bytes) -> Entry | None:
        with self._lock:
            self._lookups += 1
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            self._hits += 1
            return entry

    def insert(
        self, key: bytes, model: str, outputs: Outputs, generation: int, ensemble: bool = False,
    ) -> bool:
        """Keep a response; False when it is larger than the cache, or its model changed
        since `generation` was read. Evicts least recently used entries to make room."""
        size = entry_size(outputs)
        if size > self.capacity:
            return False
        entry = Entry(model, ensemble, {n: _owned(a) for n, a in outputs.items()}, size)
        with self._lock:
            if generation != self._generation:
                return False
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.size
            while self._entries and self._bytes + size > self.capacity:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.size
                self._evictions += 1
            self._entries[key] = entry
            self._bytes += size
            self._inserts += 1
            return True

    def drop_model(self, model: str) -> int:
        """Forget the responses of `model` and of every ensemble (an ensemble's answer depends
        on the models it calls); returns how many entries went."""
        with self._lock:
            self._generation += 1
            gone = [k for k, e in self._entries.items() if e.model == model or e.ensemble]
            for key in gone:
                self._bytes -= self._entries.pop(key).size
            return len(gone)

    def totals(self) -> CacheTotals:
        with self._lock:
            return CacheTotals(
                capacity=self.capacity,
                entries=len(self._entries),
                bytes=self._bytes,
                lookups=self._lookups,
                hits=self._hits,
                misses=self._lookups - self._hits,
                inserts=self._inserts,
                evictions=self._evictions,
            )
