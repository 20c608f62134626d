"""Protocol buffer classes for the Tachyon gRPC API and model configuration.

The schema lives in ``protos/inference.proto`` and ``protos/model_config.proto``
and is compiled by ``protos/generate.py`` into the checked-in binary descriptor
set ``server/_proto/tachyon.desc``. This module loads that set into a *private*
:class:`~google.protobuf.descriptor_pool.DescriptorPool` and builds the message
classes from it at import time; no generated ``*_pb2`` modules are involved.

A private pool is required because the schema reuses Triton's package and
message names (``inference.ModelInferRequest`` ...) for wire compatibility, and
``tritonclient``'s generated modules register those same names in protobuf's
default pool. Both can be imported in one process without conflict.

Usage::

    from server import proto

    req = proto.ModelInferRequest(model_name="resnet")
    tensor = req.inputs.add()          # a proto.ModelInferRequest.InferInputTensor
    cfg = text_format.Parse(pbtxt, proto.ModelConfig())
    proto.DataType.Name(cfg.input[0].data_type)   # "TYPE_FP32"
    request_cls, response_cls, client_stream, server_stream = proto.METHODS["ModelInfer"]

Message classes are typed as ``type[Any]``: their fields are only known at run
time, so static checkers cannot describe them more precisely.
"""

from __future__ import annotations

from importlib import resources
from typing import Any, Final, TypeAlias

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import (
    Descriptor,
    EnumDescriptor,
    FileDescriptor,
    ServiceDescriptor,
)
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

MessageClass: TypeAlias = type[Any]
"""The (dynamic) type of every message class exposed here."""

PACKAGE: Final = "inference"
SERVICE_NAME: Final = "inference.GRPCInferenceService"
DESCRIPTOR_SET_RESOURCE: Final = "_proto/tachyon.desc"
"""Location of the compiled descriptor set, relative to the ``server`` package."""


def _read_descriptor_set() -> descriptor_pb2.FileDescriptorSet:
    package = __package__ or "server"
    resource = resources.files(package)
    for part in DESCRIPTOR_SET_RESOURCE.split("/"):
        resource = resource / part
    return descriptor_pb2.FileDescriptorSet.FromString(resource.read_bytes())


def _build_pool() -> tuple[descriptor_pool.DescriptorPool, tuple[FileDescriptor, ...]]:
    pool = descriptor_pool.DescriptorPool()
    files: list[FileDescriptor] = []
    # protoc writes the set in dependency order, so each file's imports are
    # already in the pool when it is added.
    for file_proto in _read_descriptor_set().file:
        files.append(pool.AddSerializedFile(file_proto.SerializeToString()))
    return pool, tuple(files)


_POOL_AND_FILES = _build_pool()
POOL: Final[descriptor_pool.DescriptorPool] = _POOL_AND_FILES[0]
"""Private descriptor pool holding ``model_config.proto`` and ``inference.proto``."""
FILES: Final[tuple[FileDescriptor, ...]] = _POOL_AND_FILES[1]
"""The loaded file descriptors, dependencies first."""
del _POOL_AND_FILES

_BY_FULL_NAME: dict[str, MessageClass] = {}
_TOP_LEVEL: dict[str, Any] = {}


def _register(desc: Descriptor) -> MessageClass:
    cls: MessageClass = message_factory.GetMessageClass(desc)
    _BY_FULL_NAME[desc.full_name] = cls
    for nested in desc.nested_types:
        nested_cls = _register(nested)
        # The upb backend exposes nested classes on their parent by itself; the
        # pure-Python backend does not, so make it uniform.
        if getattr(cls, nested.name, None) is not nested_cls:
            setattr(cls, nested.name, nested_cls)
    return cls


def _index() -> None:
    for file in FILES:
        for name, desc in file.message_types_by_name.items():
            _TOP_LEVEL[name] = _register(desc)
        for name, enum in file.enum_types_by_name.items():
            _TOP_LEVEL[name] = EnumTypeWrapper(enum)
            for value in enum.values:
                _TOP_LEVEL[value.name] = value.number


