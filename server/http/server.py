"""HTTP/REST transport: KServe v2 JSON, Triton's binary tensor extension, error mapping.

Binary tensor extension: when the `Inference-Header-Content-Length` header is present, the
body is that many bytes of JSON followed by the binary tensors, in input order, each input
declaring its size in `parameters.binary_data_size`. Outputs asked for with
`parameters.binary_data: true` (or the request's `binary_data_output: true`) travel the same way.
"""

from __future__ import annotations

import base64
import binascii
import logging
from typing import Any

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from server.dataplane import DataPlane
from server.errors import Code, ServingError, exhausted, invalid
from server.statistics import Duration, ModelStats
from server.tensors import check_shape, from_json, from_raw, to_json, to_raw
from server.types import DataType, InferInput, InferRequest, InferResponse, RequestedOutput

log = logging.getLogger(__name__)

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


def _json(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status, media_type="application/json")


def _error(exc: ServingError, status: int | None = None) -> Response:
    return _json({"error": exc.message}, status or STATUS[exc.code])


def _tensor(
    item: Any, binary: memoryview, offset: int, binary_sizes_ok: bool
) -> tuple[InferInput, int]:
    if not isinstance(item, dict):
        raise invalid(f"inputs: each input must be an object, got {type(item).__name__}")
    name = item.get("name")
    if not isinstance(name, str):
        raise invalid(f"inputs: 'name' must be a string, got {name!r}")
    shape_value = item.get("shape")
    if not isinstance(shape_value, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) for d in shape_value
    ):
        raise invalid(f"input '{name}': 'shape' must be a list of integers, got {shape_value!r}")
    shape = check_shape(name, shape_value)
    try:
        datatype = DataType.from_wire(item.get("datatype", ""))
    except ValueError as exc:
        raise invalid(f"input '{name}': {exc}") from None
    params = item.get("parameters") or {}
    if not isinstance(params, dict):
        raise invalid(f"input '{name}': 'parameters' must be an object, got {params!r}")
    size = params.get("binary_data_size")
    if size is not None:
        if not binary_sizes_ok:
            raise invalid(
                f"input '{name}': binary_data_size given but the request has no "
                "Inference-Header-Content-Length header"
            )
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise invalid(
                f"input '{name}': binary_data_size must be a non-negative integer, got {size!r}"
            )
        if offset + size > len(binary):
            raise invalid(
                f"input '{name}': binary_data_size {size} overruns the binary body "
                f"({len(binary) - offset} bytes left)"
            )
        data = from_raw(name, datatype, shape, binary[offset : offset + size])
        return InferInput(name, datatype, shape, data), offset + size
    if "data" not in item:
        raise invalid(f"input '{name}': neither 'data' nor parameters.binary_data_size given")
    return InferInput(name, datatype, shape, from_json(name, datatype, shape, item["data"])), offset


def decode_infer_request(
    model: str, version: str, body: bytes, header_length: int | None
) -> tuple[InferRequest, bool]:
    """Returns the request and the request-level binary_data_output flag."""
    json_part = body if header_length is None else body[:header_length]
    binary = memoryview(body)[len(body) if header_length is None else header_length :]
    try:
        payload = orjson.loads(json_part)
    except orjson.JSONDecodeError as exc:
        raise invalid(f"request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise invalid(f"request body must be a JSON object, got {type(payload).__name__}")
    raw_inputs = payload.get("inputs")
    if not isinstance(raw_inputs, list):
        raise invalid(f"'inputs' must be a list of tensors, got {raw_inputs!r}")
    offset = 0
    inputs = []
    for item in raw_inputs:
        tensor, offset = _tensor(item, binary, offset, header_length is not None)
        inputs.append(tensor)
    if offset != len(binary):
        raise invalid(
            f"binary body has {len(binary)} bytes, but the inputs' binary_data_size add up to "
            f"{offset}"
        )
    params = payload.get("parameters") or {}
    if not isinstance(params, dict):
        raise invalid(f"'parameters' must be an object, got {params!r}")
    raw_outputs = payload.get("outputs") or []
    if not isinstance(raw_outputs, list):
        raise invalid(f"'outputs' must be a list of requested outputs, got {raw_outputs!r}")
    outputs = []
    for out in raw_outputs:
        if not isinstance(out, dict) or not isinstance(out.get("name"), str):
            raise invalid(f"outputs: each output needs a string 'name', got {out!r}")
        out_params = out.get("parameters") or {}
        if not isinstance(out_params, dict):
            raise invalid(
                f"output '{out['name']}': 'parameters' must be an object, got {out_params!r}"
            )
        binary_flag = out_params.get("binary_data")
        outputs.append(
            RequestedOutput(out["name"], None if binary_flag is None else bool(binary_flag))
        )
    request_id = payload.get("id", "")
    request = InferRequest(
        model_name=model,
        model_version=version,
        inputs=inputs,
        outputs=outputs,
        id=request_id if isinstance(request_id, str) else str(request_id),
        parameters={k: v for k, v in params.items() if isinstance(v, bool | int | float | str)},
    )
    return request, bool(params.get("binary_data_output", False))


def encode_infer_response(
    response: InferResponse, request: InferRequest, binary_default: bool
) -> Response:
    wants = {o.name: o.binary for o in request.outputs}
    outputs = []
    chunks = []
    for output in response.outputs:
        entry: dict[str, Any] = {
            "name": output.name,
            "datatype": output.datatype.value,
            "shape": list(output.shape),
        }
        binary = wants.get(output.name)
        if binary is None:
            binary = binary_default
        if binary:
            raw = to_raw(output.datatype, output.data)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = to_json(output.datatype, output.data)
        outputs.append(entry)
    payload: dict[str, Any] = {
        "model_name": response.model_name,
        "model_version": response.model_version,
        "outputs": outputs,
    }
    if response.id:
        payload["id"] = response.id
    header = orjson.dumps(payload)
    if not chunks:
        return Response(header, media_type="application/json")
    return Response(
        b"".join([header, *chunks]),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(header))},
    )


