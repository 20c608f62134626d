"""Triton's classification extension, the core function: top N classes as BYTES
"value:index[:label]", formatted as Triton formats them."""

from __future__ import annotations

import numpy as np
import pytest

from server.dataplane import classify


def strings(array: np.ndarray) -> list[object]:
    return np.vectorize(lambda b: b.decode(), otypes=[object])(array).tolist()


def test_the_example_of_triton_s_documentation() -> None:
    # [1.1, 3.3, 0.5, 2.4], top 2: "3.3:1", "2.4:3" (std::to_string prints six decimals)
    values = np.array([1.1, 3.3, 0.5, 2.4], dtype=np.float32)
    assert strings(classify(values, 2, batched=False)) == ["3.300000:1", "2.400000:3"]
    labelled = classify(values, 2, batched=False, labels=["a", "b", "c", "d"])
    assert strings(labelled) == ["3.300000:1:b", "2.400000:3:d"]


def test_batched_outputs_keep_the_batch_dimension() -> None:
    values = np.array([[0.1, 0.7, 0.2], [0.5, 0.25, 0.25]], dtype=np.float64)
    result = classify(values, 2, batched=True, labels=["x", "y"])
    assert result.shape == (2, 2) and result.dtype == object
    # a label past the end of the file: none, as in Triton; ties: the lower index first
    assert strings(result) == [["0.700000:1:y", "0.200000:2"], ["0.500000:0:x", "0.250000:1:y"]]


def test_a_count_above_the_classes_clamps_and_integers_print_plainly() -> None:
    values = np.array([[1, 5, 10, 4]], dtype=np.int64)
    assert strings(classify(values, 9, batched=True)) == [["10:2", "5:1", "4:3", "1:0"]]
    unsigned = np.array([[3, 200]], dtype=np.uint8)
    assert strings(classify(unsigned, 1, batched=True)) == [["200:1"]]


def test_a_batched_output_with_more_dimensions_flattens_them_into_classes() -> None:
    values = np.arange(12, dtype=np.float32).reshape(2, 2, 3)
    assert strings(classify(values, 1, batched=True)) == [["5.000000:5"], ["11.000000:5"]]


@pytest.mark.parametrize("count", [1, 3, 10])
def test_the_top_classes_are_numpy_s_descending_order(count: int) -> None:
    values = np.random.default_rng(0).random((5, 10)).astype(np.float32)
    result = classify(values, count, batched=True)
    for row, classes in zip(values, strings(result), strict=True):
        assert [int(c.split(":")[1]) for c in classes] == list(np.argsort(-row)[:count])
