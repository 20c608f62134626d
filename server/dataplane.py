"""The transport-neutral core: health, metadata, inference, configs, statistics, repository.

`grpc/` and `http/` call only this class; they convert wire formats and map `ServingError`
codes to their statuses. No model logic lives in a transport.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from server import __version__, logs, shared_memory, tracing
from server.backends.base import Options
from server.config import ServerSettings
from server.errors import Code, ServingError, invalid
from server.manager import ModelManager, ModelVersion
from server.model_config import ModelSpec
from server.statistics import ModelStats
from server.tensors import span
from server.types import Array, DataType, InferInput, InferRequest, InferResponse, OutputTensor

log = logging.getLogger(__name__)

EXTENSIONS = (
    "binary_tensor_data",
    "classification",
    "model_configuration",
    "model_repository",
    "parameters",
    "schedule_policy",
    "statistics",
    "system_shared_memory",
)


@dataclass(frozen=True, slots=True)
class TensorMetadata:
    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorMetadata, ...]
    outputs: tuple[TensorMetadata, ...]


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One RepositoryIndex row. A model in the repository that was never loaded has only its
    name (version, state and reason ""), as in Triton; transports leave the empty ones out."""

    name: str
    version: str = ""
    state: str = ""
    reason: str = ""


class DataPlane:
    def __init__(self, settings: ServerSettings, manager: ModelManager) -> None:
        self.settings = settings
        self.manager = manager
        self.started = False  # set once the initial models are loaded
        # None unless --trace-config turns tracing on: transports check it once per request
        self.tracer = tracing.make_tracer(settings.trace)
        self._liveness: list[Callable[[], bool]] = []
        # the system shared memory regions, registered over either transport
        self.shared_memory = shared_memory.SharedMemoryRegistry()

    # -- health ---------------------------------------------------------------------------

    def add_liveness_check(self, check: Callable[[], bool]) -> None:
        """Live only while every check added holds (e.g. a transport whose I/O thread died
        fails its check)."""
        self._liveness.append(check)

    def live(self) -> bool:
        return all(check() for check in self._liveness)

    def ready(self) -> bool:
        """Ready once startup loading finished (and until shutdown starts). With strict
        readiness (Triton's default) also every version meant to be served must be READY:
        failed loads count, versions unloaded on purpose (an unload request, or retired by
        version_policy) and loads still running do not."""
        if not self.started:
            return False
        return not self.settings.strict_readiness or not self.manager.unready()

    def model_ready(self, name: str, version: str = "") -> bool:
        return self.manager.is_ready(name, version)

    # -- metadata -------------------------------------------------------------------------

    def server_metadata(self) -> tuple[str, str, tuple[str, ...]]:
        return self.settings.server_id, __version__, EXTENSIONS

    def model_metadata(self, name: str, version: str = "") -> ModelMetadata:
        entry = self.manager.get(name, version)
        spec = _spec(entry)
        ready = sorted(
            v.version for v in self.manager.entries() if v.name == name and v.ready
        )
        batch = spec.max_batch_size
        return ModelMetadata(
            name=name,
            versions=tuple(str(v) for v in ready),
            platform=entry.backends[0].metadata()["platform"] if entry.backends else spec.platform,
            inputs=tuple(
                TensorMetadata(t.name, t.datatype.value, t.full_shape(batch)) for t in spec.inputs
            ),
            outputs=tuple(
                TensorMetadata(t.name, t.datatype.value, t.full_shape(batch)) for t in spec.outputs
            ),
        )

    def model_config(self, name: str, version: str = "") -> Any:
        return self.manager.find_config(name, version)

    # -- inference ------------------------------------------------------------------------

    async def infer(self, request: InferRequest) -> InferResponse:
        if not shared_memory.uses_shared_memory(request):
            return await self._infer(request)
        try:  # inputs are read from their regions; outputs' regions are held until written
            memory = await shared_memory.admit(
                self.shared_memory, request, self.settings.max_request_bytes
            )
        except ServingError as exc:
            log.info("request to '%s' failed: %s", request.model_name, exc.message)
            if request.trace is not None:
                request.trace.finish(request.model_name, request.model_version, request.id, exc)
            raise
        try:
            response = await self._infer(request)
            await memory.deliver(response)
            return response
        finally:
            memory.close()

    async def _infer(self, request: InferRequest) -> InferResponse:
        if request.id:
            logs.request_id.set(request.id)  # each request runs in its own task's context
        try:
            entry = self.manager.get(request.model_name, request.model_version)
        except ServingError as exc:
            log.info("request failed: %s", exc.message)
            if request.trace is not None:
                request.trace.finish(request.model_name, request.model_version, request.id, exc)
            raise
        spec = _spec(entry)
        start = time.monotonic_ns()
        try:
            rows = _validate_inputs(spec, request.inputs, self.settings.max_request_bytes)
            names, classes = _requested_outputs(spec, request)
            batcher = entry.batcher
            assert batcher is not None
            params = request.parameters
            level, timeout = batcher.check_parameters(
                params.get("priority"), params.get("timeout")
            )
            inputs = {i.name: i.data for i in request.inputs}
            if len(inputs) > 1:  # the model's order: requests batch whatever order they used
                inputs = {t.name: inputs[t.name] for t in spec.inputs if t.name in inputs}
            options: Options = ()
            if entry.backends:
                try:
                    entry.backends[0].check_request(inputs)
                    options = entry.backends[0].request_options(params)
                except ValueError as exc:
                    raise invalid(str(exc)) from None
            outputs = await batcher.submit(
                inputs, names, rows, level, timeout, options, request.trace
            )
        except BaseException as exc:
            reason = _failure_reason(exc)
            entry.stats.record_failure(time.monotonic_ns() - start, reason)
            _log_failure(request, reason, exc)
            if request.trace is not None:
                request.trace.finish(request.model_name, str(entry.version), request.id, exc)
            raise
        entry.stats.record_success(time.monotonic_ns() - start)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("infer %s version %d: %d rows", request.model_name, entry.version, rows)
        return InferResponse(
            model_name=request.model_name,
            model_version=str(entry.version),
            id=request.id,
            outputs=[
                await _classified(entry, spec, n, outputs[n], classes[n]) if n in classes
                else OutputTensor(n, _output_type(spec, n), outputs[n].shape, outputs[n])
                for n in names
            ],
        )

    # -- statistics and repository --------------------------------------------------------

    def statistics(self, name: str = "", version: str = "") -> list[tuple[str, int, ModelStats]]:
        if name:
            entries = [self.manager.get(name, version)]
        else:
            entries = [v for v in self.manager.entries() if v.ready]
        return [(e.name, e.version, e.stats) for e in entries]

    async def load_model(
        self, name: str, config_json: str | None = None, files: dict[str, bytes] | None = None
    ) -> None:
        await self.manager.load(name, config_json, files)

    async def unload_model(self, name: str) -> None:
        await self.manager.unload_request(name)

    async def repository_index(self, ready_only: bool = False) -> list[IndexEntry]:
        """Every version the manager knows (unloaded ones as UNAVAILABLE with the reason
        "unloaded", as Triton keeps them), and, unless `ready_only`, every other model in the
        repository with its name only, as Triton lists models it never loaded."""
        entries = [
            IndexEntry(v.name, str(v.version) if v.version else "", v.state.value, v.reason)
            for v in self.manager.entries()
            if v.ready or not ready_only
        ]
        if ready_only:
            return entries
        known = {v.name for v in self.manager.entries()}
        entries += [
            IndexEntry(name) for name in await self.manager.repository_models() if name not in known
        ]
        return sorted(entries, key=lambda e: e.name)


