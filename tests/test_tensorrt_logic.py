"""The TensorRT backend's config and batching logic over engine descriptions (no engine is
run here: `describe` reads these descriptions from a real engine in tests/test_gpu.py), the
plan builder's input checks and float16 graph, how a host without TensorRT or a GPU fails a
plan's load (a real server, other models still served) and a build. FAISS's GPU placement and
limits, as pure functions."""

from __future__ import annotations

import shutil
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.backends import _cudart
from server.backends.faiss import GPU_MAX_K, GPU_MAX_NPROBE, gpu_devices, gpu_limit_reason
from server.backends.tensorrt_api import ERROR, INFO, KEPT, WARNING, Recorder, use_device
from server.backends.tensorrt_build import (
    BatchRange,
    BuildError,
    config_text,
    float16_graph,
    next_version,
    onnx_inputs,
    profile_shapes,
)
from server.backends.tensorrt_engine import (
    IoTensor,
    batch_ranges,
    check_against_engine,
    choose_profile,
    complete_from_engine,
    datatype_of,
)
from server.model_config import ConfigError, ModelSpec, parse_config, to_spec
from server.types import DataType

from .conftest import BUNDLED, ROOT, ServerFactory, repository_index


def tensorrt_imports() -> bool:
    """Whether `import tensorrt` works (the bindings without libnvinfer raise ImportError)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


def cuda_starts() -> bool:
    try:
        _cudart.set_device(0)
    except _cudart.CudaError:
        return False
    return True


def mlp_engine(*profiles: tuple[int, int, int]) -> list[IoTensor]:
    """What `describe` gives for the MLP built with these batch profiles."""
    shapes = tuple(((low, 784), (opt, 784), (high, 784)) for low, opt, high in profiles)
    return [
        IoTensor("INPUT0", True, DataType.FP32, (-1, 784), shapes),
        IoTensor("OUTPUT0", False, DataType.FP32, (-1, 10)),
    ]


def completed(tensors: list[IoTensor], text: str = "") -> Any:
    config = parse_config(f'platform: "tensorrt_plan" {text}', "plan")
    complete_from_engine(config, tensors)
    return config


# -- auto-complete -------------------------------------------------------------------------


def test_config_is_completed_from_the_engine() -> None:
    config = completed(mlp_engine((1, 64, 512)))
    spec = to_spec(config, "tensorrt")
    assert spec.max_batch_size == 512
    assert [(t.name, t.datatype, t.dims) for t in spec.inputs] == [
        ("INPUT0", DataType.FP32, (784,))]
    assert [(t.name, t.datatype, t.dims) for t in spec.outputs] == [
        ("OUTPUT0", DataType.FP32, (10,))]
    assert spec.dynamic_batching is not None  # batching completed on, as for ONNX models


def test_a_given_max_batch_size_and_listed_tensors_are_kept() -> None:
    config = completed(mlp_engine((1, 8, 32)), "max_batch_size: 16 input [{ name: 'INPUT0' "
                       "data_type: TYPE_FP32 dims: [784] }]")
    spec = to_spec(config, "tensorrt")
    assert spec.max_batch_size == 16
    assert [t.name for t in spec.inputs] == ["INPUT0"] and [t.name for t in spec.outputs] == [
        "OUTPUT0"]


def test_an_engine_without_a_dynamic_batch_dimension_does_not_batch() -> None:
    tensors = [IoTensor("X", True, DataType.FP16, (4, 3), (((4, 3), (4, 3), (4, 3)),)),
               IoTensor("Y", False, DataType.FP16, (4, 2))]
    spec = to_spec(completed(tensors), "tensorrt")
    assert spec.max_batch_size == 0
    assert spec.inputs[0].dims == (4, 3) and spec.outputs[0].dims == (4, 2)


def test_engine_types_without_a_numpy_type_are_refused() -> None:
    assert datatype_of("m", "X", "HALF") is DataType.FP16
    with pytest.raises(ConfigError, match="model 'm': engine tensor 'X' has type BF16, which "
                                          "Tachyon cannot serve, expected one of FLOAT"):
        datatype_of("m", "X", "BF16")


# -- profiles ------------------------------------------------------------------------------


def test_batch_ranges_are_what_every_input_accepts() -> None:
    two = [
        IoTensor("A", True, DataType.FP32, (-1, 2), (((1, 2), (4, 2), (8, 2)),
                                                     ((9, 2), (32, 2), (64, 2)))),
        IoTensor("B", True, DataType.FP32, (-1, 2), (((2, 2), (4, 2), (16, 2)),
                                                     ((70, 2), (80, 2), (90, 2)))),
    ]
    assert batch_ranges(two) == [(2, 8), (0, -1)]


def test_the_tightest_profile_holding_the_batch_is_chosen() -> None:
    ranges = [(1, 512), (1, 8), (9, 64)]
    assert choose_profile(ranges, 1) == 1
    assert choose_profile(ranges, 8) == 1
    assert choose_profile(ranges, 9) == 2
    assert choose_profile(ranges, 200) == 0
    assert choose_profile(ranges, 513) is None


def test_load_refuses_a_max_batch_size_the_profiles_do_not_cover() -> None:
    spec = to_spec(completed(mlp_engine((1, 8, 32)), "max_batch_size: 64"), "tensorrt")
    with pytest.raises(ConfigError, match=r"model 'plan': max_batch_size 64 needs a batch of 33, "
                                          r"but the engine's optimization profiles accept batch "
                                          r"sizes 1\.\.32, expected profiles covering 1\.\.64"):
        check_against_engine(spec, mlp_engine((1, 8, 32)))
    check_against_engine(spec, mlp_engine((1, 8, 32), (33, 48, 64)))  # two profiles cover it


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("input [{ name: 'IN' data_type: TYPE_FP32 dims: [784] }]",
         r"input 'IN' is not an engine input, expected one of \['INPUT0'\]"),
        ("input [{ name: 'INPUT0' data_type: TYPE_FP16 dims: [784] }]",
         "input 'INPUT0': data_type TYPE_FP16 does not match the engine's TYPE_FP32"),
        ("input [{ name: 'INPUT0' data_type: TYPE_FP32 dims: [28, 28] }]",
         r"input 'INPUT0': dims \[28, 28\] with max_batch_size 8 give rank 3, but the "
         r"engine's shape is \[-1, 784\]"),
        ("input [{ name: 'OUTPUT0' data_type: TYPE_FP32 dims: [10] }]",
         r"input 'OUTPUT0' is not an engine input"),
        ("input [{ name: 'INPUT0' data_type: TYPE_FP32 dims: [783] }]",
         r"input 'INPUT0': dims \[783\] do not match the engine's shape \[-1, 784\] after its "
         "batch dimension"),
    ],
)
def test_configs_that_disagree_with_the_engine_are_refused(config: str, message: str) -> None:
    text = (f"max_batch_size: 8 {config} output [{{ name: 'OUTPUT0' data_type: TYPE_FP32 "
            "dims: [10] }]")
    spec = to_spec(parse_config(text, "plan"), "tensorrt")
    with pytest.raises(ConfigError, match=f"model 'plan': {message}"):
        check_against_engine(spec, mlp_engine((1, 8, 8)))


# -- tachyon trt build: what is checked before TensorRT runs -------------------------------


def test_profiles_come_from_the_onnx_inputs_and_the_batch_range() -> None:
    inputs = onnx_inputs(BUNDLED / "add_sub" / "1" / "model.onnx")
    assert inputs == [("INPUT0", (-1, 16)), ("INPUT1", (-1, 16))]
    shapes = profile_shapes(inputs, BatchRange(1, 64, 512))
    assert shapes["INPUT1"] == ((1, 16), (64, 16), (512, 16))


@pytest.mark.parametrize(
    ("inputs", "batch", "message"),
    [
        ([("X", (8, 16))], BatchRange(1, 1, 8),
         r"input 'X' has shape \[8, 16\], expected a dynamic first \(batch\) dimension"),
        ([("X", (-1, -1))], BatchRange(1, 1, 8),
         r"input 'X' has shape \[-1, -1\], expected fixed sizes after the batch dimension"),
        ([("X", (-1, 4))], BatchRange(1, 16, 8),
         r"--min-batch 1 --opt-batch 16 --max-batch 8 are invalid, expected 1 <= min <= opt"),
    ],
)
def test_bad_build_inputs_are_refused(
    inputs: list[tuple[str, tuple[int, ...]]], batch: BatchRange, message: str
) -> None:
    with pytest.raises(BuildError, match=message):
        profile_shapes(inputs, batch)


def test_a_build_goes_to_the_next_version_with_a_config_the_server_completes(
    tmp_path: Path,
) -> None:
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "3").mkdir()
    (tmp_path / "m" / "notes").mkdir()
    assert next_version(tmp_path / "m") == 4
    assert next_version(tmp_path / "absent") == 1
    config = parse_config(config_text("m", 512), "m")
    assert (config.platform, config.max_batch_size) == ("tensorrt_plan", 512)
    assert config.HasField("dynamic_batching")


# -- FAISS on GPU: placement and limits ----------------------------------------------------


def faiss_spec(group: str) -> ModelSpec:
    text = ("max_batch_size: 8 input [{ name: 'QUERY' data_type: TYPE_FP32 dims: [8] }] "
            "output [{ name: 'IDS' data_type: TYPE_INT64 dims: [4] }] " + group)
    return to_spec(parse_config(text, "idx"), "faiss")


def test_faiss_instances_replicate_over_listed_gpus_or_shard_with_kind_model() -> None:
    replicated = faiss_spec("instance_group [{ kind: KIND_GPU gpus: [0, 1] }]")
    assert [gpu_devices(replicated, i, 2) for i in range(2)] == [(0,), (1,)]
    sharded = faiss_spec("instance_group [{ kind: KIND_MODEL gpus: [0, 1] }]")
    assert sharded.instance_count == 1
    assert gpu_devices(sharded, 0, 2) == (0, 1)
    unlisted = faiss_spec("instance_group [{ kind: KIND_GPU count: 3 }]")
    assert [gpu_devices(unlisted, i, 2) for i in range(3)] == [(0,), (1,), (0,)]
    with pytest.raises(ConfigError, match=r"model 'idx': instance_group gpus \[0, 1\] lists GPU "
                                          r"1, but FAISS sees 1 GPU\(s\), expected 0\.\.0"):
        gpu_devices(sharded, 0, 1)


def test_faiss_gpu_limits_are_named() -> None:
    assert gpu_limit_reason(GPU_MAX_K, {"nprobe": GPU_MAX_NPROBE}) == ""
    assert gpu_limit_reason(GPU_MAX_K + 1, {}) == (
        f"parameters.max_k {GPU_MAX_K + 1} is more than the GPU's limit {GPU_MAX_K}")
    assert gpu_limit_reason(10, {"nprobe": 4096}) == (
        f"parameters.nprobe 4096 is more than the GPU's limit {GPU_MAX_NPROBE}")


@pytest.mark.skipif(tensorrt_imports(), reason="checks the message without TensorRT")
def test_trt_build_without_tensorrt_says_which_extra(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from server.cli import main

    onnx_file = str(BUNDLED / "add_sub" / "1" / "model.onnx")
    argv = ["trt", "build", "--onnx", onnx_file, "--repository", str(tmp_path), "--model", "m"]
    assert main([*argv, "--max-batch", "8", "--opt-batch", "16"]) == 2
    assert "--opt-batch 16 --max-batch 8 are invalid" in capsys.readouterr().err
    assert main([*argv, "--max-batch", "8"]) == 2
    error = capsys.readouterr().err
    assert "needs the tensorrt extra: pip install tachyon-serve[tensorrt]" in error
    assert not (tmp_path / "m").exists()  # nothing written


@pytest.mark.parametrize(
    ("kind", "found"), [("KIND_CPU", "KIND_CPU"), ("KIND_GPU", "no visible GPU")]
)
def test_a_plan_needs_a_gpu_instance_on_a_gpu_host(tmp_path: Path, kind: str, found: str) -> None:
    from server import gpus
    from server.backends.tensorrt import TensorRtBackend

    if kind == "KIND_GPU" and gpus.visible_gpus() > 0:
        pytest.skip("checks a host without a GPU")
    text = ("max_batch_size: 8 input [{ name: 'INPUT0' data_type: TYPE_FP32 dims: [784] }] "
            "output [{ name: 'OUTPUT0' data_type: TYPE_FP32 dims: [10] }] "
            f"instance_group [{{ kind: {kind} }}]")
    backend = TensorRtBackend(to_spec(parse_config(text, "plan"), "tensorrt"), tmp_path, 0)
    with pytest.raises(ConfigError, match=f"model 'plan': platform tensorrt_plan runs on a GPU, "
                                          f"but the model has {found}, expected a GPU instance"):
        backend.load()


# -- TensorRT and CUDA that do not start -----------------------------------------------------


def test_tensorrts_errors_are_kept_per_thread_for_the_failed_calls_message() -> None:
    recorder = Recorder()
    recorder.record(INFO, "Loaded engine size: 3 MiB")  # neither kept nor logged
    recorder.record(ERROR, "IRuntime::deserializeCudaEngine: Error Code 1: Serialization\n")
    other: list[str] = []

    def elsewhere() -> None:
        recorder.record(WARNING, "elsewhere")
        other.extend(recorder.take())

    thread = threading.Thread(target=elsewhere)
    thread.start()
    thread.join()
    assert other == ["elsewhere"]  # another loader thread's failure is not this one's
    assert recorder.reason("no reason") == (
        "IRuntime::deserializeCudaEngine: Error Code 1: Serialization")
    assert recorder.reason("no reason") == "no reason"  # taken
    for i in range(KEPT + 3):
        recorder.record(WARNING, f"w{i}")
    assert recorder.take() == [f"w{i}" for i in range(3, KEPT + 3)]


@pytest.mark.skipif(not _cudart.available(), reason="needs the CUDA runtime library (libcudart)")
@pytest.mark.skipif(cuda_starts(), reason="checks a host where CUDA does not start")
def test_a_host_where_cuda_does_not_start_fails_with_cudas_reason() -> None:
    with pytest.raises(ConfigError, match=r"^model 'plan': TensorRT needs a CUDA GPU, but "
                                          r"cudaSetDevice failed: .+ \(cudaError \d+\)$"):
        use_device("model 'plan'", 0)


def test_the_float16_graph_keeps_float32_inputs_and_outputs(tmp_path: Path) -> None:
    """What TensorRT 11 (strongly typed, no FP16 builder flag) builds FP16 kernels from."""
    import onnx
    import onnxruntime as ort

    sys.path.insert(0, str(ROOT / "tools"))
    from make_models import make_mlp

    source = make_mlp(tmp_path / "mlp.onnx")
    graph = float16_graph(source)
    model = onnx.load_from_string(graph)
    weights = {t.name: t.data_type for t in model.graph.initializer}
    assert weights["W0"] == onnx.TensorProto.FLOAT16
    fp32 = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    fp16 = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    assert [(i.name, i.type) for i in fp16.get_inputs()] == [("INPUT0", "tensor(float)")]
    assert [(o.name, o.type) for o in fp16.get_outputs()] == [("OUTPUT0", "tensor(float)")]
    x = np.random.default_rng(5).standard_normal((16, 784), np.float32)
    expected = fp32.run(None, {"INPUT0": x})[0]
    got = fp16.run(None, {"INPUT0": x})[0]
    assert np.abs(got - expected).max() < 2e-2 * np.abs(expected).max()
    assert not np.array_equal(got, expected)  # float16 arithmetic did happen


def test_trt_build_refuses_a_file_that_is_not_onnx(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from server.cli import main

    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x0fnot a protobuf at all")
    argv = ["trt", "build", "--onnx", str(bad), "--repository", str(tmp_path), "--model", "m"]
    assert main(argv) == 2
    assert f"tachyon: {bad} is not an ONNX model (" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


PLAN_IO = ("input [{ name: 'INPUT0' data_type: TYPE_FP32 dims: [16] }] "
           "output [{ name: 'OUTPUT0' data_type: TYPE_FP32 dims: [16] }]")


@pytest.mark.skipif(tensorrt_imports() and cuda_starts(), reason="checks a host without a GPU")
def test_plans_that_cannot_load_here_are_unavailable_with_the_reason_and_others_serve(
    tmp_path: Path, start_server: ServerFactory
) -> None:
    import tritonclient.grpc as grpcclient

    repo = tmp_path / "repo"
    shutil.copytree(BUNDLED / "add_sub", repo / "add_sub")
    for name, config in (("listed", f"max_batch_size: 8 {PLAN_IO}"), ("completed", "")):
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "1" / "model.plan").write_bytes(b"not an engine")
        (repo / name / "config.pbtxt").write_text(
            f'name: "{name}" platform: "tensorrt_plan" {config}')
    server = start_server(repo, "--exit-on-error", "false")
    index = repository_index(server)
    listed, completed = index[("listed", "1")], index[("completed", "1")]
    assert (listed["state"], completed["state"]) == ("UNAVAILABLE", "UNAVAILABLE")
    # config complete: the load stops at the GPU check
    assert listed["reason"].startswith("model 'listed': platform tensorrt_plan runs on a GPU, "
                                       "but the model has no visible GPU")
    # config to complete from the engine: TensorRT's import or CUDA says why
    assert completed["reason"].startswith((
        "model 'completed' (platform tensorrt_plan) needs the tensorrt extra: pip install "
        "tachyon-serve[tensorrt] (", "model 'completed': TensorRT needs a CUDA GPU, but "))
    client = grpcclient.InferenceServerClient(server.grpc_url)
    x = np.arange(16, dtype=np.float32).reshape(1, 16)
    inputs = [grpcclient.InferInput(n, [1, 16], "FP32") for n in ("INPUT0", "INPUT1")]
    for tensor in inputs:
        tensor.set_data_from_numpy(x)
    result = client.infer("add_sub", inputs)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x + x)
    client.close()
