"""Tests of the C++ extension ``server._native`` against ``tests/native_reference.py``.

Example tests pin the documented behaviour (results, exact error messages, accepted buffer
kinds); hypothesis property tests check that native and reference agree on random inputs,
malformed ones included.
"""

from __future__ import annotations

import itertools
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
# gather / gather_into


def test_gather_mixed_buffer_kinds() -> None:
    parts = [
        b"ab",
        bytearray(b"cd"),
        memoryview(b"xyz")[1:],
        np.arange(3, dtype=np.uint8),
        memoryview(b"RO").toreadonly(),
    ]
    out = _native.gather(parts)
    assert isinstance(out, np.ndarray)
    assert out.dtype == np.uint8
    assert out.ndim == 1
    assert out.tobytes() == b"abcdyz\x00\x01\x02RO"


def test_gather_result_is_a_fresh_writable_array() -> None:
    src = np.arange(4, dtype=np.uint8)
    out = _native.gather([src])
    assert out.flags.c_contiguous
    assert out.flags.writeable
    assert out.flags.owndata
    assert not np.shares_memory(out, src)
    out[0] = 99
    assert src[0] == 0


def test_gather_view_reshape_round_trip() -> None:
    requests = [np.random.default_rng(i).random((2, 3)).astype(np.float32) for i in range(4)]
    batch = _native.gather(requests).view(np.float32).reshape(8, 3)
    np.testing.assert_array_equal(batch, np.concatenate(requests))


def test_gather_empty_inputs() -> None:
    empty = _native.gather([])
    assert empty.dtype == np.uint8
    assert empty.shape == (0,)
    assert _native.gather([b"", np.empty((0, 3), np.float32)]).shape == (0,)


def test_gather_read_only_numpy_and_sequence_kinds() -> None:
    arr = np.arange(6, dtype=np.int16).reshape(2, 3)
    arr.flags.writeable = False
    expected = arr.tobytes() + b"z"
    assert _native.gather([arr, b"z"]).tobytes() == expected
    assert _native.gather((arr, b"z")).tobytes() == expected
    assert _native.gather(p for p in [arr, b"z"]).tobytes() == expected


def test_gather_memoryview_slices() -> None:
    data = bytes(range(20))
    parts = [memoryview(data)[3:7], memoryview(bytearray(data))[10:], memoryview(data)[5:5]]
    assert _native.gather(parts).tobytes() == data[3:7] + data[10:]


def test_gather_rejects_non_contiguous() -> None:
    strided = np.arange(10, dtype=np.uint8)[::2]
    with pytest.raises(BUFFER_ERRORS):
        _native.gather([strided])
    with pytest.raises(BUFFER_ERRORS):
        _native.gather([memoryview(b"abcdef")[::2]])
    with pytest.raises(BUFFER_ERRORS):
        _native.gather([np.asfortranarray(np.ones((3, 2), np.float32))])


def test_gather_rejects_non_buffers() -> None:
    with pytest.raises(TypeError, match=r"parts\[1\] must be a bytes-like object"):
        _native.gather([b"a", 3])
    with pytest.raises(TypeError, match=r"parts\[0\].*not str"):
        _native.gather(["text"])
    with pytest.raises(TypeError, match="not a single bytes"):
        _native.gather(b"abc")
    with pytest.raises(TypeError, match="must be an iterable"):
        _native.gather(42)


def test_gather_propagates_iterator_errors() -> None:
    def broken() -> Any:
        yield b"a"
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        _native.gather(broken())


def test_gather_large_path_is_correct() -> None:
    parts = [np.full(THRESHOLD, i, dtype=np.uint8) for i in range(3)] + [b"tail"]
    out = _native.gather(parts)
    assert out.tobytes() == b"".join(p.tobytes() if isinstance(p, np.ndarray) else p for p in parts)


def test_gather_into_writes_prefix_and_returns_count() -> None:
    out = np.full(8, 0xEE, dtype=np.uint8)
    assert _native.gather_into([b"ab", memoryview(b"cde")], out) == 5
    assert out.tobytes() == b"abcde\xee\xee\xee"
    target = bytearray(5)
    assert _native.gather_into([b"xy", b"z"], target) == 3
    assert target == bytearray(b"xyz\x00\x00")


