"""The GPU paths on a GPU (marked `gpu`; each skips with its reason elsewhere): the CUDA EP
with I/O binding, in-process and served; GPU memory back to its baseline after an unload;
the TensorRT EP; TensorRT plans built and served; FAISS on the GPU. scripts/device-check runs
these on the GPU machine."""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from server import gpus
from server.backends.buffers import pinned_memory_works
from server.backends.onnxruntime import OnnxRuntimeBackend
from server.batching import DynamicBatcher
from server.model_config import ConfigError, parse_config, to_spec
from server.statistics import ModelStats

from .conftest import ROOT, RunningServer, ServerFactory, wait_for

sys.path.insert(0, str(ROOT / "tools"))
from make_models import make_mlp

# onnxruntime-gpu offers the CUDA EP on a host without a GPU too: both are needed
HAS_CUDA_EP = "CUDAExecutionProvider" in ort.get_available_providers() and gpus.visible_gpus() > 0
HAS_FAISS = importlib.util.find_spec("faiss") is not None


def _tensorrt_imports() -> bool:
    """`import tensorrt` works (its bindings without libnvinfer raise ImportError)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


HAS_TENSORRT = _tensorrt_imports()

pytestmark = pytest.mark.gpu
needs_cuda_ep = pytest.mark.skipif(
    not HAS_CUDA_EP, reason="needs onnxruntime-gpu (the CUDA EP) and a GPU"
)
MiB = 1 << 20


def mlp_config(name: str, extra: str = "") -> str:
    return f"""
