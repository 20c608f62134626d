"""The response cache through a real server (`--cache-config local,size=N`, models with
`response_cache { enable: true }`), with tritonclient over gRPC and HTTP: hits answer the same
outputs without executing the model, other requests miss, LRU eviction by bytes, statistics
and metrics, reloads and unloads, ensembles, refused configs, a server without a cache."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcclient_aio
import tritonclient.http as httpclient

from server import index_build
from tests.conftest import BUNDLED, RunningServer, ServerFactory, tachyon_command
from tests.conftest import repository_index as index
from tests.test_e2e_repository import adder_bytes

CACHE_BYTES = 4000  # ten [1, 16] FP32 responses of 391 bytes; a [64, 16] one does not fit
ENTRY_1x16 = 256 + 64 + len("OUTPUT0") + 64  # server/cache.py's charge for one [1, 16] row

ADDER = """
name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: 64
input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] }} ]
output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] }} ]
dynamic_batching {{ }}
{extra}
"""
CACHED = "response_cache { enable: true }"

CHAIN = """
name: "{name}"
platform: "ensemble"
max_batch_size: 8
input [ { name: "A" data_type: TYPE_FP32 dims: [ 16 ] } ]
output [ { name: "OUT" data_type: TYPE_FP32 dims: [ 16 ] } ]
ensemble_scheduling { step [
  { model_name: "{step}" model_version: -1
    input_map { key: "INPUT0" value: "A" } output_map { key: "OUTPUT0" value: "s" } },
  { model_name: "identity_fp32" model_version: -1
    input_map { key: "INPUT0" value: "s" } output_map { key: "OUTPUT0" value: "OUT" } }
] }
response_cache { enable: true }
"""


def random_adder_bytes() -> bytes:
    """OUTPUT0 = INPUT0 + uniform noise: a model whose answers change between calls."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("RandomUniformLike", ["INPUT0"], ["noise"]),
         helper.make_node("Add", ["INPUT0", "noise"], ["OUTPUT0"])], "noisy",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["b", 16])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["b", 16])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def add_model(repo: Path, name: str, config: str, onnx: bytes | None = None) -> Path:
    folder = repo / name
    (folder / "1").mkdir(parents=True)
    (folder / "config.pbtxt").write_text(config)
    if onnx is not None:
        (folder / "1" / "model.onnx").write_bytes(onnx)
    return folder


def chain(name: str, step: str) -> str:
    return CHAIN.replace("{name}", name).replace("{step}", step)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cache_repo")
    shutil.copytree(BUNDLED / "identity_fp32", root / "identity_fp32")  # no cache
    shutil.copytree(BUNDLED / "digits", root / "digits")
    with (root / "digits" / "config.pbtxt").open("a") as config:
        config.write(f"\n{CACHED}\n")
    for name, value in (("adder", 1.0), ("reloaded", 1.0)):
        add_model(root, name, ADDER.format(name=name, extra=CACHED), adder_bytes(value))
    add_model(root, "chain_cached", chain("chain_cached", "reloaded"))
    # refused at load
    sequence = ADDER.format(name="seq_cached", extra=CACHED)
    add_model(root, "seq_cached", sequence.replace("dynamic_batching", "sequence_batching"),
              adder_bytes(1))
    add_model(root, "decoupled_cached", ADDER.format(
        name="decoupled_cached", extra=CACHED + " model_transaction_policy { decoupled: true }"),
        adder_bytes(1))
    add_model(root, "random_cached", ADDER.format(name="random_cached", extra=CACHED),
              random_adder_bytes())
    add_model(root, "random_plain", ADDER.format(name="random_plain", extra=""),
              random_adder_bytes())
    add_model(root, "chain_random", chain("chain_random", "random_plain"))
    vectors = root.parent / "vectors.npy"
    np.save(vectors, np.random.default_rng(0).standard_normal((500, 8)).astype(np.float32))
    index_build.build(vectors, "Flat", root, "vectors", k=5)
    with (root / "vectors" / "config.pbtxt").open("a") as config:
        config.write(f"\n{CACHED}\n")
    return root


