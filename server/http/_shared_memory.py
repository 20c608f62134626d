"""Triton's shared memory endpoints over HTTP (docs/protocol/extension_shared_memory.md):

    GET|POST /v2/systemsharedmemory[/region/{name}]/status
             -> [{"name", "key", "offset", "byte_size"}, ...]
    POST     /v2/systemsharedmemory/region/{name}/register, body {"key", "offset", "byte_size"}
    POST     /v2/systemsharedmemory[/region/{name}]/unregister (no name: every region)

This server has no CUDA shared memory: its status lists no region, unregistering one is a
no-op (as in Triton without them) and registering one answers 501.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server.errors import invalid, unimplemented
from server.shared_memory import CUDA_UNSUPPORTED, SharedMemoryRegistry, cuda_status

ReadJson = Callable[[Request], Awaitable[Any]]
"""Reads a request's (small) JSON body; None when the body is empty."""
Registry = Callable[[], SharedMemoryRegistry]
"""The server's registry (looked up per call: the routes exist before the data plane does)."""

_SYSTEM = "/v2/systemsharedmemory"
_CUDA = "/v2/cudasharedmemory"
_REGION = "/region/{region}"


def routes(registry: Registry, read_json: ReadJson) -> list[Route]:
    endpoints = _Endpoints(registry, read_json)
    status = ["GET", "POST"]  # Triton documents GET; tritonclient sends GET, others POST
    return [
        Route(f"{_SYSTEM}/status", endpoints.status, methods=status),
        Route(f"{_SYSTEM}{_REGION}/status", endpoints.status, methods=status),
        Route(f"{_SYSTEM}{_REGION}/register", endpoints.register, methods=["POST"]),
        Route(f"{_SYSTEM}/unregister", endpoints.unregister, methods=["POST"]),
        Route(f"{_SYSTEM}{_REGION}/unregister", endpoints.unregister, methods=["POST"]),
        Route(f"{_CUDA}/status", _cuda_status, methods=status),
        Route(f"{_CUDA}{_REGION}/status", _cuda_status, methods=status),
        Route(f"{_CUDA}{_REGION}/register", _cuda_register, methods=["POST"]),
        Route(f"{_CUDA}/unregister", _cuda_unregister, methods=["POST"]),
        Route(f"{_CUDA}{_REGION}/unregister", _cuda_unregister, methods=["POST"]),
    ]


class _Endpoints:
    def __init__(self, registry: Registry, read_json: ReadJson) -> None:
        self.registry = registry
        self.read_json = read_json

    async def status(self, request: Request) -> Response:
        regions = self.registry().status(request.path_params.get("region", ""))
        return _json([
            {"name": r.name, "key": r.key, "offset": r.offset, "byte_size": r.byte_size}
            for r in regions
        ])

    async def register(self, request: Request) -> Response:
        body = await self.read_json(request)
        if not isinstance(body, dict):
            raise invalid(
                f"register: the body is {body!r}, expected a JSON object "
                '{"key": "/name", "offset": 0, "byte_size": N}'
            )
        for field in ("key", "byte_size"):
            if field not in body:
                raise invalid(f"register: '{field}' is missing from the body, expected "
                              '{"key": "/name", "offset": 0, "byte_size": N}')
        self.registry().register(
            request.path_params["region"], body["key"], body.get("offset", 0), body["byte_size"]
        )
        return Response(status_code=200)

    async def unregister(self, request: Request) -> Response:
        self.registry().unregister(request.path_params.get("region", ""))
        return Response(status_code=200)


async def _cuda_status(request: Request) -> Response:
    return _json(cuda_status(request.path_params.get("region", "")))


async def _cuda_register(request: Request) -> Response:
    raise unimplemented(CUDA_UNSUPPORTED)


async def _cuda_unregister(request: Request) -> Response:
    return Response(status_code=200)  # none exist (perf_analyzer unregisters them all)


def _json(payload: Any) -> Response:
    return Response(orjson.dumps(payload), 200, media_type="application/json")
