"""Tests for the protocol schema (protos/*.proto) and its loader (server/proto.py).

The schema must stay wire compatible with Triton's ``grpc_service.proto`` and
``model_config.proto``; tritonclient's generated modules serve as the reference.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
from google.protobuf import descriptor_pool, json_format, text_format
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from tritonclient.grpc import model_config_pb2 as triton_mc
from tritonclient.grpc import service_pb2 as triton_svc

from server import proto

REPO_ROOT = Path(__file__).resolve().parent.parent
TRITON = SimpleNamespace(svc=triton_svc, mc=triton_mc)
OURS = SimpleNamespace(svc=proto, mc=proto)

# Fields/messages that upstream Triton added after the tritonclient release we
# test against (2.41). They are part of our schema with upstream's numbers.
NEWER_UPSTREAM_FIELDS = {
    "inference.ModelStatistics.response_stats",  # = 9
    "inference.ModelConfig.runtime",  # = 25
    "inference.ModelConfig.model_metrics",  # = 26
    "inference.ModelEnsembling.max_inflight_responses",  # = 2
    "inference.ModelInput.is_non_linear_format_io",  # = 9
    "inference.ModelOutput.is_non_linear_format_io",  # = 7
}
NEWER_UPSTREAM_MESSAGES = {
    "inference.InferResponseStatistics",
    "inference.ModelStatistics.ResponseStatsEntry",
    "inference.ModelMetrics",
    "inference.ModelMetrics.MetricControl",
    "inference.ModelMetrics.MetricControl.MetricIdentifier",
    "inference.ModelMetrics.MetricControl.HistogramOptions",
}


# --------------------------------------------------------------- helpers


def _label(field: FieldDescriptor) -> str:
    if hasattr(field, "is_repeated"):  # protobuf >= 5.29 (``label`` is gone in 7)
        if field.is_repeated:
            return "repeated"
        return "required" if field.is_required else "optional"
    return {1: "optional", 2: "required", 3: "repeated"}[field.label]


def _field_signature(field: FieldDescriptor) -> tuple[Any, ...]:
    target = field.message_type or field.enum_type
    oneof = field.containing_oneof
    return (
        field.name,
        field.number,
        field.type,
        _label(field),
        target.full_name if target is not None else None,
        oneof.name if oneof is not None else None,
        field.has_presence,
    )


def _walk_messages(descs: Any) -> Iterator[Descriptor]:
    for desc in descs:
        yield desc
        yield from _walk_messages(desc.nested_types)


def _walk_enums(descs: Any) -> Iterator[EnumDescriptor]:
    for desc in _walk_messages(descs):
        yield from desc.enum_types


def _ours(full_name: str) -> Descriptor:
    return proto.POOL.FindMessageTypeByName(full_name)


def _text(msg: Any) -> str:
    return str(text_format.MessageToString(msg))


def _as_dict(msg: Any) -> dict[str, Any]:
    result: dict[str, Any] = json_format.MessageToDict(msg, preserving_proto_field_name=True)
    return result


def _assert_same_content(a: Any, b: Any) -> None:
    assert a.DESCRIPTOR.full_name == b.DESCRIPTOR.full_name
    assert _as_dict(a) == _as_dict(b)
    assert _text(a) == _text(b)
    assert a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)


# ---------------------------------------------------------- stale check


def test_descriptor_set_is_up_to_date() -> None:
    pytest.importorskip("grpc_tools")
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "protos" / "generate.py"), "--check"],
        cwd=REPO_ROOT.parent,  # the script must not depend on the working directory
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------- loader


def test_private_pool_coexists_with_tritonclient() -> None:
    assert proto.POOL is not descriptor_pool.Default()
    default_desc = descriptor_pool.Default().FindMessageTypeByName("inference.ModelInferRequest")
    assert default_desc is triton_svc.ModelInferRequest.DESCRIPTOR
    assert proto.ModelInferRequest is not triton_svc.ModelInferRequest
    assert proto.ModelInferRequest.DESCRIPTOR.file.pool is proto.POOL


def test_import_order_independent() -> None:
    code = textwrap.dedent(
        """
        import server.proto as p
        import tritonclient.grpc.service_pb2 as s
        import tritonclient.grpc.model_config_pb2 as m
        assert p.ModelConfig.DESCRIPTOR is not m.ModelConfig.DESCRIPTOR
        r = p.ModelInferRequest(model_name="x")
        assert s.ModelInferRequest.FromString(r.SerializeToString()).model_name == "x"
        """
    )
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_message_is_exposed() -> None:
    for file in proto.FILES:
        for name, desc in file.message_types_by_name.items():
            cls = getattr(proto, name)
            assert cls is proto.message_class(desc.full_name)
            assert cls.DESCRIPTOR is desc
            for nested in _walk_messages(desc.nested_types):
                assert proto.message_class(nested.full_name).DESCRIPTOR is nested
    # Nested classes hang off their parents, like generated code.
    tensor = proto.ModelInferRequest.InferInputTensor
    assert tensor is proto.message_class("inference.ModelInferRequest.InferInputTensor")
    assert proto.ModelInferRequest().inputs.add().__class__ is tensor
    with pytest.raises(AttributeError):
        _ = proto.NoSuchMessage
    with pytest.raises(KeyError):
        proto.message_class("inference.NoSuchMessage")


def test_explicit_names_and_enums() -> None:
    explicit = [
        "ServerLiveRequest",
        "ServerLiveResponse",
        "ServerReadyRequest",
        "ServerReadyResponse",
        "ModelReadyRequest",
        "ModelReadyResponse",
        "ServerMetadataRequest",
        "ServerMetadataResponse",
        "ModelMetadataRequest",
        "ModelMetadataResponse",
        "ModelInferRequest",
        "ModelInferResponse",
        "ModelStreamInferResponse",
        "ModelConfigRequest",
        "ModelConfigResponse",
        "ModelStatisticsRequest",
        "ModelStatisticsResponse",
        "RepositoryIndexRequest",
        "RepositoryIndexResponse",
        "RepositoryModelLoadRequest",
        "RepositoryModelLoadResponse",
        "RepositoryModelUnloadRequest",
        "RepositoryModelUnloadResponse",
        "InferParameter",
        "InferTensorContents",
        "ModelConfig",
        "ModelInput",
        "ModelOutput",
        "InferStatistics",
        "InferBatchStatistics",
        "StatisticDuration",
        "ModelStatistics",
        "SystemSharedMemoryStatusRequest",
        "SystemSharedMemoryStatusResponse",
        "SystemSharedMemoryRegisterRequest",
        "SystemSharedMemoryRegisterResponse",
        "SystemSharedMemoryUnregisterRequest",
        "SystemSharedMemoryUnregisterResponse",
    ]
    for name in explicit:
        assert name in vars(proto), name
        assert vars(proto)[name].DESCRIPTOR.full_name == f"inference.{name}"
        assert name in proto.__all__

    assert proto.DATA_TYPE.full_name == "inference.DataType"
    assert proto.DATA_TYPE.file.pool is proto.POOL
    assert proto.DataType.Name(11) == "TYPE_FP32"
    assert proto.DataType.Value("TYPE_STRING") == 13
    assert proto.TYPE_BF16 == 14
    assert proto.ModelInstanceGroup.KIND_CPU == 2
    assert proto.ModelQueuePolicy.DELAY == 1
    assert proto.SERVICE.full_name == proto.SERVICE_NAME == "inference.GRPCInferenceService"
    assert proto.full_method_name("ModelInfer") == "/inference.GRPCInferenceService/ModelInfer"
    with pytest.raises(KeyError):
        proto.full_method_name("Nope")


def test_methods_mapping() -> None:
    assert proto.METHODS["ModelInfer"] == (
        proto.ModelInferRequest,
        proto.ModelInferResponse,
        False,
        False,
    )
    assert proto.METHODS["ModelStreamInfer"] == (
        proto.ModelInferRequest,
        proto.ModelStreamInferResponse,
        True,
        True,
    )
    for name, (req, resp, cs, ss) in proto.METHODS.items():
        method = proto.SERVICE.methods_by_name[name]
        assert req.DESCRIPTOR is method.input_type
        assert resp.DESCRIPTOR is method.output_type
        assert (cs, ss) == (method.client_streaming, method.server_streaming)


def test_text_format_config_pbtxt() -> None:
    pbtxt = """
        name: "resnet"
        platform: "onnxruntime_onnx"
        max_batch_size: 16
        input [
          { name: "input__0" data_type: TYPE_FP32 format: FORMAT_NCHW dims: [ 3, -1, -1 ] }
        ]
        output [
          { name: "probs" data_type: TYPE_FP32 dims: [ 1000 ] label_filename: "labels.txt" }
        ]
        dynamic_batching { preferred_batch_size: [ 8, 16 ] max_queue_delay_microseconds: 500 }
        instance_group [ { count: 2 kind: KIND_CPU } ]
        version_policy: { latest: { num_versions: 2 } }
        parameters: { key: "intra_op_thread_count" value: { string_value: "4" } }
        runtime: "libtriton_onnxruntime.so"
    """
    cfg = text_format.Parse(pbtxt, proto.ModelConfig())
    assert cfg.input[0].data_type == proto.DataType.Value("TYPE_FP32")
    assert list(cfg.input[0].dims) == [3, -1, -1]
    assert cfg.input[0].format == proto.ModelInput.FORMAT_NCHW
    assert cfg.WhichOneof("scheduling_choice") == "dynamic_batching"
    assert list(cfg.dynamic_batching.preferred_batch_size) == [8, 16]
    assert cfg.instance_group[0].kind == proto.ModelInstanceGroup.KIND_CPU
    assert cfg.version_policy.WhichOneof("policy_choice") == "latest"
    assert cfg.parameters["intra_op_thread_count"].string_value == "4"
    assert cfg.runtime == "libtriton_onnxruntime.so"
    # And back to text again.
    again = text_format.Parse(text_format.MessageToString(cfg), proto.ModelConfig())
    assert again == cfg
    with pytest.raises(text_format.ParseError):
        text_format.Parse("nonexistent_field: 1", proto.ModelConfig())


# ---------------------------------------------------- schema comparison


def test_service_matches_tritonclient() -> None:
    theirs = triton_svc.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    ours = proto.SERVICE
    assert ours.full_name == theirs.full_name

    def methods(service: Any) -> list[tuple[str, str, str, bool, bool]]:
        return [
            (
                m.name,
                m.input_type.full_name,
                m.output_type.full_name,
                bool(m.client_streaming),
                bool(m.server_streaming),
            )
            for m in service.methods
        ]

    assert methods(ours) == methods(theirs)
    assert set(proto.METHODS) == {m.name for m in theirs.methods}


def test_grpc_service_messages_match_tritonclient() -> None:
    theirs_names = set()
    for theirs in _walk_messages(triton_svc.DESCRIPTOR.message_types_by_name.values()):
        theirs_names.add(theirs.full_name)
        ours = _ours(theirs.full_name)
        assert ours.GetOptions().map_entry == theirs.GetOptions().map_entry, theirs.full_name
        theirs_fields = {f.name: _field_signature(f) for f in theirs.fields}
        ours_fields = {f.name: _field_signature(f) for f in ours.fields}
        for name, sig in theirs_fields.items():
            assert ours_fields.get(name) == sig, f"{theirs.full_name}.{name}"
        extra = {f"{theirs.full_name}.{n}" for n in set(ours_fields) - set(theirs_fields)}
        assert extra <= NEWER_UPSTREAM_FIELDS, extra
        assert [o.name for o in ours.oneofs] == [o.name for o in theirs.oneofs]
    for theirs_enum in _walk_enums(triton_svc.DESCRIPTOR.message_types_by_name.values()):
        ours_enum = proto.POOL.FindEnumTypeByName(theirs_enum.full_name)
        assert [(v.name, v.number) for v in ours_enum.values] == [
            (v.name, v.number) for v in theirs_enum.values
        ]

    inference_file = proto.POOL.FindFileByName("inference.proto")
    ours_names = {
        d.full_name for d in _walk_messages(inference_file.message_types_by_name.values())
    }
    assert ours_names - theirs_names <= NEWER_UPSTREAM_MESSAGES


def test_model_config_is_subset_of_triton() -> None:
    """Every field we declare exists in Triton's schema with the same number and type."""
    config_file = proto.POOL.FindFileByName("model_config.proto")
    for ours in _walk_messages(config_file.message_types_by_name.values()):
        if ours.full_name in NEWER_UPSTREAM_MESSAGES:
            continue
        theirs = triton_mc.DESCRIPTOR.pool.FindMessageTypeByName(ours.full_name)
        assert ours.GetOptions().map_entry == theirs.GetOptions().map_entry, ours.full_name
        theirs_fields = {f.name: f for f in theirs.fields}
        for field in ours.fields:
            full = f"{ours.full_name}.{field.name}"
            if full in NEWER_UPSTREAM_FIELDS:
                continue
            assert field.name in theirs_fields, full
            assert _field_signature(field) == _field_signature(theirs_fields[field.name]), full
    for ours_enum in list(config_file.enum_types_by_name.values()) + list(
        _walk_enums(config_file.message_types_by_name.values())
    ):
        if ours_enum.full_name.rsplit(".", 1)[0] in NEWER_UPSTREAM_MESSAGES:
            continue
        theirs_enum = triton_mc.DESCRIPTOR.pool.FindEnumTypeByName(ours_enum.full_name)
        theirs_values = {v.name: v.number for v in theirs_enum.values}
        for value in ours_enum.values:
            assert theirs_values.get(value.name) == value.number, value.full_name