@pytest.fixture(scope="module")
def server(start_server: ServerFactory, repo: Path) -> RunningServer:
    return start_server(
        repo, "--cache-config", f"local,size={CACHE_BYTES}", "--model-control-mode", "explicit",
        "--load-model", "*", "--exit-on-error", "false", "--strict-readiness", "false",
    )


# -- helpers --------------------------------------------------------------------------------


def stats(server: RunningServer, model: str) -> dict[str, int]:
    """execution_count, inference_count and each inference_stats count/ns over gRPC, checked
    against HTTP's numbers for the same model."""
    g = grpcclient.InferenceServerClient(server.grpc_url)
    h = httpclient.InferenceServerClient(server.http_url)
    grpc_stats = g.get_inference_statistics(model, as_json=True)["model_stats"][0]
    http_stats = h.get_inference_statistics(model)["model_stats"][0]
    flat: dict[str, int] = {}
    for key in ("execution_count", "inference_count"):
        flat[key] = int(grpc_stats.get(key, 0))
        assert int(http_stats[key]) == flat[key], (key, grpc_stats, http_stats)
    for key in ("success", "queue", "compute_infer", "cache_hit", "cache_miss"):
        grpc_stat = grpc_stats["inference_stats"].get(key, {})
        flat[key] = int(grpc_stat.get("count", 0))
        flat[f"{key}_ns"] = int(grpc_stat.get("ns", 0))
        assert int(http_stats["inference_stats"][key]["count"]) == flat[key], key
    return flat


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after if not k.endswith("_ns")}


def infer_grpc(
    server: RunningServer, model: str, data: np.ndarray, name: str = "INPUT0",
    output: str = "OUTPUT0", request_id: str = "",
) -> grpcclient.InferResult:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    tensor = grpcclient.InferInput(name, list(data.shape), "FP32")
    tensor.set_data_from_numpy(data)
    return client.infer(model, [tensor], request_id=request_id,
                        outputs=[grpcclient.InferRequestedOutput(output)])


def infer_http(server: RunningServer, model: str, data: np.ndarray) -> np.ndarray:
    client = httpclient.InferenceServerClient(server.http_url)
    tensor = httpclient.InferInput("INPUT0", list(data.shape), "FP32")
    tensor.set_data_from_numpy(data, binary_data=True)
    result = client.infer(model, [tensor])
    out = result.as_numpy("OUTPUT0")
    assert out is not None
    return out


def scrape(server: RunningServer) -> str:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def metric(text: str, name: str, labels: str = "") -> float:
    pattern = re.escape(name) + (re.escape("{" + labels + "}") if labels else "") + r" (\S+)"
    found = re.search(r"^" + pattern + r"$", text, re.MULTILINE)
    assert found is not None, f"{name}{{{labels}}} not in the scrape"
    return float(found.group(1))


def rows(seed: int, count: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 16)).astype(np.float32)


# -- hits and misses ------------------------------------------------------------------------


def test_repeat_is_answered_from_the_cache_without_executing(server: RunningServer) -> None:
    data = rows(1)
    before = stats(server, "adder")
    first = infer_grpc(server, "adder", data, request_id="first")
    after_miss = stats(server, "adder")
    assert delta(after_miss, before) == {
        "execution_count": 1, "inference_count": 1, "success": 1, "queue": 1,
        "compute_infer": 1, "cache_hit": 0, "cache_miss": 1,
    }
    assert after_miss["cache_miss_ns"] > before["cache_miss_ns"]
    again = infer_grpc(server, "adder", data, request_id="second")
    over_http = infer_http(server, "adder", data)  # one cache for both transports
    after_hits = stats(server, "adder")
    assert delta(after_hits, after_miss) == {
        "execution_count": 0, "inference_count": 0, "success": 2, "queue": 2,
        "compute_infer": 0, "cache_hit": 2, "cache_miss": 0,
    }
    assert after_hits["cache_hit_ns"] > after_miss["cache_hit_ns"]
    expected = data + 1
    np.testing.assert_array_equal(first.as_numpy("OUTPUT0"), expected)
    np.testing.assert_array_equal(again.as_numpy("OUTPUT0"), expected)
    np.testing.assert_array_equal(over_http, expected)
    assert again.get_response().id == "second"  # the id of the request it answers
    assert again.get_response().model_version == "1"


