"""config.pbtxt -> ONNX Runtime execution providers and their options (pure functions).

Triton's ONNX Runtime backend mapping, key for key:

* `instance_group { kind: KIND_GPU gpus: [...] }` gives each instance its `device_id`;
* `gpu_execution_accelerator [{ name: "tensorrt" parameters {...} }]` puts the TensorRT EP in
  front: `precision_mode` FP32 / FP16 / BF16 / INT8 -> `trt_fp16_enable` / `trt_bf16_enable` /
  `trt_int8_enable`, `max_workspace_size_bytes` -> `trt_max_workspace_size`, the
  `int8_*` keys -> `trt_int8_*`, and the `trt_*` options ONNX Runtime documents passed through;
* `gpu_execution_accelerator [{ name: "cuda" parameters {...} }]` are the CUDA EP's options;
* the CUDA EP always runs behind TensorRT (the nodes TensorRT cannot take), the CPU EP last;
* `optimization { graph { level } }`: -1 basic, 0 (default) all, 1 extended, 2 none.

Unknown accelerator names and keys, and values of the wrong type, are refused at load with a
message naming the model, the field, the value and what was expected.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from server import extras
from server.model_config import Accelerator, ConfigError, ModelSpec

CPU, CUDA, TENSORRT = (
    "CPUExecutionProvider",
    "CUDAExecutionProvider",
    "TensorrtExecutionProvider",
)
GPU_KINDS = ("KIND_GPU", "KIND_AUTO", "KIND_MODEL")

# Triton's graph level -> onnxruntime.GraphOptimizationLevel member name
GRAPH_LEVELS = {
    -1: "ORT_ENABLE_BASIC",
    0: "ORT_ENABLE_ALL",
    1: "ORT_ENABLE_EXTENDED",
    2: "ORT_DISABLE_ALL",
}
PRECISIONS = {
    "FP32": (),
    "FP16": ("trt_fp16_enable",),
    "BF16": ("trt_bf16_enable",),
    "INT8": ("trt_int8_enable",),
}
ENGINE_CACHE_DIR = "trt_engine_cache"  # under the version folder, when enabled without a path
TIMING_CACHE_DIR = "trt_timing_cache"

_BOOL_WORDS = {"1": True, "true": True, "0": False, "false": False}


def _is_int(value: str) -> bool:
    # digits only: Python's int() also takes "1_000" and " 5", which ONNX Runtime's parsers
    # refuse or read as 1
    return re.fullmatch(r"-?[0-9]+", value) is not None


def _is_bool(value: str) -> bool:
    return value.lower() in _BOOL_WORDS


def _is_count(value: str) -> bool:
    return _is_int(value) and int(value) >= 0


def _non_empty(value: str) -> bool:
    return value != ""


def _any(value: str) -> bool:
    return True


# ONNX Runtime's own parsers (checked against onnxruntime-gpu 1.31.1): booleans only as
# "True"/"False" for TensorRT (we normalise), sizes and counts unsigned (gpu_mem_limit "-1" and
# an empty trt_* string are refused at session creation, so they are refused here at load)
Check = tuple[Callable[[str], bool], str]  # (accepts?, what was expected)
BOOL: Check = (_is_bool, '"1", "0", "true" or "false"')
INT: Check = (_is_int, "an integer")
COUNT: Check = (_is_count, "an integer >= 0")
STR: Check = (_non_empty, "a non-empty string")
ANY_STR: Check = (_any, "a string")


def _choice(*values: str) -> Check:
    return (lambda v: v in values, " or ".join(f'"{v}"' for v in values))


# Triton's names for the TensorRT EP's options -> ONNX Runtime's, with the value's type
TRT_RENAMED: dict[str, tuple[str, Check]] = {
    "max_workspace_size_bytes": ("trt_max_workspace_size", COUNT),
    "int8_calibration_table_name": ("trt_int8_calibration_table_name", STR),
    "int8_use_native_calibration_table": ("trt_int8_use_native_calibration_table", BOOL),
}
# the trt_* options of ONNX Runtime's TensorRT EP, passed through as they are
TRT_OPTIONS: dict[str, Check] = {
    "trt_max_workspace_size": COUNT,
    "trt_max_partition_iterations": COUNT,
    "trt_min_subgraph_size": COUNT,
    "trt_fp16_enable": BOOL,
    "trt_bf16_enable": BOOL,
    "trt_int8_enable": BOOL,
    "trt_int8_calibration_table_name": STR,
    "trt_int8_use_native_calibration_table": BOOL,
    "trt_dla_enable": BOOL,
    "trt_dla_core": COUNT,
    "trt_engine_cache_enable": BOOL,
    "trt_engine_cache_path": STR,
    "trt_engine_cache_prefix": STR,
    "trt_dump_subgraphs": BOOL,
    "trt_force_sequential_engine_build": BOOL,
    "trt_context_memory_sharing_enable": BOOL,
    "trt_layer_norm_fp32_fallback": BOOL,
    "trt_timing_cache_enable": BOOL,
    "trt_timing_cache_path": STR,
    "trt_force_timing_cache": BOOL,
    "trt_detailed_build_log": BOOL,
    "trt_build_heuristics_enable": BOOL,
    "trt_sparsity_enable": BOOL,
    "trt_builder_optimization_level": COUNT,
    "trt_auxiliary_streams": INT,  # -1: TensorRT decides
    "trt_tactic_sources": STR,
    "trt_extra_plugin_lib_paths": STR,
    "trt_profile_min_shapes": STR,
    "trt_profile_max_shapes": STR,
    "trt_profile_opt_shapes": STR,
    "trt_cuda_graph_enable": BOOL,
    "trt_dump_ep_context_model": BOOL,
    "trt_ep_context_file_path": STR,
    "trt_ep_context_embed_mode": COUNT,
    "trt_engine_decryption_enable": BOOL,
    "trt_engine_decryption_lib_path": STR,
    "trt_engine_hw_compatible": BOOL,
    "trt_weight_stripped_engine_enable": BOOL,
    "trt_onnx_model_folder_path": STR,
    "trt_op_types_to_exclude": ANY_STR,  # "": exclude nothing
    "trt_preview_features": STR,
}
# the CUDA EP's options (ONNX Runtime's names)
CUDA_OPTIONS: dict[str, Check] = {
    "gpu_mem_limit": COUNT,
    "arena_extend_strategy": _choice("kNextPowerOfTwo", "kSameAsRequested", "0", "1"),
    "cudnn_conv_algo_search": _choice("EXHAUSTIVE", "HEURISTIC", "DEFAULT", "0", "1", "2"),
    "do_copy_in_default_stream": BOOL,
    "cudnn_conv_use_max_workspace": BOOL,
    "cudnn_conv1d_pad_to_nc1d": BOOL,
    "enable_cuda_graph": BOOL,
    "enable_skip_layer_norm_strict_mode": BOOL,
    "use_tf32": BOOL,
    "prefer_nhwc": BOOL,
    "use_ep_level_unified_stream": BOOL,
    "tunable_op_enable": BOOL,
    "tunable_op_tuning_enable": BOOL,
    "tunable_op_max_tuning_duration_ms": COUNT,
}
# numbers Triton accepts for the CUDA enums -> ONNX Runtime's names
_CUDA_ENUMS = {
    "arena_extend_strategy": {"0": "kNextPowerOfTwo", "1": "kSameAsRequested"},
    "cudnn_conv_algo_search": {"0": "EXHAUSTIVE", "1": "HEURISTIC", "2": "DEFAULT"},
}
# Triton's older spelling: these model-level `parameters` configure the CUDA EP too
CUDA_MODEL_PARAMETERS = (
    "cudnn_conv_algo_search", "gpu_mem_limit", "arena_extend_strategy",
    "do_copy_in_default_stream",
)


@dataclass(frozen=True, slots=True)
class ProviderPlan:
    """What one instance's InferenceSession is created with."""

    providers: list[tuple[str, dict[str, str]]]
    graph_level: str = "ORT_ENABLE_ALL"
    notes: list[str] = field(default_factory=list)  # log lines (a missing TensorRT)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.providers]

    @property
    def on_gpu(self) -> bool:
        return self.providers[0][0] != CPU

    def without(self, name: str) -> ProviderPlan:
        """This plan less one provider (a fallback: TensorRT that did not come up)."""
        kept = [(n, o) for n, o in self.providers if n != name]
        return ProviderPlan(kept, self.graph_level, self.notes)

    def on_cpu(self) -> ProviderPlan:
        return ProviderPlan([(CPU, {})], self.graph_level, self.notes)


