"""HTTP/REST transport: KServe v2 routes over Starlette, error mapping, disconnects.

Inference bodies are converted in `_codec` (JSON and Triton's binary tensor extension) and read,
bounded and (de)compressed in `_body`; large ones are handled on worker threads so that the
event loop keeps answering small requests. A client that disconnects while its inference waits
cancels it: the request leaves its model's queue.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from collections.abc import Awaitable
from typing import Any, TypeVar

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive

from server.dataplane import DataPlane
from server.errors import Code, ServingError, invalid
from server.http._body import HttpError, compress, read_body, response_encoding
from server.http._codec import (
    decode_infer_request,
    decode_offloaded,
    encode_infer_response,
    encode_offloaded,
)
from server.http._protocol import HEAD_TIMEOUT, bounded_protocol
from server.http._shared_memory import routes as shared_memory_routes
from server.statistics import Duration, ModelStats
from server.tracing import RequestTrace
from server.types import InferResponse

log = logging.getLogger(__name__)

T = TypeVar("T")
HEADER_LENGTH = "inference-header-content-length"
STATUS = {
    Code.INVALID_ARGUMENT: 400,
    Code.NOT_FOUND: 404,
    Code.UNAVAILABLE: 503,
    Code.RESOURCE_EXHAUSTED: 503,
    Code.UNIMPLEMENTED: 501,
    Code.ALREADY_EXISTS: 409,
    Code.CANCELLED: 499,
    Code.DEADLINE_EXCEEDED: 504,
    Code.INTERNAL: 500,
}
CLIENT_GONE = 499  # nginx's "client closed request": logged, never seen by the client


def _json(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status, media_type="application/json")


def _error(exc: ServingError, status: int | None = None) -> Response:
    return _json({"error": exc.message}, status or STATUS[exc.code])


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


async def _disconnected(receive: Receive) -> None:
    """Returns when the client disconnects. Called once the body is read: the server's
    receive channel then has nothing but `http.disconnect` to deliver."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(receive: Receive, work: Awaitable[T]) -> T:
    """`await work` in this task, cancelled if the client disconnects first (then raises
    ClientGone). One watcher task a call: half the cost of running `work` in a task too."""
    task = asyncio.current_task()
    assert task is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        await _disconnected(receive)
        gone = True
        task.cancel()

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if not gone:
            raise
        task.uncancel()
        raise ClientGone from None
    finally:
        watcher.cancel()


def _duration(d: Duration) -> dict[str, int]:
    return {"count": d.count, "ns": d.ns}


def statistics_json(name: str, version: int, stats: ModelStats) -> dict[str, Any]:
    fields = (
        "success", "fail", "queue", "compute_input", "compute_infer", "compute_output",
        "cache_hit", "cache_miss",
    )
    return {
        "name": name,
        "version": str(version),
        "last_inference": stats.last_inference_ms,
        "inference_count": stats.inference_count,
        "execution_count": stats.execution_count,
        "inference_stats": {f: _duration(getattr(stats, f)) for f in fields},
        "batch_stats": [
            {
                "batch_size": size,
                "compute_input": _duration(b.compute_input),
                "compute_infer": _duration(b.compute_infer),
                "compute_output": _duration(b.compute_output),
            }
            for size, b in sorted(stats.batches.items())
        ],
    }


