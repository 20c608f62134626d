"""FAISS indexes as models through a real server: a repository built with `index_build`,
queried with tritonclient over gRPC and HTTP and by 32 concurrent aio clients whose requests
the batcher merges; every answer equals FAISS's own in-process search. Bad queries are
INVALID_ARGUMENT, a file that is not an index leaves its model UNAVAILABLE with the reason while
the others serve, and a version built while the server polls replaces the old one."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.grpc.aio as grpcclient_aio  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from server import index_build  # noqa: E402
from server.backends.faiss import apply_search_parameters  # noqa: E402
from tests.conftest import RunningServer, ServerFactory, repository_index, wait_for  # noqa: E402

COUNT, DIM, K = 2000, 32, 10
MODELS = {"flat": ("Flat", "L2"), "ivf": ("IVF16,Flat", "IP"), "hnsw": ("HNSW16", "L2")}
OUTPUTS = ("DISTANCES", "IDS")


def random_vectors(seed: int, rows: int = COUNT) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, DIM)).astype(np.float32)


def build(repo: Path, model: str, factory: str, metric: str = "L2", seed: int = 0) -> None:
    path = repo.parent / f"vectors-{model}-{seed}.npy"
    np.save(path, random_vectors(seed))
    ids = repo.parent / f"ids-{model}-{seed}.npy"
    np.save(ids, np.arange(COUNT, dtype=np.int64) * 3 + seed * 100_000)
    index_build.build(path, factory, repo, model, ids_path=ids, metric=metric, k=K)


class Reference:
    """The written index of a model version, searched in-process with its config's settings."""

    def __init__(self, repo: Path, model: str, version: int = 1) -> None:
        from server import model_config

        params = model_config.read_config(repo / model).parameters  # type: ignore[union-attr]
        self.index = faiss.read_index(str(repo / model / str(version) / "index.faiss"))
        search = {k: int(params[k].string_value) for k in ("nprobe", "efSearch") if k in params}
        apply_search_parameters(self.index, search)
        self.k = int(params["k"].string_value)

    def search(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        distances, ids = self.index.search(queries, self.k)
        return distances, ids


def assert_same_neighbours(
    distances: np.ndarray, ids: np.ndarray, expected: tuple[np.ndarray, np.ndarray]
) -> None:
    """Equal results; ids may differ only where distances tie (a batch of a different size
    sums in a different order, which can swap neighbours at equal distance)."""
    want_distances, want_ids = expected
    np.testing.assert_allclose(distances, want_distances, rtol=1e-5, atol=1e-5)
    differ = ids != want_ids
    if differ.any():
        rows = np.nonzero(differ.any(axis=1))[0]
        for row in rows:
            assert sorted(ids[row]) == sorted(want_ids[row]) or np.allclose(
                distances[row][differ[row]], want_distances[row][differ[row]], atol=1e-5
            ), (row, ids[row], want_ids[row])


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("faiss") / "repo"
    for model, (factory, metric) in MODELS.items():
        build(root, model, factory, metric)
        # a short wait for company makes merged batches certain, not just likely
        config = root / model / "config.pbtxt"
        text = config.read_text()
        assert "dynamic_batching {\n}" in text
        config.write_text(text.replace(
            "dynamic_batching {\n}", "dynamic_batching {\n  max_queue_delay_microseconds: 2000\n}"
        ))
    build(root, "growing", "Flat")
    build(root, "broken", "Flat")
    (root / "broken" / "1" / "index.faiss").write_bytes(b"this is not a FAISS index")
    return root


@pytest.fixture(scope="module")
def server(start_server: ServerFactory, repo: Path) -> RunningServer:
    return start_server(repo, "--model-control-mode", "poll", "--repository-poll-secs", "0.2",
                        "--exit-on-error", "false")


def grpc_infer(
    client: grpcclient.InferenceServerClient, model: str, queries: np.ndarray
) -> tuple[np.ndarray, np.ndarray, str]:
    tensor = grpcclient.InferInput("QUERY", list(queries.shape), "FP32")
    tensor.set_data_from_numpy(queries)
    outputs = [grpcclient.InferRequestedOutput(name) for name in OUTPUTS]
    result = client.infer(model, [tensor], outputs=outputs)
    version = result.get_response().model_version
    return result.as_numpy("DISTANCES"), result.as_numpy("IDS"), version


def http_infer(
    client: httpclient.InferenceServerClient, model: str, queries: np.ndarray, binary: bool
) -> tuple[np.ndarray, np.ndarray]:
    tensor = httpclient.InferInput("QUERY", list(queries.shape), "FP32")
    tensor.set_data_from_numpy(queries, binary_data=binary)
    outputs = [httpclient.InferRequestedOutput(name, binary_data=binary) for name in OUTPUTS]
    result = client.infer(model, [tensor], outputs=outputs)
    return result.as_numpy("DISTANCES"), result.as_numpy("IDS")


# -- correct answers ----------------------------------------------------------------------


@pytest.mark.parametrize("model", list(MODELS))
def test_grpc_and_http_answers_equal_in_process_search(
    server: RunningServer, repo: Path, model: str
) -> None:
    reference = Reference(repo, model)
    queries = random_vectors(7, rows=5)
    expected = reference.search(queries)
    g = grpcclient.InferenceServerClient(server.grpc_url)
    h = httpclient.InferenceServerClient(server.http_url)
    distances, ids, version = grpc_infer(g, model, queries)
    assert version == "1"
    np.testing.assert_array_equal(distances, expected[0])
    np.testing.assert_array_equal(ids, expected[1])
    assert ids.dtype == np.int64 and np.all(ids % 3 == 0)  # the ids file's ids
    distances, ids = http_infer(h, model, queries, binary=True)
    np.testing.assert_array_equal(distances, expected[0])
    np.testing.assert_array_equal(ids, expected[1])
    distances, ids = http_infer(h, model, queries, binary=False)  # JSON both ways
    np.testing.assert_allclose(distances, expected[0], rtol=1e-6)
    np.testing.assert_array_equal(ids, expected[1])
    metadata = g.get_model_metadata(model, as_json=True)
    assert metadata["platform"] == "faiss"
    assert [(t["name"], t["datatype"], t["shape"]) for t in metadata["inputs"]] == [
        ("QUERY", "FP32", ["-1", str(DIM)])
    ]
    assert [(t["name"], t["datatype"]) for t in metadata["outputs"]] == [
        ("DISTANCES", "FP32"), ("IDS", "INT64")
    ]
    config = h.get_model_config(model)
    assert config["backend"] == "faiss"
    assert config["parameters"]["metric"]["string_value"] == (
        "INNER_PRODUCT" if MODELS[model][1] == "IP" else "L2"
    )


@pytest.mark.parametrize("model", ["flat", "ivf"])
def test_32_concurrent_aio_clients_get_correct_batched_answers(
    server: RunningServer, repo: Path, model: str
) -> None:
    reference = Reference(repo, model)
    requests_per_client, clients = 8, 32
    before = httpclient.InferenceServerClient(server.http_url).get_inference_statistics(model)
    failures: list[str] = []

    async def client_task(seed: int) -> int:
        rng = np.random.default_rng(seed)
        client = grpcclient_aio.InferenceServerClient(server.grpc_url)
        try:
            for _ in range(requests_per_client):
                queries = rng.standard_normal((int(rng.integers(1, 4)), DIM)).astype(np.float32)
                tensor = grpcclient_aio.InferInput("QUERY", list(queries.shape), "FP32")
                tensor.set_data_from_numpy(queries)
                result = await client.infer(model, [tensor])
                try:
                    assert_same_neighbours(
                        result.as_numpy("DISTANCES"), result.as_numpy("IDS"),
                        reference.search(queries),
                    )
                except AssertionError as exc:
                    failures.append(f"client {seed}: {exc}")
        finally:
            await client.close()
        return requests_per_client

    async def run_all() -> int:
        return sum(await asyncio.gather(*(client_task(seed) for seed in range(clients))))

    assert asyncio.run(run_all()) == clients * requests_per_client
    assert failures == []
    after = httpclient.InferenceServerClient(server.http_url).get_inference_statistics(model)

    def counts(stats: dict[str, Any]) -> tuple[int, int]:
        entry = stats["model_stats"][0]
        return int(entry["inference_stats"]["success"]["count"]), int(entry["execution_count"])

    requests = counts(after)[0] - counts(before)[0]
    executions = counts(after)[1] - counts(before)[1]
    assert requests == clients * requests_per_client
    assert executions < requests, "the batcher merged no requests"
    print(f"{model}: {requests} requests from {clients} clients in {executions} executions")


# -- bad queries ---------------------------------------------------------------------------


def test_a_query_of_the_wrong_dimension_is_invalid_argument(server: RunningServer) -> None:
    queries = random_vectors(3, rows=2)[:, :16].copy()
    with pytest.raises(InferenceServerException) as info:
        grpc_infer(grpcclient.InferenceServerClient(server.grpc_url), "flat", queries)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "QUERY" in (info.value.message() or "")
    with pytest.raises(InferenceServerException) as http_info:
        http_infer(httpclient.InferenceServerClient(server.http_url), "flat", queries, True)
    assert http_info.value.status() == "400"
    assert "QUERY" in (http_info.value.message() or "")


def test_a_nan_query_is_invalid_argument_and_the_model_still_serves(
    server: RunningServer, repo: Path
) -> None:
    queries = random_vectors(4, rows=3)
    queries[1, 5] = np.nan
    g = grpcclient.InferenceServerClient(server.grpc_url)
    with pytest.raises(InferenceServerException) as info:
        grpc_infer(g, "flat", queries)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "input 'QUERY' row 1 holds nan" in (info.value.message() or "")
    with pytest.raises(InferenceServerException) as http_info:
        http_infer(httpclient.InferenceServerClient(server.http_url), "flat", queries, True)
    assert http_info.value.status() == "400"
    assert "input 'QUERY' row 1" in (http_info.value.message() or "")
    good = random_vectors(4, rows=3)
    _, ids, _ = grpc_infer(g, "flat", good)
    np.testing.assert_array_equal(ids, Reference(repo, "flat").search(good)[1])


def test_a_nan_query_fails_alone_not_its_batch(server: RunningServer, repo: Path) -> None:
    """Sent among 15 good concurrent queries, a NaN query fails by itself: it is refused
    before it is queued, so it never shares a batch with the others."""
    reference = Reference(repo, "flat")

    async def burst() -> list[object]:
        client = grpcclient_aio.InferenceServerClient(server.grpc_url)

        async def one(i: int) -> object:
            queries = random_vectors(100 + i, rows=1)
            if i == 7:
                queries[0, 3] = np.inf
            tensor = grpcclient_aio.InferInput("QUERY", list(queries.shape), "FP32")
            tensor.set_data_from_numpy(queries)
            try:
                result = await client.infer("flat", [tensor])
            except InferenceServerException as exc:
                return exc
            np.testing.assert_array_equal(result.as_numpy("IDS"), reference.search(queries)[1])
            return result

        try:
            return list(await asyncio.gather(*(one(i) for i in range(16))))
        finally:
            await client.close()

    outcomes = asyncio.run(burst())
    failed = [i for i, o in enumerate(outcomes) if isinstance(o, InferenceServerException)]
    assert failed == [7]


def test_per_request_k_and_nprobe(server: RunningServer, repo: Path) -> None:
    """Request parameters override k (up to max_k) and nprobe; both transports."""
    queries = random_vectors(7, rows=4)
    g = grpcclient.InferenceServerClient(server.grpc_url)
    tensor = grpcclient.InferInput("QUERY", list(queries.shape), "FP32")
    tensor.set_data_from_numpy(queries)
    result = g.infer("flat", [tensor], parameters={"k": 3})
    reference = Reference(repo, "flat")
    _, expected_ids = reference.index.search(queries, 3)
    assert result.as_numpy("IDS").shape == (4, 3)
    np.testing.assert_array_equal(result.as_numpy("IDS"), expected_ids)
    ivf = Reference(repo, "ivf")
    apply_search_parameters(ivf.index, {"nprobe": 16})  # every list: exact search
    _, exhaustive = ivf.index.search(queries, K)
    served = g.infer("ivf", [tensor], parameters={"nprobe": 16}).as_numpy("IDS")
    np.testing.assert_array_equal(served, exhaustive)
    default = g.infer("ivf", [tensor]).as_numpy("IDS")  # the model's own nprobe again
    np.testing.assert_array_equal(default, Reference(repo, "ivf").search(queries)[1])
    h = httpclient.InferenceServerClient(server.http_url)
    h_tensor = httpclient.InferInput("QUERY", list(queries.shape), "FP32")
    h_tensor.set_data_from_numpy(queries)
    h_result = h.infer("flat", [h_tensor], parameters={"k": 3})
    np.testing.assert_array_equal(h_result.as_numpy("IDS"), expected_ids)


@pytest.mark.parametrize(
    ("model", "params", "needle"),
    [("flat", {"k": 11}, "parameter 'k' is 11, expected 1..10 (parameters.max_k)"),
     ("flat", {"k": 0}, "parameter 'k' is 0, expected a positive integer"),
     ("flat", {"nprobe": 4}, "parameter 'nprobe' does not apply to this"),
     ("hnsw", {"nprobe": 4}, "parameter 'nprobe' does not apply to this"),
     ("ivf", {"efSearch": 4}, "parameter 'efSearch' does not apply to this")],
)
def test_bad_search_parameters_are_invalid_argument(
    server: RunningServer, model: str, params: dict[str, int], needle: str
) -> None:
    queries = random_vectors(8, rows=1)
    g = grpcclient.InferenceServerClient(server.grpc_url)
    tensor = grpcclient.InferInput("QUERY", [1, DIM], "FP32")
    tensor.set_data_from_numpy(queries)
    with pytest.raises(InferenceServerException) as info:
        g.infer(model, [tensor], parameters=params)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert needle in (info.value.message() or "")
    h = httpclient.InferenceServerClient(server.http_url)
    h_tensor = httpclient.InferInput("QUERY", [1, DIM], "FP32")
    h_tensor.set_data_from_numpy(queries)
    with pytest.raises(InferenceServerException) as http_info:
        h.infer(model, [h_tensor], parameters=params)
    assert http_info.value.status() == "400"
    assert needle in (http_info.value.message() or "")


# -- repository ----------------------------------------------------------------------------


def test_a_file_that_is_not_faiss_leaves_only_its_model_unavailable(
    server: RunningServer,
) -> None:
    entry = repository_index(server)[("broken", "1")]
    assert entry["state"] == "UNAVAILABLE"
    assert "cannot read" in entry["reason"] and "as a FAISS index" in entry["reason"]
    g = grpcclient.InferenceServerClient(server.grpc_url)
    assert not g.is_model_ready("broken")
    assert all(g.is_model_ready(model) for model in MODELS)


def test_a_version_built_while_polling_replaces_the_old_one(
    server: RunningServer, repo: Path
) -> None:
    g = grpcclient.InferenceServerClient(server.grpc_url)
    queries = random_vectors(9, rows=4)
    assert grpc_infer(g, "growing", queries)[2] == "1"
    build(repo, "growing", "Flat", seed=1)  # other vectors, other ids
    wait_for(lambda: repository_index(server).get(("growing", "2"), {}).get("state") == "READY",
             "version 2 to be READY")
    distances, ids, version = grpc_infer(g, "growing", queries)
    assert version == "2"
    expected = Reference(repo, "growing", 2).search(queries)
    np.testing.assert_array_equal(distances, expected[0])
    np.testing.assert_array_equal(ids, expected[1])
    assert np.all(ids >= 100_000)  # version 2's ids
    wait_for(lambda: repository_index(server)[("growing", "1")]["state"] == "UNAVAILABLE",
             "version 1 to be unloaded")
