"""Tests of the C++ extension ``server._native`` against ``tests/native_reference.py``.

Example tests pin the documented behaviour (results, exact error messages, accepted buffer
kinds); hypothesis property tests check that native and reference agree on random inputs,
malformed ones included.
"""

from __future__ import annotations

import os
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from server import _native

try:
    from tests import native_reference as ref
except ModuleNotFoundError:  # plain `pytest` (rootdir not on sys.path): tests/ itself is
    import native_reference as ref  # type: ignore[no-redef]

BUFFER_ERRORS = (BufferError, ValueError, TypeError)
THRESHOLD = _native.GIL_RELEASE_THRESHOLD
DTYPES = [
    np.bool_,
    np.int8,
    np.int16,
    np.int32,
    np.int64,
    np.uint8,
    np.uint16,
    np.uint32,
    np.uint64,
    np.float16,
    np.float32,
    np.float64,
    np.complex64,
    np.complex128,
]


def wire(*items: bytes) -> bytes:
    """Hand-made BYTES encoding, independent of both implementations."""
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def outcome(fn: Callable[..., Any], *args: Any) -> tuple[str, Any]:
    """("ok", result) or ("ValueError", message): comparable across implementations."""
    try:
        result = fn(*args)
    except ValueError as exc:
        return ("ValueError", str(exc))
    if isinstance(result, np.ndarray):
        return ("ok", (result.dtype.str, result.shape, result.tobytes()))
    return ("ok", result)


# --------------------------------------------------------------------------------------------
# encode_bytes / decode_bytes / bytes_sizes


def test_encode_wire_format() -> None:
    assert _native.encode_bytes([b"ab", b""]) == b"\x02\x00\x00\x00ab\x00\x00\x00\x00"
    assert _native.encode_bytes([]) == b""


def test_encode_element_kinds_and_non_ascii() -> None:
    items = ["héllo", "", "日本語", b"\x00\xff", bytearray(b"ba"), memoryview(b"xmvx")[1:3]]
    expected = wire("héllo".encode(), b"", "日本語".encode(), b"\x00\xff", b"ba", b"mv")
    assert _native.encode_bytes(items) == expected
    assert _native.encode_bytes(tuple(items)) == expected
    assert _native.encode_bytes(iter(items)) == expected
    assert ref.encode_bytes(items) == expected


def test_encode_numpy_arrays_are_flattened_in_c_order() -> None:
    obj = np.array([[b"a", "é"], [b"", b"cd"]], dtype=object)
    assert _native.encode_bytes(obj) == wire(b"a", "é".encode(), b"", b"cd")
    fixed = np.array([b"ab", b"c"], dtype="S2")
    assert _native.encode_bytes(fixed) == wire(b"ab", b"c")
    text = np.array([["x", "ÿz"]], dtype=np.str_)
    assert _native.encode_bytes(text) == wire(b"x", "ÿz".encode())
    assert _native.encode_bytes(np.empty((0, 2), dtype=object)) == b""


def test_encode_rejects_bad_items() -> None:
    with pytest.raises(TypeError, match=r"items\[1\] must be bytes.*not int"):
        _native.encode_bytes([b"a", 1])
    with pytest.raises(TypeError, match="not a single str"):
        _native.encode_bytes("abc")
    with pytest.raises(TypeError, match="not a single bytes"):
        _native.encode_bytes(b"abc")
    with pytest.raises(UnicodeEncodeError):
        _native.encode_bytes(["\ud800"])


def test_decode_examples() -> None:
    buf = wire(b"", "é".encode(), b"xyz")
    assert _native.decode_bytes(buf, 3) == [b"", "é".encode(), b"xyz"]
    assert _native.decode_bytes(buf) == [b"", "é".encode(), b"xyz"]
    assert _native.decode_bytes(buf, -1) == [b"", "é".encode(), b"xyz"]
    assert _native.decode_bytes(b"", 0) == []
    assert _native.decode_bytes(b"", -1) == []
    assert all(type(x) is bytes for x in _native.decode_bytes(buf))