name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: 512
input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ 784 ] }} ]
output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 10 ] }} ]
dynamic_batching {{ max_queue_delay_microseconds: 500 }}
instance_group [ {{ kind: KIND_GPU gpus: [ 0 ] }} ]
{extra}
"""


@pytest.fixture(scope="module")
def mlp_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_mlp(tmp_path_factory.mktemp("mlp") / "model.onnx")


def repository(root: Path, mlp_file: Path, models: dict[str, str]) -> Path:
    for name, config in models.items():
        (root / name / "1").mkdir(parents=True)
        shutil.copy(mlp_file, root / name / "1" / "model.onnx")
        (root / name / "config.pbtxt").write_text(config)
    return root


def cpu_reference(mlp_file: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(mlp_file), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["OUTPUT0"], {"INPUT0": x})[0])


def infer(server: RunningServer, model: str, x: np.ndarray) -> np.ndarray:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc_url)
    data = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
    data.set_data_from_numpy(x)
    out = client.infer(model, [data]).as_numpy("OUTPUT0")
    client.close()
    return np.asarray(out)


# -- ONNX Runtime, CUDA EP -----------------------------------------------------------------


@needs_cuda_ep
def test_bound_cuda_batches_match_the_cpu_under_concurrent_load(mlp_file: Path) -> None:
    assert pinned_memory_works(0)
    spec = to_spec(parse_config(mlp_config("mlp_gpu"), "mlp_gpu"), "onnxruntime")
    backend = OnnxRuntimeBackend(spec, mlp_file.parent, 0)
    backend.load()
    assert backend.session.get_providers()[0] == "CUDAExecutionProvider"
    rng = np.random.default_rng(0)
    requests = [rng.standard_normal((int(rng.integers(1, 5)), 784), np.float32)
                for _ in range(400)]
    stats = ModelStats()

    async def main() -> list[dict[str, np.ndarray]]:
        batcher = DynamicBatcher(spec, [backend], stats)
        batcher.start()
        answers = await asyncio.gather(*(
            batcher.submit({"INPUT0": x}, ["OUTPUT0"], len(x)) for x in requests))
        await batcher.drain()
        return answers

    answers = asyncio.run(main())
    expected = cpu_reference(mlp_file, np.concatenate(requests))
    got = np.concatenate([a["OUTPUT0"] for a in answers])
    np.testing.assert_allclose(got, expected, rtol=2e-3, atol=2e-3)  # TF32 / kernel order
    assert max(stats.batches) > 8
    backend.unload()


@needs_cuda_ep
def test_served_on_cuda_with_io_binding(
    tmp_path: Path, mlp_file: Path, start_server: ServerFactory
) -> None:
    repo = repository(tmp_path / "repo", mlp_file, {"mlp_gpu": mlp_config("mlp_gpu")})
    server = start_server(repo)
    x = np.random.default_rng(1).standard_normal((8, 784), np.float32)
    np.testing.assert_allclose(infer(server, "mlp_gpu", x), cpu_reference(mlp_file, x),
                               rtol=2e-3, atol=2e-3)
    assert "instance 0 on CUDAExecutionProvider, CPUExecutionProvider with I/O binding" \
        in server.log()


@needs_cuda_ep
@pytest.mark.skipif(gpus.nvml() is None, reason="needs nvidia-ml-py and a driver")
def test_gpu_memory_returns_to_its_baseline_after_unload(
    tmp_path: Path, mlp_file: Path, start_server: ServerFactory
) -> None:
    import tritonclient.grpc as grpcclient

    repo = repository(tmp_path / "repo", mlp_file, {"mlp_gpu": mlp_config(
        "mlp_gpu", 'parameters { key: "io_binding" value: { string_value: "true" } }')})
    server = start_server(repo, "--model-control-mode", "explicit")
    client = grpcclient.InferenceServerClient(server.grpc_url)
    pid = server.process.pid
    x = np.random.default_rng(2).standard_normal((512, 784), np.float32)

    def cycle() -> int:
        client.load_model("mlp_gpu")
        infer(server, "mlp_gpu", x)
        loaded = gpus.process_gpu_memory(pid) or gpus.device_memory_used()
        client.unload_model("mlp_gpu")
        wait_for(lambda: not client.is_model_ready("mlp_gpu"), "the unload")
        return loaded

    cycle()  # the first load creates the CUDA context, which stays for the process
    time.sleep(1)
    # NVML's per-process figure; in a container whose PIDs NVML cannot see, the device's
    # total (the machine runs nothing else)
    per_process = gpus.process_gpu_memory(pid) > 0
    measure = (lambda: gpus.process_gpu_memory(pid)) if per_process else gpus.device_memory_used
    baseline = measure()
    peaks = [cycle() for _ in range(3)]
    time.sleep(1)
    after = measure()
    client.close()
    assert min(peaks) > baseline, (baseline, peaks)  # the model did take GPU memory
    assert after <= baseline + 16 * MiB, (baseline, peaks, after)


@needs_cuda_ep
@pytest.mark.skipif(not gpus.tensorrt_libraries(), reason="needs TensorRT's libnvinfer")
def test_tensorrt_ep_runs_in_front_of_cuda(
    tmp_path: Path, mlp_file: Path, start_server: ServerFactory
) -> None:
    trt = ('optimization { execution_accelerators { gpu_execution_accelerator [ { name: '
           '"tensorrt" parameters { key: "precision_mode" value: "FP16" } parameters { key: '
           '"trt_engine_cache_enable" value: "1" } } ] } }')
    repo = repository(tmp_path / "repo", mlp_file, {"mlp_trt": mlp_config("mlp_trt", trt)})
    server = start_server(repo)
    x = np.random.default_rng(3).standard_normal((4, 784), np.float32)
    np.testing.assert_allclose(infer(server, "mlp_trt", x), cpu_reference(mlp_file, x),
                               rtol=3e-2, atol=3e-2)  # FP16
    assert "on TensorrtExecutionProvider, CUDAExecutionProvider" in server.log()
    assert any((repo / "mlp_trt" / "1" / "trt_engine_cache").iterdir())


# -- TensorRT plans ------------------------------------------------------------------------


@pytest.mark.skipif(not HAS_TENSORRT, reason="needs TensorRT with its libraries ([tensorrt])")
def test_a_built_plan_is_completed_from_its_engine_and_served(
    tmp_path: Path, mlp_file: Path, start_server: ServerFactory
) -> None:
    from server.backends.tensorrt_build import BatchRange, build_plan, config_text

    model = tmp_path / "repo" / "mlp_plan"
    (model / "1").mkdir(parents=True)
    (model / "1" / "model.plan").write_bytes(build_plan(mlp_file, BatchRange(1, 64, 256)))
    (model / "config.pbtxt").write_text(config_text("mlp_plan", 256))
    server = start_server(tmp_path / "repo")
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc_url)
    config = client.get_model_config("mlp_plan", as_json=True)["config"]
    assert config["platform"] == "tensorrt_plan" and int(config["max_batch_size"]) == 256
    assert [i["name"] for i in config["input"]] == ["INPUT0"]
    for rows in (1, 64, 256):
        x = np.random.default_rng(rows).standard_normal((rows, 784), np.float32)
        np.testing.assert_allclose(infer(server, "mlp_plan", x), cpu_reference(mlp_file, x),
                                   rtol=3e-2, atol=3e-2)
    client.close()


# -- FAISS ---------------------------------------------------------------------------------


def _faiss_gpus() -> int:
    if not HAS_FAISS:
        return 0
    import faiss

    return int(faiss.get_num_gpus())


@pytest.mark.skipif(_faiss_gpus() == 0, reason="needs a GPU build of FAISS and a GPU")
def test_faiss_on_gpu_matches_the_cpu_and_checks_its_limits(tmp_path: Path) -> None:
    import faiss

    from server.backends.faiss import FaissBackend

    rng = np.random.default_rng(4)
    vectors = rng.standard_normal((20_000, 64), np.float32)
    index = faiss.IndexFlatL2(64)
    index.add(vectors)
    (tmp_path / "1").mkdir()
    faiss.write_index(index, str(tmp_path / "1" / "index.faiss"))
    gpus_listed = list(range(min(_faiss_gpus(), 2)))
    text = ("max_batch_size: 64 input [{ name: 'QUERY' data_type: TYPE_FP32 dims: [64] }] "
            "output [{ name: 'DISTANCES' data_type: TYPE_FP32 dims: [10] }, { name: 'IDS' "
            f"data_type: TYPE_INT64 dims: [10] }}] instance_group [{{ kind: KIND_MODEL gpus: "
            f"{gpus_listed} }}]")
    backend = FaissBackend(to_spec(parse_config(text, "idx"), "faiss"), tmp_path / "1", 0)
    backend.load()
    queries = rng.standard_normal((64, 64), np.float32)
    got = backend.execute({"QUERY": queries}, ["IDS"])["IDS"]
    _, expected = index.search(queries, 10)
    assert (got == expected).mean() > 0.99
    backend.unload()
    too_big = text + " parameters { key: 'max_k' value: { string_value: '4096' } }"
    with pytest.raises(ConfigError, match="max_k 4096 is more than the GPU's limit 2048"):
        FaissBackend(to_spec(parse_config(too_big, "idx"), "faiss"), tmp_path / "1", 0).load()