def graph_level(spec: ModelSpec) -> str:
    level = GRAPH_LEVELS.get(spec.graph_level)
    if level is None:
        raise ConfigError(
            f"model '{spec.name}': optimization.graph.level {spec.graph_level} is invalid, "
            f"expected one of {sorted(GRAPH_LEVELS)} (-1 basic, 0 all, 1 extended, 2 none)"
        )
    return level


def _checked(where: str, key: str, value: str, check: Check) -> str:
    accepts, expected = check
    if not accepts(value):
        raise ConfigError(f"{where} parameters '{key}' is '{value}', expected {expected}")
    if check is BOOL:
        return "True" if _BOOL_WORDS[value.lower()] else "False"
    return value


def tensorrt_options(
    spec: ModelSpec, index: int, accelerator: Accelerator, version_dir: Path
) -> dict[str, str]:
    """The TensorRT EP's options for `gpu_execution_accelerator[index]` (without device_id).
    Enabled caches without a path go under the version folder."""
    where = f"model '{spec.name}': gpu_execution_accelerator[{index}] 'tensorrt'"
    options: dict[str, str] = {}
    for key, value in accelerator.parameters.items():
        if key == "precision_mode":
            flags = PRECISIONS.get(value.upper())
            if flags is None:
                raise ConfigError(
                    f"{where} parameters 'precision_mode' is '{value}', expected one of "
                    f"{', '.join(PRECISIONS)}"
                )
            options.update(dict.fromkeys(flags, "True"))
        elif key in TRT_RENAMED:
            name, check = TRT_RENAMED[key]
            options[name] = _checked(where, key, value, check)
        elif key in TRT_OPTIONS:
            options[key] = _checked(where, key, value, TRT_OPTIONS[key])
        else:
            raise ConfigError(
                f"{where} parameters key '{key}' (value '{value}') is not a TensorRT option, "
                "expected precision_mode, max_workspace_size_bytes, "
                "int8_calibration_table_name, int8_use_native_calibration_table or one of "
                "ONNX Runtime's trt_* options (see the README, GPU)"
            )
    for enable, path, folder in (
        ("trt_engine_cache_enable", "trt_engine_cache_path", ENGINE_CACHE_DIR),
        ("trt_timing_cache_enable", "trt_timing_cache_path", TIMING_CACHE_DIR),
    ):
        if options.get(enable) == "True" and not options.get(path):
            options[path] = str(version_dir / folder)
    return options