def test_decode_buffer_kinds() -> None:
    buf = wire(b"ab", b"c")
    arr = np.frombuffer(buf, dtype=np.uint8)  # read-only numpy array
    assert not arr.flags.writeable
    assert _native.decode_bytes(arr, 2) == [b"ab", b"c"]
    assert _native.decode_bytes(bytearray(buf), 2) == [b"ab", b"c"]
    assert _native.decode_bytes(memoryview(b"JUNK" + buf + b"JUNK")[4:-4], 2) == [b"ab", b"c"]


def test_decode_overrun_message() -> None:
    buf = wire(b"", b"", b"") + struct.pack("<I", 100) + b"12345"
    with pytest.raises(
        ValueError, match=r"^element 3 declares 100 bytes at offset 16 but only 5 remain$"
    ):
        _native.decode_bytes(buf, 4)


def test_decode_short_prefix_message() -> None:
    with pytest.raises(
        ValueError,
        match=r"^element 1 needs a 4-byte length prefix at offset 6 but only 2 bytes remain$",
    ):
        _native.decode_bytes(wire(b"ab") + b"\x01\x00", -1)


def test_decode_trailing_bytes_message() -> None:
    with pytest.raises(ValueError, match=r"^3 trailing bytes after 2 elements$"):
        _native.decode_bytes(wire(b"a", b"b") + b"xyz", 2)
    with pytest.raises(ValueError, match=r"^4 trailing bytes after 0 elements$"):
        _native.decode_bytes(wire(b""), 0)


def test_decode_missing_elements_message() -> None:
    with pytest.raises(ValueError, match=r"^expected 3 elements but only 2 fit in 10 bytes$"):
        _native.decode_bytes(wire(b"a", b"b"), 3)


def test_decode_huge_count_fails_fast() -> None:
    with pytest.raises(ValueError, match="expected 1000000000000 elements but only 1 fit"):
        _native.decode_bytes(wire(b"a"), 10**12)


def test_decode_rejects_bad_count() -> None:
    with pytest.raises(ValueError, match=r"count must be -1 \(all elements\) or >= 0, got -2"):
        _native.decode_bytes(b"", -2)
    with pytest.raises(TypeError):
        _native.decode_bytes(b"", "3")
    with pytest.raises(TypeError):
        _native.decode_bytes("not a buffer", 0)