def test_other_inputs_outputs_and_parameters(server: RunningServer) -> None:
    data = np.random.default_rng(2).random((1, 64)).astype(np.float32) * 16
    before = stats(server, "digits")
    label = infer_grpc(server, "digits", data, "INPUT", "LABEL")
    probabilities = infer_grpc(server, "digits", data, "INPUT", "PROBABILITIES")  # other output
    infer_grpc(server, "digits", data + 1, "INPUT", "LABEL")  # other input
    assert delta(stats(server, "digits"), before)["cache_miss"] == 3
    # a repeat with a parameter that does not change the answer (priority) hits; a
    # classification of a cached output hits and is formatted from the cached values
    client = grpcclient.InferenceServerClient(server.grpc_url)
    tensor = grpcclient.InferInput("INPUT", [1, 64], "FP32")
    tensor.set_data_from_numpy(data)
    repeat = client.infer("digits", [tensor], priority=0,
                          outputs=[grpcclient.InferRequestedOutput("LABEL")])
    classes = client.infer(
        "digits", [tensor],
        outputs=[grpcclient.InferRequestedOutput("PROBABILITIES", class_count=2)])
    counts = delta(stats(server, "digits"), before)
    assert (counts["cache_miss"], counts["cache_hit"], counts["execution_count"]) == (3, 2, 3)
    np.testing.assert_array_equal(repeat.as_numpy("LABEL"), label.as_numpy("LABEL"))
    top = classes.as_numpy("PROBABILITIES")[0][0].decode().split(":")
    values = probabilities.as_numpy("PROBABILITIES")[0]
    assert int(top[1]) == int(np.argmax(values)) == int(label.as_numpy("LABEL")[0][0])
    assert float(top[0]) == pytest.approx(float(values.max()), abs=1e-6)