def _log_failure(request: InferRequest, reason: str, exc: BaseException) -> None:
    """Each failed request is logged once, here, with its cause (a backend error's traceback
    is logged once per batch by the batcher, so its requests log at debug level)."""
    message = exc.message if isinstance(exc, ServingError) else repr(exc)
    level = logging.DEBUG if reason == "backend" else logging.INFO
    log.log(level, "request to '%s' failed (%s): %s", request.model_name, reason, message)


def _failure_reason(exc: BaseException) -> str:
    """The `reason` label of a failed request: rejected, cancelled, backend or other."""
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    if isinstance(exc, ServingError):
        if exc.code in (Code.RESOURCE_EXHAUSTED, Code.UNAVAILABLE):
            return "rejected"
        if exc.code is Code.CANCELLED:
            return "cancelled"
        if exc.code is Code.INTERNAL:
            return "backend"
    return "other"


def _spec(entry: ModelVersion) -> ModelSpec:
    assert entry.spec is not None, "a READY version has a spec"
    return entry.spec


def _output_type(spec: ModelSpec, name: str) -> Any:
    tensor = spec.output(name)
    assert tensor is not None
    return tensor.datatype


# classifications of more strings than this are formatted on a worker thread (about 5 ms)
_CLASSIFY_ON_LOOP = 4096