def test_model_config_covers_tritonclient() -> None:
    """We also accept everything Triton 2.41 accepts, so existing config.pbtxt files parse."""
    for theirs in _walk_messages(triton_mc.DESCRIPTOR.message_types_by_name.values()):
        ours = _ours(theirs.full_name)
        ours_fields = {f.name for f in ours.fields}
        missing = {f.name for f in theirs.fields} - ours_fields
        assert not missing, (theirs.full_name, missing)


def test_data_type_enum_matches_triton() -> None:
    theirs = triton_mc.DESCRIPTOR.enum_types_by_name["DataType"]
    assert [(v.name, v.number) for v in proto.DATA_TYPE.values] == [
        (v.name, v.number) for v in theirs.values
    ]


# ------------------------------------------------------- wire round trips


def _infer_parameters(params: Any) -> None:
    params["flag"].bool_param = True
    params["neg"].int64_param = -(2**63)
    params["text"].string_param = "héllo"
    params["ratio"].double_param = 0.125
    params["big"].uint64_param = 2**64 - 1


def build_infer_request(ns: SimpleNamespace) -> Any:
    req = ns.svc.ModelInferRequest(model_name="clf", model_version="3", id="req-1")
    _infer_parameters(req.parameters)
    req.parameters["priority"].uint64_param = 2
    contents: list[tuple[str, str, list[int], dict[str, list[Any]]]] = [
        ("b", "BOOL", [2], {"bool_contents": [True, False]}),
        ("i8", "INT8", [3], {"int_contents": [-128, 0, 127]}),
        ("i32", "INT32", [1, 2], {"int_contents": [-(2**31), 2**31 - 1]}),
        ("i64", "INT64", [2], {"int64_contents": [-(2**63), 2**63 - 1]}),
        ("u16", "UINT16", [2], {"uint_contents": [0, 65535]}),
        ("u32", "UINT32", [1], {"uint_contents": [2**32 - 1]}),
        ("u64", "UINT64", [1], {"uint64_contents": [2**64 - 1]}),
        ("f32", "FP32", [2, 2], {"fp32_contents": [0.5, -1.25, 3.0, 1e-3]}),
        ("f64", "FP64", [2], {"fp64_contents": [1e300, -2.5]}),
        ("s", "BYTES", [2], {"bytes_contents": [b"ab\x00c", b""]}),
    ]
    for name, datatype, shape, data in contents:
        tensor = req.inputs.add(name=name, datatype=datatype, shape=shape)
        for field, values in data.items():
            getattr(tensor.contents, field).extend(values)
    req.inputs[0].parameters["binary_data_size"].int64_param = 2
    _infer_parameters(req.inputs[1].parameters)
    out = req.outputs.add(name="probs")
    out.parameters["classification"].int64_param = 3
    out.parameters["binary_data"].bool_param = True
    req.outputs.add(name="logits")
    return req


