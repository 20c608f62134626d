"""The dynamic batcher, in-process: batches form, every waiter is answered, errors spread."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from server.backends.base import Backend, Options
from server.backends.onnxruntime import OnnxRuntimeBackend
from server.batching import DynamicBatcher, _gather
from server.errors import Code, ServingError
from server.model_config import parse_config, to_spec
from server.statistics import ModelStats
from server.types import Array

BUNDLED = Path(__file__).resolve().parent.parent / "model_repository"


def identity_spec(extra: str = "", max_batch: int = 64) -> object:
    return to_spec(parse_config(
        f"max_batch_size: {max_batch} input [{{ name: 'INPUT0' data_type: TYPE_FP32 dims: [-1] }}] "
        f"output [{{ name: 'OUTPUT0' data_type: TYPE_FP32 dims: [-1] }}] {extra}",
        "identity_fp32"), "onnxruntime")


class GatedBackend(Backend):
    """Echoes INPUT0 (times `scale`) but waits for `gate` first, to let a queue build up;
    records every batch it saw."""

    def __init__(self, *args: object, fail: bool = False, rows_off: int = 0) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.gate = threading.Event()
        self.batches: list[tuple[int, ...]] = []
        self.fail = fail
        self.rows_off = rows_off

    def load(self) -> None:
        pass

    def execute(
        self, inputs: dict[str, Array], outputs: list[str], options: Options = ()
    ) -> dict[str, Array]:
        self.gate.wait(10)
        array = inputs["INPUT0"]
        self.batches.append(array.shape)
        if self.fail:
            raise RuntimeError("boom")
        return {"OUTPUT0": array[self.rows_off:] * 2}

    def unload(self) -> None:
        pass


async def _submit(batcher: DynamicBatcher, value: float, width: int = 4) -> Array:
    data = np.full((1, width), value, dtype=np.float32)
    out = await batcher.submit({"INPUT0": data}, ["OUTPUT0"], 1)
    return out["OUTPUT0"]


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_concurrent_requests_share_batches_with_a_real_model() -> None:
    spec = identity_spec()
    backend = OnnxRuntimeBackend(spec, BUNDLED / "identity_fp32" / "1")  # type: ignore[arg-type]
    backend.load()
    stats = ModelStats()

    async def main() -> None:
        batcher = DynamicBatcher(spec, [backend], stats)  # type: ignore[arg-type]
        batcher.start()
        values = [float(i) for i in range(200)]
        results = await asyncio.gather(*(_submit(batcher, v, width=16) for v in values))
        for value, result in zip(values, results, strict=True):
            np.testing.assert_array_equal(result, np.full((1, 16), value, dtype=np.float32))
        await batcher.drain()

    run(main())
    assert stats.inference_count == 200
    assert stats.execution_count < 200  # some requests shared a batch
    assert max(stats.batches) > 1


def test_gated_queue_forms_one_batch_and_splits_in_order() -> None:
    spec = identity_spec()
    backend = GatedBackend(spec, Path("."))

    async def main() -> None:
        batcher = DynamicBatcher(spec, [backend], ModelStats())  # type: ignore[arg-type]
        batcher.start()
        first = asyncio.ensure_future(_submit(batcher, -1.0))
        await asyncio.sleep(0.05)  # the first request occupies the only instance
        rest = [asyncio.ensure_future(_submit(batcher, float(i))) for i in range(10)]
        await asyncio.sleep(0.05)
        backend.gate.set()
        assert (await first)[0, 0] == -2.0
        for i, task in enumerate(rest):
            assert (await task)[0, 0] == 2.0 * i
        await batcher.drain()

    run(main())
    assert backend.batches == [(1, 4), (10, 4)]


def test_max_batch_size_and_shapes_split_batches() -> None:
    spec = identity_spec(max_batch=4)
    backend = GatedBackend(spec, Path("."))

    async def main() -> None:
        batcher = DynamicBatcher(spec, [backend], ModelStats())  # type: ignore[arg-type]
        batcher.start()
        first = asyncio.ensure_future(_submit(batcher, 0.0))
        await asyncio.sleep(0.05)
        tasks = [asyncio.ensure_future(_submit(batcher, 1.0, width=4)) for _ in range(6)]
        tasks += [asyncio.ensure_future(_submit(batcher, 1.0, width=3)) for _ in range(2)]
        await asyncio.sleep(0.05)
        backend.gate.set()
        await asyncio.gather(first, *tasks)
        await batcher.drain()

    run(main())
    assert backend.batches[0] == (1, 4)
    # never more than max_batch_size rows, never two widths in one batch
    assert all(rows <= 4 for rows, _ in backend.batches)
    assert sorted(backend.batches[1:]) == [(2, 3), (2, 4), (4, 4)]


def test_an_error_reaches_every_waiter_and_the_batcher_lives_on() -> None:
    spec = identity_spec()
    backend = GatedBackend(spec, Path("."), fail=True)

    async def main() -> None:
        batcher = DynamicBatcher(spec, [backend], ModelStats())  # type: ignore[arg-type]
        batcher.start()
        tasks = [asyncio.ensure_future(_submit(batcher, 1.0)) for _ in range(5)]
        backend.gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, ServingError) and r.code is Code.INTERNAL for r in results)
        assert all("boom" in str(r) for r in results)
        backend.fail = False
        assert (await _submit(batcher, 3.0))[0, 0] == 6.0
        await batcher.drain()

    run(main())


def test_output_batch_size_is_checked() -> None:
    spec = identity_spec()
    backend = GatedBackend(spec, Path("."), rows_off=1)  # drops a row

    async def main() -> None:
        batcher = DynamicBatcher(spec, [backend], ModelStats())  # type: ignore[arg-type]
        batcher.start()
        first = asyncio.ensure_future(_submit(batcher, 0.0))
        await asyncio.sleep(0.05)
        tasks = [asyncio.ensure_future(_submit(batcher, 1.0)) for _ in range(3)]
        await asyncio.sleep(0.05)
        backend.gate.set()
        results = await asyncio.gather(first, *tasks, return_exceptions=True)
        assert all(isinstance(r, ServingError) for r in results[1:])
        assert "expected 3 rows" in str(results[1])
        await batcher.drain()

    run(main())


def test_a_lone_request_does_not_wait_for_the_queue_delay() -> None:
    spec = identity_spec("dynamic_batching { max_queue_delay_microseconds: 5000000 }")
    backend = GatedBackend(spec, Path("."))
    backend.gate.set()
    stats = ModelStats()

    async def main() -> None:
        batcher = DynamicBatcher(spec, [backend], stats)  # type: ignore[arg-type]
        batcher.start()
        for value in range(3):
            start = time.monotonic()
            assert (await _submit(batcher, float(value)))[0, 0] == 2.0 * value
            assert time.monotonic() - start < 2.5  # far below the 5 s delay
        await batcher.drain()

    run(main())
    assert stats.queue.ns < 3 * 1_000_000_000


def test_full_queue_is_rejected_at_once() -> None:
    spec = identity_spec("dynamic_batching { default_queue_policy { max_queue_size: 2 } }")
    backend = GatedBackend(spec, Path("."))

    async def main() -> None:
        batcher = DynamicBatcher(spec, [backend], ModelStats())  # type: ignore[arg-type]
        batcher.start()
        first = asyncio.ensure_future(_submit(batcher, 0.0))
        await asyncio.sleep(0.05)
        queued = [asyncio.ensure_future(_submit(batcher, 1.0)) for _ in range(2)]
        await asyncio.sleep(0.01)
        with pytest.raises(ServingError) as info:
            await _submit(batcher, 1.0)
        assert info.value.code is Code.RESOURCE_EXHAUSTED
        assert "max_queue_size" in info.value.message
        backend.gate.set()
        await asyncio.gather(first, *queued)
        await batcher.drain()

    run(main())


def test_priorities_are_served_highest_first() -> None:
    spec = identity_spec("dynamic_batching { priority_levels: 3 default_priority_level: 2 }",
                         max_batch=2)
    backend = GatedBackend(spec, Path("."))
    order: list[float] = []

    async def main() -> None:
        batcher = DynamicBatcher(spec, [backend], ModelStats())  # type: ignore[arg-type]
        batcher.start()
        first = asyncio.ensure_future(_submit(batcher, 0.0))
        await asyncio.sleep(0.05)

        async def one(value: float, priority: int) -> None:
            level, timeout = batcher.check_parameters(priority, None)
            data = np.full((1, 4), value, dtype=np.float32)
            await batcher.submit({"INPUT0": data}, ["OUTPUT0"], 1, level, timeout)
            order.append(value)

        tasks = [asyncio.ensure_future(one(v, p)) for v, p in
                 [(3.0, 3), (3.1, 3), (2.0, 0), (1.0, 1), (1.1, 1)]]
        await asyncio.sleep(0.05)
        backend.gate.set()
        await asyncio.gather(first, *tasks)
        await batcher.drain()

    run(main())
    assert order == [1.0, 1.1, 2.0, 3.0, 3.1]


def test_queue_timeout_and_cancellation_leave_the_queue() -> None:
    spec = identity_spec(
        "dynamic_batching { default_queue_policy { allow_timeout_override: true "
        "max_queue_size: 3 } }"
    )
    backend = GatedBackend(spec, Path("."))

    async def main() -> None:
        batcher = DynamicBatcher(spec, [backend], ModelStats())  # type: ignore[arg-type]
        batcher.start()
        first = asyncio.ensure_future(_submit(batcher, 0.0))
        await asyncio.sleep(0.05)
        level, timeout = batcher.check_parameters(None, 20_000)  # 20 ms
        data = np.zeros((1, 4), dtype=np.float32)
        timed = asyncio.ensure_future(batcher.submit({"INPUT0": data}, ["OUTPUT0"], 1,
                                                     level, timeout))
        cancelled = asyncio.ensure_future(_submit(batcher, 5.0))
        kept = asyncio.ensure_future(_submit(batcher, 6.0))
        await asyncio.sleep(0.01)
        assert batcher.pending == 3
        cancelled.cancel()
        with pytest.raises(ServingError) as info:
            await timed
        assert info.value.code is Code.UNAVAILABLE and "timed out" in info.value.message
        assert batcher.pending == 1  # only `kept` is still queued
        backend.gate.set()
        await first
        assert (await kept)[0, 0] == 12.0
        await batcher.drain()

    run(main())
    assert backend.batches == [(1, 4), (1, 4)]  # the cancelled and expired never ran


@pytest.mark.parametrize(
    ("priority", "timeout", "needle"),
    [(-1, None, "parameter 'priority' is -1"), (9, None, "expected 0..3"),
     ("high", None, "parameter 'priority'"), (True, None, "parameter 'priority'"),
     (None, -5, "parameter 'timeout' is -5"), (None, 10**15, "parameter 'timeout'"),
     (None, 1.5, "parameter 'timeout' is 1.5")],
)
def test_bad_priority_and_timeout_are_refused(
    priority: object, timeout: object, needle: str
) -> None:
    spec = identity_spec("dynamic_batching { priority_levels: 3 default_priority_level: 1 }")
    batcher = DynamicBatcher(spec, [], ModelStats())  # type: ignore[arg-type]
    with pytest.raises(ServingError) as info:
        batcher.check_parameters(priority, timeout)
    assert info.value.code is Code.INVALID_ARGUMENT
    assert needle in info.value.message


def test_preserve_ordering_across_instances() -> None:
    spec = identity_spec("dynamic_batching { preserve_ordering: true } "
                         "instance_group [{ count: 2 kind: KIND_CPU }]", max_batch=1)
    slow, fast = GatedBackend(spec, Path(".")), GatedBackend(spec, Path("."), )
    fast.gate.set()
    done: list[float] = []

    async def main() -> None:
        batcher = DynamicBatcher(spec, [slow, fast], ModelStats())  # type: ignore[arg-type]
        batcher.start()

        async def one(value: float) -> None:
            await _submit(batcher, value)
            done.append(value)

        first = asyncio.ensure_future(one(0.0))  # goes to `slow`
        await asyncio.sleep(0.02)
        second = asyncio.ensure_future(one(1.0))  # goes to `fast`, finishes first
        await asyncio.sleep(0.1)
        assert done == []  # held back until the earlier batch is delivered
        slow.gate.set()
        await asyncio.gather(first, second)
        await batcher.drain()

    run(main())
    assert done == [0.0, 1.0]


def test_requests_with_different_options_never_share_a_batch() -> None:
    spec = identity_spec()
    backend = GatedBackend(spec, Path("."))
    seen: list[object] = []
    original = backend.execute

    def recording(inputs: dict[str, Array], outputs: list[str], options: Options = ()) -> dict:
        seen.append((inputs["INPUT0"].shape[0], options))
        return original(inputs, outputs, options)

    backend.execute = recording  # type: ignore[method-assign]

    async def main() -> None:
        batcher = DynamicBatcher(spec, [backend], ModelStats())  # type: ignore[arg-type]
        batcher.start()
        first = asyncio.ensure_future(_submit(batcher, 0.0))
        await asyncio.sleep(0.05)
        data = np.zeros((1, 4), dtype=np.float32)
        tasks = [
            asyncio.ensure_future(batcher.submit({"INPUT0": data}, ["OUTPUT0"], 1, None, 0, opts))
            for opts in [(("k", 1),), (("k", 2),), (("k", 1),), (("k", 2),), (("k", 1),)]
        ]
        await asyncio.sleep(0.05)
        backend.gate.set()
        await asyncio.gather(first, *tasks)
        await batcher.drain()

    run(main())
    assert seen[0] == (1, ())
    assert sorted(seen[1:], key=str) == [(2, (("k", 2),)), (3, (("k", 1),))]


class OptionalInputsBackend(Backend):
    """OUT = A + B + C, with B and C optional (zero when left out); waits for `gate` and
    records the input names of every batch."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.gate = threading.Event()
        self.batches: list[tuple[int, tuple[str, ...]]] = []

    def load(self) -> None:
        pass

    def execute(
        self, inputs: dict[str, Array], outputs: list[str], options: Options = ()
    ) -> dict[str, Array]:
        self.gate.wait(10)
        self.batches.append((inputs["A"].shape[0], tuple(sorted(inputs))))
        total = inputs["A"] + inputs.get("B", 0) + inputs.get("C", 0)
        return {"OUT": total}

    def unload(self) -> None:
        pass


