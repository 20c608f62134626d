"""The response cache in process: --cache-config parsing, request keys, LRU bounded in bytes,
and which models may enable it (server/cache.py, server/cache_policy.py)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from server import model_config
from server.cache import (
    ENTRY_OVERHEAD,
    OUTPUT_OVERHEAD,
    CacheConfigError,
    CacheSettings,
    ResponseCache,
    entry_size,
    parse_cache_config,
    request_key,
)
from server.cache_policy import check_model
from server.model_config import ConfigError
from server.types import DataType

FP32 = DataType.FP32


def _key(data: np.ndarray, outputs: tuple[str, ...] = ("OUT",), **kw: object) -> bytes:
    options = tuple(sorted(kw.items()))
    return request_key("m", 1, [("IN", FP32, data)], list(outputs), options)


def _outputs(rows: int, value: float = 0.0) -> dict[str, np.ndarray]:
    return {"OUT": np.full((rows, 4), value, dtype=np.float32)}  # 16 bytes a row


# -- --cache-config -------------------------------------------------------------------------


def test_cache_config_as_triton_spells_it() -> None:
    assert parse_cache_config([]) is None
    assert parse_cache_config(["local,size=1048576"]) == CacheSettings(1048576)
    assert parse_cache_config(["local,size=0"]) is None  # Triton: only a non-zero size
    assert parse_cache_config(["local,size=10", "local,size=20"]) == CacheSettings(20)


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("redis,host=localhost", "cache 'redis' is not available"),
        ("local,bytes=10", "setting 'bytes=10' is not known"),
        ("local", "setting '' is not known"),
        ("local,size=10MB", "size '10MB' is not a whole number of bytes"),
        ("local,size=-1", "size '-1' is not a whole number of bytes"),
    ],
)
def test_bad_cache_config_names_the_value(value: str, words: str) -> None:
    with pytest.raises(CacheConfigError) as info:
        parse_cache_config([value])
    assert f"--cache-config '{value}'" in str(info.value)
    assert words in str(info.value)
    assert "expected local,size=BYTES" in str(info.value)


# -- keys -----------------------------------------------------------------------------------


def test_key_covers_every_part_of_a_request() -> None:
    data = np.arange(8, dtype=np.float32).reshape(2, 4)
    key = _key(data)
    assert _key(data.copy()) == key  # the same bytes: the same key
    assert _key(np.asfortranarray(data)) == key  # layout does not matter, values do
    changed = data.copy()
    changed[1, 3] = 99
    others = {
        _key(changed),
        _key(data.reshape(4, 2)),  # same bytes, another shape
        _key(data, outputs=("OUT", "OTHER")),
        _key(data, outputs=()),
        _key(data, k=3),
        _key(data, k=4),
        _key(data, k="4"),
        request_key("m", 2, [("IN", FP32, data)], ["OUT"], ()),
        request_key("n", 1, [("IN", FP32, data)], ["OUT"], ()),
        request_key("m", 1, [("IN2", FP32, data)], ["OUT"], ()),
        request_key("m", 1, [("IN", DataType.INT32, data.view(np.int32))], ["OUT"], ()),
    }
    assert key not in others and len(others) == 11


def test_keys_of_empty_bool_and_half_tensors() -> None:
    for dtype, datatype in ((np.float32, FP32), (np.bool_, DataType.BOOL),
                            (np.float16, DataType.FP16)):
        empty = np.zeros((1, 0), dtype=dtype)
        one = np.ones((1, 2), dtype=dtype)
        keys = {request_key("m", 1, [("IN", datatype, a)], ["O"], ()) for a in (empty, one)}
        assert len(keys) == 2


def test_bytes_keys_are_length_prefixed() -> None:
    def key(*items: bytes) -> bytes:
        array = np.array(items, dtype=object)
        return request_key("m", 1, [("T", DataType.BYTES, array)], ["O"], ())

    assert key(b"ab", b"c") != key(b"a", b"bc")
    assert key(b"ab", b"c") == key(b"ab", b"c")


# -- LRU bounded in bytes -------------------------------------------------------------------


def test_entry_size_counts_output_bytes_and_overhead() -> None:
    assert entry_size(_outputs(2)) == ENTRY_OVERHEAD + OUTPUT_OVERHEAD + len("OUT") + 32
    texts = {"T": np.array([b"abc", b""], dtype=object)}
    assert entry_size(texts) == ENTRY_OVERHEAD + OUTPUT_OVERHEAD + 1 + (3 + 4) + (0 + 4)


def test_hit_returns_a_read_only_copy() -> None:
    cache = ResponseCache(10_000)
    produced = _outputs(2, 1.5)
    assert cache.insert(b"k", "m", produced, cache.generation)
    produced["OUT"][:] = 7  # the producer's array changing later does not reach the cache
    entry = cache.lookup(b"k")
    assert entry is not None
    assert entry.outputs["OUT"].tolist() == [[1.5] * 4] * 2
    with pytest.raises(ValueError):
        entry.outputs["OUT"][0, 0] = 3
    assert cache.lookup(b"other") is None
    totals = cache.totals()
    assert (totals.lookups, totals.hits, totals.misses, totals.entries) == (2, 1, 1, 1)


def test_least_recently_used_goes_first_when_bytes_run_out() -> None:
    one = entry_size(_outputs(1))
    cache = ResponseCache(3 * one)
    for name in (b"a", b"b", b"c"):
        assert cache.insert(name, "m", _outputs(1), cache.generation)
    assert cache.lookup(b"a") is not None  # a is now the most recently used
    assert cache.insert(b"d", "m", _outputs(1), cache.generation)
    assert cache.lookup(b"b") is None  # b was the least recently used
    assert all(cache.lookup(k) is not None for k in (b"a", b"c", b"d"))
    # a bigger entry (two rows more) evicts as many as it needs, oldest first
    assert cache.insert(b"e", "m", _outputs(3), cache.generation)
    totals = cache.totals()
    assert totals.bytes == 2 * one + 32 <= totals.capacity
    assert totals.evictions == 3
    assert [cache.lookup(k) is not None for k in (b"a", b"c", b"d", b"e")] == [
        False, False, True, True
    ]


def test_an_entry_larger_than_the_cache_is_not_kept() -> None:
    cache = ResponseCache(entry_size(_outputs(4)) - 1)
    assert cache.insert(b"small", "m", _outputs(1), cache.generation)
    assert not cache.insert(b"big", "m", _outputs(4), cache.generation)
    assert cache.lookup(b"big") is None
    assert cache.lookup(b"small") is not None  # nothing was evicted for it
    assert cache.totals().evictions == 0


def test_model_changes_drop_entries_and_refuse_stale_inserts() -> None:
    cache = ResponseCache(100_000)
    cache.insert(b"m1", "m", _outputs(1), cache.generation)
    cache.insert(b"n1", "n", _outputs(1), cache.generation)
    cache.insert(b"e1", "ens", _outputs(1), cache.generation, ensemble=True)
    before = cache.generation  # a request to n reads this, then n reloads while it runs
    assert cache.drop_model("m") == 2  # m's entry and every ensemble's
    assert cache.lookup(b"m1") is None and cache.lookup(b"e1") is None
    assert cache.lookup(b"n1") is not None
    assert not cache.insert(b"n2", "n", _outputs(1), before)
    assert cache.insert(b"n2", "n", _outputs(1), cache.generation)
    assert cache.totals().bytes == 2 * entry_size(_outputs(1))


def test_concurrent_use_keeps_the_byte_count_exact() -> None:
    one = entry_size(_outputs(1))
    cache = ResponseCache(20 * one)

    def work(worker: int) -> None:
        for i in range(300):
            key = f"{worker}-{i % 40}".encode()
            if cache.lookup(key) is None:
                cache.insert(key, "m", _outputs(1), cache.generation)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    totals = cache.totals()
    assert totals.bytes == totals.entries * one <= totals.capacity
    assert totals.lookups == 1200


# -- which models may enable the cache ------------------------------------------------------


def _config(extra: str) -> object:
    return model_config.parse_config(
        'platform: "onnxruntime_onnx" max_batch_size: 8 '
        'input [{ name: "X" data_type: TYPE_FP32 dims: [4] }] '
        'output [{ name: "Y" data_type: TYPE_FP32 dims: [4] }] '
        "response_cache { enable: true } " + extra,
        "m",
    )


@pytest.mark.parametrize(
    ("extra", "section"),
    [
        ("sequence_batching { }", "sequence_batching"),
        ("model_transaction_policy { decoupled: true }", "model_transaction_policy.decoupled"),
    ],
)
def test_cache_refused_where_answers_depend_on_more_than_the_request(
    extra: str, section: str
) -> None:
    with pytest.raises(ConfigError) as info:
        model_config.to_spec(_config(extra), "onnxruntime")
    assert f"model 'm': response_cache.enable is true with {section}" in str(info.value)


def _onnx(path: Path, op: str) -> None:
    nodes = [helper.make_node(op, ["X"], ["R"])] if op != "Identity" else []
    nodes.append(helper.make_node("Add", ["X", "R" if nodes else "X"], ["Y"]))
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["b", 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["b", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path.mkdir(parents=True)
    onnx.save(model, str(path / "model.onnx"))


def test_onnx_graph_with_random_operators_cannot_enable_the_cache(tmp_path: Path) -> None:
    spec = model_config.to_spec(_config(""), "onnxruntime")
    assert spec.response_cache
    _onnx(tmp_path / "plain", "Identity")
    check_model(spec, tmp_path / "plain")  # deterministic: accepted
    _onnx(tmp_path / "random", "RandomUniformLike")
    with pytest.raises(ConfigError) as info:
        check_model(spec, tmp_path / "random")
    assert "model 'm': response_cache.enable is true, but its ONNX graph model.onnx holds " \
        "random operators ['RandomUniformLike']" in str(info.value)