def test_gather_into_any_writable_buffer() -> None:
    out = np.zeros((2, 2), dtype=np.float32)
    src = np.array([1.5, 2.5, 3.5, 4.5], dtype=np.float32)
    assert _native.gather_into([src[:2], src[2:]], out) == 16
    np.testing.assert_array_equal(out.ravel(), src)
    assert _native.gather_into([], bytearray()) == 0


def test_gather_into_too_small_names_sizes() -> None:
    with pytest.raises(ValueError, match=r"^out holds 3 bytes but parts need 4 bytes$"):
        _native.gather_into([b"ab", b"cd"], bytearray(3))


def test_gather_into_rejects_read_only_out() -> None:
    with pytest.raises(BUFFER_ERRORS):
        _native.gather_into([b"a"], b"x")
    frozen = np.zeros(4, np.uint8)
    frozen.flags.writeable = False
    with pytest.raises(BUFFER_ERRORS):
        _native.gather_into([b"a"], frozen)
    with pytest.raises(BUFFER_ERRORS):
        _native.gather_into([b"a"], memoryview(bytearray(4)).toreadonly())


# --------------------------------------------------------------------------------------------
# scatter


def test_scatter_splits_in_order() -> None:
    assert _native.scatter(b"abcdef", [1, 2, 3]) == [b"a", b"bc", b"def"]
    assert _native.scatter(b"abcdef", [0, 2, 0]) == [b"", b"ab", b""]
    assert _native.scatter(b"abcdef", []) == []
    assert _native.scatter(b"", [0, 0]) == [b"", b""]


def test_scatter_ignores_bytes_past_the_sizes() -> None:
    assert _native.scatter(b"abcdef", [2]) == [b"ab"]


def test_scatter_numpy_batch_and_sizes() -> None:
    batch = np.arange(12, dtype=np.float32).reshape(4, 3)
    batch.flags.writeable = False
    sizes = np.array([1, 3], dtype=np.int64) * 3 * 4
    pieces = _native.scatter(batch, sizes)
    assert all(type(p) is bytes for p in pieces)
    np.testing.assert_array_equal(np.frombuffer(pieces[1], np.float32), batch[1:].ravel())


def test_scatter_memoryview_slice() -> None:
    assert _native.scatter(memoryview(b"0123456789")[2:8], [4, 2]) == [b"2345", b"67"]


def test_scatter_overrun_names_both_numbers() -> None:
    with pytest.raises(
        ValueError, match=r"^sizes sum to 7 bytes but the buffer holds only 6 bytes$"
    ):
        _native.scatter(b"abcdef", [3, 4])


def test_scatter_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match=r"^sizes\[1\] is negative \(-2\)$"):
        _native.scatter(b"abcdef", [1, -2])
    with pytest.raises(TypeError):
        _native.scatter(b"abcdef", [1.5])
    with pytest.raises(TypeError):
        _native.scatter(b"abcdef", 3)
    with pytest.raises(OverflowError):
        _native.scatter(b"abcdef", [2**70])
    with pytest.raises(ValueError, match="more than 18446744073709551615"):
        _native.scatter(b"abcdef", [2**62] * 5)


def test_scatter_large_path_is_correct() -> None:
    batch = np.random.default_rng(0).integers(0, 256, 3 * THRESHOLD, dtype=np.uint8)
    sizes = [THRESHOLD, 0, 2 * THRESHOLD - 5, 5]
    pieces = _native.scatter(batch, sizes)
    assert pieces == ref.scatter(batch, sizes)
    assert b"".join(pieces) == batch.tobytes()


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
        _native.gather(parts[:3])
        _native.gather_into(parts[:3], bytearray(64))
        _native.scatter(parts[2], [1, 3])
        _native.encode_bytes(parts)
        _native.decode_bytes(buf, 2)
        _native.bytes_sizes(buf)
        with pytest.raises(ValueError):
            _native.decode_bytes(buf, 3)
    after = [sys.getrefcount(x) for x in [*parts, parts, buf]]
    assert after == before