def test_requests_with_different_optional_inputs_never_share_a_batch() -> None:
    """{A, B} and {A, C} requests queued together: each batch holds one set of inputs, and
    every request gets its own sum (before the fix: one batch, KeyError, INTERNAL)."""
    spec = to_spec(parse_config(
        "max_batch_size: 16 "
        "input [{ name: 'A' data_type: TYPE_FP32 dims: [2] }, "
        "{ name: 'B' data_type: TYPE_FP32 dims: [2] optional: true }, "
        "{ name: 'C' data_type: TYPE_FP32 dims: [2] optional: true }] "
        "output [{ name: 'OUT' data_type: TYPE_FP32 dims: [2] }]", "optional"), "onnxruntime")
    backend = OptionalInputsBackend(spec, Path("."))

    def submit(batcher: DynamicBatcher, a: float, other: str, value: float) -> object:
        inputs = {"A": np.full((1, 2), a, np.float32), other: np.full((1, 2), value, np.float32)}
        return asyncio.ensure_future(batcher.submit(inputs, ["OUT"], 1))

    async def main() -> None:
        batcher = DynamicBatcher(spec, [backend], ModelStats())
        batcher.start()
        first = submit(batcher, 0.0, "B", 0.0)
        await asyncio.sleep(0.05)  # the first request holds the only instance
        tasks = [submit(batcher, float(i), "B" if i % 2 else "C", 10.0 * i) for i in range(8)]
        await asyncio.sleep(0.05)
        backend.gate.set()
        await first  # type: ignore[misc]
        for i, task in enumerate(tasks):
            result = await task  # type: ignore[misc]
            np.testing.assert_array_equal(result["OUT"], np.full((1, 2), 11.0 * i))
        await batcher.drain()

    run(main())
    assert sorted(backend.batches[1:]) == [(4, ("A", "B")), (4, ("A", "C"))]


