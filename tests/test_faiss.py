"""The FAISS backend and `tachyon index build`, in-process: results equal FAISS's own search,
configs complete from the index and are checked against it, bad queries and bad build inputs
get messages that say what to fix, and the GPU choice is a pure function."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from server import extras, index_build, model_config  # noqa: E402
from server.backends import factory  # noqa: E402
from server.backends.faiss import (  # noqa: E402
    FAISS_GPU_WHEELS,
    GPU_MAX_NPROBE,
    FaissBackend,
    apply_search_parameters,
    clone_to_gpus,
    cpu_parts,
    faiss_reason,
    gpu_limit_reason,
    is_gpu_build,
    no_gpu_reason,
    use_gpu,
)
from server.index_build import BuildError  # noqa: E402
from server.model_config import ConfigError, ModelSpec  # noqa: E402

COUNT, DIM = 2000, 32


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((COUNT, DIM)).astype(np.float32)


@pytest.fixture(scope="module")
def queries() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((37, DIM)).astype(np.float32)


@pytest.fixture
def vectors_file(tmp_path: Path, vectors: np.ndarray) -> Path:
    path = tmp_path / "vectors.npy"
    np.save(path, vectors)
    return path


def load_spec(model_dir: Path, version: int = 1, default_max_batch_size: int = 8) -> ModelSpec:
    """What the manager does: read, complete when incomplete, validate."""
    config = model_config.read_config(model_dir) or model_config.parse_config("", model_dir.name)
    version_dir = model_dir / str(version)
    backend = model_config.backend_of(config, version_dir)
    assert backend == "faiss"
    if not model_config.is_complete(config):
        factory(backend).complete_config(config, version_dir, default_max_batch_size)
    return model_config.to_spec(config, backend)


def loaded(model_dir: Path, version: int = 1) -> FaissBackend:
    backend = FaissBackend(load_spec(model_dir, version), model_dir / str(version))
    backend.load()
    return backend


def reference(model_dir: Path, version: int = 1) -> tuple[object, int]:
    """The written index, searched in-process with the config's parameters."""
    params = load_spec(model_dir, version).parameters
    index = faiss.read_index(str(model_dir / str(version) / "index.faiss"))
    apply_search_parameters(
        index, {k: int(params[k]) for k in ("nprobe", "efSearch") if k in params}
    )
    return index, int(params["k"])


def write_index(model_dir: Path, index: object, config: str | None = None) -> Path:
    (model_dir / "1").mkdir(parents=True)
    faiss.write_index(index, str(model_dir / "1" / "index.faiss"))
    if config is not None:
        (model_dir / "config.pbtxt").write_text(config)
    return model_dir


def flat(vectors: np.ndarray) -> object:
    index = faiss.IndexFlatL2(DIM)
    index.add(vectors)
    return index


CONFIG = """
backend: "faiss"
max_batch_size: 16
input [ {{ name: "QUERY" data_type: TYPE_FP32 dims: [ {d} ] }} ]
output [ {{ name: "DISTANCES" data_type: TYPE_FP32 dims: [ {k} ] }},
         {{ name: "IDS" data_type: {ids_type} dims: [ {k} ] }} ]
{extra}
"""


def config(d: int = DIM, k: int = 10, ids_type: str = "TYPE_INT64", extra: str = "") -> str:
    return CONFIG.format(d=d, k=k, ids_type=ids_type, extra=extra)


def param(key: str, value: str) -> str:
    return f'parameters {{ key: "{key}" value {{ string_value: "{value}" }} }}\n'


# -- the backend against FAISS's own search ---------------------------------------------