_index()


def message_class(full_name: str) -> MessageClass:
    """Return the class for a message by full name, e.g. ``"inference.ModelConfig"``.

    Nested messages are addressed with dots
    (``"inference.ModelInferRequest.InferInputTensor"``). Raises ``KeyError``.
    """
    return _BY_FULL_NAME[full_name]


def _top(name: str) -> MessageClass:
    cls: MessageClass = _TOP_LEVEL[name]
    return cls


# --------------------------------------------------------------- service

SERVICE: Final[ServiceDescriptor] = POOL.FindServiceByName(SERVICE_NAME)

METHODS: Final[dict[str, tuple[MessageClass, MessageClass, bool, bool]]] = {
    method.name: (
        _BY_FULL_NAME[method.input_type.full_name],
        _BY_FULL_NAME[method.output_type.full_name],
        bool(method.client_streaming),
        bool(method.server_streaming),
    )
    for method in SERVICE.methods
}
"""RPC name -> (request class, response class, client_streaming, server_streaming)."""


def full_method_name(rpc: str) -> str:
    """The gRPC path of an RPC, e.g. ``"/inference.GRPCInferenceService/ModelInfer"``."""
    if rpc not in METHODS:
        raise KeyError(rpc)
    return f"/{SERVICE_NAME}/{rpc}"


# ----------------------------------------------------------------- enums

DATA_TYPE: Final[EnumDescriptor] = POOL.FindEnumTypeByName("inference.DataType")
DataType: Final[EnumTypeWrapper] = _TOP_LEVEL["DataType"]
"""``DataType.Name(11) == "TYPE_FP32"``, ``DataType.Value("TYPE_FP32") == 11``."""

# ------------------------------------------------------ inference.proto

ServerLiveRequest: MessageClass = _top("ServerLiveRequest")
ServerLiveResponse: MessageClass = _top("ServerLiveResponse")
ServerReadyRequest: MessageClass = _top("ServerReadyRequest")
ServerReadyResponse: MessageClass = _top("ServerReadyResponse")
ModelReadyRequest: MessageClass = _top("ModelReadyRequest")
ModelReadyResponse: MessageClass = _top("ModelReadyResponse")
ServerMetadataRequest: MessageClass = _top("ServerMetadataRequest")
ServerMetadataResponse: MessageClass = _top("ServerMetadataResponse")
ModelMetadataRequest: MessageClass = _top("ModelMetadataRequest")
ModelMetadataResponse: MessageClass = _top("ModelMetadataResponse")
InferParameter: MessageClass = _top("InferParameter")
InferTensorContents: MessageClass = _top("InferTensorContents")
ModelInferRequest: MessageClass = _top("ModelInferRequest")
ModelInferResponse: MessageClass = _top("ModelInferResponse")
ModelStreamInferResponse: MessageClass = _top("ModelStreamInferResponse")
ModelConfigRequest: MessageClass = _top("ModelConfigRequest")
ModelConfigResponse: MessageClass = _top("ModelConfigResponse")
ModelStatisticsRequest: MessageClass = _top("ModelStatisticsRequest")
StatisticDuration: MessageClass = _top("StatisticDuration")
InferStatistics: MessageClass = _top("InferStatistics")
InferResponseStatistics: MessageClass = _top("InferResponseStatistics")
InferBatchStatistics: MessageClass = _top("InferBatchStatistics")
MemoryUsage: MessageClass = _top("MemoryUsage")
ModelStatistics: MessageClass = _top("ModelStatistics")
ModelStatisticsResponse: MessageClass = _top("ModelStatisticsResponse")
ModelRepositoryParameter: MessageClass = _top("ModelRepositoryParameter")
RepositoryIndexRequest: MessageClass = _top("RepositoryIndexRequest")
RepositoryIndexResponse: MessageClass = _top("RepositoryIndexResponse")
RepositoryModelLoadRequest: MessageClass = _top("RepositoryModelLoadRequest")
RepositoryModelLoadResponse: MessageClass = _top("RepositoryModelLoadResponse")
RepositoryModelUnloadRequest: MessageClass = _top("RepositoryModelUnloadRequest")
RepositoryModelUnloadResponse: MessageClass = _top("RepositoryModelUnloadResponse")
SystemSharedMemoryStatusRequest: MessageClass = _top("SystemSharedMemoryStatusRequest")
SystemSharedMemoryStatusResponse: MessageClass = _top("SystemSharedMemoryStatusResponse")
SystemSharedMemoryRegisterRequest: MessageClass = _top("SystemSharedMemoryRegisterRequest")
SystemSharedMemoryRegisterResponse: MessageClass = _top("SystemSharedMemoryRegisterResponse")
SystemSharedMemoryUnregisterRequest: MessageClass = _top("SystemSharedMemoryUnregisterRequest")
SystemSharedMemoryUnregisterResponse: MessageClass = _top("SystemSharedMemoryUnregisterResponse")
CudaSharedMemoryStatusRequest: MessageClass = _top("CudaSharedMemoryStatusRequest")
CudaSharedMemoryStatusResponse: MessageClass = _top("CudaSharedMemoryStatusResponse")
CudaSharedMemoryRegisterRequest: MessageClass = _top("CudaSharedMemoryRegisterRequest")
CudaSharedMemoryRegisterResponse: MessageClass = _top("CudaSharedMemoryRegisterResponse")
CudaSharedMemoryUnregisterRequest: MessageClass = _top("CudaSharedMemoryUnregisterRequest")
CudaSharedMemoryUnregisterResponse: MessageClass = _top("CudaSharedMemoryUnregisterResponse")
TraceSettingRequest: MessageClass = _top("TraceSettingRequest")
TraceSettingResponse: MessageClass = _top("TraceSettingResponse")
LogSettingsRequest: MessageClass = _top("LogSettingsRequest")
LogSettingsResponse: MessageClass = _top("LogSettingsResponse")