def test_default_max_queue_size_bounds_a_queue_the_config_leaves_unbounded() -> None:
    spec = identity_spec()  # no max_queue_size
    backend = GatedBackend(spec, Path("."))

    async def main() -> None:
        batcher = DynamicBatcher(
            spec, [backend], ModelStats(), default_max_queue_size=2  # type: ignore[arg-type]
        )
        batcher.start()
        first = asyncio.ensure_future(_submit(batcher, 0.0))
        await asyncio.sleep(0.05)
        queued = [asyncio.ensure_future(_submit(batcher, 1.0)) for _ in range(2)]
        await asyncio.sleep(0.01)
        with pytest.raises(ServingError) as info:
            await _submit(batcher, 1.0)
        assert info.value.code is Code.RESOURCE_EXHAUSTED
        assert "queue is full (2 requests, --default-max-queue-size)" in info.value.message
        backend.gate.set()
        await asyncio.gather(first, *queued)
        await batcher.drain()

    run(main())


def test_the_config_max_queue_size_wins_over_the_default() -> None:
    spec = identity_spec("dynamic_batching { default_queue_policy { max_queue_size: 3 } }")
    backend = GatedBackend(spec, Path("."))

    async def main() -> None:
        batcher = DynamicBatcher(
            spec, [backend], ModelStats(), default_max_queue_size=1  # type: ignore[arg-type]
        )
        batcher.start()
        first = asyncio.ensure_future(_submit(batcher, 0.0))
        await asyncio.sleep(0.05)
        queued = [asyncio.ensure_future(_submit(batcher, 1.0)) for _ in range(3)]
        await asyncio.sleep(0.01)
        with pytest.raises(ServingError, match=r"3 requests, max_queue_size"):
            await _submit(batcher, 1.0)
        backend.gate.set()
        await asyncio.gather(first, *queued)
        await batcher.drain()

    run(main())