def test_decode_large_path_is_correct() -> None:
    items = [bytes([i]) * (THRESHOLD // 3) for i in range(5)] + [b""]
    assert _native.decode_bytes(wire(*items), len(items)) == items


def test_bytes_sizes() -> None:
    assert _native.bytes_sizes(b"") == 0
    assert _native.bytes_sizes(wire(b"a", b"", "é".encode())) == 3
    with pytest.raises(ValueError, match=r"trailing|needs a 4-byte"):
        _native.bytes_sizes(wire(b"a") + b"\x00")


# --------------------------------------------------------------------------------------------
# resource behaviour


def test_no_references_kept() -> None:
    parts = [bytes(range(10)), bytearray(b"cd"), np.arange(4, dtype=np.uint8), "é" * 3]
    buf = wire(b"a", b"bc")
    before = [sys.getrefcount(x) for x in [*parts, parts, buf]]
    for _ in range(100):
        _native.encode_bytes(parts)
        _native.decode_bytes(buf, 2)
        _native.bytes_sizes(buf)
        with pytest.raises(ValueError):
            _native.decode_bytes(buf, 3)
    after = [sys.getrefcount(x) for x in [*parts, parts, buf]]
    assert after == before


def test_bytearray_is_released_after_the_call() -> None:
    data = bytearray(b"abc")
    packed = bytearray(wire(b"x"))
    _native.encode_bytes([data])
    _native.decode_bytes(packed, 1)
    _native.bytes_sizes(packed)
    data.extend(b"d")  # each would raise BufferError while an export were still held
    packed.extend(b"y")
    assert data == bytearray(b"abcd")
    assert packed == bytearray(wire(b"x") + b"y")


@pytest.mark.skipif(sys.version_info < (3, 12), reason="__buffer__ needs Python 3.12")
def test_list_mutated_by_a_buffer_export_is_safe() -> None:
    # An exporter written in Python runs code mid-call; the native side must not depend on the
    # caller's list (whose other elements this one frees) staying as it was. A regression is a
    # use-after-free: run under PYTHONMALLOC=debug to make it crash reliably.
    items: list[Any] = []

    class Clearing:
        def __buffer__(self, flags: int) -> memoryview:
            items.clear()
            return memoryview(b"mid")

        def __release_buffer__(self, view: memoryview) -> None:
            view.release()

    text = "é" * 30
    items[:] = [bytes(range(40)), Clearing(), text[:-1] + "!"]  # elements only the list holds
    assert _native.encode_bytes(items) == wire(bytes(range(40)), b"mid", (text[:-1] + "!").encode())


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two CPUs to observe concurrency")
def test_gil_released_during_large_encode() -> None:
    parts = [np.ones(8 << 20, dtype=np.uint8) for _ in range(16)]  # 128 MiB in all
    stamps: list[float] = []
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            stamps.append(time.perf_counter())
            for _ in range(200):
                pass

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    worker = threading.Thread(target=spin)
    worker.start()
    try:
        time.sleep(0.01)
        t0 = time.perf_counter()
        out = _native.encode_bytes(parts)
        t1 = time.perf_counter()
    finally:
        stop.set()
        worker.join()
        sys.setswitchinterval(old_interval)
    assert len(out) == (128 << 20) + 16 * 4
    duration = t1 - t0
    # With the GIL held throughout, the worker could only have run in the first switch
    # interval (0.1 ms) after t0, before the copy began; look well inside the call.
    if duration < 0.004:
        pytest.skip(f"encode_bytes took {duration * 1e3:.1f} ms, too short to observe")
    lo, hi = t0 + 0.25 * duration, t1 - 0.25 * duration
    assert any(lo < s < hi for s in stamps), "no Python progress while encode_bytes copied"


# --------------------------------------------------------------------------------------------
# properties: native == reference

arrays = hnp.arrays(
    dtype=st.sampled_from(DTYPES),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6),
)
texts = st.text(max_size=12)
binaries = st.binary(max_size=24)
elements = st.one_of(texts, binaries)
PROPS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPS
@given(st.lists(elements, max_size=20))
def test_prop_encode_decode_round_trip(items: list[str | bytes]) -> None:
    encoded = _native.encode_bytes(items)
    assert encoded == ref.encode_bytes(items)
    as_bytes = [x.encode("utf-8") if isinstance(x, str) else x for x in items]
    assert _native.decode_bytes(encoded, len(items)) == as_bytes
    assert _native.decode_bytes(encoded, -1) == as_bytes
    assert ref.decode_bytes(encoded, len(items)) == as_bytes
    assert _native.bytes_sizes(encoded) == len(items)


@PROPS
@given(st.lists(elements, max_size=10))
def test_prop_encode_numpy_object_array(items: list[str | bytes]) -> None:
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    assert _native.encode_bytes(arr) == ref.encode_bytes(items)


@PROPS
@given(st.binary(max_size=40), st.integers(-1, 6))
def test_prop_decode_arbitrary_bytes_matches_reference(buf: bytes, count: int) -> None:
    assert outcome(_native.decode_bytes, buf, count) == outcome(ref.decode_bytes, buf, count)
    assert outcome(_native.bytes_sizes, buf) == outcome(ref.bytes_sizes, buf)


@PROPS
@given(
    st.lists(binaries, min_size=1, max_size=8),
    st.sampled_from(["truncate", "append", "patch_prefix", "wrong_count"]),
    st.data(),
)
def test_prop_malformed_buffers_raise_alike(
    items: list[bytes], mutation: str, data: st.DataObject
) -> None:
    good = wire(*items)
    count = len(items)
    if mutation == "truncate":
        buf = good[: data.draw(st.integers(0, len(good) - 1))]
    elif mutation == "append":
        buf = good + data.draw(st.binary(min_size=1, max_size=8))
    elif mutation == "patch_prefix":
        # Make one element's length prefix claim more bytes than follow it.
        index = data.draw(st.integers(0, count - 1))
        start = sum(4 + len(b) for b in items[:index])
        rest = len(good) - start - 4
        declared = data.draw(st.integers(rest + 1, 2**32 - 1))
        buf = good[:start] + struct.pack("<I", declared) + good[start + 4 :]
    else:
        buf = good
        count = data.draw(st.integers(0, 12).filter(lambda c: c != len(items)))
    native = outcome(_native.decode_bytes, buf, count)
    assert native == outcome(ref.decode_bytes, buf, count)
    assert native[0] == "ValueError"
