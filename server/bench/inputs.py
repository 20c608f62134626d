"""What the load generator sends: request tensors from a model's metadata (random) or from a data
file, checked against the metadata, and serialized once into wire bytes.

Input data files use perf_analyzer's `--input-data` JSON format; each entry of "data" is one
request, and requests are sent round-robin:

    {"data": [
      {"INPUT0": {"content": [0.5, 1.0, ...], "shape": [1, 16]}},
      {"INPUT0": [0.5, 1.0, ...]},                         # shape from --shape / metadata
      {"TEXT": {"content": ["a", "b"], "shape": [2]}},     # BYTES as strings
      {"INPUT0": {"b64": "AACAPw...", "shape": [1, 16]}}   # raw little-endian bytes, base64
    ]}

A "shape" either has the model's full rank or, for a batching model, leaves out the batch
dimension (as perf_analyzer's does), which is then 1.
"""

from __future__ import annotations

import base64
import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from server.bench.errors import BenchError

NUMPY_TYPES: dict[str, Any] = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
    "UINT64": np.uint64, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
    "INT64": np.int64, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
    "BYTES": np.object_,
}
STRING_LENGTH = 16

Tensors = dict[str, np.ndarray]
Shape = tuple[int, ...]


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1: variable


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A model as the server describes it (ModelMetadata, plus ModelConfig's max_batch_size
    when the server has that RPC; None when it does not)."""

    name: str
    version: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    max_batch_size: int | None

    @property
    def batched(self) -> bool:
        """Whether the first dimension is the batch: from the config when known, else when every
        input's first dimension is variable."""
        if self.max_batch_size is not None:
            return self.max_batch_size > 0
        return bool(self.inputs) and all(t.shape[:1] == (-1,) for t in self.inputs)

    def input_names(self) -> str:
        return ", ".join(t.name for t in self.inputs)


