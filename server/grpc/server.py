"""gRPC transport: converts protobuf messages to the core's types and back, maps errors.

Handlers are registered through a generic handler built from our own descriptors (no generated
service stubs), so every RPC of the service exists: the ones not built yet answer
UNIMPLEMENTED with a message.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from server import proto, shared_memory, tracing
from server.config import GrpcConnections
from server.dataplane import DataPlane
from server.errors import Code, ServingError, invalid
from server.grpc._wire import bytes_field, split_bytes_field
from server.grpc.health import HEALTH_SERVICE, REFLECTION_SERVICES, HealthService, ReflectionService
from server.grpc.restricted import RestrictedProtocolInterceptor
from server.restricted import Restrictions
from server.statistics import Duration, ModelStats
from server.tensors import check_shape, from_contents, from_raw, raw_view, to_raw
from server.tls import TlsSettings, grpc_credentials
from server.types import (
    DataType,
    InferInput,
    InferRequest,
    InferResponse,
    RequestedOutput,
    SharedMemoryRef,
)

log = logging.getLogger(__name__)

STATUS = {
    Code.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    Code.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Code.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Code.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Code.UNIMPLEMENTED: grpc.StatusCode.UNIMPLEMENTED,
    Code.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    Code.CANCELLED: grpc.StatusCode.CANCELLED,
    Code.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    Code.INTERNAL: grpc.StatusCode.INTERNAL,
}

Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


def _parameters(params: Any) -> dict[str, bool | int | float | str]:
    out: dict[str, bool | int | float | str] = {}
    for key, value in params.items():
        kind = value.WhichOneof("parameter_choice")
        if kind is not None:
            out[key] = getattr(value, kind)
    return out


def _set_parameters(target: Any, params: dict[str, bool | int | float | str]) -> None:
    for key, value in params.items():
        if isinstance(value, bool):
            target[key].bool_param = value
        elif isinstance(value, int):
            target[key].int64_param = value
        elif isinstance(value, float):
            target[key].double_param = value
        else:
            target[key].string_param = str(value)


def parse_infer_request(data: bytes) -> Any:
    try:
        return proto.ModelInferRequest.FromString(data)
    except Exception as exc:  # upb's DecodeError
        raise invalid(f"ModelInferRequest does not parse: {exc}") from None


_DATATYPES = {d.value: d for d in DataType}


LARGE_MESSAGE_BYTES = 1 << 20
"""Above this, ModelInfer's tensors bypass upb's copies (see server/grpc/_wire.py)."""
RAW_INPUT_CONTENTS = 7  # ModelInferRequest.raw_input_contents
RAW_OUTPUT_CONTENTS = 6  # ModelInferResponse.raw_output_contents


def decode_infer_bytes(data: bytes) -> InferRequest:
    """A serialized ModelInferRequest as the core's request; a large one's raw tensors are
    views of `data`, never copied."""
    if len(data) < LARGE_MESSAGE_BYTES:
        return decode_infer_request(parse_infer_request(data))
    rest, raw = split_bytes_field(data, RAW_INPUT_CONTENTS, "ModelInferRequest")
    return decode_infer_request(parse_infer_request(rest), raw)


def decode_infer_request(
    message: Any, raw_contents: list[memoryview] | None = None
) -> InferRequest:
    raw = message.raw_input_contents if raw_contents is None else raw_contents
    refs = [_shared_memory(tensor, "input") for tensor in message.inputs]
    if raw:
        for tensor in message.inputs:
            if tensor.HasField("contents"):  # Triton's words for it
                raise invalid(
                    f"contents field must not be specified when using raw_input_contents for "
                    f"'{tensor.name}' for model '{message.model_name}'"
                )
    in_memory = len(refs) - refs.count(None)  # inputs in shared memory have no raw entry
    if raw and len(raw) != len(message.inputs) - in_memory:
        raise invalid(
            f"raw_input_contents has {len(raw)} entries, expected "
            f"{len(message.inputs) - in_memory} (one per input not in shared memory)"
        )
    inputs = []
    index = 0
    for tensor, ref in zip(message.inputs, refs, strict=True):
        datatype = _DATATYPES.get(tensor.datatype)
        if datatype is None:
            raise invalid(
                f"input '{tensor.name}': unknown datatype '{tensor.datatype}', expected one of "
                f"{', '.join(_DATATYPES)}"
            )
        shape = check_shape(tensor.name, tensor.shape)
        if ref is not None:
            if tensor.HasField("contents"):
                raise invalid(
                    f"input '{tensor.name}': 'contents' given for an input in shared memory "
                    f"region '{ref.region}', expected one or the other"
                )
            inputs.append(shared_memory.shared_input(tensor.name, datatype, shape, ref))
            continue
        if raw:
            data = from_raw(tensor.name, datatype, shape, raw[index])
            index += 1
        else:
            data = from_contents(tensor.name, datatype, shape, tensor.contents)
        inputs.append(InferInput(tensor.name, datatype, shape, data))
    return InferRequest(
        model_name=message.model_name,
        model_version=message.model_version,
        inputs=inputs,
        outputs=[_requested_output(o) for o in message.outputs],
        id=message.id,
        parameters=_parameters(message.parameters),
    )


def _shared_memory(tensor: Any, kind: str) -> SharedMemoryRef | None:
    """The shared memory region a tensor's parameters name (None for most tensors)."""
    if not tensor.parameters:
        return None
    return shared_memory.tensor_ref(f"{kind} '{tensor.name}'", _parameters(tensor.parameters))