@pytest.mark.parametrize(
    ("factory_string", "metric", "with_ids"),
    [
        ("Flat", "L2", False),
        ("Flat", "IP", True),
        ("IVF16,Flat", "L2", False),
        ("IVF16,PQ8x4", "L2", True),
        ("HNSW16", "L2", True),
        ("HNSW16", "IP", False),
    ],
)
def test_results_equal_in_process_search(
    tmp_path: Path,
    vectors_file: Path,
    queries: np.ndarray,
    factory_string: str,
    metric: str,
    with_ids: bool,
) -> None:
    ids_path = None
    if with_ids:
        ids_path = tmp_path / "ids.npy"
        np.save(ids_path, np.arange(COUNT, dtype=np.int64) * 7 + 1000)
    index_build.build(
        vectors_file, factory_string, tmp_path / "repo", "vectors", ids_path=ids_path,
        metric=metric, k=5,
    )
    model_dir = tmp_path / "repo" / "vectors"
    backend = loaded(model_dir)
    expected_index, k = reference(model_dir)
    assert k == 5
    out = backend.execute({"QUERY": queries}, ["DISTANCES", "IDS"])
    distances, ids = expected_index.search(queries, k)  # type: ignore[attr-defined]
    assert out["DISTANCES"].dtype == np.float32 and out["IDS"].dtype == np.int64
    assert out["DISTANCES"].shape == (len(queries), 5)
    np.testing.assert_array_equal(out["DISTANCES"], distances)
    np.testing.assert_array_equal(out["IDS"], ids)
    found = out["IDS"][out["IDS"] >= 0]
    if with_ids:
        assert np.all((found - 1000) % 7 == 0)
    else:
        assert found.max() < COUNT
    assert backend.metadata() == {"platform": "faiss"}
    backend.unload()


def test_execute_answers_the_requested_outputs_from_read_only_input(
    tmp_path: Path, vectors: np.ndarray
) -> None:
    model_dir = write_index(tmp_path / "m", flat(vectors), config())
    backend = loaded(model_dir)
    query = np.frombuffer(vectors[:3].tobytes(), dtype=np.float32).reshape(3, DIM)
    out = backend.execute({"QUERY": query}, ["IDS"])
    assert list(out) == ["IDS"]
    assert out["IDS"][:, 0].tolist() == [0, 1, 2]  # each vector is its own nearest neighbour


def test_fewer_vectors_than_k_pads_with_minus_one(tmp_path: Path, vectors: np.ndarray) -> None:
    model_dir = write_index(tmp_path / "m", flat(vectors[:3]), config(k=5))
    out = loaded(model_dir).execute({"QUERY": vectors[:2]}, ["DISTANCES", "IDS"])
    assert out["IDS"][:, 3:].tolist() == [[-1, -1], [-1, -1]]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_query_is_a_value_error_naming_input_and_row(
    tmp_path: Path, vectors: np.ndarray, bad: float
) -> None:
    backend = loaded(write_index(tmp_path / "m", flat(vectors), config()))
    query = vectors[:5].copy()
    query[3, 7] = bad
    with pytest.raises(ValueError, match=r"model 'm': input 'QUERY' row 3 holds -?(nan|inf) at"):
        backend.execute({"QUERY": query}, ["IDS"])


def test_omp_threads_applies_on_the_thread_that_searches(
    tmp_path: Path, vectors: np.ndarray, queries: np.ndarray
) -> None:
    """OpenMP's thread count is per calling thread: `omp_threads` must hold on the instance
    thread that runs `search`, not only on the loader thread that ran `load`."""
    import threading

    wanted = faiss.omp_get_max_threads() + 3  # differs from what a fresh thread starts with
    text = config(extra=param("omp_threads", str(wanted)))
    backend = loaded(write_index(tmp_path / "m", flat(vectors), text))
    seen: list[int] = []

    def instance_thread() -> None:
        before = faiss.omp_get_max_threads()
        backend.execute({"QUERY": queries[:2]}, ["IDS"])
        seen.extend((before, faiss.omp_get_max_threads()))

    for _ in range(2):  # a second thread too: each instance thread sets its own
        thread = threading.Thread(target=instance_thread)
        thread.start()
        thread.join()
    assert seen[0] != wanted and seen[1] == wanted
    assert seen[3] == wanted


# -- config completion and checks --------------------------------------------------------


def test_a_missing_config_is_completed_from_the_index(tmp_path: Path, vectors: np.ndarray) -> None:
    model_dir = write_index(tmp_path / "m", flat(vectors))
    spec = load_spec(model_dir, default_max_batch_size=8)
    assert spec.max_batch_size == 8 and spec.dynamic_batching is not None
    assert [(t.name, t.datatype.value, t.dims) for t in spec.inputs] == [("QUERY", "FP32", (32,))]
    assert [(t.name, t.datatype.value, t.dims) for t in spec.outputs] == [
        ("DISTANCES", "FP32", (10,)),
        ("IDS", "INT64", (10,)),
    ]
    assert spec.platform == "faiss"


