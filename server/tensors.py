"""Wire bytes and JSON values <-> numpy arrays, through `server._native` for BYTES.

Every function checks sizes against the declared shape and raises INVALID_ARGUMENT with a
message that names the input, what was expected and what came.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from server import _native
from server.errors import invalid
from server.types import Array, DataType

Buffer = bytes | bytearray | memoryview


# No request carries a tensor that spans more bytes than this (1 TiB); a larger shape is
# refused before numpy sees it (numpy refuses shapes spanning 2**63 bytes, even empty ones).
# The data plane applies the server's own, smaller bound (--max-request-bytes).
MAX_TENSOR_BYTES = 1 << 40


def element_count(shape: Sequence[int]) -> int:
    return math.prod(shape)


def span(shape: Sequence[int]) -> int:
    """The elements a shape spans with its empty (0) dimensions counted as 1: what bounds an
    array's size and indexing even when it holds no element."""
    return math.prod(d or 1 for d in shape)


def check_shape(
    name: str, shape: Sequence[int], itemsize: int = 1, max_bytes: int = MAX_TENSOR_BYTES
) -> tuple[int, ...]:
    """A request's shape as a tuple; refuses negative dimensions and shapes that span more
    than `max_bytes` at `itemsize` bytes an element (BYTES: at least 1)."""
    dims = tuple(shape)
    if dims and min(dims) < 0:
        raise invalid(f"input '{name}': shape {list(dims)} has a negative dimension")
    if span(dims) * max(itemsize, 1) > max_bytes:
        raise invalid(
            f"input '{name}': shape {list(dims)} spans {span(dims)} elements of "
            f"{max(itemsize, 1)} bytes, more than the bound of {max_bytes} bytes a request "
            "may carry"
        )
    return dims


def from_raw(name: str, datatype: DataType, shape: tuple[int, ...], data: Buffer) -> Array:
    """Decode a raw tensor (`raw_input_contents` or an HTTP binary part)."""
    check_shape(name, shape, datatype.itemsize)
    count = element_count(shape)
    if datatype is DataType.BYTES:
        try:
            items = _native.decode_bytes(data, count)
        except ValueError as exc:
            raise invalid(f"input '{name}': BYTES data is malformed: {exc}") from None
        array = np.empty(count, dtype=object)
        array[:] = items
        return array.reshape(shape)
    expected = count * datatype.itemsize
    if len(data) != expected:
        raise invalid(
            f"input '{name}': raw data has {len(data)} bytes, expected {expected} "
            f"({datatype.value} with shape {list(shape)})"
        )
    return np.frombuffer(data, dtype=datatype.numpy).reshape(shape)


# InferTensorContents field for each datatype (FP16 has none: it travels raw only)
CONTENTS_FIELD = {
    DataType.BOOL: "bool_contents",
    DataType.INT8: "int_contents",
    DataType.INT16: "int_contents",
    DataType.INT32: "int_contents",
    DataType.INT64: "int64_contents",
    DataType.UINT8: "uint_contents",
    DataType.UINT16: "uint_contents",
    DataType.UINT32: "uint_contents",
    DataType.UINT64: "uint64_contents",
    DataType.FP32: "fp32_contents",
    DataType.FP64: "fp64_contents",
    DataType.BYTES: "bytes_contents",
}


def from_contents(name: str, datatype: DataType, shape: tuple[int, ...], contents: Any) -> Array:
    """Decode typed `contents` of a gRPC input tensor."""
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise invalid(
            f"input '{name}': {datatype.value} cannot travel in typed contents, expected "
            "raw_input_contents"
        )
    values = getattr(contents, field)
    check_shape(name, shape, datatype.itemsize)
    count = element_count(shape)
    if len(values) != count:
        raise invalid(
            f"input '{name}': contents.{field} has {len(values)} elements, expected {count} "
            f"for shape {list(shape)}"
        )
    if datatype is DataType.BYTES:
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    try:
        return np.array(values, dtype=datatype.numpy).reshape(shape)
    except OverflowError:
        raise invalid(
            f"input '{name}': contents.{field} holds a value out of range for {datatype.value}"
        ) from None


def from_json(name: str, datatype: DataType, shape: tuple[int, ...], data: Any) -> Array:
    """Decode the `data` of a JSON input tensor (flat or nested lists, row-major)."""
    check_shape(name, shape, datatype.itemsize)
    flat = _flatten(data)
    count = element_count(shape)
    if len(flat) != count:
        raise invalid(
            f"input '{name}': data has {len(flat)} elements, expected {count} for shape "
            f"{list(shape)}"
        )
    if datatype is DataType.BYTES:
        array = np.empty(count, dtype=object)
        try:
            array[:] = [
                v.encode("utf-8") if isinstance(v, str) else _not_str(name, v) for v in flat
            ]
        except TypeError as exc:
            raise invalid(str(exc)) from None
        return array.reshape(shape)
    kinds = _JSON_KINDS[datatype]
    for value in flat:
        if not isinstance(value, kinds) or (kinds == (bool,)) != isinstance(value, bool):
            raise invalid(
                f"input '{name}': data holds {value!r} ({type(value).__name__}), expected "
                f"{datatype.value} values"
            )
    try:
        return np.array(flat, dtype=datatype.numpy).reshape(shape)
    except (OverflowError, ValueError):
        raise invalid(
            f"input '{name}': data holds a value out of range for {datatype.value}"
        ) from None


_JSON_KINDS: dict[DataType, tuple[type, ...]] = {
    DataType.BOOL: (bool,),
    **{
        d: (int,)
        for d in (
            DataType.UINT8,
            DataType.UINT16,
            DataType.UINT32,
            DataType.UINT64,
            DataType.INT8,
            DataType.INT16,
            DataType.INT32,
            DataType.INT64,
        )
    },
    **{d: (int, float) for d in (DataType.FP16, DataType.FP32, DataType.FP64)},
}


def _not_str(name: str, value: Any) -> bytes:
    raise TypeError(f"input '{name}': data holds {value!r}, expected strings for BYTES")


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    if not data or not isinstance(data[0], list):
        return data
    flat: list[Any] = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            flat.append(item)
    return flat


def to_raw(datatype: DataType, array: Array) -> bytes:
    """Encode an output tensor as raw bytes (BYTES: length-prefixed elements)."""
    if datatype is DataType.BYTES:
        return bytes(_native.encode_bytes(array.ravel().tolist()))
    return np.ascontiguousarray(array, dtype=datatype.numpy).tobytes()


def raw_view(datatype: DataType, array: Array) -> bytes | memoryview:
    """`to_raw` without the copy where the array is already contiguous in its wire type."""
    if datatype is DataType.BYTES:
        return to_raw(datatype, array)
    contiguous = np.ascontiguousarray(array, dtype=datatype.numpy)
    if contiguous.size == 0:
        # memoryview.cast("B") refuses a view with a zero in its shape
        return b""
    return contiguous.data.cast("B")


def to_json(datatype: DataType, array: Array) -> list[Any]:
    """Encode an output tensor as a flat JSON list."""
    if datatype is DataType.BYTES:
        out = []
        for item in array.ravel().tolist():
            raw = item if isinstance(item, bytes) else str(item).encode("utf-8")
            try:
                out.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise invalid(
                    "BYTES output is not UTF-8 text and cannot be sent as JSON, request it "
                    "with binary_data: true"
                ) from None
        return out
    if datatype is DataType.FP16:
        array = array.astype(np.float32)
    result: list[Any] = array.ravel().tolist()
    return result