# --------------------------------------------------- model_config.proto

ModelConfig: MessageClass = _top("ModelConfig")
ModelInput: MessageClass = _top("ModelInput")
ModelOutput: MessageClass = _top("ModelOutput")
ModelTensorReshape: MessageClass = _top("ModelTensorReshape")
ModelInstanceGroup: MessageClass = _top("ModelInstanceGroup")
ModelVersionPolicy: MessageClass = _top("ModelVersionPolicy")
ModelOptimizationPolicy: MessageClass = _top("ModelOptimizationPolicy")
ModelQueuePolicy: MessageClass = _top("ModelQueuePolicy")
ModelDynamicBatching: MessageClass = _top("ModelDynamicBatching")
ModelSequenceBatching: MessageClass = _top("ModelSequenceBatching")
ModelEnsembling: MessageClass = _top("ModelEnsembling")
ModelParameter: MessageClass = _top("ModelParameter")
ModelWarmup: MessageClass = _top("ModelWarmup")
ModelTransactionPolicy: MessageClass = _top("ModelTransactionPolicy")
ModelRateLimiter: MessageClass = _top("ModelRateLimiter")
ModelResponseCache: MessageClass = _top("ModelResponseCache")
BatchInput: MessageClass = _top("BatchInput")
BatchOutput: MessageClass = _top("BatchOutput")


def __getattr__(name: str) -> Any:
    """Any other top-level message class, enum wrapper or enum value in the schema."""
    try:
        return _TOP_LEVEL[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_TOP_LEVEL))


__all__ = [
    "DATA_TYPE",
    "DESCRIPTOR_SET_RESOURCE",
    "FILES",
    "METHODS",
    "PACKAGE",
    "POOL",
    "SERVICE",
    "SERVICE_NAME",
    "DataType",
    "MessageClass",
    "full_method_name",
    "message_class",
    *sorted(_TOP_LEVEL),
]
