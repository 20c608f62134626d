"""`tachyon index tune`: real FAISS indexes on clustered (Gaussian mixture) data, tuned against
exact search. The issue's target (a 200k x 128 IVF index tuned to recall 0.95 meets it on
held-out queries, and on fresh queries it never saw), the new version served by a running
server with the chosen nprobe, HNSW's efSearch, several factories compared, and bad input
refused with a message and nothing written."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

import tritonclient.grpc as grpcclient  # noqa: E402

from server import index_build, index_tune, model_config  # noqa: E402
from server.cli import main  # noqa: E402
from server.index_sweep import TuneError, grid, read_fvecs, recall_per_query  # noqa: E402
from server.index_tune import TuneOptions  # noqa: E402
from tests.conftest import BUNDLED, ROOT, ServerFactory, repository_index, wait_for  # noqa: E402

sys.path.insert(0, str(ROOT / "tools"))
from make_vectors import mixture  # noqa: E402

FAST = 0.02  # seconds of searching behind each queries/s figure: enough to check the plumbing


def build(tmp: Path, model: str, factory: str, rows: int, dim: int, clusters: int,
          **kwargs: object) -> tuple[Path, Path]:
    """(repository, vectors file) with `model` built as version 1."""
    repo = tmp / "repo"
    vectors = tmp / f"{model}-vectors.npy"
    np.save(vectors, mixture(0, rows, dim, clusters))
    index_build.build(vectors, factory, repo, model, **kwargs)  # type: ignore[arg-type]
    return repo, vectors


def save_queries(tmp: Path, rows: int, dim: int, clusters: int, seed: int = 7) -> Path:
    path = tmp / f"queries-{seed}.npy"
    np.save(path, mixture(seed, rows, dim, clusters))
    return path


def served_parameters(repo: Path, model: str) -> dict[str, str]:
    config = model_config.read_config(repo / model)
    assert config is not None
    return {k: v.string_value for k, v in config.parameters.items()}


def fresh_recall(index: Any, vectors: np.ndarray, queries: np.ndarray, k: int) -> float:
    exact = faiss.IndexFlatL2(vectors.shape[1])
    exact.add(vectors)
    _, want = exact.search(queries, k)
    _, got = index.search(queries, k)
    return float(recall_per_query(got, want).mean())


# -- the target ------------------------------------------------------------------------------


def test_ivf_tuned_to_095_meets_it_on_held_out_and_fresh_queries(tmp_path: Path) -> None:
    """The issue's target at a quarter of its size (50k x 128; the 200k x 128 case is
    benchmarks/index_tune_bench.py, whose results are in benchmarks/results/index-tune-*.md)."""
    rows, dim, clusters = 50_000, 128, 1000
    repo, vectors_path = build(tmp_path, "ivf", "IVF128,Flat", rows, dim, clusters,
                               train_size=128 * 40)
    queries = save_queries(tmp_path, 1000, dim, clusters)
    result = index_tune.tune(repo, "ivf", queries, TuneOptions(recall=0.95, measure_s=FAST))
    assert not result.failure, result.failure
    chosen = result.chosen
    assert chosen is not None and chosen.chosen is not None and chosen.parameter == "nprobe"
    assert chosen.chosen.recall_low >= 0.95
    assert chosen.holdout_recall is not None and chosen.holdout_recall >= 0.95
    # the smallest: the grid point before the chosen one misses the target
    value = chosen.chosen.value
    assert value is not None
    before = [p for p in chosen.points if p.value is not None and p.value < value]
    assert before and before[-1].recall_low < 0.95
    # the new version carries the choice in its config and its index, and meets the recall on
    # queries the tune never saw
    assert result.published is not None and result.published.version == 2
    nprobe = int(served_parameters(repo, "ivf")["nprobe"])
    assert nprobe == chosen.chosen.value
    written = faiss.read_index(str(repo / "ivf" / "2" / "index.faiss"))
    assert faiss.extract_index_ivf(written).nprobe == nprobe
    fresh = mixture(99, 500, dim, clusters)
    assert fresh_recall(written, np.load(vectors_path), fresh, 10) >= 0.95
    report = (repo / "ivf" / "2" / "report.md").read_text()
    assert "**chosen**" in report and "held-out" in report
    assert (repo / "ivf" / "2" / "recall_qps.png").read_bytes()[:4] == b"\x89PNG"
    assert (repo / "ivf" / "1" / "index.faiss").exists()  # the old version is untouched


# -- served by a running server ---------------------------------------------------------------


def test_a_polling_server_serves_the_new_version_with_the_chosen_nprobe(
    tmp_path: Path, start_server: ServerFactory
) -> None:
    dim, clusters = 32, 200
    repo, _ = build(tmp_path, "ivf", "IVF64,Flat", 20_000, dim, clusters, nprobe=1)
    server = start_server(repo, "--model-control-mode", "poll", "--repository-poll-secs", "0.2")
    queries = save_queries(tmp_path, 600, dim, clusters)
    code = main(["index", "tune", "--repository", str(repo), "--model", "ivf", "--queries",
                 str(queries), "--recall", "0.97", "--measure-s", str(FAST)])
    assert code == 0
    nprobe = int(served_parameters(repo, "ivf")["nprobe"])
    assert nprobe > 1  # nprobe 1 (what version 1 was built with) misses 0.97 on this data
    wait_for(lambda: repository_index(server).get(("ivf", "2"), {}).get("state") == "READY",
             "version 2 to load")
    probe = mixture(5, 64, dim, clusters)
    client = grpcclient.InferenceServerClient(server.grpc_url)
    tensor = grpcclient.InferInput("QUERY", list(probe.shape), "FP32")
    tensor.set_data_from_numpy(probe)
    answer = client.infer("ivf", [tensor], model_version="2")
    local = faiss.read_index(str(repo / "ivf" / "2" / "index.faiss"))
    faiss.extract_index_ivf(local).nprobe = nprobe
    want_distances, want_ids = local.search(probe, 10)
    np.testing.assert_allclose(answer.as_numpy("DISTANCES"), want_distances, rtol=1e-5,
                               atol=1e-5)
    assert (answer.as_numpy("IDS") == want_ids).mean() > 0.99  # ties may swap
    faiss.extract_index_ivf(local).nprobe = 1
    _, ids_at_one = local.search(probe, 10)
    assert not np.array_equal(answer.as_numpy("IDS"), ids_at_one)


# -- other indexes ---------------------------------------------------------------------------


def test_hnsw_gets_an_ef_search_with_fvecs_queries_and_a_separate_holdout(tmp_path: Path) -> None:
    dim, clusters = 24, 100
    repo, _ = build(tmp_path, "hnsw", "HNSW8", 8000, dim, clusters, ef_search=10)
    data = mixture(3, 400, dim, clusters)
    path = tmp_path / "queries.fvecs"
    rows = np.hstack([np.full((len(data), 1), dim, np.int32), data.view(np.int32)])
    rows.astype(np.int32).tofile(path)
    np.testing.assert_array_equal(read_fvecs(path), data)
    holdout = save_queries(tmp_path, 150, dim, clusters, seed=8)
    result = index_tune.tune(repo, "hnsw", path, TuneOptions(recall=0.98, k=10, measure_s=FAST),
                             holdout_path=holdout)
    assert result.info["tuning_queries"] == 400 and result.info["holdout_queries"] == 150
    assert not result.failure, result.failure
    chosen = result.chosen
    assert chosen is not None and chosen.parameter == "efSearch" and chosen.chosen is not None
    assert served_parameters(repo, "hnsw")["efSearch"] == str(chosen.chosen.value)
    assert chosen.holdout_recall is not None and chosen.holdout_recall >= 0.98


def test_factories_are_compared_and_memory_picks_the_smallest_that_meets(tmp_path: Path) -> None:
    dim, clusters = 32, 100
    repo, vectors = build(tmp_path, "ivf", "IVF32,Flat", 10_000, dim, clusters)
    queries = save_queries(tmp_path, 600, dim, clusters)
    factories = "IVF32,SQ8;IVF32,PQ4x4;IVF32,SQfp16"
    result = index_tune.tune(repo, "ivf", queries,
                             TuneOptions(recall=0.9, factories=tuple(factories.split(";")),
                                         optimize="memory", measure_s=FAST),
                             vectors_path=vectors)
    assert not result.failure, result.failure
    names = [c.name for c in result.candidates]
    assert names == ["served v1", "IVF32,SQ8", "IVF32,PQ4x4", "IVF32,SQfp16"]
    met = [c for c in result.candidates if c.met]
    served = result.candidates[0]
    assert served.met and served.holdout_recall is not None and served.holdout_recall >= 0.9
    assert result.chosen is min(met, key=lambda c: c.memory_bytes)
    assert result.chosen is not None and result.chosen.name == "IVF32,SQ8"
    pq = result.candidates[2]
    assert not pq.met  # 4 bytes a vector cannot reach 0.9
    assert pq.memory_bytes < result.chosen.memory_bytes
    raw = json.loads((repo / "ivf" / "2" / "tune.json").read_text())
    assert raw["chosen"] == "IVF32,SQ8" and len(raw["candidates"]) == 4
    written = faiss.read_index(str(repo / "ivf" / "2" / "index.faiss"))
    assert "ScalarQuantizer" in type(faiss.downcast_index(written)).__name__
    faiss.extract_index_ivf(written).nprobe = int(served_parameters(repo, "ivf")["nprobe"])
    fresh = mixture(99, 300, dim, clusters)
    assert fresh_recall(written, np.load(vectors), fresh, 10) >= 0.85  # ids are the rows


# -- refused -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(repository with ivf (IVF-Flat), pq (IVF-PQ) and identity_fp32 (ONNX), queries,
    vectors)."""
    tmp = tmp_path_factory.mktemp("tune")
    dim, clusters = 16, 50
    repo, vectors = build(tmp, "ivf", "IVF16,Flat", 4000, dim, clusters)
    index_build.build(vectors, "IVF16,PQ2x4", repo, "pq")
    shutil.copytree(BUNDLED / "identity_fp32", repo / "identity_fp32")
    return repo, save_queries(tmp, 200, dim, clusters), vectors


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["index", "tune", "--measure-s", str(FAST), *args])
    captured = capsys.readouterr()
    return code, captured.err