def _fmt(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def fit_shape(model: ModelInfo, tensor: TensorInfo, dims: Sequence[int], what: str) -> Shape:
    """`dims` checked against the tensor's metadata shape; a shape without the batch dimension
    of a batching model gets batch 1."""
    shape = tuple(int(d) for d in dims)
    rank = len(tensor.shape)
    if model.batched and len(shape) == rank - 1:
        shape = (1, *shape)
    if len(shape) != rank or any(d < 0 for d in shape) or any(
        m not in (-1, d) for m, d in zip(tensor.shape, shape, strict=True)
    ):
        raise BenchError(
            f"{what}: shape {_fmt(dims)} does not fit input '{tensor.name}' of model "
            f"'{model.name}', whose shape is {_fmt(tensor.shape)} (-1: any size)")
    if model.batched and model.max_batch_size and shape[0] > model.max_batch_size:
        raise BenchError(
            f"{what}: batch size {shape[0]} of input '{tensor.name}' is over model "
            f"'{model.name}''s max_batch_size {model.max_batch_size}")
    return shape


def resolve_shapes(model: ModelInfo, overrides: Mapping[str, Sequence[int]]) -> dict[str, Shape]:
    """The request shape of every input: the override, else the metadata shape with a variable
    batch dimension set to 1. An override named "" stands for a model's only input."""
    names = {t.name for t in model.inputs}
    overrides = dict(overrides)
    if "" in overrides:
        if len(model.inputs) != 1:
            raise BenchError(f"--shape without an input name needs a model with one input; "
                             f"'{model.name}' has {model.input_names()}: use --shape NAME:DIMS")
        overrides[model.inputs[0].name] = overrides.pop("")
    for name in overrides:
        if name not in names:
            raise BenchError(f"shape given for '{name}', which is not an input of model "
                             f"'{model.name}' (inputs: {model.input_names()})")
    shapes = {}
    for tensor in model.inputs:
        if tensor.name in overrides:
            shapes[tensor.name] = fit_shape(model, tensor, overrides[tensor.name], "shape override")
            continue
        dims = list(tensor.shape)
        if model.batched and dims and dims[0] == -1:
            dims[0] = 1
        if any(d < 0 for d in dims):
            example = ",".join("1" if d < 0 else str(d) for d in dims)
            raise BenchError(
                f"input '{tensor.name}' of model '{model.name}' has variable dimensions "
                f"{_fmt(tensor.shape)}: give its shape, e.g. --shape {tensor.name}:{example} "
                "(or [shape] in the scenario)")
        shapes[tensor.name] = tuple(dims)
    return shapes


def _numpy_type(model: ModelInfo, tensor: TensorInfo) -> Any:
    if tensor.datatype not in NUMPY_TYPES:
        raise BenchError(f"input '{tensor.name}' of model '{model.name}' has datatype "
                         f"{tensor.datatype}, which tachyon bench cannot generate")
    return NUMPY_TYPES[tensor.datatype]


def random_tensors(model: ModelInfo, shapes: Mapping[str, Shape],
                   seed: int = 0) -> Tensors:
    """One request of random data: floats in [0, 1), integers in [0, 64), random booleans,
    strings of 16 random letters."""
    rng = np.random.default_rng(seed)
    tensors: Tensors = {}
    for tensor in model.inputs:
        dtype = _numpy_type(model, tensor)
        shape = shapes[tensor.name]
        if tensor.datatype == "BYTES":
            letters = rng.integers(97, 123, size=(math.prod(shape), STRING_LENGTH), dtype=np.uint8)
            flat = np.array([row.tobytes() for row in letters] or [], dtype=object)
            tensors[tensor.name] = flat.reshape(shape)
        elif tensor.datatype == "BOOL":
            tensors[tensor.name] = rng.integers(0, 2, size=shape).astype(np.bool_)
        elif tensor.datatype.startswith("FP"):
            tensors[tensor.name] = rng.random(size=shape).astype(dtype)
        else:
            tensors[tensor.name] = rng.integers(0, 64, size=shape).astype(dtype)
    return tensors


# -- data files ----------------------------------------------------------------------------


def _entry_tensor(model: ModelInfo, tensor: TensorInfo, value: Any, default_shape: Shape,
                  what: str) -> np.ndarray:
    dtype = _numpy_type(model, tensor)
    if isinstance(value, Mapping):
        unknown = set(value) - {"content", "shape", "b64"}
        if unknown or ("content" in value) == ("b64" in value):
            raise BenchError(f"{what}: expected {{\"content\": [...], \"shape\": [...]}} or "
                             f"{{\"b64\": \"...\", \"shape\": [...]}}, got keys {sorted(value)}")
        shape = (fit_shape(model, tensor, value["shape"], what) if "shape" in value
                 else default_shape)
        content = value.get("content")
        raw = value.get("b64")
    else:
        shape, content, raw = default_shape, value, None
    count = math.prod(shape)
    if raw is not None:
        if tensor.datatype == "BYTES":
            raise BenchError(f"{what}: b64 data is not supported for BYTES tensors")
        try:
            array = np.frombuffer(base64.b64decode(raw, validate=True), dtype=np.dtype(dtype)
                                  .newbyteorder("<"))
        except ValueError as exc:
            raise BenchError(f"{what}: b64 content does not decode to {tensor.datatype}: "
                             f"{exc}") from None
    elif tensor.datatype == "BYTES":
        flat = np.asarray(content, dtype=object).reshape(-1)
        if not all(isinstance(v, str) for v in flat):
            raise BenchError(f"{what}: a BYTES tensor's content must be strings")
        array = np.array([v.encode() for v in flat] or [], dtype=object)
    else:
        try:
            array = np.asarray(content, dtype=dtype).reshape(-1)
        except (TypeError, ValueError) as exc:
            raise BenchError(f"{what}: content is not {tensor.datatype} numbers: {exc}") from None
    if array.size != count:
        raise BenchError(f"{what}: {array.size} values do not fill shape {_fmt(shape)} "
                         f"({count} values), as model '{model.name}' expects "
                         f"{_fmt(tensor.shape)} for input '{tensor.name}'")
    return array.reshape(shape)


def load_input_data(path: Path, model: ModelInfo,
                    shapes: Mapping[str, Shape]) -> list[Tensors]:
    """The requests of a perf_analyzer-style data file, each checked against the metadata."""
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BenchError(f"input data {path}: cannot read JSON: {exc}") from None
    entries = document.get("data") if isinstance(document, Mapping) else None
    if not isinstance(entries, list) or not entries:
        raise BenchError(f"input data {path}: expected {{\"data\": [{{INPUT: ...}}, ...]}} with "
                         "at least one entry (perf_analyzer's --input-data format)")
    names = {t.name: t for t in model.inputs}
    requests = []
    for i, entry in enumerate(entries):
        where = f"input data {path}, entry {i}"
        if not isinstance(entry, Mapping):
            raise BenchError(f"{where}: expected an object of input name -> tensor")
        unknown = sorted(set(entry) - set(names))
        if unknown:
            raise BenchError(f"{where}: {', '.join(unknown)} is not an input of model "
                             f"'{model.name}' (inputs: {model.input_names()})")
        missing = [n for n in names if n not in entry]
        if missing:
            raise BenchError(f"{where}: input(s) {', '.join(missing)} of model '{model.name}' "
                             "missing")
        requests.append({
            name: _entry_tensor(model, names[name], entry[name], shapes[name],
                                f"{where}, tensor '{name}'")
            for name in names
        })
    return requests


# -- serialization -------------------------------------------------------------------------


def _raw(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(v)) + bytes(v) for v in array.reshape(-1))
    return np.ascontiguousarray(array, dtype=np.dtype(array.dtype).newbyteorder("<")).tobytes()