def cuda_options(spec: ModelSpec, index: int | None, parameters: dict[str, str]) -> dict[str, str]:
    """The CUDA EP's options from a `name: "cuda"` accelerator (`index`), or from the
    model-level `parameters` Triton also reads (`index` None; other keys are ignored there)."""
    where = (
        f"model '{spec.name}': gpu_execution_accelerator[{index}] 'cuda'"
        if index is not None else f"model '{spec.name}':"
    )
    options: dict[str, str] = {}
    for key, value in parameters.items():
        check = CUDA_OPTIONS.get(key)
        if check is None:
            if index is None:
                continue
            raise ConfigError(
                f"{where} parameters key '{key}' (value '{value}') is not a CUDA EP option, "
                f"expected one of {', '.join(CUDA_OPTIONS)}"
            )
        value = _CUDA_ENUMS.get(key, {}).get(value, value)
        options[key] = _checked(where, key, value, check)
    return options


def accelerator_options(
    spec: ModelSpec, version_dir: Path
) -> tuple[dict[str, str] | None, dict[str, str]]:
    """(TensorRT options, or None when TensorRT is not asked for; CUDA options)."""
    trt: dict[str, str] | None = None
    cuda = cuda_options(spec, None, {k: spec.parameters[k] for k in CUDA_MODEL_PARAMETERS
                                     if k in spec.parameters})
    for index, accelerator in enumerate(spec.accelerators):
        if accelerator.name == "tensorrt":
            trt = {**(trt or {}), **tensorrt_options(spec, index, accelerator, version_dir)}
        elif accelerator.name == "cuda":
            cuda.update(cuda_options(spec, index, accelerator.parameters))
        else:
            raise ConfigError(
                f"model '{spec.name}': gpu_execution_accelerator[{index}] name "
                f"'{accelerator.name}' is not supported by ONNX Runtime here, expected "
                "'tensorrt' or 'cuda'"
            )
    return trt, cuda


