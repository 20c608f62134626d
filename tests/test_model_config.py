"""config.pbtxt parsing, completion from ONNX graphs, and validation errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from server import model_config, repository
from server.backends.onnxruntime import OnnxRuntimeBackend, select_providers
from server.model_config import ConfigError, parse_config, to_spec
from server.types import DataType

BUNDLED = Path(__file__).resolve().parent.parent / "model_repository"


def spec_of(text: str, name: str = "m") -> model_config.ModelSpec:
    return to_spec(parse_config(text, name), "onnxruntime")


def test_bundled_config_parses_to_spec() -> None:
    config = model_config.read_config(BUNDLED / "digits")
    spec = to_spec(config, model_config.backend_of(config, BUNDLED / "digits" / "1"))
    assert spec.max_batch_size == 64
    assert [t.name for t in spec.inputs] == ["INPUT"]
    assert spec.inputs[0].datatype is DataType.FP32 and spec.inputs[0].dims == (64,)
    assert spec.dynamic_batching is not None
    assert spec.dynamic_batching.max_queue_delay_us == 500
    assert spec.parameters == {"intra_op_thread_count": "1"}
    assert spec.instance_kind == "KIND_CPU"


def test_missing_config_is_completed_from_the_graph() -> None:
    config = parse_config("", "add_sub")
    OnnxRuntimeBackend.complete_config(config, BUNDLED / "add_sub" / "1", 4)
    spec = to_spec(config, "onnxruntime")
    assert spec.max_batch_size == 4  # batchable graph: the default max batch size
    assert spec.dynamic_batching is not None
    assert {t.name: t.dims for t in spec.inputs} == {"INPUT0": (16,), "INPUT1": (16,)}
    assert {t.name for t in spec.outputs} == {"OUTPUT0", "OUTPUT1"}


def test_completion_keeps_an_explicit_non_batching_config() -> None:
    config = parse_config('max_batch_size: 0 input [{name: "INPUT0" data_type: TYPE_FP32 '
                          "dims: [-1, 16]}]", "add_sub")
    OnnxRuntimeBackend.complete_config(config, BUNDLED / "add_sub" / "1", 4)
    spec = to_spec(config, "onnxruntime")
    assert spec.max_batch_size == 0
    assert {t.name: t.dims for t in spec.inputs} == {"INPUT0": (-1, 16), "INPUT1": (-1, 16)}


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("max_batch_size: 4 input [{ name: 'a' data_type: TYPE_FP32 dims: [0] }] "
         "output [{ name: 'b' data_type: TYPE_FP32 dims: [1] }]", "dims [0] are invalid"),
        ("max_batch_size: -1", "max_batch_size -1 is invalid"),
        ("input [{ name: 'a' data_type: TYPE_FP32 dims: [1] }]", "lists 1 inputs and 0 outputs"),
        ("max_batch_size: 4 input [{ name: 'a' data_type: TYPE_FP32 dims: [1] }, "
         "{ name: 'a' data_type: TYPE_FP32 dims: [1] }] "
         "output [{ name: 'b' data_type: TYPE_FP32 dims: [1] }]", "appears twice"),
        ("max_batch_size: 4 dynamic_batching { preferred_batch_size: [8] } "
         "input [{ name: 'a' data_type: TYPE_FP32 dims: [1] }] "
         "output [{ name: 'b' data_type: TYPE_FP32 dims: [1] }]",
         "preferred_batch_size 8 is invalid"),
        ("this is not protobuf text", "is not valid"),
    ],
)
def test_invalid_configs_name_model_field_and_value(text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        spec_of(text, "broken")
    assert "model 'broken'" in str(info.value)
    assert needle in str(info.value)


def test_unknown_platform_is_refused() -> None:
    config = parse_config('platform: "pytorch_libtorch"', "m")
    with pytest.raises(ConfigError, match="platform/backend 'pytorch_libtorch' is not supported"):
        model_config.backend_of(config, None)


def test_graph_mismatch_is_reported_at_load() -> None:
    config = parse_config(
        "max_batch_size: 8 input [{ name: 'INPUT0' data_type: TYPE_INT32 dims: [16] }] "
        "output [{ name: 'OUTPUT0' data_type: TYPE_FP32 dims: [16] }]", "identity_fp32")
    spec = to_spec(config, "onnxruntime")
    backend = OnnxRuntimeBackend(spec, BUNDLED / "identity_fp32" / "1")
    with pytest.raises(ConfigError, match="data_type TYPE_INT32 does not match"):
        backend.load()


def test_version_policies(tmp_path: Path) -> None:
    model = tmp_path / "m"
    for name in ("1", "2", "3", "10", "latest", "0"):
        (model / name).mkdir(parents=True)
    versions = repository.version_dirs(model)
    assert sorted(versions) == [1, 2, 3, 10]
    select = repository.select_versions
    assert select(parse_config("", "m"), list(versions)) == [10]
    assert select(parse_config("version_policy { latest { num_versions: 2 } }", "m"),
                  list(versions)) == [3, 10]
    assert select(parse_config("version_policy { all { } }", "m"), list(versions)) == [1, 2, 3, 10]
    assert select(parse_config("version_policy { specific { versions: [2, 7] } }", "m"),
                  list(versions)) == [2]


def test_provider_selection_logic() -> None:
    cpu, cuda, trt = (
        "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
    )
    everything = [trt, cuda, cpu]
    assert select_providers(everything, "KIND_CPU", ["tensorrt"]) == [cpu]
    assert select_providers(everything, "KIND_AUTO", []) == [cuda, cpu]
    assert select_providers(everything, "KIND_GPU", ["tensorrt"]) == [trt, cuda, cpu]
    assert select_providers([cpu], "KIND_AUTO", ["tensorrt"]) == [cpu]
    with pytest.raises(ConfigError, match="KIND_GPU needs CUDAExecutionProvider"):
        select_providers([cpu], "KIND_GPU", [])


def test_triton_repository_is_served_unchanged(tmp_path: Path) -> None:
    """A config written for Triton (fields Tachyon does not use included) parses."""
    shutil.copytree(BUNDLED / "identity_fp32", tmp_path / "identity_fp32")
    (tmp_path / "identity_fp32" / "config.pbtxt").write_text(
        """
