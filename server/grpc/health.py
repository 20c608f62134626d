"""The standard gRPC health (`grpc.health.v1.Health`) and reflection services, for both
transports.

Health follows readiness: SERVING while the server is ready (`DataPlane.ready()`, Triton's
strict readiness), NOT_SERVING otherwise and from the moment shutdown starts, so Kubernetes
gRPC probes and `grpc_health_probe` see what `/v2/health/ready` says. The services known by
name are "" (the server as a whole), the inference service and the health service itself; any
other name is NOT_FOUND for Check and SERVICE_UNKNOWN for Watch, as the protocol asks.

Reflection (`grpc.reflection.v1alpha` and `v1`, whose messages are the same on the wire) lets
`grpcurl` and other tools list the services and fetch their descriptors without .proto files.
The descriptors come from a pool that holds our own inference.proto and model_config.proto plus
the health and reflection protos.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.reflection import ReflectionServicer

from server import proto
from server.dataplane import DataPlane
from server.errors import not_found

HEALTH_SERVICE = "grpc.health.v1.Health"
REFLECTION_SERVICES = (
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN

WATCH_INTERVAL_S = 0.2
"""How often a Watch stream looks at readiness (a change is sent within this time)."""


class HealthService:
    """Check and Watch over the data plane's readiness."""

    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane
        self.stopping = False
        self._stopped = asyncio.Event()
        self.services = frozenset(("", proto.SERVICE_NAME, HEALTH_SERVICE))

    def enter_shutdown(self) -> None:
        """NOT_SERVING from now on; Watch streams send it and end."""
        self.stopping = True
        self._stopped.set()

    def status(self) -> int:
        serving = not self.stopping and self.dataplane.ready()
        return int(SERVING if serving else NOT_SERVING)

    async def Check(self, request: Any, context: Any) -> Any:
        if request.service not in self.services:
            raise not_found(
                f"health: unknown service '{request.service}', expected one of "
                f"{sorted(self.services)}"
            )
        return health_pb2.HealthCheckResponse(status=self.status())

    async def Watch(self, request: Any, context: Any) -> AsyncIterator[Any]:
        """The current status at once, then every change; ends once shutdown has begun."""
        if request.service not in self.services:
            yield health_pb2.HealthCheckResponse(status=SERVICE_UNKNOWN)
            await self._stopped.wait()  # the protocol keeps the call open
            return
        last = None
        while True:
            status = self.status()
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            if self.stopping:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), WATCH_INTERVAL_S)


def reflection_pool() -> descriptor_pool.DescriptorPool:
    """Our protos plus health and reflection, in one pool reflection answers from."""
    pool = descriptor_pool.DescriptorPool()
    for file in proto.FILES:
        pool.AddSerializedFile(_serialized(file))
    pool.AddSerializedFile(health_pb2.DESCRIPTOR.serialized_pb)
    pool.AddSerializedFile(reflection_pb2.DESCRIPTOR.serialized_pb)
    return pool


def _serialized(file: Any) -> bytes:
    message = descriptor_pb2.FileDescriptorProto()
    file.CopyToProto(message)
    data: bytes = message.SerializeToString()
    return data


class ReflectionService:
    """ServerReflectionInfo, one answer per request message (the library's servicer does the
    work; it only reads the request messages it is given)."""

    def __init__(self) -> None:
        names = (proto.SERVICE_NAME, HEALTH_SERVICE, *REFLECTION_SERVICES)
        self._servicer = ReflectionServicer(names, pool=reflection_pool())

    def answer(self, request: Any) -> Any:
        answers: Iterator[Any] = self._servicer.ServerReflectionInfo(iter((request,)), None)
        return next(answers)

    async def ServerReflectionInfo(
        self, requests: AsyncIterator[Any], context: Any
    ) -> AsyncIterator[Any]:
        async for request in requests:
            yield self.answer(request)