def test_completion_takes_k_from_parameters_and_keeps_listed_tensors(
    tmp_path: Path, vectors: np.ndarray
) -> None:
    text = 'backend: "faiss"\n' + param("k", "4")
    model_dir = write_index(tmp_path / "m", flat(vectors), text)
    spec = load_spec(model_dir)
    assert [t.dims for t in spec.outputs] == [(4,), (4,)]
    backend = FaissBackend(spec, model_dir / "1")
    backend.load()
    assert backend.execute({"QUERY": vectors[:2]}, ["IDS"])["IDS"].shape == (2, 4)


def test_a_non_batching_completion_serves_whole_query_matrices(
    tmp_path: Path, vectors: np.ndarray
) -> None:
    model_dir = write_index(tmp_path / "m", flat(vectors))
    spec = load_spec(model_dir, default_max_batch_size=0)
    assert spec.max_batch_size == 0
    assert spec.inputs[0].dims == (-1, 32) and spec.outputs[1].dims == (-1, 10)
    backend = FaissBackend(spec, model_dir / "1")
    backend.load()
    assert backend.execute({"QUERY": vectors[:3]}, ["IDS"])["IDS"][:, 0].tolist() == [0, 1, 2]


def test_completion_of_a_file_that_is_not_faiss_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "1" / "index.faiss").write_bytes(b"this is not an index")
    with pytest.raises(ConfigError, match=r"model 'm': cannot read .*index.faiss as a FAISS"):
        load_spec(tmp_path / "m")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (config(d=16), r"model 'm': input 'QUERY': dims \[16\] do not match the index "
                       r"dimension 32, expected \[32\]"),
        (config(extra=param("metric", "INNER_PRODUCT")),
         r"model 'm': parameters.metric 'INNER_PRODUCT' does not match the index's metric, "
         r"expected 'L2'"),
        (config(extra=param("metric", "COSINE")), r"parameters.metric 'COSINE' is not supported"),
        (config(extra=param("k", "5")), r"parameters.k 5 does not match the outputs' dims \[10\]"),
        (config(extra=param("max_k", "5")), r"parameters.k 10 is more than parameters.max_k 5"),
        (config(extra=param("nprobe", "8")),
         r"parameters.nprobe 8 does not apply to this IndexFlatL2 index"),
        (config(extra=param("efSearch", "many")),
         r"parameters.efSearch 'many' is invalid, expected a positive integer"),
        (config(ids_type="TYPE_INT32"), r"output 'IDS': data_type TYPE_INT32, expected TYPE_INT64"),
        (config().replace('"IDS"', '"LABELS"'), r"output 'LABELS' is not produced by a FAISS"),
        (config().replace('"QUERY"', '"INPUT0"'), r"inputs \['INPUT0'\] .* expected one input"),
    ],
)
def test_a_config_that_does_not_match_the_index_is_refused(
    tmp_path: Path, vectors: np.ndarray, text: str, message: str
) -> None:
    model_dir = write_index(tmp_path / "m", flat(vectors), text)
    with pytest.raises(ConfigError, match=message):
        loaded(model_dir)


def test_k_up_to_max_k_and_a_matching_metric_load(tmp_path: Path, vectors: np.ndarray) -> None:
    text = config(k=5, extra=param("max_k", "100") + param("metric", "L2") + param("k", "5"))
    backend = loaded(write_index(tmp_path / "m", flat(vectors), text))
    assert backend.execute({"QUERY": vectors[:1]}, ["IDS"])["IDS"].shape == (1, 5)


# -- GPU choice -------------------------------------------------------------------------


def test_use_gpu() -> None:
    assert use_gpu(1, "KIND_GPU") and use_gpu(2, "KIND_AUTO") and use_gpu(1, "KIND_MODEL")
    assert not use_gpu(0, "KIND_AUTO") and not use_gpu(1, "KIND_CPU")
    assert not use_gpu(0, "KIND_CPU") and not use_gpu(0, "KIND_MODEL")
    assert use_gpu(2, "KIND_MODEL", (0, 1))
    with pytest.raises(ConfigError, match="KIND_GPU needs a GPU, but FAISS sees none"):
        use_gpu(0, "KIND_GPU")
    # a KIND_MODEL group that lists gpus asks for them (its index is sharded over them)
    with pytest.raises(ConfigError, match=r"^instance_group kind KIND_MODEL gpus \[0, 1\] needs "
                                          r"a GPU, but FAISS sees none: why$"):
        use_gpu(0, "KIND_MODEL", (0, 1), "why")