# --------------------------------------------------------------------------------------------
# batch assembly: `_gather` against np.concatenate, on random dtypes and shapes

GATHER_DTYPES = [np.bool_, np.int8, np.uint16, np.int32, np.int64, np.float16, np.float32,
                 np.float64, np.complex64]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(GATHER_DTYPES),
    hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=4),
    st.integers(1, 6),
    st.data(),
)
def test_prop_gather_is_concatenate(
    dtype: Any, inner: tuple[int, ...], n_requests: int, data: st.DataObject
) -> None:
    arrays = [
        data.draw(hnp.arrays(dtype, (data.draw(st.integers(0, 3)), *inner)))
        for _ in range(n_requests)
    ]
    # as the wire delivers them: read-only views of bytes, and some strided ones (row slices
    # of a transposed array) that take the concatenate path
    parts = [np.frombuffer(a.tobytes(), dtype).reshape(a.shape) for a in arrays]
    if data.draw(st.booleans()) and inner and len(inner) == 1 and inner[0] > 1:
        parts[0] = np.ascontiguousarray(arrays[0].T).T
    requests = [SimpleNamespace(inputs={"X": p}, rows=p.shape[0]) for p in parts]
    batch = _gather(requests)["X"]  # type: ignore[arg-type]
    expected = np.concatenate(arrays)
    assert batch.dtype == expected.dtype
    assert batch.shape == expected.shape
    assert batch.tobytes() == expected.tobytes()


def test_gather_object_dtype_concatenates() -> None:
    parts = [np.array([b"a", b"bc"], dtype=object), np.array([b""], dtype=object)]
    requests = [SimpleNamespace(inputs={"S": p}, rows=len(p)) for p in parts]
    batch = _gather(requests)["S"]  # type: ignore[arg-type]
    assert batch.tolist() == [b"a", b"bc", b""]