@pytest.mark.parametrize(
    ("model", "recall", "message"),
    [
        ("missing", "0.9", "--model 'missing' is not in repository"),
        ("identity_fp32", "0.9", "served by the 'onnxruntime' backend, expected a FAISS model"),
        ("ivf", "0", "--recall 0.0 is out of range, expected 0 < recall <= 1"),
        ("ivf", "1.5", "--recall 1.5 is out of range"),
        ("pq", "0.9", "does not keep its vectors exactly (PQ / SQ / fp16 codes), expected "
                      "--vectors"),
    ],
)
def test_bad_input_is_refused_with_exit_2(
    small: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str], model: str,
    recall: str, message: str,
) -> None:
    repo, queries, _ = small
    code, err = run_cli(capsys, "--repository", str(repo), "--model", model, "--queries",
                        str(queries), "--recall", recall)
    assert code == 2 and message in err, err
    assert not (repo / model / "2").exists()


def test_queries_of_another_dimension_are_refused(
    small: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    repo, _, _ = small
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((10, 17), np.float32))
    code, err = run_cli(capsys, "--repository", str(repo), "--model", "ivf", "--queries",
                        str(wrong), "--recall", "0.9")
    assert code == 2
    assert "have dimension 17, expected 16 (the index's)" in err, err


def test_an_unreachable_recall_writes_nothing_and_exits_1(
    small: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    repo, queries, vectors = small
    before = sorted(p.name for p in (repo / "pq").iterdir())
    config = (repo / "pq" / "config.pbtxt").read_text()
    code, err = run_cli(capsys, "--repository", str(repo), "--model", "pq", "--queries",
                        str(queries), "--vectors", str(vectors), "--recall", "0.99")
    assert code == 1
    assert "no index meets recall@10 >= 0.99" in err and "nothing written" in err, err
    assert sorted(p.name for p in (repo / "pq").iterdir()) == before
    assert (repo / "pq" / "config.pbtxt").read_text() == config


def test_grid_and_recall_units() -> None:
    assert grid("nprobe", 64, 10) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]
    assert grid("efSearch", 40, 10) == [10, 12, 16, 24, 32, 40]
    found = np.array([[1, 2, 3], [4, 5, 6]])
    exact = np.array([[3, 2, 9], [7, 8, -1]])
    np.testing.assert_allclose(recall_per_query(found, exact), [2 / 3, 0.0])
    with pytest.raises(TuneError, match="out of range"):
        index_tune.check_options(TuneOptions(recall=-1))