def test_no_gpu_reason_tells_a_cpu_build_from_a_gpu_build_without_a_device() -> None:
    cpu = no_gpu_reason(False, "1.15.1", None)
    assert cpu.startswith("this faiss 1.15.1 is a CPU-only build (faiss-cpu); ")
    # a venv holding faiss-cpu and a GPU wheel (one `faiss` module) gets the step that fixes it
    clash = extras.gpu_build_clash("faiss-cpu", FAISS_GPU_WHEELS)
    assert cpu.endswith(clash or "install a GPU build in its place (the [gpu] extra: "
                                 "faiss-gpu), or use KIND_CPU")
    gpu = no_gpu_reason(True, "1.14.1", "")
    assert gpu.startswith("this faiss 1.14.1 is a GPU build, but CUDA reports no device "
                          "(CUDA_VISIBLE_DEVICES=''; no NVIDIA driver")
    assert "CUDA_VISIBLE_DEVICES" not in no_gpu_reason(True, "1.14.1", None)
    # the build as FAISS reports it matches the GPU classes the module has
    assert is_gpu_build(faiss) == hasattr(faiss, "StandardGpuResources")


@pytest.mark.skipif(faiss.get_num_gpus() > 0, reason="checks the error without a GPU")
@pytest.mark.parametrize("group", ["{ kind: KIND_GPU }", "{ kind: KIND_GPU gpus: [ 0 ] }",
                                   "{ kind: KIND_MODEL gpus: [ 0, 1 ] }"])
def test_a_gpu_group_without_a_gpu_fails_the_load_saying_why(
    tmp_path: Path, vectors: np.ndarray, group: str
) -> None:
    text = config(extra=f"instance_group [ {group} ]")
    kind = group.split()[2]
    listed = " gpus [0, 1]" if "0, 1" in group else " gpus [0]" if "[ 0 ]" in group else ""
    why = ("is a GPU build, but CUDA reports no device" if is_gpu_build(faiss)
           else "is a CPU-only build (faiss-cpu)")
    with pytest.raises(ConfigError) as error:
        loaded(write_index(tmp_path / "m", flat(vectors), text))
    assert str(error.value).startswith(
        f"model 'm': instance_group kind {kind}{listed} needs a GPU, but FAISS sees none: "
        f"this faiss {faiss.__version__} {why}"
    )


def test_a_model_group_without_gpus_runs_on_the_cpu_without_a_gpu(
    tmp_path: Path, vectors: np.ndarray, queries: np.ndarray
) -> None:
    if faiss.get_num_gpus() > 0:
        pytest.skip("checks the CPU fallback without a GPU")
    model_dir = write_index(tmp_path / "m", flat(vectors),
                            config(extra="instance_group [ { kind: KIND_MODEL } ]"))
    backend = loaded(model_dir)
    _, want = flat(vectors).search(queries, 10)  # type: ignore[attr-defined]
    assert np.array_equal(backend.execute({"QUERY": queries}, ["IDS"])["IDS"], want)


def test_gpu_limits_count_the_nprobe_the_index_file_holds() -> None:
    assert gpu_limit_reason(10, {}, GPU_MAX_NPROBE) == ""
    assert gpu_limit_reason(10, {}, 4096) == (
        f"the index's own nprobe 4096 is more than the GPU's limit {GPU_MAX_NPROBE}, expected "
        f"parameters.nprobe <= {GPU_MAX_NPROBE}")
    # the config's nprobe replaces the index's own
    assert gpu_limit_reason(10, {"nprobe": 64}, 4096) == ""


def test_faiss_reason_keeps_what_the_gpu_build_says() -> None:
    """Errors as FAISS's GPU build (faiss-gpu-cu12 1.14.1, faiss-gpu 1.15.1) raises them from
    index_cpu_to_gpu on a host without a GPU, and for an index type it has no GPU version of."""
    no_device = (
        "Error in faiss::gpu::GpuIndex::GpuIndex(std::shared_ptr<faiss::gpu::GpuResources>, int, "
        "faiss::MetricType, float, faiss::gpu::GpuIndexConfig) at /project/faiss/faiss/gpu/"
        "GpuIndex.cu:65: Error: 'config_.device < getNumDevices()' failed: Invalid GPU device 0"
    )
    assert faiss_reason(RuntimeError(no_device)) == "Invalid GPU device 0"
    hnsw = (
        "Error in virtual faiss::Index* faiss::gpu::ToGpuCloner::clone_Index(const faiss::Index*) "
        "at /project/faiss/faiss/gpu/GpuCloner.cpp:253: This index type is not implemented on GPU."
    )
    assert faiss_reason(RuntimeError(hnsw)) == "This index type is not implemented on GPU."