def test_parameters_that_change_an_answer_are_in_the_key(server: RunningServer) -> None:
    """FAISS's `k` changes the answer: each k is its own entry; a repeat of one hits."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    query = grpcclient.InferInput("QUERY", [1, 8], "FP32")
    query.set_data_from_numpy(np.random.default_rng(4).standard_normal((1, 8)).astype(np.float32))

    def ids(k: int) -> np.ndarray:
        out = client.infer("vectors", [query], parameters={"k": k}).as_numpy("IDS")
        assert out is not None
        return out

    before = stats(server, "vectors")
    three, five = ids(3), ids(5)
    assert three.shape == (1, 3) and five.shape == (1, 5)
    np.testing.assert_array_equal(five[:, :3], three)
    np.testing.assert_array_equal(ids(3), three)  # from the cache
    counts = delta(stats(server, "vectors"), before)
    assert (counts["cache_miss"], counts["cache_hit"], counts["execution_count"]) == (2, 1, 2)


def test_many_identical_requests_at_once(server: RunningServer) -> None:
    data = rows(3)
    before = stats(server, "adder")

    async def burst() -> list[np.ndarray]:
        client = grpcclient_aio.InferenceServerClient(server.grpc_url)
        try:
            tensor = grpcclient_aio.InferInput("INPUT0", [1, 16], "FP32")
            tensor.set_data_from_numpy(data)
            results = await asyncio.gather(*(client.infer("adder", [tensor]) for _ in range(32)))
        finally:
            await client.close()
        return [r.as_numpy("OUTPUT0") for r in results]

    outputs = asyncio.run(burst())
    for out in outputs:
        np.testing.assert_array_equal(out, data + 1)
    counts = delta(stats(server, "adder"), before)
    assert counts["success"] == 32
    assert counts["cache_hit"] + counts["cache_miss"] == 32
    assert counts["cache_miss"] == counts["inference_count"] >= 1
    after = stats(server, "adder")
    infer_grpc(server, "adder", data)  # cached by now
    assert delta(stats(server, "adder"), after)["cache_hit"] == 1


# -- bounded in bytes -----------------------------------------------------------------------


def test_least_recently_used_responses_are_evicted_by_bytes(server: RunningServer) -> None:
    first = rows(100)
    infer_grpc(server, "adder", first)
    evictions = metric(scrape(server), "tachyon_cache_num_evictions_total")
    for seed in range(101, 101 + CACHE_BYTES // ENTRY_1x16 + 2):  # more than the cache holds
        infer_grpc(server, "adder", rows(seed))
    text = scrape(server)
    assert metric(text, "tachyon_cache_num_evictions_total") > evictions
    assert metric(text, "tachyon_cache_bytes") <= CACHE_BYTES
    assert metric(text, "tachyon_cache_size_bytes") == CACHE_BYTES
    assert 0 < metric(text, "tachyon_cache_util") <= 1
    before = stats(server, "adder")
    infer_grpc(server, "adder", rows(101 + CACHE_BYTES // ENTRY_1x16 + 1))  # the newest: kept
    np.testing.assert_array_equal(
        infer_grpc(server, "adder", first).as_numpy("OUTPUT0"), first + 1)  # evicted: runs
    counts = delta(stats(server, "adder"), before)
    assert (counts["cache_hit"], counts["cache_miss"], counts["execution_count"]) == (1, 1, 1)


def test_a_response_larger_than_the_cache_is_not_cached(server: RunningServer) -> None:
    data = rows(7, 64)  # 4096 bytes of output: more than the whole cache
    entries = metric(scrape(server), "tachyon_cache_num_entries")
    before = stats(server, "adder")
    for _ in range(2):
        np.testing.assert_array_equal(infer_http(server, "adder", data), data + 1)
    counts = delta(stats(server, "adder"), before)
    assert (counts["cache_hit"], counts["cache_miss"], counts["execution_count"]) == (0, 2, 2)
    assert metric(scrape(server), "tachyon_cache_num_entries") == entries


# -- statistics and metrics agree -----------------------------------------------------------


def test_per_model_metrics_match_the_statistics(server: RunningServer) -> None:
    infer_grpc(server, "adder", rows(8))
    infer_grpc(server, "adder", rows(8))
    counts = stats(server, "adder")
    text = scrape(server)
    labels = 'model="adder",version="1"'
    assert metric(text, "tachyon_cache_num_hits_per_model_total", labels) == counts["cache_hit"]
    assert metric(text, "tachyon_cache_num_misses_per_model_total", labels) == \
        counts["cache_miss"]
    assert metric(text, "tachyon_cache_hit_duration_per_model_seconds_count", labels) == \
        counts["cache_hit"]
    assert metric(text, "tachyon_cache_miss_duration_per_model_seconds_count", labels) == \
        counts["cache_miss"]
    # a hit counts as a successful request; only executions count as inferences
    assert metric(text, "tachyon_inference_request_success_total", labels) == counts["success"]
    assert metric(text, "tachyon_inference_count_total", labels) == counts["inference_count"]
    assert metric(text, "tachyon_cache_num_hits_total") >= counts["cache_hit"]
    hits, misses = (metric(text, f"tachyon_cache_num_{k}_total") for k in ("hits", "misses"))
    assert metric(text, "tachyon_cache_num_lookups_total") == hits + misses
    uncached = stats(server, "identity_fp32")  # a model without response_cache
    assert uncached["cache_hit"] == uncached["cache_miss"] == 0


# -- model changes --------------------------------------------------------------------------


def test_reload_unload_and_ensembles_never_answer_from_an_old_version(
    server: RunningServer, repo: Path,
) -> None:
    g = grpcclient.InferenceServerClient(server.grpc_url)
    data = rows(9)
    for _ in range(2):  # the second time from the cache
        np.testing.assert_array_equal(
            infer_grpc(server, "reloaded", data).as_numpy("OUTPUT0"), data + 1)
        np.testing.assert_array_equal(
            infer_grpc(server, "chain_cached", data, "A", "OUT").as_numpy("OUT"), data + 1)
    assert stats(server, "chain_cached")["cache_hit"] == 1
    # the ensemble's hit did not even reach its steps
    assert stats(server, "reloaded")["cache_hit"] == 2
    # new files for the same version: the next answers come from them, not from the cache
    (repo / "reloaded" / "1" / "model.onnx").write_bytes(adder_bytes(5))
    g.load_model("reloaded")
    np.testing.assert_array_equal(
        infer_grpc(server, "reloaded", data).as_numpy("OUTPUT0"), data + 5)
    np.testing.assert_array_equal(
        infer_grpc(server, "chain_cached", data, "A", "OUT").as_numpy("OUT"), data + 5)
    assert stats(server, "reloaded")["cache_miss"] == 1  # a new load, new statistics
    entries = metric(scrape(server), "tachyon_cache_num_entries")
    g.unload_model("reloaded")  # its entries and the ensemble's go
    assert metric(scrape(server), "tachyon_cache_num_entries") == entries - 2
    g.load_model("reloaded")
    np.testing.assert_array_equal(
        infer_grpc(server, "reloaded", data).as_numpy("OUTPUT0"), data + 5)
    assert stats(server, "reloaded")["cache_miss"] == 1


def test_models_that_cannot_cache_deterministically_are_refused(server: RunningServer) -> None:
    models = index(server)
    reasons = {
        "seq_cached": "response_cache.enable is true with sequence_batching",
        "decoupled_cached": "response_cache.enable is true with "
                            "model_transaction_policy.decoupled",
        "random_cached": "response_cache.enable is true, but its ONNX graph model.onnx holds "
                         "random operators ['RandomUniformLike']",
        "chain_random": "its step model 'random_plain' is not deterministic",
    }
    for name, words in reasons.items():
        entry = models.get((name, "1")) or models[(name, "")]
        assert entry["state"] == "UNAVAILABLE", entry
        assert words in entry["reason"], entry
    assert models[("random_plain", "1")]["state"] == "READY"  # without the cache it serves


# -- a server without a cache, bad flags ----------------------------------------------------


def test_without_a_cache_the_model_is_served_uncached_with_one_warning(
    start_server: ServerFactory, tmp_path: Path,
) -> None:
    add_model(tmp_path, "adder", ADDER.format(name="adder", extra=CACHED), adder_bytes(1))
    server = start_server(tmp_path)
    data = rows(10)
    for _ in range(2):
        np.testing.assert_array_equal(infer_http(server, "adder", data), data + 1)
    counts = stats(server, "adder")
    assert (counts["execution_count"], counts["cache_hit"], counts["cache_miss"]) == (2, 0, 0)
    warnings = [line for line in server.log().splitlines() if "response_cache" in line]
    assert len(warnings) == 1 and "served without caching" in warnings[0], warnings
    assert "tachyon_cache_num_entries" not in scrape(server)


@pytest.mark.parametrize(
    ("flag", "words"),
    [
        (["--cache-config", "redis,host=localhost"],
         "--cache-config 'redis,host=localhost': cache 'redis' is not available"),
        (["--cache-config=local,size=1GB"],
         "--cache-config 'local,size=1GB': size '1GB' is not a whole number of bytes"),
    ],
)
def test_a_bad_cache_config_stops_the_server_at_start(flag: list[str], words: str) -> None:
    result = subprocess.run(
        [*tachyon_command(), "serve", "--model-repository", str(BUNDLED), *flag],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2, result
    assert words in result.stderr and "expected local,size=BYTES" in result.stderr