def _requested_output(output: Any) -> RequestedOutput:
    """A requested output; parameters["classification"] = N asks for the top N classes
    (Triton's classification extension); shared_memory_* parameters put it in a region."""
    ref = _shared_memory(output, "output")
    if "classification" not in output.parameters:
        return RequestedOutput(output.name, shared_memory=ref)
    value = output.parameters["classification"]
    kind = value.WhichOneof("parameter_choice")
    count = getattr(value, kind) if kind is not None else None
    if kind not in ("int64_param", "uint64_param") or not isinstance(count, int) or count < 1:
        raise invalid(
            f"output '{output.name}': parameter 'classification' is {count!r}, expected a "
            "positive integer (int64_param): the number of top classes to return"
        )
    return RequestedOutput(output.name, class_count=count, shared_memory=ref)


def serialize_infer_response(response: InferResponse) -> bytes:
    """ModelInferResponse's bytes; large outputs are joined in once, not copied three times
    (tobytes, the message, its serialization)."""
    size = sum(o.data.nbytes for o in response.outputs if o.datatype is not DataType.BYTES)
    if size < LARGE_MESSAGE_BYTES:
        serialized: bytes = encode_infer_response(response).SerializeToString()
        return serialized
    message = encode_infer_response(response, with_raw=False)
    parts: list[memoryview | bytes] = [message.SerializeToString()]
    for output in response.outputs:
        parts += bytes_field(RAW_OUTPUT_CONTENTS, raw_view(output.datatype, output.data))
    return b"".join(parts)


def encode_infer_response(response: InferResponse, with_raw: bool = True) -> Any:
    message = proto.ModelInferResponse(
        model_name=response.model_name, model_version=response.model_version, id=response.id
    )
    raw = []
    for output in response.outputs:
        tensor = message.outputs.add()
        tensor.name = output.name
        tensor.datatype = output.datatype.value
        tensor.shape.extend(output.shape)
        if with_raw:
            raw.append(to_raw(output.datatype, output.data))
    message.raw_output_contents.extend(raw)
    return message


def _duration(target: Any, source: Duration) -> None:
    target.count = source.count
    target.ns = source.ns


def encode_statistics(name: str, version: int, stats: ModelStats) -> Any:
    message = proto.ModelStatistics(
        name=name,
        version=str(version),
        last_inference=stats.last_inference_ms,
        inference_count=stats.inference_count,
        execution_count=stats.execution_count,
    )
    infer = message.inference_stats
    for field in (
        "success", "fail", "queue", "compute_input", "compute_infer", "compute_output",
        "cache_hit", "cache_miss",
    ):
        _duration(getattr(infer, field), getattr(stats, field))
    for size in sorted(stats.batches):
        batch = stats.batches[size]
        entry = message.batch_stats.add()
        entry.batch_size = size
        _duration(entry.compute_input, batch.compute_input)
        _duration(entry.compute_infer, batch.compute_infer)
        _duration(entry.compute_output, batch.compute_output)
    return message