def build_raw_infer_request(ns: SimpleNamespace) -> Any:
    req = ns.svc.ModelInferRequest(model_name="clf")
    req.inputs.add(name="x", datatype="FP16", shape=[1, 4])
    req.inputs.add(name="y", datatype="BYTES", shape=[1])
    req.raw_input_contents.extend([bytes(range(8)), b"\x03\x00\x00\x00abc"])
    req.parameters["sequence_id"].uint64_param = 42
    req.parameters["sequence_start"].bool_param = True
    return req


def build_infer_response(ns: SimpleNamespace) -> Any:
    resp = ns.svc.ModelInferResponse(model_name="clf", model_version="3", id="req-1")
    _infer_parameters(resp.parameters)
    typed = resp.outputs.add(name="labels", datatype="BYTES", shape=[2])
    typed.contents.bytes_contents.extend([b"cat", b"dog"])
    typed.parameters["classification"].bool_param = True
    resp.outputs.add(name="raw", datatype="FP32", shape=[1, 2])
    resp.raw_output_contents.append(b"\x00\x00\x80?\x00\x00\x00@")
    return resp


def build_stream_response(ns: SimpleNamespace) -> Any:
    resp = ns.svc.ModelStreamInferResponse(error_message="partial failure")
    resp.infer_response.CopyFrom(build_infer_response(ns))
    resp.infer_response.parameters["triton_final_response"].bool_param = True
    return resp


