"""Shapes are bounded before numpy sees them: a shape whose element count (empty dimensions
counted as 1) times the item size overflows or passes the bound is INVALID_ARGUMENT naming the
input, the shape and the bound, in every decoder (raw, typed contents, JSON)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from server import tensors
from server.errors import Code, ServingError
from server.types import DataType

HUGE = [
    (0, 2**62),
    (2**62, 0, 4),
    (0, 2**63 - 1, 2**63 - 1),
    (1 << 21, 1 << 21),  # 2**42 elements: past 1 TiB at one byte each
]


def _refused(call: object) -> ServingError:
    with pytest.raises(ServingError) as info:
        call()  # type: ignore[operator]
    assert info.value.code is Code.INVALID_ARGUMENT, info.value
    return info.value


@pytest.mark.parametrize("shape", HUGE)
def test_check_shape_refuses_shapes_past_the_bound(shape: tuple[int, ...]) -> None:
    error = _refused(lambda: tensors.check_shape("IN", shape))
    assert "input 'IN'" in error.message
    assert str(list(shape)) in error.message
    assert str(tensors.MAX_TENSOR_BYTES) in error.message


def test_check_shape_takes_the_item_size_and_a_bound() -> None:
    assert tensors.check_shape("IN", [0, 16], 4, 64) == (0, 16)
    error = _refused(lambda: tensors.check_shape("IN", [0, 17], 4, 64))
    assert "[0, 17]" in error.message and "64 bytes" in error.message


@pytest.mark.parametrize("datatype", [DataType.FP32, DataType.BYTES, DataType.BOOL])
@pytest.mark.parametrize("shape", HUGE)
def test_decoders_refuse_huge_shapes(datatype: DataType, shape: tuple[int, ...]) -> None:
    contents = SimpleNamespace(fp32_contents=[], bytes_contents=[], bool_contents=[])
    for call in (
        lambda: tensors.from_raw("IN", datatype, shape, b""),
        lambda: tensors.from_contents("IN", datatype, shape, contents),
        lambda: tensors.from_json("IN", datatype, shape, []),
    ):
        error = _refused(call)
        assert "input 'IN'" in error.message and str(list(shape)) in error.message


def test_bytes_raw_data_too_short_for_a_large_count_is_malformed() -> None:
    error = _refused(lambda: tensors.from_raw("IN", DataType.BYTES, (1 << 30,), b"\0" * 8))
    assert "BYTES data is malformed" in error.message and "1073741824" in error.message


def test_empty_tensors_within_the_bound_still_decode() -> None:
    assert tensors.from_raw("IN", DataType.FP32, (0, 16), b"").shape == (0, 16)
    assert tensors.from_json("IN", DataType.INT32, (0, 3), []).shape == (0, 3)
    assert tensors.from_raw("IN", DataType.BYTES, (0,), b"").shape == (0,)


@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 4, 2)])
def test_raw_view_of_an_empty_tensor_is_empty_like_to_raw(shape: tuple[int, ...]) -> None:
    import numpy as np

    array = np.zeros(shape, dtype=np.float32)
    assert bytes(tensors.raw_view(DataType.FP32, array)) == tensors.to_raw(DataType.FP32, array)
    assert bytes(tensors.raw_view(DataType.FP32, array)) == b""
