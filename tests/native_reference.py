"""Plain-Python / numpy reference implementations of ``server._native``.

Each function here has the same signature, result and error behaviour (exception type and,
for ValueError, the exact message) as its native counterpart, so the tests can check
``native == reference`` on random inputs and the benchmarks can time the realistic Python
alternative. They are written for clarity, not speed.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # collections.abc.Buffer is Python >= 3.12
    from typing_extensions import Buffer

_PREFIX = struct.Struct("<I")
_MAX_ELEMENT_BYTES = 0xFFFFFFFF


def _as_bytes(obj: Buffer) -> memoryview:
    """A flat byte view of a C-contiguous buffer (raises like the native code otherwise)."""
    view = memoryview(obj)
    if not view.c_contiguous:
        raise BufferError("buffer is not C-contiguous")
    if view.nbytes == 0:
        return memoryview(b"")  # memoryview cannot cast a shape with zeros
    return view.cast("B") if view.ndim != 1 or view.format != "B" else view


def _element_bytes(index: int, item: Any) -> bytes:
    if isinstance(item, str):
        return item.encode("utf-8")
    if isinstance(item, bytes):
        return item
    try:
        return _as_bytes(item).tobytes()
    except TypeError:
        raise TypeError(
            f"items[{index}] must be bytes, bytearray, memoryview, str or another buffer, "
            f"not {type(item).__name__}"
        ) from None


def encode_bytes(items: Iterable[Any]) -> bytes:
    """KServe v2 / Triton BYTES serialization: ``<I`` length then the bytes, per element."""
    if isinstance(items, (bytes, bytearray, memoryview, str)):
        raise TypeError(
            f"items must be a sequence of bytes/str elements, not a single {type(items).__name__}"
        )
    if isinstance(items, np.ndarray):
        items = items.ravel(order="C")
    chunks = []
    for i, item in enumerate(items):
        data = _element_bytes(i, item)
        if len(data) > _MAX_ELEMENT_BYTES:
            raise ValueError(
                f"items[{i}] is {len(data)} bytes; a BYTES element holds at most 4294967295"
            )
        chunks.append(_PREFIX.pack(len(data)))
        chunks.append(data)
    return b"".join(chunks)


def _scan(buf: Buffer, count: int) -> list[tuple[int, int]]:
    """(offset, size) of each element; ValueError with the native message when malformed."""
    if count < -1:
        raise ValueError(f"count must be -1 (all elements) or >= 0, got {count}")
    view = _as_bytes(buf)
    length = view.nbytes
    spans: list[tuple[int, int]] = []
    pos = 0
    while (pos < length) if count == -1 else (len(spans) < count):
        left = length - pos
        if left == 0:
            raise ValueError(
                f"expected {count} elements but only {len(spans)} fit in {length} bytes"
            )
        if left < _PREFIX.size:
            raise ValueError(
                f"element {len(spans)} needs a 4-byte length prefix at offset {pos} "
                f"but only {left} bytes remain"
            )
        (size,) = _PREFIX.unpack_from(view, pos)
        start = pos + _PREFIX.size
        if size > length - start:
            raise ValueError(
                f"element {len(spans)} declares {size} bytes at offset {start} "
                f"but only {length - start} remain"
            )
        spans.append((start, size))
        pos = start + size
    if pos != length:
        raise ValueError(f"{length - pos} trailing bytes after {len(spans)} elements")
    return spans


def decode_bytes(buf: Buffer, count: int = -1) -> list[bytes]:
    """Parse ``count`` BYTES elements (``-1``: all of them) with ``struct``."""
    view = _as_bytes(buf)
    return [view[start : start + size].tobytes() for start, size in _scan(view, count)]


def bytes_sizes(buf: Buffer) -> int:
    return len(_scan(buf, -1))