async def _classified(
    entry: ModelVersion, spec: ModelSpec, name: str, array: Array, class_count: int
) -> OutputTensor:
    batched = spec.max_batch_size > 0
    labels = entry.labels.get(name, ())
    rows = array.shape[0] if batched and array.ndim else 1
    if rows * min(class_count, array.size // max(rows, 1)) <= _CLASSIFY_ON_LOOP:
        data = classify(array, class_count, batched, labels)
    else:
        data = await asyncio.to_thread(classify, array, class_count, batched, labels)
    return OutputTensor(name, DataType.BYTES, data.shape, data)


# -- classification (Triton's extension) ----------------------------------------------------

CLASSIFIABLE = frozenset({
    DataType.UINT8, DataType.UINT16, DataType.UINT32, DataType.UINT64, DataType.INT8,
    DataType.INT16, DataType.INT32, DataType.INT64, DataType.FP32, DataType.FP64,
})


def classify(values: Array, count: int, batched: bool, labels: Sequence[str] = ()) -> Array:
    """The top `count` classes of an output, as Triton's classification extension returns
    them: BYTES "value:index" or "value:index:label" (label i is line i of the output's
    label_filename), highest value first (ties: the lower index first). A batched output
    keeps its batch dimension and its other dimensions (flattened) are the classes: shape
    [rows, count]; otherwise [count]. `count` above the number of classes means all of them.
    Values print as Triton prints them (C++ std::to_string): integers as they are, floats
    with six decimals ("0.984375:2")."""
    rows = values.reshape(values.shape[0] if batched else 1, -1)
    classes = rows.shape[1]
    top = min(count, classes)
    # descending, ties by lower index: a stable ascending sort of the reversed rows, reversed
    order = classes - 1 - np.argsort(rows[:, ::-1], axis=1, kind="stable")[:, ::-1][:, :top]
    floating = values.dtype.kind == "f"
    result = np.empty((rows.shape[0], top), dtype=object)
    for r in range(rows.shape[0]):
        for k, index in enumerate(order[r].tolist()):
            value = rows[r, index]
            text = f"{float(value):f}:{index}" if floating else f"{int(value)}:{index}"
            if index < len(labels) and labels[index]:
                text = f"{text}:{labels[index]}"
            result[r, k] = text.encode()
    return result if batched else result.reshape(top)


# -- request validation ---------------------------------------------------------------------


def _validate_inputs(spec: ModelSpec, inputs: list[InferInput], max_bytes: int) -> int:
    """Check names, datatypes and shapes against the model; returns the batch rows."""
    seen = set()
    rows = 1
    for tensor in inputs:
        model_input = spec.input(tensor.name)
        if model_input is None:
            raise invalid(
                f"model '{spec.name}': unexpected input '{tensor.name}', expected inputs "
                f"{sorted(t.name for t in spec.inputs)}"
            )
        if tensor.name in seen:
            raise invalid(f"model '{spec.name}': input '{tensor.name}' appears twice")
        seen.add(tensor.name)
        if tensor.datatype is not model_input.datatype:
            raise invalid(
                f"model '{spec.name}': input '{tensor.name}' has datatype "
                f"{tensor.datatype.value}, expected {model_input.datatype.value}"
            )
        rows = _check_shape(
            spec, model_input.dims, tensor, rows if len(seen) > 1 else None, max_bytes
        )
    if len(seen) == len(spec.inputs):  # every input given: nothing can be missing
        return rows
    missing = sorted(t.name for t in spec.inputs if t.name not in seen and not t.optional)
    if missing:
        raise invalid(
            f"model '{spec.name}': missing input {', '.join(repr(m) for m in missing)}, expected "
            f"inputs {sorted(t.name for t in spec.inputs)}"
        )
    return rows


def _check_shape(
    spec: ModelSpec, dims: tuple[int, ...], tensor: InferInput, batch: int | None, max_bytes: int
) -> int:
    shape = tensor.shape
    expected = (spec.max_batch_size and (-1, *dims)) or dims
    where = f"model '{spec.name}': input '{tensor.name}'"
    if len(shape) != len(expected):
        raise invalid(
            f"{where} has shape {list(shape)}, expected rank {len(expected)} "
            f"(shape {list(expected)})"
        )
    for got, want in zip(shape, expected, strict=True):
        if want != -1 and got != want:
            raise invalid(f"{where} has shape {list(shape)}, expected {list(expected)}")
    itemsize = max(tensor.datatype.itemsize, 1)
    if span(shape) * itemsize > max_bytes:  # even with no element: backends index by it
        raise invalid(
            f"{where} has shape {list(shape)}, which spans {span(shape)} elements of {itemsize} "
            f"bytes, more than the bound of {max_bytes} bytes a request may carry "
            "(--max-request-bytes)"
        )
    if not spec.max_batch_size:
        return 1
    rows = shape[0]
    if rows < 1 or rows > spec.max_batch_size:
        raise invalid(
            f"{where} has batch size {rows}, expected 1..{spec.max_batch_size} (max_batch_size)"
        )
    if batch is not None and rows != batch:
        raise invalid(f"{where} has batch size {rows}, but other inputs have {batch}")
    return rows


def _requested_outputs(spec: ModelSpec, request: InferRequest) -> tuple[list[str], dict[str, int]]:
    """The outputs to compute, and the class count of those asked for as classifications."""
    if not request.outputs:
        return [t.name for t in spec.outputs], {}
    names = []
    classes = {}
    for output in request.outputs:
        tensor = spec.output(output.name)
        if tensor is None:
            raise invalid(
                f"model '{spec.name}': unexpected requested output '{output.name}', expected "
                f"one of {[t.name for t in spec.outputs]}"
            )
        names.append(output.name)
        if output.class_count:
            where = f"model '{spec.name}': output '{output.name}'"
            if output.class_count < 0:
                raise invalid(
                    f"{where}: parameter 'classification' is {output.class_count}, expected a "
                    "positive number of classes"
                )
            if tensor.datatype not in CLASSIFIABLE:
                raise invalid(
                    f"{where} is {tensor.datatype.value}: class result not available for this "
                    "type, expected a numeric output (INT8..INT64, UINT8..UINT64, FP32, FP64)"
                )
            classes[output.name] = output.class_count
    return names, classes