def build_metadata_response(ns: SimpleNamespace) -> Any:
    resp = ns.svc.ModelMetadataResponse(name="clf", versions=["1", "3"], platform="onnxruntime")
    resp.inputs.add(name="x", datatype="FP32", shape=[-1, 4])
    resp.outputs.add(name="y", datatype="INT64", shape=[-1])
    resp.outputs.add(name="z", datatype="BYTES", shape=[-1, 1])
    return resp


def build_server_metadata(ns: SimpleNamespace) -> Any:
    return ns.svc.ServerMetadataResponse(
        name="tachyon", version="0.1.0", extensions=["statistics", "model_configuration"]
    )


def build_statistics_response(ns: SimpleNamespace) -> Any:
    resp = ns.svc.ModelStatisticsResponse()
    for i, name in enumerate(["clf", "det"]):
        stats = resp.model_stats.add(
            name=name,
            version=str(i + 1),
            last_inference=1_700_000_000_000 + i,
            inference_count=1000 + i,
            execution_count=100 + i,
        )
        inf = stats.inference_stats
        for j, field in enumerate(
            [
                "success",
                "fail",
                "queue",
                "compute_input",
                "compute_infer",
                "compute_output",
                "cache_hit",
                "cache_miss",
            ]
        ):
            getattr(inf, field).count = j + 1
            getattr(inf, field).ns = (j + 1) * 1_000_003
        for bs in (1, 8):
            batch = stats.batch_stats.add(batch_size=bs)
            batch.compute_input.count = bs
            batch.compute_input.ns = bs * 10
            batch.compute_infer.count = bs
            batch.compute_infer.ns = bs * 100
            batch.compute_output.count = bs
            batch.compute_output.ns = 2**64 - 1
        stats.memory_usage.add(type="GPU", id=0, byte_size=2**33)
        stats.memory_usage.add(type="CPU", id=-1, byte_size=12)
    return resp


