"""Coalesced inference: many client requests to one model version whose rows a transport
already joined into one buffer per input (the native gRPC request path), run as one entry of
the model's DynamicBatcher, with the statistics and metrics of that many requests.

Which versions qualify (`plain_model`): a DynamicBatcher model (not an ensemble, no response
cache, no sequence batching, not decoupled) whose inputs and outputs all have fixed-size
datatypes and are required, and whose backend has no per-request checks for such tensors. A
transport hands this module only requests that are valid against the spec (names, datatypes,
shapes, sizes) and carry no parameters, so each runs at the default priority with the default
queue timeout, exactly as `DataPlane.infer` would run it; everything else takes that path.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from server.backends.base import Backend, Options
from server.batching import DynamicBatcher, Outputs
from server.dataplane import _failure_reason
from server.errors import ServingError
from server.manager import ModelManager, ModelVersion
from server.statistics import ModelStats
from server.types import Array, DataType, TensorSpec

log = logging.getLogger(__name__)

# Backends whose check_request looks at BYTES tensors only: a plain request needs no check.
_CHECKS_BYTES_ONLY = frozenset({"onnxruntime"})


@dataclass(frozen=True, slots=True)
class PlainModel:
    """A model version whose plain requests may be coalesced, with what a request to it uses."""

    token: int
    entry: ModelVersion
    batcher: DynamicBatcher
    keys: tuple[str, ...]  # the model_version strings that reach it ("": the default)
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    level: int
    timeout_us: int
    options: Options


@dataclass(slots=True, eq=False)
class CoalescedRequest:
    """`count` requests' rows to `model`: inputs in the model's order, outputs by name."""

    model: PlainModel
    inputs: dict[str, Array]
    outputs: list[str]
    rows: int
    count: int
    cancelled: int = 0  # requests whose client went away meanwhile (set by the transport)
    started_ns: int = field(default_factory=time.monotonic_ns)


def plain_model(entry: ModelVersion, token: int, keys: tuple[str, ...]) -> PlainModel | None:
    """`entry` as a PlainModel, or None when its requests must take DataPlane.infer."""
    spec, batcher = entry.spec, entry.batcher
    if spec is None or not entry.ready or not entry.backends:
        return None
    # a response-cache model's scheduler wraps its batcher (server/cached_scheduler.py);
    # sequence batching and decoupled models are refused at load (model_config._unsupported)
    if not isinstance(batcher, DynamicBatcher) or spec.response_cache:
        return None
    tensors = (*spec.inputs, *spec.outputs)
    if any(t.datatype is DataType.BYTES for t in tensors) or any(t.optional for t in spec.inputs):
        return None
    backend = entry.backends[0]
    checks = type(backend).check_request is not Backend.check_request
    if checks and spec.backend not in _CHECKS_BYTES_ONLY:
        return None
    try:
        level, timeout_us = batcher.check_parameters(None, None)
        options = backend.request_options({})
    except (ServingError, ValueError):
        return None
    return PlainModel(
        token, entry, batcher, keys,
        spec.inputs, spec.outputs,
        level, timeout_us, options,
    )


def plain_models(manager: ModelManager, first_token: int) -> list[PlainModel]:
    """Every READY version that qualifies, each with the version strings that reach it."""
    found = []
    token = first_token
    for entry in manager.entries():
        if not entry.ready:
            continue
        keys = [str(entry.version)]
        try:
            if manager.get(entry.name) is entry:
                keys.append("")
        except ServingError:
            pass
        model = plain_model(entry, token, tuple(keys))
        if model is not None:
            found.append(model)
            token += 1
    return found


def admits(model: PlainModel, count: int) -> bool:
    """Whether `count` requests to `model` can be queued now as one entry: else each takes
    DataPlane.infer, which answers each as today (a full queue refuses some of them)."""
    return model.entry.ready and model.batcher.admits(model.level, count)


async def infer(request: CoalescedRequest) -> Outputs:
    """Runs the rows through the model's batcher; the requests count as `count` successes
    (those cancelled meanwhile as failures), or all fail with the batch's error."""
    model = request.model
    stats = model.entry.stats
    try:
        outputs = await model.batcher.submit(
            request.inputs, request.outputs, request.rows, model.level, model.timeout_us,
            model.options, None, count=request.count,
        )
    except BaseException as exc:
        reason = _failure_reason(exc)
        record_failures(stats, time.monotonic_ns() - request.started_ns, reason, request.count)
        message = exc.message if isinstance(exc, ServingError) else repr(exc)
        level = logging.DEBUG if reason == "backend" else logging.INFO
        log.log(level, "%d requests to '%s' failed (%s): %s", request.count,
                model.entry.name, reason, message)
        raise
    ns = time.monotonic_ns() - request.started_ns
    if request.cancelled:
        record_failures(stats, ns, "cancelled", request.cancelled)
    record_successes(stats, ns, request.count - request.cancelled)
    return outputs


def record_successes(stats: ModelStats, ns: int, count: int) -> None:
    """`count` successful requests of `ns` each (ModelStats.record_success, in bulk)."""
    if count <= 0:
        return
    stats.success.add(ns * count, count)
    m = stats.metrics
    if m is not None:
        m.success.inc(count)
        seconds = ns / 1e9
        for _ in range(count):
            m.request.observe(seconds)


def record_failures(stats: ModelStats, ns: int, reason: str, count: int) -> None:
    """`count` failed requests of `ns` each (ModelStats.record_failure, in bulk)."""
    if count <= 0:
        return
    stats.fail.add(ns * count, count)
    if stats.metrics is not None:
        stats.metrics.failures[reason].inc(count)


def input_arrays(model: PlainModel, buffers: list[bytes], shapes: list[tuple[int, ...]]) -> dict[
    str, Array
]:
    """The coalesced input buffers as arrays (views, no copy), by name in the model's order."""
    return {
        t.name: np.frombuffer(b, t.datatype.numpy).reshape(s)
        for t, b, s in zip(model.inputs, buffers, shapes, strict=True)
    }


def wire_outputs(model: PlainModel, outputs: Outputs) -> list[Array | None]:
    """One C-contiguous array per model output in its wire datatype (None: not computed)."""
    return [
        None if (a := outputs.get(t.name)) is None
        else np.ascontiguousarray(a, dtype=t.datatype.numpy)
        for t in model.outputs
    ]