def samples_per_request(model: ModelInfo, tensors: Tensors) -> int:
    """The batch size of a request (1 for a model without a batch dimension)."""
    if not model.batched or not model.inputs:
        return 1
    return int(tensors[model.inputs[0].name].shape[0])


def grpc_payload(model: ModelInfo, tensors: Tensors) -> bytes:
    """A serialized ModelInferRequest with every input in raw_input_contents."""
    from server import proto

    request = proto.ModelInferRequest(model_name=model.name, model_version=model.version)
    for tensor in model.inputs:
        array = tensors[tensor.name]
        entry = request.inputs.add()
        entry.name = tensor.name
        entry.datatype = tensor.datatype
        entry.shape.extend(array.shape)
        request.raw_input_contents.append(_raw(array, tensor.datatype))
    data: bytes = request.SerializeToString()
    return data


@dataclass(frozen=True, slots=True)
class HttpRequest:
    path: str
    headers: dict[str, str]
    body: bytes

    def wire(self, host: str) -> bytes:
        """The whole HTTP/1.1 request, ready to write on a kept-alive connection."""
        lines = [f"POST {self.path} HTTP/1.1", f"Host: {host}",
                 *(f"{k}: {v}" for k, v in self.headers.items()),
                 f"Content-Length: {len(self.body)}", "", ""]
        return "\r\n".join(lines).encode() + self.body


def model_path(model: ModelInfo) -> str:
    version = f"/versions/{model.version}" if model.version else ""
    return f"/v2/models/{model.name}{version}"


def http_request(model: ModelInfo, tensors: Tensors, binary: bool) -> HttpRequest:
    """A KServe v2 infer request: JSON, or with the binary tensor extension (inputs and every
    output as raw bytes after the JSON header)."""
    path = model_path(model) + "/infer"
    inputs = []
    blobs = []
    for tensor in model.inputs:
        array = tensors[tensor.name]
        entry: dict[str, Any] = {"name": tensor.name, "shape": list(array.shape),
                                 "datatype": tensor.datatype}
        if binary:
            blob = _raw(array, tensor.datatype)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif tensor.datatype == "BYTES":
            entry["data"] = [bytes(v).decode(errors="replace") for v in array.reshape(-1)]
        else:
            entry["data"] = array.reshape(-1).tolist()
        inputs.append(entry)
    document: dict[str, Any] = {"inputs": inputs}
    if not binary:
        body = json.dumps(document, separators=(",", ":")).encode()
        return HttpRequest(path, {"Content-Type": "application/json"}, body)
    document["outputs"] = [{"name": t.name, "parameters": {"binary_data": True}}
                           for t in model.outputs]
    header = json.dumps(document, separators=(",", ":")).encode()
    return HttpRequest(path, {"Content-Type": "application/octet-stream",
                              "Inference-Header-Content-Length": str(len(header))},
                       header + b"".join(blobs))