def device_of(spec: ModelSpec, instance: int, visible_gpus: int) -> int:
    """The GPU an instance runs on: the one its group lists, else `instance % visible`.
    A listed GPU that is not visible is a ConfigError."""
    gpus = spec.instance_gpus[instance] if instance < len(spec.instance_gpus) else ()
    if not gpus:
        return instance % visible_gpus if visible_gpus > 0 else 0
    device = gpus[0]
    if visible_gpus > 0 and device >= visible_gpus:
        raise ConfigError(
            f"model '{spec.name}': instance_group gpus lists GPU {device}, but "
            f"{visible_gpus} GPU(s) are visible, expected 0..{visible_gpus - 1}"
        )
    return device


def plan_providers(
    spec: ModelSpec,
    available: Sequence[str],
    instance: int,
    version_dir: Path,
    visible_gpus: int = 1,
    tensorrt_present: bool = True,
    no_gpu_reason: str = "",
) -> ProviderPlan:
    """The execution providers (with options) of one instance, in priority order.

    KIND_CPU runs on the CPU. Otherwise CUDA when ONNX Runtime offers it and a GPU is visible
    (KIND_AUTO without one runs on the CPU, as in Triton), TensorRT in front when the config
    asks for it and its libraries load (`tensorrt_present`; else one note), the CPU last.
    KIND_GPU without the CUDA EP or without a visible GPU (`no_gpu_reason` says why) is a
    ConfigError. The accelerators' options are checked whatever the kind, so a config error
    shows on a CPU host too.
    """
    level = graph_level(spec)
    trt, cuda = accelerator_options(spec, version_dir)
    if spec.instance_kind not in GPU_KINDS:
        return ProviderPlan([(CPU, {})], level)
    notes: list[str] = []
    providers: list[tuple[str, dict[str, str]]] = []
    if CUDA in available and visible_gpus > 0:
        device = {"device_id": str(device_of(spec, instance, visible_gpus))}
        if trt is not None and TENSORRT in available:
            if tensorrt_present:
                providers.append((TENSORRT, {**device, **trt}))
            else:
                notes.append(
                    f"model '{spec.name}' instance {instance}: TensorRT libraries "
                    "(libnvinfer) are missing, running on the CUDA EP (pip install "
                    "tachyon-serve[tensorrt])"
                )
        providers.append((CUDA, {**device, **cuda}))
    if spec.instance_kind == "KIND_GPU" and not providers:
        if CUDA not in available:
            raise ConfigError(
                f"model '{spec.name}': instance_group kind KIND_GPU needs "
                f"CUDAExecutionProvider, but ONNX Runtime offers only {', '.join(available)} "
                f"({extras.gpu_build_clash('onnxruntime') or 'install the [gpu] extra'})"
            )
        raise ConfigError(
            f"model '{spec.name}': instance_group kind KIND_GPU needs a GPU, but this process "
            f"sees none ({no_gpu_reason or 'no NVIDIA driver, or CUDA_VISIBLE_DEVICES hides them'}"
            "); use KIND_AUTO to run on the CPU where there is no GPU"
        )
    return ProviderPlan([*providers, (CPU, {})], level, notes)


def select_providers(
    available: Sequence[str], instance_kind: str, gpu_accelerators: Sequence[str]
) -> list[str]:
    """The provider names alone, in priority order, for a kind and accelerator names (a
    shorthand of `plan_providers`)."""
    spec = ModelSpec(
        name="", backend="onnxruntime", max_batch_size=0, inputs=(), outputs=(),
        model_filename="", instance_kind=instance_kind,
        accelerators=tuple(Accelerator(name) for name in gpu_accelerators),
    )
    return plan_providers(spec, available, 0, Path()).names