name: "identity_fp32"
backend: "onnxruntime"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_FP32 format: FORMAT_NONE dims: [ 16 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ]
instance_group [ { count: 2 kind: KIND_CPU } ]
dynamic_batching { preferred_batch_size: [ 4, 8 ] max_queue_delay_microseconds: 100 }
optimization { execution_accelerators { gpu_execution_accelerator : [ { name : "tensorrt" } ] } }
model_warmup [ { name: "w" batch_size: 1 inputs { key: "INPUT0" value: {
  data_type: TYPE_FP32 dims: [ 16 ] zero_data: true } } } ]
response_cache { enable: false }
"""
    )
    config = model_config.read_config(tmp_path / "identity_fp32")
    spec = to_spec(config, model_config.backend_of(config, None))
    assert spec.instance_count == 2
    assert spec.gpu_accelerators == ("tensorrt",)
    assert spec.dynamic_batching is not None
    assert spec.dynamic_batching.preferred_batch_sizes == (4, 8)


# -- sections Tachyon does not implement ---------------------------------------------------

BASE = ("max_batch_size: 8 input [{ name: 'INPUT0' data_type: TYPE_FP32 dims: [16] }] "
        "output [{ name: 'OUTPUT0' data_type: TYPE_FP32 dims: [16] }] ")


@pytest.mark.parametrize(
    ("extra", "section"),
    [
        ("sequence_batching { max_sequence_idle_microseconds: 100 }", "sequence_batching"),
        ("ensemble_scheduling { step [{ model_name: 'x' }] }", "ensemble_scheduling"),
        ("model_transaction_policy { decoupled: true }", "model_transaction_policy.decoupled"),
        ("model_repository_agents { agents [{ name: 'checksum' }] }", "model_repository_agents"),
        ("batch_input [{ kind: BATCH_ELEMENT_COUNT target_name: 'N' data_type: TYPE_INT32 "
         "source_input: 'INPUT0' }]", "batch_input"),
        ("batch_output [{ target_name: 'OUTPUT0' }]", "batch_output"),
        ("model_operations { op_library_filename: 'libops.so' }", "model_operations"),
        ("model_metrics { metric_control [{ metric_identifier { family: 'x' } }] }",
         "model_metrics"),
        ("cc_model_filenames { key: '8.0' value: 'model.plan' }", "cc_model_filenames"),
        ("runtime: 'libtriton_onnxruntime.so'", "runtime"),
        ("optimization { execution_accelerators { cpu_execution_accelerator [{ name: "
         "'openvino' }] } }", "cpu_execution_accelerator"),
        ("instance_group [{ count: 1 kind: KIND_CPU passive: true }]", "instance_group[0].passive"),
        ("instance_group [{ kind: KIND_GPU profile: '0' }]", "instance_group[0].profile"),
        ("instance_group [{ kind: KIND_GPU secondary_devices [{ device_id: 0 }] }]",
         "instance_group[0].secondary_devices"),
        ("instance_group [{ kind: KIND_GPU }, { kind: KIND_CPU }]", "different kinds"),
    ],
)
def test_unsupported_sections_are_refused_naming_the_section(extra: str, section: str) -> None:
    with pytest.raises(ConfigError) as info:
        spec_of(BASE + extra, "fancy")
    message = str(info.value)
    assert "model 'fancy'" in message and section in message
    assert "is not supported" in message


@pytest.mark.parametrize(
    ("tensor", "flag"),
    [
        ("input [{ name: 'S' data_type: TYPE_INT32 dims: [1] is_shape_tensor: true }]",
         "is_shape_tensor"),
        ("input [{ name: 'R' data_type: TYPE_FP32 dims: [-1] allow_ragged_batch: true }]",
         "allow_ragged_batch"),
        ("output [{ name: 'N' data_type: TYPE_FP32 dims: [4] is_non_linear_format_io: true }]",
         "is_non_linear_format_io"),
    ],
)
def test_unsupported_tensor_flags_are_refused(tensor: str, flag: str) -> None:
    with pytest.raises(ConfigError, match=f"'[SRN]': {flag} is not supported"):
        spec_of(BASE + tensor, "fancy")


def test_ensembles_keep_their_scheduling_and_hints_are_accepted() -> None:
    ensemble = parse_config(
        "platform: 'ensemble' max_batch_size: 8 "
        "input [{ name: 'IN' data_type: TYPE_FP32 dims: [16] }] "
        "output [{ name: 'OUT' data_type: TYPE_FP32 dims: [16] }] "
        "ensemble_scheduling { step [{ model_name: 'identity_fp32' model_version: -1 "
        "input_map { key: 'INPUT0' value: 'IN' } output_map { key: 'OUTPUT0' value: 'OUT' } }] }",
        "ens")
    assert to_spec(ensemble, "ensemble").name == "ens"
    hints = (
        "instance_group [{ count: 1 kind: KIND_GPU gpus: [0] rate_limiter { priority: 1 } "
        "host_policy: 'numa0' }] optimization { graph { level: 1 } priority: PRIORITY_MAX "
        "input_pinned_memory { enable: false } } metric_tags { key: 'team' value: 'a' } "
        "response_cache { enable: false } model_transaction_policy { decoupled: false }"
    )
    assert spec_of(BASE + hints, "hinted").instance_count == 1


def test_labels_come_from_the_version_or_the_model_folder(tmp_path: Path) -> None:
    version = tmp_path / "m" / "1"
    version.mkdir(parents=True)
    (tmp_path / "m" / "labels.txt").write_text("cat\ndog\n")
    (version / "v_labels.txt").write_text("one\n")

    def labelled(first: str, second: str) -> object:
        return parse_config(
            "input [{ name: 'IN' data_type: TYPE_FP32 dims: [2] }] output ["
            f"{{ name: 'OUT' data_type: TYPE_FP32 dims: [2] label_filename: '{first}' }}, "
            f"{{ name: 'O2' data_type: TYPE_FP32 dims: [1] label_filename: '{second}' }}]", "m")

    config = labelled("labels.txt", "v_labels.txt")
    assert model_config.read_labels(config, version) == {"OUT": ("cat", "dog"), "O2": ("one",)}
    (tmp_path / "m" / "labels.txt").unlink()
    with pytest.raises(ConfigError, match=r"label_filename 'labels\.txt' does not exist"):
        model_config.read_labels(config, version)
    with pytest.raises(ConfigError, match=r"label_filename '\.\./x' is not allowed"):
        model_config.read_labels(labelled("v_labels.txt", "../x"), version)