def test_cpu_parts_look_through_shards_and_wrappers(vectors: np.ndarray) -> None:
    shards = faiss.IndexShards(DIM, True, True)
    for part in (flat(vectors[:1000]), flat(vectors[1000:])):
        shards.add_shard(part)
    assert cpu_parts(faiss, shards) == ["IndexFlatL2", "IndexFlatL2"]
    assert cpu_parts(faiss, faiss.IndexIDMap(faiss.IndexHNSWFlat(DIM, 16))) == ["IndexHNSWFlat"]


@pytest.mark.skipif(not is_gpu_build(faiss), reason="needs a GPU build of FAISS (no GPU)")
@pytest.mark.parametrize("factory_string", ["HNSW16", "IDMap,HNSW16", "SQ8"])
def test_sharding_an_index_faiss_has_no_gpu_version_of_is_refused(
    vectors: np.ndarray, factory_string: str
) -> None:
    """FAISS's multi-GPU cloner hands such an index back as a CPU copy, with no error and no
    GPU call (so this runs without a GPU): the backend must not call it a GPU index."""
    index = faiss.index_factory(DIM, factory_string)
    index.train(vectors)
    if factory_string.startswith("IDMap"):
        index.add_with_ids(vectors, np.arange(COUNT, dtype=np.int64))
    else:
        index.add(vectors)
    resources = [faiss.StandardGpuResources(), faiss.StandardGpuResources()]
    options = faiss.GpuMultipleClonerOptions()
    options.shard = True
    copied = faiss.index_cpu_to_gpu_multiple_py(resources, index, options, [0, 1])
    assert copied.ntotal == COUNT and cpu_parts(faiss, copied)  # FAISS's own behaviour
    leaf = "IndexScalarQuantizer" if factory_string == "SQ8" else "IndexHNSWFlat"
    with pytest.raises(ValueError, match=f"^FAISS has no GPU version of {leaf} "):
        clone_to_gpus(faiss, resources, (0, 1), index)