def build_repository_index(ns: SimpleNamespace) -> Any:
    resp = ns.svc.RepositoryIndexResponse()
    resp.models.add(name="clf", version="1", state="READY")
    resp.models.add(name="broken", version="2", state="UNAVAILABLE", reason="load failed")
    resp.models.add(name="pending")
    return resp


def build_load_request(ns: SimpleNamespace) -> Any:
    req = ns.svc.RepositoryModelLoadRequest(repository_name="", model_name="clf")
    req.parameters["config"].string_param = '{"max_batch_size": 4}'
    req.parameters["file:1/model.onnx"].bytes_param = b"\x08\x07\x00\xff" * 16
    req.parameters["poll"].bool_param = False
    req.parameters["retries"].int64_param = -3
    return req


def build_unload_request(ns: SimpleNamespace) -> Any:
    req = ns.svc.RepositoryModelUnloadRequest(model_name="clf")
    req.parameters["unload_dependents"].bool_param = True
    return req


def build_shm_messages(ns: SimpleNamespace) -> list[Any]:
    status = ns.svc.SystemSharedMemoryStatusResponse()
    status.regions["in"].name = "in"
    status.regions["in"].key = "/tachyon_in"
    status.regions["in"].offset = 64
    status.regions["in"].byte_size = 4096
    cuda_status = ns.svc.CudaSharedMemoryStatusResponse()
    cuda_status.regions["g"].device_id = 1
    cuda_status.regions["g"].byte_size = 1 << 20
    return [
        ns.svc.SystemSharedMemoryRegisterRequest(name="in", key="/k", offset=8, byte_size=16),
        ns.svc.SystemSharedMemoryUnregisterRequest(name="in"),
        status,
        ns.svc.CudaSharedMemoryRegisterRequest(
            name="g", raw_handle=b"\x01" * 64, device_id=1, byte_size=1024
        ),
        cuda_status,
    ]


