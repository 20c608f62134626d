"""`--grpc-restricted-protocol` on grpc.aio: a server interceptor that refuses a call to a
restricted group unless its metadata carries the header, before any handler runs.

Installed only when some group is restricted, so unrestricted servers pay nothing per call.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc

from server.restricted import Restrictions, grpc_group


def _first(metadata: Sequence[tuple[str, Any]] | None, key: str) -> str | bytes | None:
    for name, value in metadata or ():
        if name == key:
            return value
    return None


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
        if restriction.allows(_first(details.invocation_metadata, restriction.header)):
            return handler
        return _refusal(handler, restriction.grpc_message())