def test_importing_faiss_logs_no_loader_lines() -> None:
    """faiss-cpu logs which CPU build it loads as `faiss.loader`, faiss-gpu-cu12 as
    `faiss._loader`: a server at INFO shows neither."""
    code = ("import logging; logging.basicConfig(level=logging.INFO); "
            "from server.backends.faiss import import_faiss; import_faiss(); "
            "logging.getLogger('check').info('imported')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, timeout=60)
    assert "INFO:check:imported" in result.stderr
    assert "faiss" not in result.stderr.replace("import_faiss", ""), result.stderr


@pytest.mark.gpu
@pytest.mark.skipif(faiss.get_num_gpus() == 0, reason="needs faiss-gpu and a GPU")
@pytest.mark.parametrize("factory_string", ["Flat", "IVF16,Flat"])
def test_gpu_results_match_the_cpu(
    tmp_path: Path, vectors_file: Path, queries: np.ndarray, factory_string: str
) -> None:
    index_build.build(vectors_file, factory_string, tmp_path / "repo", "v", k=5)
    model_dir = tmp_path / "repo" / "v"
    (model_dir / "config.pbtxt").write_text(
        (model_dir / "config.pbtxt").read_text() + "instance_group [ { kind: KIND_GPU } ]\n"
    )
    backend = loaded(model_dir)
    assert backend._gpu_resources is not None  # the placement is the test
    expected_index, k = reference(model_dir)
    out = backend.execute({"QUERY": queries}, ["DISTANCES", "IDS"])
    distances, ids = expected_index.search(queries, k)  # type: ignore[attr-defined]
    np.testing.assert_allclose(out["DISTANCES"], distances, rtol=1e-4, atol=1e-4)
    assert (out["IDS"] == ids).mean() > 0.99
    backend.unload()


def test_faiss_reason_drops_the_cpp_location() -> None:
    try:
        faiss.index_factory(DIM, "Bogus")
    except RuntimeError as exc:
        assert faiss_reason(exc) == "could not parse index string Bogus"
    assert faiss_reason(RuntimeError("plain")) == "plain"


# -- index build ------------------------------------------------------------------------


def test_build_writes_a_complete_config_and_new_versions(
    tmp_path: Path, vectors_file: Path
) -> None:
    repo = tmp_path / "repo"
    first = index_build.build(vectors_file, "IVF16,Flat", repo, "vectors", metric="IP", k=7)
    assert first.version == 1 and first.count == COUNT and first.dimension == DIM
    assert first.parameters == {"k": "7", "metric": "INNER_PRODUCT", "nprobe": "4"}
    text = (repo / "vectors" / "config.pbtxt").read_text()
    config = model_config.parse_config(text, "vectors")
    assert config.backend == "faiss" and config.max_batch_size == 64
    assert config.HasField("dynamic_batching")
    assert [(t.name, list(t.dims)) for t in config.input] == [("QUERY", [32])]
    assert [(t.name, list(t.dims)) for t in config.output] == [("DISTANCES", [7]), ("IDS", [7])]
    assert {k: v.string_value for k, v in config.parameters.items()} == first.parameters
    assert not list(repo.glob(".staging*"))
    # a second build: the next version; an existing config keeps what the index does not decide
    (repo / "vectors" / "config.pbtxt").write_text(
        text + "instance_group [ { count: 2 kind: KIND_CPU } ]\n" + param("note", "kept")
    )
    second = index_build.build(vectors_file, "HNSW16", repo, "vectors", k=3)
    assert second.version == 2
    config = model_config.read_config(repo / "vectors")
    assert config is not None and config.instance_group[0].count == 2
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params == {"k": "3", "metric": "L2", "efSearch": "64", "note": "kept"}
    third = index_build.build(vectors_file, "Flat", repo, "vectors", version=7)
    assert third.version == 7 and index_build.next_version(repo / "vectors") == 8
    assert sorted(p.name for p in (repo / "vectors").iterdir()) == [
        "1", "2", "7", "config.pbtxt"
    ]


def test_next_version(tmp_path: Path) -> None:
    assert index_build.next_version(tmp_path / "absent") == 1
    for name in ("1", "3", "notes"):
        (tmp_path / name).mkdir()
    assert index_build.next_version(tmp_path) == 4
    assert index_build.next_version(tmp_path, 2) == 2
    with pytest.raises(BuildError, match=r"version 3 of model .* exists .*omit --version .* 4"):
        index_build.next_version(tmp_path, 3)
    with pytest.raises(BuildError, match=r"--version 0 is invalid"):
        index_build.next_version(tmp_path, 0)


def test_train_size_samples_and_ids_wrap_an_id_map(vectors: np.ndarray) -> None:
    index = index_build.make_index("HNSW8", DIM, "L2")
    ids = np.arange(COUNT, dtype=np.int64)[::-1].copy()
    built = index_build.train_and_add(index, vectors, ids)
    assert isinstance(built, faiss.IndexIDMap)
    assert built.search(vectors[:1], 1)[1][0, 0] == COUNT - 1
    ivf = index_build.make_index("IVF8,Flat", DIM, "L2")
    assert index_build.train_and_add(ivf, vectors, train_size=500).ntotal == COUNT
    with pytest.raises(BuildError, match=r"training the IndexIVFFlat index on 4 vectors failed: "
                                         r"Number of training points \(4\) should be at least"):
        index_build.train_and_add(index_build.make_index("IVF8,Flat", DIM, "L2"), vectors,
                                  train_size=4)


def bad_file(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.npy"
    rng = np.random.default_rng(0)
    arrays = {
        "rank3": rng.random((4, 4, 4), dtype=np.float32),
        "ints": np.ones((10, 4), dtype=np.int32),
        "nan": np.vstack([np.zeros((5, 4)), [[0, np.nan, 0, 0]]]).astype(np.float32),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }
    if kind == "text":
        path.write_text("not numpy")
    elif kind == "object":
        np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    else:
        np.save(path, arrays[kind])
    return path


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", r"vectors file .*missing.npy does not exist"),
        ("text", r"vectors file .*text.npy is not a .npy array"),
        ("object", r"vectors file .*object.npy is not a .npy array"),
        ("rank3", r"have shape \[4, 4, 4\], expected 2 dimensions \[n, d\]"),
        ("ints", r"have dtype int32, expected float32"),
        ("nan", r"row 5 holds NaN or infinity"),
        ("empty", r"have shape \[0, 4\], expected n, d >= 1"),
    ],
)
def test_bad_vectors_are_refused(tmp_path: Path, kind: str, message: str) -> None:
    path = tmp_path / "missing.npy" if kind == "missing" else bad_file(tmp_path, kind)
    with pytest.raises(BuildError, match=message):
        index_build.build(path, "Flat", tmp_path / "repo", "m")
    assert not (tmp_path / "repo" / "m").exists()


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        (np.arange(10, dtype=np.int64), r"hold 10 ids for 2000 vectors, expected 2000"),
        (np.arange(COUNT, dtype=np.float32), r"have dtype float32, expected an integer type"),
        (np.arange(COUNT).reshape(2, -1), r"have shape \[2, 1000\], expected 1 dimension"),
        (np.arange(COUNT) - 1, r"hold -1, expected ids >= 0"),
        (np.arange(COUNT) // 2, r"hold id 0 more than once, expected unique ids"),
    ],
)
def test_bad_ids_are_refused(
    tmp_path: Path, vectors_file: Path, ids: np.ndarray, message: str
) -> None:
    np.save(tmp_path / "ids.npy", ids)
    with pytest.raises(BuildError, match=message):
        index_build.build(
            vectors_file, "Flat", tmp_path / "repo", "m", ids_path=tmp_path / "ids.npy"
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"factory": "Bogus42"}, r"--factory 'Bogus42' cannot build an index of dimension 32: "
                                 r"could not parse index string Bogus42"),
        ({"factory": "IVF16,PQ7"}, r"multiple of the number of subquantizers"),
        ({"metric": "COSINE"}, r"--metric 'COSINE' is not supported"),
        ({"k": 0}, r"--k 0 is invalid"),
        ({"k": 5000}, r"--k 5000 is more than the 2000 vectors"),
        ({"nprobe": 4}, r"--nprobe applies to IVF indexes, not IndexFlat"),
        ({"factory": "IVF16,Flat", "ef_search": 4}, r"--ef-search applies to HNSW indexes"),
        ({"factory": "IVF16,Flat", "train_size": 5000}, r"--train-size 5000 is invalid"),
        ({"model": "../up"}, r"--model '../up' is not allowed"),
    ],
)
def test_bad_build_options_are_refused(
    tmp_path: Path, vectors_file: Path, kwargs: dict[str, object], message: str
) -> None:
    options: dict[str, object] = {"factory": "Flat", "model": "m", **kwargs}
    factory_string, model = str(options.pop("factory")), str(options.pop("model"))
    with pytest.raises(BuildError, match=message):
        index_build.build(vectors_file, factory_string, tmp_path / "repo", model, **options)  # type: ignore[arg-type]
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").iterdir())


