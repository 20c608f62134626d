"""KServe v2 inference bodies <-> the core's InferRequest / InferResponse.

Binary tensor extension: when the `Inference-Header-Content-Length` header is present, the
body is that many bytes of JSON followed by the binary tensors, in input order, each input
declaring its size in `parameters.binary_data_size`. Outputs asked for with
`parameters.binary_data: true` (or the request's `binary_data_output: true`) travel the same way.
Over a compressed body these lengths count the decompressed bytes, as in Triton.

Both directions are plain functions with no I/O: the transport runs them inline for small
bodies and on a worker thread for large ones.
"""

from __future__ import annotations

from typing import Any

import orjson

from server import shared_memory
from server.errors import invalid
from server.http._body import OFFLOAD_BYTES
from server.tensors import check_shape, from_json, from_raw, to_json, to_raw
from server.types import DataType, InferInput, InferRequest, InferResponse, RequestedOutput

Body = bytes | memoryview


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
    ref = shared_memory.tensor_ref(f"input '{name}'", params)
    if ref is not None:
        if "data" in item or "binary_data_size" in params:
            raise invalid(
                f"input '{name}': 'data' or binary_data_size given for an input in shared "
                f"memory region '{ref.region}', expected one or the other"
            )
        return shared_memory.shared_input(name, datatype, shape, ref), offset
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


def _requested_output(out: Any) -> RequestedOutput:
    """One entry of `outputs`: `binary_data` (this transport's) and `classification`
    (Triton's classification extension: the top N classes, N a positive integer)."""
    if not isinstance(out, dict) or not isinstance(out.get("name"), str):
        raise invalid(f"outputs: each output needs a string 'name', got {out!r}")
    name = out["name"]
    params = out.get("parameters") or {}
    if not isinstance(params, dict):
        raise invalid(f"output '{name}': 'parameters' must be an object, got {params!r}")
    binary = params.get("binary_data")
    class_count = 0
    if "classification" in params:
        class_count = params["classification"]
        if not isinstance(class_count, int) or isinstance(class_count, bool) or class_count < 1:
            raise invalid(
                f"output '{name}': parameter 'classification' is {class_count!r}, expected a "
                "positive integer: the number of top classes to return"
            )
    ref = shared_memory.tensor_ref(f"output '{name}'", params)
    return RequestedOutput(name, None if binary is None else bool(binary), class_count, ref)


def decode_infer_request(
    model: str, version: str, body: Body, header_length: int | None
) -> tuple[InferRequest, bool]:
    """Returns the request and the request-level binary_data_output flag."""
    view = memoryview(body)
    split = len(view) if header_length is None else header_length
    try:
        payload = orjson.loads(view[:split])
    except orjson.JSONDecodeError as exc:
        raise invalid(f"request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise invalid(f"request body must be a JSON object, got {type(payload).__name__}")
    raw_inputs = payload.get("inputs")
    if not isinstance(raw_inputs, list):
        raise invalid(f"'inputs' must be a list of tensors, got {raw_inputs!r}")
    binary = view[split:]
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
    request_id = payload.get("id", "")
    request = InferRequest(
        model_name=model,
        model_version=version,
        inputs=inputs,
        outputs=[_requested_output(out) for out in raw_outputs],
        id=request_id if isinstance(request_id, str) else str(request_id),
        parameters={k: v for k, v in params.items() if isinstance(v, bool | int | float | str)},
    )
    return request, bool(params.get("binary_data_output", False))


def encode_infer_response(
    response: InferResponse, request: InferRequest, binary_default: bool
) -> tuple[bytes, int | None]:
    """The body and, when binary outputs follow the JSON, the JSON's length (the
    Inference-Header-Content-Length of the answer)."""
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
        if output.shared_memory is not None:
            pass  # written to its region: no data here, as in Triton
        elif binary:
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
        return header, None
    return b"".join([header, *chunks]), len(header)


# JSON tensors decode at ~20 us a KB (FP32 values, one Python object each) and binary ones
# in ~7 us whatever their size (numpy views), against ~50 us for a thread hop: a request
# moves to a thread when its JSON passes JSON_OFFLOAD_BYTES or its binary part OFFLOAD_BYTES
# (BYTES elements become objects one by one). Measured by benchmarks/http_offload_threshold.py.
JSON_OFFLOAD_BYTES = 16 << 10


def decode_offloaded(size: int, header_length: int | None) -> bool:
    """Whether a body of `size` bytes is decoded on a thread rather than on the event loop."""
    json_size = size if header_length is None else header_length
    return json_size > JSON_OFFLOAD_BYTES or size - json_size > OFFLOAD_BYTES


def encode_offloaded(
    response: InferResponse, request: InferRequest, binary_default: bool
) -> bool:
    """Whether an answer is encoded on a thread: the same bounds as `decode_offloaded`, on the
    outputs' sizes in memory (object arrays: their pointers)."""
    wants = {o.name: o.binary for o in request.outputs}
    json_size = binary_size = 0
    for output in response.outputs:
        binary = wants.get(output.name)
        if binary_default if binary is None else binary:
            binary_size += output.data.nbytes
        else:
            json_size += output.data.nbytes
    return json_size > JSON_OFFLOAD_BYTES or binary_size > OFFLOAD_BYTES
