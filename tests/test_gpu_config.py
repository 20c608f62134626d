"""config.pbtxt -> GPU placement and ONNX Runtime execution providers with their options
(Triton's mapping), as pure functions: what runs on a GPU host is decided here and tested on
any host. Also: a KIND_GPU ONNX model on a host without the CUDA EP fails its load clearly."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import onnxruntime as ort
import pytest

from server import extras, gpus
from server.backends import _cudart
from server.backends.ort_providers import (
    CPU,
    CUDA,
    ENGINE_CACHE_DIR,
    TENSORRT,
    TIMING_CACHE_DIR,
    device_of,
    plan_providers,
)
from server.gpus import count_visible
from server.model_config import ConfigError, ModelSpec, parse_config, to_spec

from .conftest import BUNDLED, ServerFactory, repository_index, wait_for

EVERYTHING = [TENSORRT, CUDA, CPU]
BASE = ("max_batch_size: 8 input [{ name: 'INPUT0' data_type: TYPE_FP32 dims: [16] }] "
        "output [{ name: 'OUTPUT0' data_type: TYPE_FP32 dims: [16] }] ")
VERSION = Path("/repo/m/1")


def spec_of(extra: str, name: str = "m") -> ModelSpec:
    return to_spec(parse_config(BASE + extra, name), "onnxruntime")


def trt(*pairs: tuple[str, str], kind: str = "KIND_GPU") -> ModelSpec:
    parameters = " ".join(f"parameters {{ key: '{k}' value: '{v}' }}" for k, v in pairs)
    return spec_of(
        f"instance_group [{{ kind: {kind} }}] optimization {{ execution_accelerators {{ "
        f"gpu_execution_accelerator [{{ name: 'tensorrt' {parameters} }}] }} }}"
    )


def cuda(*pairs: tuple[str, str]) -> ModelSpec:
    parameters = " ".join(f"parameters {{ key: '{k}' value: '{v}' }}" for k, v in pairs)
    return spec_of(
        "instance_group [{ kind: KIND_GPU }] optimization { execution_accelerators { "
        f"gpu_execution_accelerator [{{ name: 'cuda' {parameters} }}] }} }}"
    )


def options(spec: ModelSpec, provider: str, instance: int = 0, visible: int = 1) -> dict[str, str]:
    plan = plan_providers(spec, EVERYTHING, instance, VERSION, visible)
    return dict(plan.providers)[provider]


# -- instance placement -------------------------------------------------------------------


def test_one_instance_per_listed_gpu_with_its_device_id() -> None:
    spec = spec_of("instance_group [{ kind: KIND_GPU gpus: [0, 2] }]")
    assert spec.instance_count == 2
    assert spec.instance_gpus == ((0,), (2,))
    assert [options(spec, CUDA, i, visible=4)["device_id"] for i in range(2)] == ["0", "2"]


def test_count_instances_on_each_listed_gpu_in_triton_order() -> None:
    spec = spec_of("instance_group [{ kind: KIND_GPU count: 2 gpus: [1, 3] }, "
                   "{ kind: KIND_GPU gpus: [0] }]")
    assert spec.instance_gpus == ((1,), (1,), (3,), (3,), (0,))
    assert spec.instance_count == 5


def test_unlisted_gpus_mean_count_instances_on_each_visible_gpu() -> None:
    config = parse_config(BASE + "instance_group [{ kind: KIND_GPU count: 2 }]", "m")
    spec = to_spec(config, "onnxruntime", visible_gpus=lambda: 3)
    assert spec.instance_gpus == ((0,), (0,), (1,), (1,), (2,), (2,))
    assert spec.instance_count == 6
    devices = [options(spec, CUDA, i, visible=3)["device_id"] for i in range(6)]
    assert devices == ["0", "0", "1", "1", "2", "2"]


def test_without_a_visible_gpu_unlisted_instances_keep_their_count() -> None:
    config = parse_config(BASE + "instance_group [{ kind: KIND_GPU count: 3 }]", "m")
    spec = to_spec(config, "onnxruntime", visible_gpus=lambda: 0)
    assert spec.instance_gpus == ((), (), ())


def test_unlisted_auto_instances_go_in_turn_over_the_visible_gpus() -> None:
    spec = spec_of("instance_group [{ kind: KIND_AUTO count: 3 }]")
    assert spec.instance_gpus == ((), (), ())
    assert [options(spec, CUDA, i, visible=2)["device_id"] for i in range(3)] == ["0", "1", "0"]


def test_kind_model_gives_every_instance_the_whole_list() -> None:
    spec = to_spec(parse_config(BASE + "instance_group [{ kind: KIND_MODEL count: 2 "
                                "gpus: [0, 1] }]", "m"), "faiss")
    assert spec.instance_gpus == ((0, 1), (0, 1))


@pytest.mark.parametrize(
    ("group", "message"),
    [
        ("{ kind: KIND_GPU gpus: [-1] }", r"gpus \[-1\] is invalid, expected distinct GPU"),
        ("{ kind: KIND_GPU gpus: [1, 1] }", r"gpus \[1, 1\] is invalid, expected distinct"),
        ("{ kind: KIND_CPU gpus: [0] }", r"gpus \[0\] is invalid for KIND_CPU, expected no gpus"),
    ],
)
def test_bad_gpu_lists_are_refused(group: str, message: str) -> None:
    with pytest.raises(ConfigError, match=rf"model 'm': instance_group\[0\]\.{message}"):
        spec_of(f"instance_group [{group}]")


def test_a_listed_gpu_that_is_not_visible_fails_the_load() -> None:
    spec = spec_of("instance_group [{ kind: KIND_GPU gpus: [0, 3] }]")
    assert device_of(spec, 0, 2) == 0
    with pytest.raises(ConfigError, match=r"lists GPU 3, but 2 GPU\(s\) are visible, "
                                          r"expected 0\.\.1"):
        device_of(spec, 1, 2)


@pytest.mark.skipif(gpus.nvml() is not None, reason="checks a host without NVML")
def test_without_nvml_there_is_no_gpu_and_no_gpu_memory() -> None:
    assert gpus.visible_gpus() == 0
    assert gpus.process_gpu_memory(os.getpid()) == 0 and gpus.device_memory_used() == 0
    # what NVML and then the CUDA runtime said: a KIND_GPU model's load error quotes it
    reason = gpus.no_gpu_reason()
    assert reason.startswith(("nvidia-ml-py is not installed; ", "NVML: ")), reason
    assert "cudaGetDeviceCount failed" in reason or "the CUDA runtime" in reason, reason


def test_the_cuda_runtime_is_found_in_nvidias_cuda_12_and_13_wheels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # nvidia-cuda-runtime (CUDA 13) and nvidia-cuda-runtime-cu12 lay their libraries out apart
    wanted = [tmp_path / "nvidia" / "cu13" / "lib" / "libcudart.so.13",
              tmp_path / "nvidia" / "cuda_runtime" / "lib" / "libcudart.so.12"]
    for library in wanted:
        library.parent.mkdir(parents=True)
        library.touch()
    monkeypatch.syspath_prepend(str(tmp_path))
    found = _cudart._pip_runtime()
    assert all(library in found for library in wanted), found


def test_cuda_visible_devices_limits_what_a_process_sees() -> None:
    assert count_visible(None, 4) == 4
    assert count_visible("0,2", 4) == 2
    assert count_visible("", 4) == 0
    assert count_visible("1,7,2", 4) == 1  # CUDA stops at the first invalid entry
    assert count_visible("-1", 4) == 0
    assert count_visible("GPU-5f3a", 1) == 1


# -- providers ----------------------------------------------------------------------------


def test_provider_order_cpu_cuda_tensorrt() -> None:
    assert plan_providers(trt(kind="KIND_CPU"), EVERYTHING, 0, VERSION).names == [CPU]
    assert plan_providers(spec_of(""), EVERYTHING, 0, VERSION).names == [CUDA, CPU]
    assert plan_providers(trt(), EVERYTHING, 0, VERSION).names == [TENSORRT, CUDA, CPU]
    auto_on_cpu = plan_providers(trt(kind="KIND_AUTO"), [CPU], 0, VERSION)
    assert auto_on_cpu.names == [CPU] and not auto_on_cpu.on_gpu


def test_cuda_always_backs_tensorrt_and_missing_libraries_give_one_note() -> None:
    plan = plan_providers(trt(), EVERYTHING, 0, VERSION, tensorrt_present=False)
    assert plan.names == [CUDA, CPU]
    assert len(plan.notes) == 1
    assert "TensorRT libraries (libnvinfer) are missing, running on the CUDA EP" in plan.notes[0]
    assert plan_providers(trt(), EVERYTHING, 0, VERSION).notes == []


def test_without_a_visible_gpu_auto_runs_on_the_cpu_and_kind_gpu_says_why() -> None:
    # onnxruntime-gpu offers the CUDA EP on a host without a GPU (or driver) too
    for spec in (spec_of("instance_group [{ kind: KIND_AUTO }]"), trt(kind="KIND_AUTO")):
        plan = plan_providers(spec, EVERYTHING, 0, VERSION, visible_gpus=0)
        assert plan.names == [CPU] and plan.notes == []
    with pytest.raises(ConfigError) as info:
        plan_providers(trt(), EVERYTHING, 0, VERSION, visible_gpus=0,
                       no_gpu_reason="NVML: Driver Not Loaded")
    assert str(info.value) == (
        "model 'm': instance_group kind KIND_GPU needs a GPU, but this process sees none "
        "(NVML: Driver Not Loaded); use KIND_AUTO to run on the CPU where there is no GPU")


def test_kind_gpu_without_the_cuda_ep_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="model 'm': instance_group kind KIND_GPU needs "
                                          "CUDAExecutionProvider, but ONNX Runtime offers only "
                                          "CPUExecutionProvider"):
        plan_providers(spec_of("instance_group [{ kind: KIND_GPU }]"), [CPU], 0, VERSION)


# -- TensorRT options ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "flags"),
    [
        ("FP32", {}),
        ("FP16", {"trt_fp16_enable": "True"}),
        ("fp16", {"trt_fp16_enable": "True"}),
        ("BF16", {"trt_bf16_enable": "True"}),
        ("INT8", {"trt_int8_enable": "True"}),
    ],
)
def test_precision_mode_maps_to_the_trt_flags(mode: str, flags: dict[str, str]) -> None:
    assert options(trt(("precision_mode", mode)), TENSORRT) == {"device_id": "0", **flags}


def test_triton_names_are_renamed_and_trt_keys_pass_through() -> None:
    got = options(trt(
        ("max_workspace_size_bytes", "1073741824"),
        ("int8_calibration_table_name", "calib.flatbuffers"),
        ("int8_use_native_calibration_table", "1"),
        ("trt_builder_optimization_level", "5"),
        ("trt_cuda_graph_enable", "true"),
        ("trt_tactic_sources", "-CUDNN,+CUBLAS"),
        ("trt_profile_min_shapes", "INPUT0:1x16"),
    ), TENSORRT)
    assert got == {
        "device_id": "0",
        "trt_max_workspace_size": "1073741824",
        "trt_int8_calibration_table_name": "calib.flatbuffers",
        "trt_int8_use_native_calibration_table": "True",
        "trt_builder_optimization_level": "5",
        "trt_cuda_graph_enable": "True",
        "trt_tactic_sources": "-CUDNN,+CUBLAS",
        "trt_profile_min_shapes": "INPUT0:1x16",
    }


def test_caches_default_under_the_version_folder() -> None:
    got = options(trt(("trt_engine_cache_enable", "1"), ("trt_timing_cache_enable", "true")),
                  TENSORRT)
    assert got["trt_engine_cache_enable"] == got["trt_timing_cache_enable"] == "True"
    assert got["trt_engine_cache_path"] == str(VERSION / ENGINE_CACHE_DIR)
    assert got["trt_timing_cache_path"] == str(VERSION / TIMING_CACHE_DIR)
    own = options(trt(("trt_engine_cache_enable", "1"), ("trt_engine_cache_path", "/cache")),
                  TENSORRT)
    assert own["trt_engine_cache_path"] == "/cache"
    off = options(trt(("trt_engine_cache_enable", "0")), TENSORRT)
    assert off == {"device_id": "0", "trt_engine_cache_enable": "False"}


@pytest.mark.parametrize(
    ("pair", "message"),
    [
        (("precision_mode", "FP8"),
         "parameters 'precision_mode' is 'FP8', expected one of FP32, FP16, BF16, INT8"),
        (("max_workspace_size_bytes", "lots"),
         "parameters 'max_workspace_size_bytes' is 'lots', expected an integer"),
        (("trt_fp16_enable", "yes"),
         "parameters 'trt_fp16_enable' is 'yes', expected \"1\", \"0\", \"true\" or \"false\""),
        (("trt_turbo", "1"),
         "parameters key 'trt_turbo' (value '1') is not a TensorRT option, expected "
         "precision_mode, max_workspace_size_bytes"),
        (("gpu_mem_limit", "1"), "parameters key 'gpu_mem_limit' (value '1') is not a "
                                 "TensorRT option"),
    ],
)
def test_bad_tensorrt_parameters_are_refused_naming_everything(
    pair: tuple[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        plan_providers(trt(pair), EVERYTHING, 0, VERSION)
    text = str(info.value)
    assert text.startswith("model 'm': gpu_execution_accelerator[0] 'tensorrt' ")
    assert message in text


@pytest.mark.parametrize(
    ("pair", "message"),
    [
        # each of these passed our checks before and was refused by onnxruntime-gpu 1.31.1's
        # TensorRT option parser (or read as another number) when the session was created
        (("max_workspace_size_bytes", "-1"),
         "parameters 'max_workspace_size_bytes' is '-1', expected an integer >= 0"),
        (("trt_max_workspace_size", "1_000"),
         "parameters 'trt_max_workspace_size' is '1_000', expected an integer >= 0"),
        (("trt_engine_cache_path", ""),
         "parameters 'trt_engine_cache_path' is '', expected a non-empty string"),
        (("trt_profile_min_shapes", ""),
         "parameters 'trt_profile_min_shapes' is '', expected a non-empty string"),
        (("trt_min_subgraph_size", " 5"),
         "parameters 'trt_min_subgraph_size' is ' 5', expected an integer >= 0"),
    ],
)
def test_values_onnx_runtime_would_refuse_are_refused_at_load(
    pair: tuple[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        plan_providers(trt(pair), EVERYTHING, 0, VERSION)
    assert message in str(info.value)


def test_onnx_runtimes_newer_trt_keys_pass_through() -> None:
    got = options(trt(("trt_preview_features", "ALIASED_PLUGIN_IO_10_03"),
                      ("trt_op_types_to_exclude", ""), ("trt_auxiliary_streams", "-1")),
                  TENSORRT)
    assert got == {"device_id": "0", "trt_preview_features": "ALIASED_PLUGIN_IO_10_03",
                   "trt_op_types_to_exclude": "", "trt_auxiliary_streams": "-1"}


def test_accelerator_parameters_are_checked_on_a_cpu_host_too() -> None:
    with pytest.raises(ConfigError, match="'trt_turbo'"):
        plan_providers(trt(("trt_turbo", "1"), kind="KIND_CPU"), [CPU], 0, VERSION)


# -- CUDA options --------------------------------------------------------------------------


def test_cuda_accelerator_keys_go_to_the_cuda_ep() -> None:
    got = options(cuda(
        ("gpu_mem_limit", "4294967296"), ("arena_extend_strategy", "1"),
        ("cudnn_conv_algo_search", "HEURISTIC"), ("enable_cuda_graph", "1"),
        ("do_copy_in_default_stream", "false"), ("use_tf32", "0"),
    ), CUDA)
    assert got == {
        "device_id": "0",
        "gpu_mem_limit": "4294967296",
        "arena_extend_strategy": "kSameAsRequested",
        "cudnn_conv_algo_search": "HEURISTIC",
        "enable_cuda_graph": "True",
        "do_copy_in_default_stream": "False",
        "use_tf32": "False",
    }


def test_tritons_model_level_cuda_parameters_still_apply() -> None:
    spec = spec_of("instance_group [{ kind: KIND_GPU }] "
                   "parameters { key: 'cudnn_conv_algo_search' value: { string_value: '1' } } "
                   "parameters { key: 'gpu_mem_limit' value: { string_value: '1000' } } "
                   "parameters { key: 'intra_op_thread_count' value: { string_value: '2' } }")
    assert options(spec, CUDA) == {
        "device_id": "0", "cudnn_conv_algo_search": "HEURISTIC", "gpu_mem_limit": "1000",
    }


@pytest.mark.parametrize(
    ("pair", "message"),
    [
        (("arena_extend_strategy", "huge"), "parameters 'arena_extend_strategy' is 'huge', "
         "expected \"kNextPowerOfTwo\" or \"kSameAsRequested\" or \"0\" or \"1\""),
        (("gpu_mem_limit", "-"), "parameters 'gpu_mem_limit' is '-', expected an integer"),
        # ONNX Runtime reads it as a size_t and refuses "-1" when the session is created
        (("gpu_mem_limit", "-1"),
         "parameters 'gpu_mem_limit' is '-1', expected an integer >= 0"),
        (("precision_mode", "FP16"), "parameters key 'precision_mode' (value 'FP16') is not a "
         "CUDA EP option, expected one of gpu_mem_limit"),
    ],
)
def test_bad_cuda_parameters_are_refused(pair: tuple[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        plan_providers(cuda(pair), EVERYTHING, 0, VERSION)
    assert str(info.value).startswith("model 'm': gpu_execution_accelerator[0] 'cuda' ")
    assert message in str(info.value)


def test_unknown_accelerator_names_are_refused() -> None:
    spec = spec_of("optimization { execution_accelerators { gpu_execution_accelerator "
                   "[{ name: 'tensorrt' }, { name: 'openvino' }] } }")
    with pytest.raises(ConfigError, match=r"model 'm': gpu_execution_accelerator\[1\] name "
                                          r"'openvino' is not supported by ONNX Runtime here, "
                                          r"expected 'tensorrt' or 'cuda'"):
        plan_providers(spec, EVERYTHING, 0, VERSION)


# -- graph level ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("level", "name"),
    [(-1, "ORT_ENABLE_BASIC"), (0, "ORT_ENABLE_ALL"), (1, "ORT_ENABLE_EXTENDED"),
     (2, "ORT_DISABLE_ALL")],
)
def test_graph_level_maps_to_onnx_runtimes(level: int, name: str) -> None:
    plan = plan_providers(spec_of(f"optimization {{ graph {{ level: {level} }} }}"), [CPU], 0,
                          VERSION)
    assert plan.graph_level == name
    assert hasattr(ort.GraphOptimizationLevel, name)


def test_a_bad_graph_level_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"model 'm': optimization\.graph\.level 7 is invalid, "
                                          r"expected one of \[-1, 0, 1, 2\]"):
        plan_providers(spec_of("optimization { graph { level: 7 } }"), [CPU], 0, VERSION)


# -- on a real server ----------------------------------------------------------------------


@pytest.mark.skipif(gpus.visible_gpus() > 0, reason="checks a host without a GPU")
def test_kind_gpu_on_a_host_without_a_gpu_is_unavailable_and_the_rest_serve(
    tmp_path: Path, start_server: ServerFactory
) -> None:
    import numpy as np
    import tritonclient.grpc as grpcclient

    repo = tmp_path / "repo"
    for name, group in (("gpu_identity", "KIND_GPU gpus: [ 0 ]"), ("auto_identity", "KIND_AUTO")):
        shutil.copytree(BUNDLED / "identity_fp32", repo / name)
        config = repo / name / "config.pbtxt"
        config.write_text(
            config.read_text().replace('name: "identity_fp32"', f'name: "{name}"')
            + f"\ninstance_group [ {{ kind: {group} }} ]\n"
        )
    server = start_server(repo, "--exit-on-error", "false", "--strict-readiness", "false")

    def reason() -> str:
        return repository_index(server).get(("gpu_identity", "1"), {}).get("reason", "")

    wait_for(lambda: bool(reason()), "the model's load to fail")
    if CUDA in ort.get_available_providers():  # onnxruntime-gpu on a host without a GPU
        assert reason().startswith("model 'gpu_identity': instance_group kind KIND_GPU needs "
                                   "a GPU, but this process sees none (")
        assert reason().endswith("); use KIND_AUTO to run on the CPU where there is no GPU")
    else:
        assert "model 'gpu_identity': instance_group kind KIND_GPU needs CUDAExecutionProvider" \
            in reason()
        assert "install the [gpu] extra" in reason()
    # the server stays up and KIND_AUTO runs on the CPU
    client = grpcclient.InferenceServerClient(server.grpc_url)
    x = np.arange(32, dtype=np.float32).reshape(2, 16)
    data = grpcclient.InferInput("INPUT0", [2, 16], "FP32")
    data.set_data_from_numpy(x)
    np.testing.assert_array_equal(client.infer("auto_identity", [data]).as_numpy("OUTPUT0"), x)
    client.close()
    assert "model 'auto_identity' instance 0 on CPUExecutionProvider\n" in server.log()


def test_a_cpu_wheel_beside_its_gpu_build_is_named_with_the_fix() -> None:
    assert extras.gpu_build_clash("onnxruntime", ("no-such-wheel",)) == ""
    assert extras.gpu_build_clash("no-such-wheel", ("numpy",)) == ""
    # a distribution installed in onnxruntime's folder stands in for the GPU build: the real
    # metadata lookup (a GPU build in another folder, a venv over the system's, is no clash)
    assert extras.site_of("numpy") == extras.site_of("onnxruntime") != ""
    clash = extras.gpu_build_clash("onnxruntime", ("no-such-wheel", "numpy"))
    assert clash.startswith("onnxruntime and numpy are both installed")
    assert "pip uninstall -y onnxruntime && pip install --force-reinstall --no-deps numpy" in clash