def test_an_existing_model_of_another_backend_is_not_overwritten(
    tmp_path: Path, vectors_file: Path
) -> None:
    model_dir = tmp_path / "repo" / "m"
    model_dir.mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text('platform: "onnxruntime_onnx"\n')
    with pytest.raises(BuildError, match=r"model 'm' exists with backend 'onnxruntime'"):
        index_build.build(vectors_file, "Flat", tmp_path / "repo", "m")
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.pbtxt"]


def cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tachyon")
    index_build.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_the_command_line(
    tmp_path: Path, vectors_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "repo"
    common = ["index", "build", "--vectors", str(vectors_file), "--repository", str(repo),
              "--model", "v"]
    args = cli([*common, "--factory", "HNSW16", "--metric", "IP", "--k", "3"])
    assert args.command == "index"
    assert index_build.run(args) == 0
    assert "model 'v' version 1: 2,000 vectors of dimension 32" in capsys.readouterr().out
    assert index_build.run(cli([*common, "--factory", "Flat", "--nprobe", "3"])) == 2
    assert "error: --nprobe applies to IVF indexes" in capsys.readouterr().err
    assert index_build.run(cli([*common, "--factory", "Flat", "--version", "1"])) == 2
    assert "version 1 of model 'v' exists" in capsys.readouterr().err
    missing = cli([*common, "--factory", "Flat"])
    missing.vectors = tmp_path / "nope.npy"
    assert index_build.run(missing) == 2
    assert "nope.npy does not exist" in capsys.readouterr().err