def build_trace_and_log(ns: SimpleNamespace) -> list[Any]:
    trace = ns.svc.TraceSettingRequest(model_name="clf")
    trace.settings["trace_level"].value.extend(["TIMESTAMPS", "TENSORS"])
    trace.settings["trace_rate"].value.append("1000")
    trace_resp = ns.svc.TraceSettingResponse()
    trace_resp.settings["trace_file"].value.append("/tmp/trace.json")
    log = ns.svc.LogSettingsRequest()
    log.settings["log_info"].bool_param = True
    log.settings["log_verbose_level"].uint32_param = 2
    log.settings["log_format"].string_param = "ISO8601"
    log_resp = ns.svc.LogSettingsResponse()
    log_resp.settings["log_file"].string_param = ""
    log_resp.settings["log_error"].bool_param = False
    return [trace, trace_resp, log, log_resp]


RICH_CONFIG = """
name: "clf"
platform: "onnxruntime_onnx"
backend: "onnxruntime"
version_policy { specific { versions: [ 1, 3 ] } }
max_batch_size: 32
input [
  {
    name: "x"
    data_type: TYPE_FP32
    format: FORMAT_NHWC
    dims: [ 224, 224, 3 ]
    reshape { shape: [ 1, 224, 224, 3 ] }
    allow_ragged_batch: true
  },
  { name: "mask" data_type: TYPE_BOOL dims: [ -1 ] optional: true },
  { name: "shape" data_type: TYPE_INT32 dims: [ 2 ] is_shape_tensor: true },
  { name: "text" data_type: TYPE_STRING dims: [ 1 ] }
]
output [
  { name: "probs" data_type: TYPE_FP32 dims: [ 1000 ] label_filename: "labels.txt" },
  { name: "emb" data_type: TYPE_FP16 dims: [ 128 ] reshape { shape: [ 1, 128 ] } },
  { name: "bf" data_type: TYPE_BF16 dims: [ 4 ] is_shape_tensor: false }
]
batch_input [
  { kind: BATCH_ACCUMULATED_ELEMENT_COUNT target_name: "acc" data_type: TYPE_INT32
    source_input: "text" }
]
batch_output [
  { target_name: "emb" kind: BATCH_SCATTER_WITH_INPUT_SHAPE source_input: "x" }
]
optimization {
  graph { level: 1 }
  priority: PRIORITY_MAX
  cuda { graphs: true busy_wait_events: true output_copy_stream: true
         graph_spec { batch_size: 4 input { key: "x" value { dim: [ 224, 224, 3 ] } }
                      graph_lower_bound { batch_size: 1
                                          input { key: "x" value { dim: [ 1, 1, 3 ] } } } } }
  execution_accelerators {
    gpu_execution_accelerator [
      { name: "tensorrt"
        parameters { key: "precision_mode" value: "FP16" }
        parameters { key: "max_workspace_size_bytes" value: "1073741824" } },
      { name: "cuda" }
    ]
    cpu_execution_accelerator [ { name: "openvino" } ]
  }
  input_pinned_memory { enable: false }
  output_pinned_memory { enable: true }
  gather_kernel_buffer_threshold: 8
  eager_batching: true
}
dynamic_batching {
  preferred_batch_size: [ 8, 16, 32 ]
  max_queue_delay_microseconds: 250
  preserve_ordering: true
  priority_levels: 3
  default_priority_level: 2
  default_queue_policy {
    timeout_action: DELAY
    default_timeout_microseconds: 100000
    allow_timeout_override: true
    max_queue_size: 64
  }
  priority_queue_policy { key: 1 value { timeout_action: REJECT max_queue_size: 8 } }
  priority_queue_policy { key: 3 value { default_timeout_microseconds: 18446744073709551615 } }
}
instance_group [
  { name: "gpu_group" kind: KIND_GPU count: 2 gpus: [ 0, 1 ] profile: [ "0" ]
    rate_limiter { resources [ { name: "R1" global: true count: 2 } ] priority: 2 }
    secondary_devices [ { kind: KIND_NVDLA device_id: 1 } ]
    host_policy: "gpu_0" },
  { kind: KIND_CPU count: 4 passive: true },
  { kind: KIND_MODEL }
]
default_model_filename: "model.onnx"
cc_model_filenames { key: "8.0" value: "model_a100.onnx" }
metric_tags { key: "team" value: "vision" }
parameters { key: "intra_op_thread_count" value { string_value: "4" } }
parameters { key: "enable_mem_arena" value { string_value: "0" } }
model_warmup [
  { name: "zeros" batch_size: 8 count: 2
    inputs { key: "x" value { data_type: TYPE_FP32 dims: [ 224, 224, 3 ] zero_data: true } }
    inputs { key: "mask" value { data_type: TYPE_BOOL dims: [ 5 ] random_data: true } }
    inputs { key: "text" value { data_type: TYPE_STRING dims: [ 1 ] input_data_file: "t.bin" } }
  }
]
model_operations { op_library_filename: "libcustom.so" }
model_transaction_policy { decoupled: true }
model_repository_agents { agents [ { name: "checksum" parameters { key: "k" value: "v" } } ] }
response_cache { enable: true }
"""