def _duration(d: Duration) -> dict[str, int]:
    return {"count": d.count, "ns": d.ns}


def statistics_json(name: str, version: int, stats: ModelStats) -> dict[str, Any]:
    fields = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")
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
        ]
        handlers = {ServingError: self._on_error, Exception: self._on_crash}
        self.app = Starlette(routes=routes, exception_handlers=handlers)

    async def _on_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ServingError)
        return _error(exc)

    async def _on_crash(self, request: Request, exc: Exception) -> Response:
        # a JSON error like the gRPC INTERNAL one; Starlette re-raises, so uvicorn logs it
        return _json({"error": f"internal error: {exc}"}, 500)

    async def live(self, request: Request) -> Response:
        return Response(status_code=200 if self.dataplane.live() else 400)

    async def ready(self, request: Request) -> Response:
        return Response(status_code=200 if self.dataplane.ready() else 400)

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
        return Response(status_code=200 if ready else 400)

    async def _body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_request_bytes:
            raise exhausted(
                f"request body of {declared} bytes exceeds the limit of "
                f"{self.max_request_bytes} bytes (--max-request-bytes)"
            )
        chunks = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_request_bytes:
                raise exhausted(
                    f"request body exceeds the limit of {self.max_request_bytes} bytes "
                    "(--max-request-bytes)"
                )
            chunks.append(chunk)
        return b"".join(chunks)

    async def infer(self, request: Request) -> Response:
        p = request.path_params
        try:
            body = await self._body(request)
        except ServingError as exc:
            return _error(exc, 413)
        header = request.headers.get(HEADER_LENGTH)
        header_length = None
        if header is not None:
            if not header.isdigit() or int(header) > len(body):
                return _error(
                    invalid(
                        f"Inference-Header-Content-Length {header!r} is invalid, expected an "
                        f"integer no larger than the body ({len(body)} bytes)"
                    )
                )
            header_length = int(header)
        infer_request, binary_default = decode_infer_request(
            p["model"], p.get("version", ""), body, header_length
        )
        response = await self.dataplane.infer(infer_request)
        return encode_infer_response(response, infer_request, binary_default)

    async def config(self, request: Request) -> Response:
        p = request.path_params
        return _json(message_to_json(self.dataplane.model_config(p["model"], p.get("version", ""))))

    async def stats(self, request: Request) -> Response:
        p = request.path_params
        entries = self.dataplane.statistics(p.get("model", ""), p.get("version", ""))
        return _json({"model_stats": [statistics_json(*e) for e in entries]})

    async def index(self, request: Request) -> Response:
        ready_only = False
        body = await request.body()
        if body:
            try:
                payload = orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                raise invalid(f"request body is not valid JSON: {exc}") from None
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
        body = await request.body()
        params: dict[str, Any] = {}
        if body:
            try:
                payload = orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                raise invalid(f"request body is not valid JSON: {exc}") from None
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


def make_server(
    dataplane: DataPlane, host: str, port: int, max_request_bytes: int
) -> uvicorn.Server:
    app = HttpApp(dataplane, max_request_bytes).app
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="none",
        http="httptools",
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