class GrpcService:
    """The RPCs of inference.GRPCInferenceService, over the data plane."""

    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane

    async def ServerLive(self, request: Any, context: Any) -> Any:
        return proto.ServerLiveResponse(live=self.dataplane.live())

    async def ServerReady(self, request: Any, context: Any) -> Any:
        return proto.ServerReadyResponse(ready=self.dataplane.ready())

    async def ModelReady(self, request: Any, context: Any) -> Any:
        return proto.ModelReadyResponse(
            ready=self.dataplane.model_ready(request.name, request.version)
        )

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        name, version, extensions = self.dataplane.server_metadata()
        return proto.ServerMetadataResponse(name=name, version=version, extensions=extensions)

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        meta = self.dataplane.model_metadata(request.name, request.version)
        message = proto.ModelMetadataResponse(
            name=meta.name, versions=meta.versions, platform=meta.platform
        )
        for target, tensors in ((message.inputs, meta.inputs), (message.outputs, meta.outputs)):
            for t in tensors:
                target.add(name=t.name, datatype=t.datatype, shape=t.shape)
        return message

    async def ModelInfer(self, request: bytes, context: Any) -> bytes:
        """The hot path: raw bytes in and out, parsed and serialized here (upb) rather than
        by grpc's generic (de)serializer callbacks."""
        if self.dataplane.tracer is not None:
            return await self._traced_infer(request, context)
        response = await self.dataplane.infer(decode_infer_bytes(request))
        return serialize_infer_response(response)

    async def _traced_infer(self, request: bytes, context: Any) -> bytes:
        """ModelInfer with a trace when the request is sampled or carries a traceparent (the
        native front end passes no context, so its calls are sampled by rate only)."""
        assert self.dataplane.tracer is not None
        trace = self.dataplane.tracer.start("grpc", *tracing.grpc_traceparent(context))
        infer_request = decode_infer_bytes(request)
        if trace is None:
            return serialize_infer_response(await self.dataplane.infer(infer_request))
        infer_request.trace = trace
        trace.received()
        response = await self.dataplane.infer(infer_request)
        trace.responding()
        message = serialize_infer_response(response)
        trace.finish(response.model_name, response.model_version, response.id)
        return message

    async def ModelConfig(self, request: Any, context: Any) -> Any:
        config = self.dataplane.model_config(request.name, request.version)
        message = proto.ModelConfigResponse()
        message.config.CopyFrom(config)
        return message

    async def ModelStatistics(self, request: Any, context: Any) -> Any:
        message = proto.ModelStatisticsResponse()
        for name, version, stats in self.dataplane.statistics(request.name, request.version):
            message.model_stats.append(encode_statistics(name, version, stats))
        return message

    async def RepositoryIndex(self, request: Any, context: Any) -> Any:
        message = proto.RepositoryIndexResponse()
        for entry in await self.dataplane.repository_index(request.ready):
            message.models.add(
                name=entry.name, version=entry.version, state=entry.state, reason=entry.reason
            )
        return message

    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:
        config_json = None
        files: dict[str, bytes] = {}
        for key, value in request.parameters.items():
            kind = value.WhichOneof("parameter_choice")
            if key == "config":
                raw = value.string_param if kind == "string_param" else value.bytes_param
                config_json = raw if isinstance(raw, str) else raw.decode()
            elif key.startswith("file:"):
                files[key[5:]] = value.bytes_param
            else:
                raise invalid(f"RepositoryModelLoad: unknown parameter '{key}', expected "
                              "'config' or 'file:<version>/<name>'")
        await self.dataplane.load_model(request.model_name, config_json, files or None)
        return proto.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:
        await self.dataplane.unload_model(request.model_name)
        return proto.RepositoryModelUnloadResponse()

    async def SystemSharedMemoryStatus(self, request: Any, context: Any) -> Any:
        message = proto.SystemSharedMemoryStatusResponse()
        for region in self.dataplane.shared_memory.status(request.name):
            message.regions[region.name].CopyFrom(
                proto.SystemSharedMemoryStatusResponse.RegionStatus(
                    name=region.name, key=region.key, offset=region.offset,
                    byte_size=region.byte_size,
                )
            )
        return message

    async def SystemSharedMemoryRegister(self, request: Any, context: Any) -> Any:
        self.dataplane.shared_memory.register(
            request.name, request.key, request.offset, request.byte_size
        )
        return proto.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryUnregister(self, request: Any, context: Any) -> Any:
        self.dataplane.shared_memory.unregister(request.name)
        return proto.SystemSharedMemoryUnregisterResponse()

    async def CudaSharedMemoryStatus(self, request: Any, context: Any) -> Any:
        shared_memory.cuda_status(request.name)  # none exist: empty, or NOT_FOUND by name
        return proto.CudaSharedMemoryStatusResponse()

    async def CudaSharedMemoryUnregister(self, request: Any, context: Any) -> Any:
        return proto.CudaSharedMemoryUnregisterResponse()  # none exist (perf_analyzer asks)

    async def stream_answer(self, message: Any) -> Any:
        """The ModelStreamInferResponse to one request of a stream: the inference result, or
        its error in `error_message` (with the request's id), as in Triton."""
        try:
            response = encode_infer_response(
                await self.dataplane.infer(decode_infer_request(message))
            )
        except ServingError as exc:
            error = proto.ModelStreamInferResponse(error_message=exc.message)
            error.infer_response.id = message.id
            return error
        return proto.ModelStreamInferResponse(infer_response=response)

    async def ModelStreamInfer(
        self, requests: AsyncIterator[Any], context: Any
    ) -> AsyncIterator[Any]:
        """Each request is answered as soon as it completes (not necessarily in order); an
        error travels in `error_message` and the stream goes on, as in Triton."""
        answers: asyncio.Queue[Any] = asyncio.Queue()
        pending: set[asyncio.Task[None]] = set()

        async def answer(message: Any) -> None:
            await answers.put(await self.stream_answer(message))

        async def read() -> None:
            async for message in requests:
                task = asyncio.create_task(answer(message))
                pending.add(task)
                task.add_done_callback(pending.discard)
            await asyncio.gather(*list(pending))
            await answers.put(None)

        reader = asyncio.create_task(read())
        try:
            while (item := await answers.get()) is not None:
                yield item
        finally:
            reader.cancel()


