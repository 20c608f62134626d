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


# -- the native request path's wire reader and writer (native/src/infer_wire.hpp) -----------

PlainRequest = tuple[str, str, str, list[tuple[str, str, tuple[int, ...]]], list[str], list[bytes]]


class _NotPlain(Exception):
    """Malformed, or a feature the native request path leaves to Python."""


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while shift < 64:
        if pos >= len(data):
            raise _NotPlain("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value & 0xFFFFFFFFFFFFFFFF, pos
        shift += 7
    raise _NotPlain("overlong varint")


def _fields(data: bytes) -> list[tuple[int, int, int | bytes]]:
    """(field, wire type, value) of every top-level field; groups are not plain."""
    out: list[tuple[int, int, int | bytes]] = []
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        field, wire = key >> 3, key & 7
        if key > 0xFFFFFFFF or field == 0:
            raise _NotPlain("bad key")
        value: int | bytes
        if wire == 0:
            value, pos = _read_varint(data, pos)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            if pos + size > len(data):
                raise _NotPlain("truncated fixed field")
            value, pos = data[pos : pos + size], pos + size
        elif wire == 2:
            length, pos = _read_varint(data, pos)
            if length > len(data) - pos:
                raise _NotPlain("truncated bytes")
            value, pos = data[pos : pos + length], pos + length
        else:
            raise _NotPlain("group")
        out.append((field, wire, value))
    return out


def _data(value: int | bytes) -> bytes:
    return value if isinstance(value, bytes) else b""


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _plain_input(data: bytes) -> tuple[str, str, tuple[int, ...]]:
    name, datatype, shape = b"", b"", []
    for field, wire, value in _fields(data):
        if field in (4, 5):
            raise _NotPlain("input parameters or contents")
        if field == 1 and wire == 2:
            name = _data(value)
        elif field == 2 and wire == 2:
            datatype = _data(value)
        elif field == 3 and wire == 0:
            shape.append(_signed(value if isinstance(value, int) else 0))
        elif field == 3 and wire == 2:
            packed, pos = _data(value), 0
            while pos < len(packed):
                item, pos = _read_varint(packed, pos)
                shape.append(_signed(item))
        elif field == 3:
            raise _NotPlain("shape with a fixed wire type")
    return name.decode("utf-8", "replace"), datatype.decode("utf-8", "replace"), tuple(shape)


def _plain_output(data: bytes) -> str:
    name = b""
    for field, wire, value in _fields(data):
        if field == 2:
            raise _NotPlain("output parameters")
        if field == 1 and wire == 2:
            name = _data(value)
    return name.decode("utf-8", "replace")


def plain_infer_request(message: bytes) -> PlainRequest | None:
    """Reference of ``server._native.plain_infer_request``: the plain subset of a
    ModelInferRequest (no parameters anywhere, no typed contents), or None."""
    strings = [b"", b"", b""]
    inputs, outputs, raw = [], [], []
    try:
        for field, wire, value in _fields(message):
            if 1 <= field <= 7 and wire != 2:
                return None  # a known field with the wrong wire type
            data = _data(value)
            if field in (1, 2, 3):
                strings[field - 1] = data
            elif field == 4:
                return None
            elif field == 5:
                inputs.append(_plain_input(data))
            elif field == 6:
                outputs.append(_plain_output(data))
            elif field == 7:
                raw.append(data)
        name, version, request_id = (s.decode("utf-8") for s in strings)
    except (_NotPlain, UnicodeDecodeError):
        return None
    return name, version, request_id, inputs, outputs, raw


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _length_delimited(field: int, data: bytes) -> bytes:
    return _key(field, 2) + _varint(len(data)) + data


def infer_response(
    model_name: str, model_version: str, id: str, outputs: list[tuple[str, str, list[int], bytes]]
) -> bytes:
    """Reference of ``server._native.infer_response``: a ModelInferResponse of raw outputs,
    fields in number order, empty strings and shapes left out (as upb writes them)."""
    out = b""
    for field, text in ((1, model_name), (2, model_version), (3, id)):
        if text:
            out += _length_delimited(field, text.encode())
    for name, datatype, shape, _ in outputs:
        tensor = b"".join(
            _length_delimited(field, text.encode())
            for field, text in ((1, name), (2, datatype)) if text
        )
        if shape:
            tensor += _length_delimited(3, b"".join(_varint(d) for d in shape))
        out += _length_delimited(5, tensor)
    for *_, data in outputs:
        out += _length_delimited(6, data)
    return out