def test_bytearray_is_released_after_the_call() -> None:
    data = bytearray(b"abc")
    _native.gather([data])
    _native.scatter(data, [1])
    _native.decode_bytes(bytearray(wire(b"x")), 1)
    data.extend(b"d")  # would raise BufferError while an export were still held
    assert data == bytearray(b"abcd")


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
    items[:] = [bytes(range(40)), Clearing(), bytes(range(30))]
    assert _native.gather(items).tobytes() == bytes(range(40)) + b"mid" + bytes(range(30))


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two CPUs to observe concurrency")
def test_gil_released_during_large_gather() -> None:
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
        out = _native.gather(parts)
        t1 = time.perf_counter()
    finally:
        stop.set()
        worker.join()
        sys.setswitchinterval(old_interval)
    assert out.nbytes == 128 << 20
    duration = t1 - t0
    # With the GIL held throughout, the worker could only have run in the first switch
    # interval (0.1 ms) after t0, before the copy began; look well inside the call.
    if duration < 0.004:
        pytest.skip(f"gather took {duration * 1e3:.1f} ms, too short to observe")
    lo, hi = t0 + 0.25 * duration, t1 - 0.25 * duration
    assert any(lo < s < hi for s in stamps), "no Python progress while gather copied"


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


def _as_kind(arr: np.ndarray, kind: str) -> Any:
    if kind == "bytes":
        return arr.tobytes()
    if kind == "bytearray":
        return bytearray(arr.tobytes())
    if kind == "memoryview":
        return memoryview(arr)
    frozen = arr.copy()
    frozen.flags.writeable = False
    return frozen


@PROPS
@given(st.lists(st.tuples(arrays, st.sampled_from(["bytes", "bytearray", "memoryview", "ro"]))))
def test_prop_gather_matches_reference(parts_and_kinds: list[tuple[np.ndarray, str]]) -> None:
    parts = [_as_kind(a, k) for a, k in parts_and_kinds]
    native = _native.gather(parts)
    assert native.dtype == np.uint8
    assert native.tobytes() == ref.gather_join(parts).tobytes()
    assert native.tobytes() == ref.gather_concat(parts).tobytes()
    out = bytearray(native.nbytes + 3)
    assert _native.gather_into(parts, out) == ref.gather_into(parts, bytearray(len(out)))
    assert bytes(out[: native.nbytes]) == native.tobytes()


@PROPS
@given(
    st.sampled_from(DTYPES),
    hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=4),
    st.integers(0, 6),
    st.data(),
)
def test_prop_gather_view_reshape_is_concatenate(
    dtype: Any, inner: tuple[int, ...], n_requests: int, data: st.DataObject
) -> None:
    requests = [
        data.draw(hnp.arrays(dtype, (data.draw(st.integers(0, 3)), *inner)))
        for _ in range(n_requests)
    ]
    rows = sum(r.shape[0] for r in requests)
    batch = _native.gather(requests).view(dtype).reshape(rows, *inner)
    expected = np.concatenate(requests) if requests else np.empty((0, *inner), dtype=dtype)
    assert batch.shape == expected.shape
    assert batch.tobytes() == expected.tobytes()


@PROPS
@given(arrays, st.lists(st.integers(0, 64), max_size=8))
def test_prop_scatter_matches_reference(batch: np.ndarray, sizes: list[int]) -> None:
    assert outcome(_native.scatter, batch, sizes) == outcome(ref.scatter, batch, sizes)


@PROPS
@given(arrays, st.data())
def test_prop_scatter_partition_round_trips(batch: np.ndarray, data: st.DataObject) -> None:
    cuts = sorted(data.draw(st.lists(st.integers(0, batch.nbytes), max_size=6)))
    bounds = [0, *cuts, batch.nbytes]
    sizes = [b - a for a, b in itertools.pairwise(bounds)]
    pieces = _native.scatter(batch, sizes)
    assert [len(p) for p in pieces] == sizes
    assert b"".join(pieces) == batch.tobytes()


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
