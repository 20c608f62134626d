"""`--grpc-restricted-protocol` on gRPC: on grpc.aio a server interceptor that refuses a call to
a restricted group unless its metadata carries the header, before any handler runs; for the
native front end the restriction of each method by the name it gives calls (it checks them in
`NativeGrpcServer` before dispatching).

Installed only when some group is restricted, so unrestricted servers pay nothing per call.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc

from server.proto import SERVICE_NAME
from server.restricted import GRPC_METHOD_GROUPS, Restriction, Restrictions, grpc_group


def metadata_value(metadata: Sequence[tuple[str, Any]] | None, key: str) -> str | bytes | None:
    """The first value of `key` in a call's metadata, None when absent."""
    for name, value in metadata or ():
        if name == key:
            return value
    return None


def by_native_method(restrictions: Restrictions) -> dict[str, Restriction]:
    """The restriction of every restricted method, by the name the native front end gives its
    calls: bare for the inference service ("ModelInfer"), "<service>/<method>" for others."""
    found = {}
    for full_name, group in GRPC_METHOD_GROUPS.items():
        restriction = restrictions.get(group)
        if restriction is not None:
            service, _, method = full_name.removeprefix("/").partition("/")
            found[method if service == SERVICE_NAME else f"{service}/{method}"] = restriction
    return found


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that answers UNAVAILABLE without reading or
    parsing the request (Triton's code and message)."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAVAILABLE, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)


class RestrictedProtocolInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, restrictions: Restrictions) -> None:
        self.restrictions = restrictions

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        restriction = self.restrictions.get(grpc_group(details.method))
        if handler is None or restriction is None:
            return handler
        if restriction.allows(metadata_value(details.invocation_metadata, restriction.header)):
            return handler
        return _refusal(handler, restriction.grpc_message())