def message_to_json(message: Any) -> dict[str, Any]:
    """A protobuf message as JSON with proto field names, enum names and numbers as numbers
    (Triton's /config shape; protobuf's own JSON writes 64-bit integers as strings)."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            out[field.name] = {
                k: (message_to_json(v) if value_field.message_type else v) for k, v in value.items()
            }
        elif _repeated(field):
            out[field.name] = [_field_json(field, v) for v in value]
        elif field.message_type is not None:
            if message.HasField(field.name):
                out[field.name] = message_to_json(value)
        elif field.containing_oneof is None or message.HasField(field.name):
            out[field.name] = _field_json(field, value)
    return out


def _field_json(field: Any, value: Any) -> Any:
    if field.message_type is not None:
        return message_to_json(value)
    if field.enum_type is not None:
        return field.enum_type.values_by_number[value].name
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return value


class HttpApp:
    def __init__(self, dataplane: DataPlane, max_request_bytes: int) -> None:
        self.dataplane = dataplane
        self.max_request_bytes = max_request_bytes
        prefix = "/v2/models/{model}"
        routes = [
            Route("/v2/health/live", self.live),
            Route("/v2/health/ready", self.ready),
            Route("/v2", self.server_metadata),
            Route("/v2/models/stats", self.stats),
            Route(prefix, self.model_metadata),
            Route(prefix + "/versions/{version}", self.model_metadata),
            Route(prefix + "/ready", self.model_ready),
            Route(prefix + "/versions/{version}/ready", self.model_ready),
            Route(prefix + "/infer", self.infer, methods=["POST"]),
            Route(prefix + "/versions/{version}/infer", self.infer, methods=["POST"]),
            Route(prefix + "/config", self.config),
            Route(prefix + "/versions/{version}/config", self.config),
            Route(prefix + "/stats", self.stats),
            Route(prefix + "/versions/{version}/stats", self.stats),
            Route("/v2/repository/index", self.index, methods=["POST", "GET"]),
            Route("/v2/repository/models/{model}/load", self.load, methods=["POST"]),
            Route("/v2/repository/models/{model}/unload", self.unload, methods=["POST"]),
            *shared_memory_routes(lambda: self.dataplane.shared_memory, self._json_body),
        ]
        handlers = {
            ServingError: self._on_error,
            HttpError: self._on_http_error,
            HTTPException: self._on_routing,
            ClientDisconnect: self._on_gone,
            ClientGone: self._on_gone,
            Exception: self._on_crash,
        }
        self.app = Starlette(routes=routes, exception_handlers=handlers)

    async def _on_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ServingError)
        return _error(exc)

    async def _on_http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HttpError)
        return _json({"error": exc.message}, exc.status)

    async def _on_routing(self, request: Request, exc: Exception) -> Response:
        """Starlette's router: 404 for an unknown path, 405 for a method the path lacks."""
        assert isinstance(exc, HTTPException)
        where = f"{request.method} {request.url.path}"
        if exc.status_code == 404:
            message = f"no endpoint at {where}, see the KServe v2 routes under /v2"
        elif exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            message = (
                f"method {request.method} is not allowed at {request.url.path}, expected "
                f"{allowed}"
            )
        else:
            message = f"{where}: {exc.detail}"
        return Response(orjson.dumps({"error": message}), exc.status_code, exc.headers,
                        media_type="application/json")

    async def _on_gone(self, request: Request, exc: Exception) -> Response:
        return Response(status_code=CLIENT_GONE)  # the server drops it: nobody is listening

    async def _on_crash(self, request: Request, exc: Exception) -> Response:
        # a JSON error like the gRPC INTERNAL one; Starlette re-raises, so uvicorn logs it
        return _json({"error": f"internal error: {exc}"}, 500)

    async def live(self, request: Request) -> Response:
        live = self.dataplane.live()
        return _json({"live": live}, 200 if live else 400)

    async def ready(self, request: Request) -> Response:
        ready = self.dataplane.ready()
        return _json({"ready": ready}, 200 if ready else 400)

    async def server_metadata(self, request: Request) -> Response:
        name, version, extensions = self.dataplane.server_metadata()
        return _json({"name": name, "version": version, "extensions": list(extensions)})

    async def model_metadata(self, request: Request) -> Response:
        p = request.path_params
        meta = self.dataplane.model_metadata(p["model"], p.get("version", ""))
        return _json(
            {
                "name": meta.name,
                "versions": list(meta.versions),
                "platform": meta.platform,
                "inputs": [
                    {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
                    for t in meta.inputs
                ],
                "outputs": [
                    {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
                    for t in meta.outputs
                ],
            }
        )

    async def model_ready(self, request: Request) -> Response:
        p = request.path_params
        ready = self.dataplane.model_ready(p["model"], p.get("version", ""))
        return _json({"name": p["model"], "ready": ready}, 200 if ready else 400)

    async def infer(self, request: Request) -> Response:
        p = request.path_params
        tracer = self.dataplane.tracer
        trace = None if tracer is None else tracer.start(
            "http", request.headers.get("traceparent"), request.headers.get("tracestate")
        )
        body = await read_body(request, self.max_request_bytes)
        header = request.headers.get(HEADER_LENGTH)
        header_length = None
        if header is not None:
            # isascii: isdigit alone takes "²" (headers are latin-1), which int() refuses
            if not (header.isascii() and header.isdigit()) or int(header) > len(body):
                raise invalid(
                    f"Inference-Header-Content-Length {header!r} is invalid, expected an "
                    f"integer no larger than the body ({len(body)} bytes)"
                )
            header_length = int(header)
        decode = (p["model"], p.get("version", ""), body, header_length)
        if decode_offloaded(len(body), header_length):
            infer_request, binary_default = await asyncio.to_thread(decode_infer_request, *decode)
        else:
            infer_request, binary_default = decode_infer_request(*decode)
        del body  # the inputs hold views of what they need
        if trace is not None:
            infer_request.trace = trace
            trace.received()
        response = await unless_disconnected(
            request.receive, self.dataplane.infer(infer_request)
        )
        if trace is not None:
            trace.responding()
        encode = (response, infer_request, binary_default)
        if encode_offloaded(response, infer_request, binary_default):
            content, json_length = await asyncio.to_thread(encode_infer_response, *encode)
        else:
            content, json_length = encode_infer_response(*encode)
        headers = {"Vary": "Accept-Encoding"}
        if json_length is not None:
            headers["Inference-Header-Content-Length"] = str(json_length)
        encoding = response_encoding(request.headers.get("accept-encoding"))
        if encoding is not None:
            content = await compress(encoding, content)
            headers["Content-Encoding"] = encoding
        media_type = "application/json" if json_length is None else "application/octet-stream"
        # a traced request's span ends once Starlette has sent the answer
        sent = None if trace is None else BackgroundTask(_trace_sent, trace, response)
        return Response(content, headers=headers, media_type=media_type, background=sent)

    async def config(self, request: Request) -> Response:
        p = request.path_params
        return _json(message_to_json(self.dataplane.model_config(p["model"], p.get("version", ""))))

    async def stats(self, request: Request) -> Response:
        p = request.path_params
        entries = self.dataplane.statistics(p.get("model", ""), p.get("version", ""))
        return _json({"model_stats": [statistics_json(*e) for e in entries]})

    async def _json_body(self, request: Request) -> Any:
        """A small JSON body (None when empty), within --max-request-bytes."""
        body = await read_body(request, self.max_request_bytes)
        if not body:
            return None
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise invalid(f"request body is not valid JSON: {exc}") from None

    async def index(self, request: Request) -> Response:
        payload = await self._json_body(request)
        ready_only = bool(isinstance(payload, dict) and payload.get("ready", False))
        entries = []
        for e in await self.dataplane.repository_index(ready_only):
            fields = (("name", e.name), ("version", e.version), ("state", e.state),
                      ("reason", e.reason))
            entries.append({k: v for k, v in fields if v})  # never loaded: the name only
        return _json(entries)

    async def load(self, request: Request) -> Response:
        """POST /v2/repository/models/{m}/load, body {"parameters": {"config": "<json>",
        "file:<version>/<name>": "<base64>"}} as in Triton."""
        payload = await self._json_body(request)
        params = (payload or {}).get("parameters") or {} if isinstance(payload, dict) else {}
        if not isinstance(params, dict):
            raise invalid(f"'parameters' must be an object, got {params!r}")
        config_json = None
        files: dict[str, bytes] = {}
        for key, value in params.items():
            if key == "config":
                config_json = value if isinstance(value, str) else orjson.dumps(value).decode()
            elif key.startswith("file:"):
                try:
                    files[key[5:]] = base64.b64decode(value, validate=True)
                except (binascii.Error, TypeError, ValueError):
                    raise invalid(f"parameter '{key}' is not base64") from None
            else:
                raise invalid(
                    f"load: unknown parameter '{key}', expected 'config' or "
                    "'file:<version>/<name>'"
                )
        await self.dataplane.load_model(request.path_params["model"], config_json, files or None)
        return Response(status_code=200)

    async def unload(self, request: Request) -> Response:
        await self.dataplane.unload_model(request.path_params["model"])
        return Response(status_code=200)


async def _trace_sent(trace: RequestTrace, response: InferResponse) -> None:
    trace.finish(response.model_name, response.model_version, response.id)


def make_server(
    dataplane: DataPlane, host: str, port: int, max_request_bytes: int,
    head_timeout: float = HEAD_TIMEOUT,
) -> uvicorn.Server:
    """uvicorn on httptools, with a request head bounded in time (`head_timeout` seconds: a
    slowloris client does not hold its connection forever) and size (server/http/_protocol.py)."""
    app = HttpApp(dataplane, max_request_bytes).app
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="none",
        http=bounded_protocol(head_timeout),
        lifespan="off",
        log_level="warning",
        access_log=False,
        ws="none",
    )
    return uvicorn.Server(config)


def _repeated(field: Any) -> bool:
    # `is_repeated` replaced `label` in protobuf 6; keep both working
    flag = getattr(field, "is_repeated", None)
    return bool(flag) if flag is not None else field.label == field.LABEL_REPEATED