ENSEMBLE_CONFIG = """
name: "pipeline"
platform: "ensemble"
max_batch_size: 8
input [ { name: "raw" data_type: TYPE_UINT8 dims: [ -1 ] } ]
output [ { name: "label" data_type: TYPE_STRING dims: [ 1 ] } ]
ensemble_scheduling {
  step [
    { model_name: "preprocess" model_version: -1
      input_map { key: "in" value: "raw" } output_map { key: "out" value: "tensor" } },
    { model_name: "clf" model_version: 3 model_namespace: ""
      input_map { key: "x" value: "tensor" } output_map { key: "labels" value: "label" } }
  ]
}
version_policy { all { } }
"""

SEQUENCE_CONFIG = """
name: "stateful"
backend: "python"
max_batch_size: 4
sequence_batching {
  max_sequence_idle_microseconds: 5000000
  oldest { max_candidate_sequences: 4 preferred_batch_size: [ 2, 4 ]
           max_queue_delay_microseconds: 10 preserve_ordering: true }
  control_input [
    { name: "START" control [ { kind: CONTROL_SEQUENCE_START int32_false_true: [ 0, 1 ] } ] },
    { name: "CORRID" control [ { kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_UINT64 } ] },
    { name: "READY" control [ { kind: CONTROL_SEQUENCE_READY fp32_false_true: [ 0, 1 ] } ] },
    { name: "END" control [ { kind: CONTROL_SEQUENCE_END bool_false_true: [ false, true ] } ] }
  ]
  state [
    { input_name: "S_IN" output_name: "S_OUT" data_type: TYPE_FP32 dims: [ 4 ]
      initial_state [ { name: "init" data_type: TYPE_FP32 dims: [ 4 ] zero_data: true } ]
      use_same_buffer_for_input_output: true use_growable_memory: true }
  ]
  iterative_sequence: true
}
version_policy { latest { num_versions: 2 } }
"""