UNIMPLEMENTED = {
    "CudaSharedMemoryRegister": shared_memory.CUDA_UNSUPPORTED,
    "TraceSetting": "tracing is not supported yet",
    "LogSettings": "log settings over gRPC are not supported yet",
}


def _unary(method: Handler) -> Handler:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(request, context)
        except ServingError as exc:
            await context.abort(STATUS[exc.code], exc.message)
        except Exception as exc:
            log.exception("gRPC %s failed", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {exc}")

    return call


def _unimplemented(name: str, why: str) -> Handler:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{name}: {why}")

    return call


def generic_handler(service: GrpcService) -> grpc.GenericRpcHandler:
    handlers = {}
    for name, (request_type, response_type, client_stream, server_stream) in proto.METHODS.items():
        serializer = response_type.SerializeToString
        deserializer = request_type.FromString
        if client_stream and server_stream:
            handlers[name] = grpc.stream_stream_rpc_method_handler(
                getattr(service, name), request_deserializer=deserializer,
                response_serializer=serializer,
            )
            continue
        method = getattr(service, name, None)
        call = _unary(method) if method is not None else _unimplemented(name, UNIMPLEMENTED[name])
        if name == "ModelInfer":  # raw bytes: ModelInfer parses and serializes itself
            handlers[name] = grpc.unary_unary_rpc_method_handler(call)
            continue
        handlers[name] = grpc.unary_unary_rpc_method_handler(
            call, request_deserializer=deserializer, response_serializer=serializer
        )
    return grpc.method_handlers_generic_handler(proto.SERVICE_NAME, handlers)


def health_handlers(
    health: HealthService, reflection: ReflectionService
) -> list[grpc.GenericRpcHandler]:
    """grpc.health.v1.Health and server reflection (v1alpha and v1: the same messages)."""
    check = grpc.unary_unary_rpc_method_handler(
        _unary(health.Check),
        request_deserializer=health_pb2.HealthCheckRequest.FromString,
        response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
    )
    watch = grpc.unary_stream_rpc_method_handler(
        health.Watch,
        request_deserializer=health_pb2.HealthCheckRequest.FromString,
        response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
    )
    methods = {"Check": check, "Watch": watch}
    handlers = [grpc.method_handlers_generic_handler(HEALTH_SERVICE, methods)]
    info = grpc.stream_stream_rpc_method_handler(
        reflection.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    for name in REFLECTION_SERVICES:
        handlers.append(
            grpc.method_handlers_generic_handler(name, {"ServerReflectionInfo": info})
        )
    return handlers


async def start(
    dataplane: DataPlane,
    host: str,
    port: int,
    max_message: int,
    health: HealthService,
    *,
    tls_settings: TlsSettings | None = None,
    restrictions: Restrictions | None = None,
    connections: GrpcConnections | None = None,
) -> grpc.aio.Server:
    """Serves on host:port, over TLS with `tls_settings`; with `restrictions`, calls to a
    restricted group without its header are refused (server/grpc/restricted.py);
    `connections`: reuse-port, connection limit and keepalive as grpc-core channel arguments."""
    options = [
        ("grpc.max_receive_message_length", max_message),
        ("grpc.max_send_message_length", max_message),
        *(connections or GrpcConnections()).grpc_options(),
    ]
    interceptors = [RestrictedProtocolInterceptor(restrictions)] if restrictions else []
    server = grpc.aio.server(options=options, interceptors=interceptors)
    server.add_generic_rpc_handlers((generic_handler(GrpcService(dataplane)),))
    server.add_generic_rpc_handlers(tuple(health_handlers(health, ReflectionService())))
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if tls_settings is None:
        bound = server.add_insecure_port(address)
    else:
        bound = server.add_secure_port(address, grpc_credentials(tls_settings))
    if bound == 0:
        raise OSError(f"cannot bind gRPC to {address}")
    await server.start()
    log.info("gRPC listening on %s%s", address, "" if tls_settings is None else " (TLS)")
    return server
