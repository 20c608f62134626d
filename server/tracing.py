"""Request tracing: OpenTelemetry spans per inference request, exported over OTLP/HTTP.

Settings follow Triton's `--trace-config` family (docs/user_guide/trace.md): global settings
`mode=triton|opentelemetry`, `level=OFF|TIMESTAMPS|TENSORS`, `rate=N` (every N-th request),
`count=N` (stop after N sampled traces; -1: never) and, for OpenTelemetry,
`opentelemetry,url=...`, `opentelemetry,resource=KEY=VALUE`, `opentelemetry,bsp_max_queue_size=`,
`bsp_schedule_delay=` (ms), `bsp_max_export_batch_size=`. As in Triton, nothing is traced unless
`mode=opentelemetry` and `level=TIMESTAMPS`; a request that carries a W3C `traceparent` (HTTP
header or gRPC metadata) is traced whatever `rate` and `count` say, with the caller's trace id
and its span as parent; `rate=0` traces only those. Triton's own JSON trace files
(`mode=triton`) and `level=TENSORS` are refused.

One trace is one request span ("InferRequest", kind SERVER) with children "receive" (reading
and decoding the request), "queue" (admitted to the batcher until its batch was dispatched),
"compute" (gather, the backend's execute, split; events mark where input and output end and
begin) and "respond" (encoding, and for HTTP sending, the answer). An ensemble's request has a
queue and a compute span per step, each naming its model.

Cost when off: the data plane's `tracer` is None and each transport checks that one attribute
per request; the batcher checks one per answered request. When on, the timestamps are kept as
monotonic integers and the spans are built once, when the request finishes, with explicit start
and end times; the SDK's batch span processor exports them from its own thread. The
OpenTelemetry packages are the trace extra, imported only when tracing is on.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from server import extras

log = logging.getLogger(__name__)

DEFAULT_URL = "http://localhost:4318/v1/traces"
LEVELS = ("OFF", "TIMESTAMPS", "TENSORS")
MODES = ("triton", "opentelemetry")
TRACEPARENT, TRACESTATE = "traceparent", "tracestate"
_OTLP_HTTP = "opentelemetry.exporter.otlp.proto.http.trace_exporter"
_GLOBAL = ("rate", "level", "count", "mode")
_OPENTELEMETRY = (
    "url", "resource", "bsp_max_queue_size", "bsp_schedule_delay", "bsp_max_export_batch_size",
)
_TRITON = ("file", "log-frequency")  # Triton's JSON trace file: accepted, used only by mode=triton


class TraceConfigError(ValueError):
    """A --trace-config value Tachyon cannot honour; the message names the setting."""


@dataclass(frozen=True, slots=True)
class TraceSettings:
    """What `--trace-config` asked for (Triton's defaults)."""

    mode: str = "triton"
    level: str = "OFF"
    """OFF traces nothing; TIMESTAMPS records the spans."""
    rate: int = 1000
    """Trace every rate-th request (1: all; 0: only those that carry a traceparent)."""
    count: int = -1
    """Sampled traces to record before stopping (-1: no limit); propagated ones always count."""
    url: str = DEFAULT_URL
    """The OTLP/HTTP endpoint (`host:port[/path]`; http:// and /v1/traces when left out)."""
    resource: tuple[tuple[str, str], ...] = ()
    """Resource attributes (service.name defaults to "tachyon"; OTEL_RESOURCE_ATTRIBUTES too)."""
    bsp_max_queue_size: int | None = None
    bsp_schedule_delay_ms: int | None = None
    bsp_max_export_batch_size: int | None = None

    @property
    def enabled(self) -> bool:
        return self.mode == "opentelemetry" and self.level != "OFF"


def parse(entries: Iterable[str]) -> TraceSettings:
    """TraceSettings from `--trace-config` values (`<setting>=<value>` or
    `<mode>,<setting>=<value>`); raises TraceConfigError naming the entry."""
    values: dict[str, Any] = {}
    resource: list[tuple[str, str]] = []
    for entry in entries:
        key, sep, value = entry.partition("=")
        scope, _, setting = key.rpartition(",")
        where = f"--trace-config {entry}"
        if not sep or not setting:
            raise TraceConfigError(
                f"{where}: expected <setting>=<value> or <mode>,<setting>=<value>"
            )
        if scope == "" and setting in _GLOBAL:
            values[setting] = _global(where, setting, value, values.get("level", "OFF"))
        elif scope == "opentelemetry" and setting in _OPENTELEMETRY:
            if setting == "resource":
                name, eq, attribute = value.partition("=")
                if not eq or not name:
                    raise TraceConfigError(f"{where}: expected resource=<key>=<value>")
                resource.append((name, attribute))
            elif setting == "url":
                values["url"] = _url(where, value)
            else:
                values[setting] = _number(where, value, minimum=1)
        elif scope == "triton" and setting in _TRITON:
            continue
        else:
            raise TraceConfigError(
                f"{where}: unknown setting, expected one of {', '.join(_GLOBAL)}, "
                f"opentelemetry,{{{','.join(_OPENTELEMETRY)}}} or triton,{{{','.join(_TRITON)}}}"
            )
    settings = TraceSettings(
        mode=values.get("mode", "triton"),
        level=values.get("level", "OFF"),
        rate=values.get("rate", 1000),
        count=values.get("count", -1),
        url=values.get("url", DEFAULT_URL),
        resource=tuple(resource),
        bsp_max_queue_size=values.get("bsp_max_queue_size"),
        bsp_schedule_delay_ms=values.get("bsp_schedule_delay"),
        bsp_max_export_batch_size=values.get("bsp_max_export_batch_size"),
    )
    _check(settings)
    return settings


def _global(where: str, setting: str, value: str, level: str) -> Any:
    if setting == "mode":
        if value not in MODES:
            raise TraceConfigError(f"{where}: expected mode={' or mode='.join(MODES)}")
        return value
    if setting == "level":
        upper = value.upper()
        if upper not in LEVELS:
            raise TraceConfigError(f"{where}: expected level={', level='.join(LEVELS)}")
        # Triton: level may repeat to collect several kinds; OFF clears them
        if upper == "OFF" or level == "OFF":
            return upper
        return "TENSORS" if "TENSORS" in (upper, level) else upper
    if setting == "count":
        count = _number(where, value, minimum=-1)
        if count == 0:
            raise TraceConfigError(f"{where}: expected count=-1 (no limit) or a positive count")
        return count
    return _number(where, value, minimum=0)  # rate


def _number(where: str, value: str, minimum: int) -> int:
    try:
        number = int(value)
    except ValueError:
        number = minimum - 1
    if number < minimum:
        raise TraceConfigError(f"{where}: expected an integer >= {minimum}")
    return number


def _url(where: str, value: str) -> str:
    from urllib.parse import urlsplit

    url = value if "://" in value else f"http://{value}"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TraceConfigError(
            f"{where}: expected the OTLP/HTTP endpoint as [http[s]://]host:port[/v1/traces]"
        )
    return url if parts.path not in ("", "/") else f"{url.rstrip('/')}/v1/traces"


def _check(settings: TraceSettings) -> None:
    if settings.level == "OFF":
        return
    if settings.mode == "triton":
        raise TraceConfigError(
            f"--trace-config level={settings.level} with mode=triton: Triton's JSON trace files "
            "are not supported, use --trace-config mode=opentelemetry (OTLP/HTTP export)"
        )
    if settings.level == "TENSORS":
        raise TraceConfigError(
            "--trace-config level=TENSORS: tensors are not traced in opentelemetry mode (as in "
            "Triton), use level=TIMESTAMPS"
        )


def inert(settings: TraceSettings) -> list[str]:
    """Settings that parse but trace nothing, in words for the start-up log."""
    if settings.mode == "opentelemetry" and settings.level == "OFF":
        return [
            "--trace-config mode=opentelemetry with level OFF (Triton's default) traces no "
            "request: add --trace-config level=TIMESTAMPS"
        ]
    return []


def check_installed(settings: TraceSettings) -> None:
    """Raises TraceConfigError when tracing is on and the trace extra is missing."""
    if not settings.enabled:
        return
    import importlib

    try:
        for module in ("opentelemetry.sdk.trace", _OTLP_HTTP):
            importlib.import_module(module)
    except ImportError as exc:
        raise TraceConfigError(
            extras.missing("--trace-config mode=opentelemetry", "trace", exc)
        ) from None


def make_tracer(settings: TraceSettings, exporter: Any = None) -> Tracer | None:
    """The server's tracer, or None when tracing is off (the default)."""
    return Tracer(settings, exporter) if settings.enabled else None


def traceparent_of(metadata: Iterable[tuple[str, Any]] | None) -> tuple[str | None, str | None]:
    """The `traceparent` and `tracestate` of gRPC metadata (key, value) pairs."""
    parent = state = None
    for key, value in metadata or ():
        if key == TRACEPARENT:
            parent = value if isinstance(value, str) else value.decode("latin-1")
        elif key == TRACESTATE:
            state = value if isinstance(value, str) else value.decode("latin-1")
    return parent, state


def grpc_traceparent(context: Any) -> tuple[str | None, str | None]:
    """The trace context a gRPC call carries: grpc.aio's invocation metadata, (name, value)
    pairs a front end passes as the context itself, or none (the native front end passes
    None until it hands request metadata over)."""
    if context is None:
        return None, None
    if isinstance(context, tuple | list):
        return traceparent_of(context)
    return traceparent_of(context.invocation_metadata())


class Tracer:
    """Decides which requests are traced and turns finished RequestTraces into spans.

    The spans of a request are made once it has finished, with the times it recorded, as the
    SDK's ReadableSpans handed straight to its batch span processor: the SDK's Tracer would
    build each one live (sampler, context, locks) only for us to end it at once, which cost
    twice as much CPU per request here (benchmarks/tracing_overhead.py).
    """

    def __init__(self, settings: TraceSettings, exporter: Any = None) -> None:
        """`exporter`: an OpenTelemetry SpanExporter (tests pass an in-memory one); default
        OTLP/HTTP to `settings.url`."""
        try:
            from opentelemetry import trace
            from opentelemetry.sdk import trace as sdk
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
            from opentelemetry.sdk.util.instrumentation import InstrumentationScope
            from opentelemetry.trace.propagation.tracecontext import (
                TraceContextTextMapPropagator,
            )
        except ImportError as exc:
            raise TraceConfigError(
                extras.missing("--trace-config mode=opentelemetry", "trace", exc)
            ) from None
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(endpoint=settings.url)
        self.settings = settings
        attributes: dict[str, str] = {"service.name": "tachyon"}
        attributes.update(settings.resource)
        self._resource = Resource.create(attributes)  # also reads OTEL_RESOURCE_ATTRIBUTES
        self._scope = InstrumentationScope("tachyon")
        self._processor = BatchSpanProcessor(
            exporter,
            max_queue_size=settings.bsp_max_queue_size,
            schedule_delay_millis=settings.bsp_schedule_delay_ms,
            max_export_batch_size=settings.bsp_max_export_batch_size,
        )
        self._otel = trace
        self._sdk = sdk
        self._ids = RandomIdGenerator()
        self._sampled_flags = trace.TraceFlags(trace.TraceFlags.SAMPLED)
        self._propagator = TraceContextTextMapPropagator()
        self._seen = itertools.count(1)
        self._remaining = settings.count
        which = (
            "requests that carry a traceparent" if settings.rate == 0
            else "every request" if settings.rate == 1
            else f"every {settings.rate}th request and those that carry a traceparent"
        )
        log.info("tracing %s: OpenTelemetry spans to %s", which, settings.url)

    def start(
        self, protocol: str, traceparent: str | None = None, tracestate: str | None = None
    ) -> RequestTrace | None:
        """A RequestTrace for a request arriving now, or None when it is not sampled: one with a
        traceparent always is (as in Triton), others every `rate`-th while `count` lasts."""
        start_ns = time.monotonic_ns()
        parent = None
        if traceparent is not None:
            carrier = {TRACEPARENT: traceparent}
            if tracestate is not None:
                carrier[TRACESTATE] = tracestate
            context = self._propagator.extract(carrier)
            parent = self._otel.get_current_span(context).get_span_context()
            if not parent.is_valid:
                parent = None
        if parent is None and not self._sampled():  # no (valid) context: sample by rate
            return None
        return RequestTrace(self, parent, protocol, start_ns)

    def _sampled(self) -> bool:
        rate = self.settings.rate
        if rate == 0 or self._remaining == 0 or next(self._seen) % rate:
            return False
        if self._remaining > 0:
            self._remaining -= 1
        return True

    def record(self, trace: RequestTrace, attributes: Mapping[str, Any], error: str | None) -> None:
        """Makes the spans of a finished request and queues them for export (event loop)."""
        otel, sdk, ids, to_wall = self._otel, self._sdk, self._ids, trace.wall_offset
        parent = trace.parent
        trace_id = parent.trace_id if parent is not None else ids.generate_trace_id()
        state = parent.trace_state if parent is not None else None
        flags = self._sampled_flags
        root = otel.SpanContext(trace_id, ids.generate_span_id(), False, flags, state)
        on_end = self._processor.on_end
        for name, start, end, span_attributes, events in trace.children():
            on_end(sdk.ReadableSpan(
                name, otel.SpanContext(trace_id, ids.generate_span_id(), False, flags, state),
                root, self._resource, span_attributes,
                [sdk.Event(event, None, at + to_wall) for event, at in events],
                instrumentation_scope=self._scope, start_time=start + to_wall,
                end_time=end + to_wall,
            ))
        status = otel.Status(
            otel.StatusCode.ERROR if error is not None else otel.StatusCode.UNSET, error
        )
        on_end(sdk.ReadableSpan(
            "InferRequest", root, parent, self._resource, attributes,
            kind=otel.SpanKind.SERVER, status=status, instrumentation_scope=self._scope,
            start_time=trace.start_ns + to_wall, end_time=trace.end_ns + to_wall,
        ))

    def shutdown(self) -> None:
        """Exports what is queued and stops the exporter thread."""
        self._processor.shutdown()


@dataclass(slots=True)
class _Scheduled:
    """One pass through a batcher: a model's queue and the batch that computed the request."""

    model: str
    enqueued_ns: int
    dispatched_ns: int
    compute_ns: int
    input_ns: int
    infer_ns: int
    output_ns: int
    batch_rows: int


class RequestTrace:
    """The timestamps of one traced request (monotonic ns), recorded by the transport, the
    batcher and the data plane, then handed to the tracer once, by `finish`.

    Who calls what: the transport creates it (Tracer.start) before reading the request, calls
    `received` once decoded and `responding` when it starts encoding the answer, and `finish`
    once the answer is out; the batcher calls `scheduled` when it answers the request; the data
    plane calls `finish` with the error when the request fails there. Only the first `finish`
    counts. Everything runs on the event loop thread.
    """

    __slots__ = (
        "_finished", "_tracer", "end_ns", "parent", "protocol", "received_ns", "responding_ns",
        "scheduled_passes", "start_ns", "wall_offset",
    )

    def __init__(self, tracer: Tracer, parent: Any, protocol: str, start_ns: int) -> None:
        self._tracer = tracer
        self.parent = parent
        self.protocol = protocol
        self.start_ns = start_ns
        self.wall_offset = time.time_ns() - time.monotonic_ns()
        self.received_ns = 0
        self.responding_ns = 0
        self.end_ns = 0
        self.scheduled_passes: list[_Scheduled] = []
        self._finished = False

    def received(self) -> None:
        self.received_ns = time.monotonic_ns()

    def scheduled(
        self, model: str, enqueued_ns: int, dispatched_ns: int, times: Sequence[int],
        batch_rows: int,
    ) -> None:
        """`times`: the batch's compute start, then its input, infer and output durations."""
        compute_ns, input_ns, infer_ns, output_ns = times
        self.scheduled_passes.append(_Scheduled(
            model, enqueued_ns, dispatched_ns, compute_ns, input_ns, infer_ns, output_ns,
            batch_rows,
        ))

    def responding(self) -> None:
        self.responding_ns = time.monotonic_ns()

    def finish(
        self, model: str, version: str, request_id: str = "", error: BaseException | None = None
    ) -> None:
        if self._finished:
            return
        self._finished = True
        self.end_ns = time.monotonic_ns()
        attributes = {
            "model_name": model,
            "model_version": version,
            "request_id": request_id,
            "tachyon.protocol": self.protocol,
        }
        message = None
        if error is not None:
            message = getattr(error, "message", None) or repr(error)
        try:
            self._tracer.record(self, attributes, message)
        except Exception:  # a trace must never fail a request
            log.exception("tracing: could not record a trace")

    def children(self) -> list[tuple[str, int, int, dict[str, Any], list[tuple[str, int]]]]:
        """(name, start, end, attributes, events) of each child span, in order."""
        spans: list[tuple[str, int, int, dict[str, Any], list[tuple[str, int]]]] = []
        if self.received_ns:
            spans.append(("receive", self.start_ns, self.received_ns, {}, []))
        for p in self.scheduled_passes:
            model = {"model_name": p.model}
            spans.append(("queue", p.enqueued_ns, p.dispatched_ns, model, []))
            input_end = p.compute_ns + p.input_ns
            output_start = input_end + p.infer_ns
            spans.append((
                "compute", p.compute_ns, output_start + p.output_ns,
                {**model, "batch_size": p.batch_rows},
                [("COMPUTE_INPUT_END", input_end), ("COMPUTE_OUTPUT_START", output_start)],
            ))
        if self.responding_ns:
            spans.append(("respond", self.responding_ns, self.end_ns, {}, []))
        return spans