def build_config_responses(ns: SimpleNamespace) -> list[Any]:
    out = []
    for pbtxt in (RICH_CONFIG, ENSEMBLE_CONFIG, SEQUENCE_CONFIG):
        resp = ns.svc.ModelConfigResponse()
        text_format.Parse(pbtxt, resp.config)
        out.append(resp)
    # One built field by field too.
    resp = ns.svc.ModelConfigResponse()
    cfg = resp.config
    cfg.name = "direct"
    cfg.max_batch_size = 2
    cfg.input.add(name="x", data_type=ns.mc.TYPE_INT64, dims=[3])
    cfg.output.add(name="y", data_type=ns.mc.TYPE_FP64, dims=[-1])
    cfg.dynamic_batching.SetInParent()
    cfg.instance_group.add(kind=ns.mc.ModelInstanceGroup.KIND_AUTO, count=1)
    cfg.version_policy.latest.num_versions = 1
    cfg.sequence_batching.direct.minimum_slot_utilization = 0.5  # switches the oneof
    out.append(resp)
    return out


def _single(builder: Callable[[SimpleNamespace], Any]) -> Callable[[SimpleNamespace], list[Any]]:
    return lambda ns: [builder(ns)]


BUILDERS: dict[str, Callable[[SimpleNamespace], list[Any]]] = {
    "infer_request": _single(build_infer_request),
    "raw_infer_request": _single(build_raw_infer_request),
    "infer_response": _single(build_infer_response),
    "stream_response": _single(build_stream_response),
    "model_metadata": _single(build_metadata_response),
    "server_metadata": _single(build_server_metadata),
    "statistics": _single(build_statistics_response),
    "repository_index": _single(build_repository_index),
    "load_request": _single(build_load_request),
    "unload_request": _single(build_unload_request),
    "model_config": build_config_responses,
    "shared_memory": build_shm_messages,
    "trace_and_log": build_trace_and_log,
}


def _module_class(module: ModuleType | Any, full_name: str) -> Any:
    return getattr(module, full_name.removeprefix("inference."))


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_triton_to_ours_and_back(kind: str) -> None:
    for theirs in BUILDERS[kind](TRITON):
        assert theirs.ByteSize() > 0
        wire = theirs.SerializeToString()
        ours = proto.message_class(theirs.DESCRIPTOR.full_name).FromString(wire)
        assert ours.DESCRIPTOR.file.pool is proto.POOL
        _assert_same_content(ours, theirs)
        back = type(theirs).FromString(ours.SerializeToString())
        assert back == theirs
        _assert_same_content(back, ours)


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_ours_to_triton_and_back(kind: str) -> None:
    built_ours = BUILDERS[kind](OURS)
    built_theirs = BUILDERS[kind](TRITON)
    for ours, reference in zip(built_ours, built_theirs, strict=True):
        assert ours.DESCRIPTOR.file.pool is proto.POOL
        theirs_cls = type(reference)
        theirs = theirs_cls.FromString(ours.SerializeToString())
        # Built independently with each library, the messages are identical.
        assert theirs == reference
        _assert_same_content(ours, theirs)
        back = type(ours).FromString(theirs.SerializeToString())
        assert back == ours


def test_newer_upstream_fields_round_trip() -> None:
    """Fields newer than tritonclient 2.41 survive a trip through it as unknown fields."""
    stats = proto.ModelStatistics(name="m")
    stats.response_stats["0"].success.count = 3
    stats.response_stats["0"].cancel.ns = 7
    cfg = proto.ModelConfig(name="m", runtime="model.py")
    cfg.ensemble_scheduling.max_inflight_responses = 4
    cfg.input.add(name="x", is_non_linear_format_io=True)
    cfg.model_metrics.metric_control.add().histogram_options.buckets.extend([0.1, 1.0])
    for msg in (stats, cfg):
        theirs = _module_class(
            triton_svc if msg.DESCRIPTOR.file.name == "inference.proto" else triton_mc,
            msg.DESCRIPTOR.full_name,
        ).FromString(msg.SerializeToString())
        back = type(msg).FromString(theirs.SerializeToString())
        assert back == msg
