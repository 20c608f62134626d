"""Tracing: Triton's --trace-config settings, sampling, span shape (in-memory exporter), and a
real OTLP/HTTP export from `tachyon serve` to a receiver on loopback that parses the protobuf
ExportTraceServiceRequest, over HTTP and both gRPC front ends, with W3C traceparent
propagation."""

from __future__ import annotations

import gzip
import json
import shutil
import threading
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from server import tracing
from server.tracing import TraceConfigError, TraceSettings
from tests.conftest import BUNDLED, ServerFactory, wait_for

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
CHILDREN = ["receive", "queue", "compute", "respond"]
ON = ["mode=opentelemetry", "level=TIMESTAMPS", "rate=1"]


def traceparent(trace_id: str = TRACE_ID, span_id: str = PARENT_ID, flags: str = "01") -> str:
    return f"00-{trace_id}-{span_id}-{flags}"


# -- settings -------------------------------------------------------------------------------


def test_tracing_is_off_by_default_and_with_mode_alone() -> None:
    assert not TraceSettings().enabled
    assert tracing.make_tracer(TraceSettings()) is None
    settings = tracing.parse(["mode=opentelemetry"])
    assert not settings.enabled  # Triton: level defaults to OFF
    assert "level=TIMESTAMPS" in tracing.inert(settings)[0]


def test_triton_settings_parse() -> None:
    settings = tracing.parse([
        "mode=opentelemetry", "level=TIMESTAMPS", "rate=100", "count=5",
        "opentelemetry,url=collector:4318/v1/traces",
        "opentelemetry,resource=service.name=tachyon-a", "opentelemetry,resource=team=ml",
        "opentelemetry,bsp_schedule_delay=200", "opentelemetry,bsp_max_queue_size=4096",
        "opentelemetry,bsp_max_export_batch_size=256", "triton,file=/tmp/ignored.json",
    ])
    assert settings.enabled
    assert (settings.rate, settings.count) == (100, 5)
    assert settings.url == "http://collector:4318/v1/traces"
    assert settings.resource == (("service.name", "tachyon-a"), ("team", "ml"))
    assert settings.bsp_schedule_delay_ms == 200
    assert settings.bsp_max_queue_size == 4096
    assert settings.bsp_max_export_batch_size == 256
    assert tracing.parse(["opentelemetry,url=https://c:4318"]).url == "https://c:4318/v1/traces"
    assert tracing.parse(["level=TIMESTAMPS", "level=OFF"]).level == "OFF"


@pytest.mark.parametrize(
    ("entries", "words"),
    [
        (["level=TIMESTAMPS"], "mode=triton"),
        (["mode=opentelemetry", "level=TENSORS"], "level=TENSORS"),
        (["rate=-1"], "rate=-1: expected an integer >= 0"),
        (["count=0"], "count=0"),
        (["mode=jaeger"], "mode=jaeger"),
        (["colour=blue"], "unknown setting"),
        (["opentelemetry,resource=x"], "resource=<key>=<value>"),
        (["opentelemetry,url=ftp://x/"], "OTLP/HTTP endpoint"),
        (["rate"], "expected <setting>=<value>"),
    ],
)
def test_bad_settings_are_refused_naming_them(entries: list[str], words: str) -> None:
    with pytest.raises(TraceConfigError) as caught:
        tracing.parse(entries)
    assert words in str(caught.value)


def test_serve_refuses_a_trace_mode_it_cannot_honour(tmp_path: Path) -> None:
    from server.cli import main

    assert main(["serve", "--model-repository", str(tmp_path),
                 "--trace-config", "level=TIMESTAMPS"]) == 2


# -- sampling and span shape (in-memory exporter) ------------------------------------------


def _tracer(*entries: str) -> tuple[tracing.Tracer, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tracer = tracing.make_tracer(tracing.parse(["mode=opentelemetry", "level=TIMESTAMPS",
                                                *entries]), exporter)
    assert tracer is not None
    return tracer, exporter


def test_rate_count_and_propagated_contexts() -> None:
    tracer, _ = _tracer("rate=3", "count=2")
    sampled = [tracer.start("http") is not None for _ in range(9)]
    assert sampled == [False, False, True, False, False, True, False, False, False]
    # a request that carries a traceparent is traced whatever rate and count say (Triton)
    assert tracer.start("http", traceparent()) is not None
    assert tracer.start("http", "not a traceparent") is None
    only_propagated, _ = _tracer("rate=0")
    assert only_propagated.start("grpc") is None
    assert only_propagated.start("grpc", traceparent()) is not None
    every, _ = _tracer("rate=1")
    assert all(every.start("grpc") is not None for _ in range(5))
    for t in (tracer, only_propagated, every):
        t.shutdown()


def test_spans_children_and_propagated_ids() -> None:
    tracer, exporter = _tracer("rate=1")
    trace = tracer.start("grpc", traceparent(), "vendor=abc")
    assert trace is not None
    trace.received()
    t = trace.received_ns
    trace.scheduled("tokenizer", t + 10, t + 20, (t + 30, 5, 50, 5), 3)
    trace.scheduled("embed", t + 100, t + 120, (t + 130, 10, 100, 10), 4)
    trace.responding()
    trace.finish("pipeline", "1", "req-7")
    trace.finish("pipeline", "1", "req-7")  # only the first finish counts
    tracer.shutdown()
    spans = {(s.name, s.attributes.get("model_name")): s for s in exporter.get_finished_spans()}
    assert len(spans) == 7
    root = spans[("InferRequest", "pipeline")]
    assert f"{root.context.trace_id:032x}" == TRACE_ID
    assert root.parent is not None and f"{root.parent.span_id:016x}" == PARENT_ID
    assert dict(root.attributes) == {"model_name": "pipeline", "model_version": "1",
                                     "request_id": "req-7", "tachyon.protocol": "grpc"}
    assert root.status.is_ok
    for (name, _), span in spans.items():
        if name == "InferRequest":
            continue
        assert span.parent is not None and span.parent.span_id == root.context.span_id, name
        assert span.context.trace_id == root.context.trace_id
        assert root.start_time <= span.start_time <= span.end_time <= root.end_time, name
    compute = spans[("compute", "embed")]
    assert compute.attributes["batch_size"] == 4
    assert [e.name for e in compute.events] == ["COMPUTE_INPUT_END", "COMPUTE_OUTPUT_START"]
    assert compute.end_time - compute.start_time == 120
    assert spans[("queue", "tokenizer")].end_time - spans[("queue", "tokenizer")].start_time == 10


def test_a_failed_request_is_an_error_span() -> None:
    tracer, exporter = _tracer("rate=1")
    trace = tracer.start("http")
    assert trace is not None
    trace.received()
    trace.finish("nope", "", "", ValueError("boom"))
    tracer.shutdown()
    (root,) = [s for s in exporter.get_finished_spans() if s.name == "InferRequest"]
    assert not root.status.is_ok and "boom" in (root.status.description or "")
    assert root.parent is None  # a fresh trace: no propagated context


# -- end to end: a real OTLP/HTTP receiver --------------------------------------------------


class _Receiver(ThreadingHTTPServer):
    spans: list[dict[str, Any]]
    lock: threading.Lock


class _Handler(BaseHTTPRequestHandler):
    server: _Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        encoding = self.headers.get("Content-Encoding", "")
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "deflate":
            body = zlib.decompress(body)
        assert self.path == "/v1/traces", self.path
        assert self.headers.get("Content-Type") == "application/x-protobuf"
        request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
        found = []
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    found.append({
                        "name": span.name,
                        "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(),
                        "parent": span.parent_span_id.hex(),
                        "start": span.start_time_unix_nano,
                        "end": span.end_time_unix_nano,
                        "attributes": {a.key: _value(a.value) for a in span.attributes},
                        "error": span.status.code == span.status.STATUS_CODE_ERROR,
                        "service": resource.get("service.name"),
                    })
        with self.server.lock:
            self.server.spans.extend(found)
        reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


@pytest.fixture(scope="module")
def receiver() -> Iterator[_Receiver]:
    server = _Receiver(("127.0.0.1", 0), _Handler)
    server.spans = []
    server.lock = threading.Lock()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def digits_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repository = tmp_path_factory.mktemp("trace-repo")
    # version 1 only (version 2 is the int8 copy): the traces name version 1
    shutil.copytree(BUNDLED / "digits", repository / "digits", ignore=_other_versions)
    return repository


def _other_versions(folder: str, names: list[str]) -> list[str]:
    return [n for n in names if n.isdigit() and n != "1"] if folder.endswith("digits") else []


def _sample() -> np.ndarray:
    sample = json.loads((BUNDLED / "digits" / "sample.json").read_text())["request"]["inputs"][0]
    return np.array(sample["data"], dtype=np.float32).reshape(sample["shape"])


def _trace(receiver: _Receiver, trace_id: str, count: int) -> list[dict[str, Any]]:
    def spans() -> list[dict[str, Any]]:
        with receiver.lock:
            return [s for s in receiver.spans if s["trace_id"] == trace_id]

    wait_for(lambda: len(spans()) >= count, f"{count} spans of trace {trace_id}", timeout=15)
    return spans()


def _check_request_trace(spans: list[dict[str, Any]], parent: str, protocol: str) -> None:
    (root,) = [s for s in spans if s["name"] == "InferRequest"]
    assert root["parent"] == parent
    assert root["service"] == "tachyon"
    assert root["attributes"]["model_name"] == "digits"
    assert root["attributes"]["model_version"] == "1"
    assert root["attributes"]["tachyon.protocol"] == protocol
    assert not root["error"]
    children = sorted((s for s in spans if s is not root), key=lambda s: s["start"])
    assert [s["name"] for s in children] == CHILDREN
    for child in children:
        assert child["parent"] == root["span_id"], child["name"]
        assert root["start"] <= child["start"] <= child["end"] <= root["end"], child["name"]
    compute = children[2]
    assert compute["attributes"]["model_name"] == "digits"
    assert compute["attributes"]["batch_size"] == 4


def _otlp_flags(receiver: _Receiver) -> list[str]:
    url = f"127.0.0.1:{receiver.server_address[1]}/v1/traces"
    flags = [*ON, f"opentelemetry,url={url}", "opentelemetry,bsp_schedule_delay=50"]
    return [arg for flag in flags for arg in ("--trace-config", flag)]


@pytest.mark.slow
def test_http_and_grpcio_export_spans_with_the_callers_trace(
    start_server: ServerFactory, receiver: _Receiver, digits_repository: Path
) -> None:
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    server = start_server(digits_repository, "--grpc-frontend", "grpcio", *_otlp_flags(receiver))
    x = _sample()

    http = httpclient.InferenceServerClient(server.http_url)
    inp = httpclient.InferInput("INPUT", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    http_trace = "11112222333344445555666677778888"
    result = http.infer("digits", [inp], headers={"traceparent": traceparent(http_trace)})
    assert result.as_numpy("LABEL").ravel().tolist() == [2, 0, 4, 9]
    _check_request_trace(_trace(receiver, http_trace, 5), PARENT_ID, "http")

    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    ginp = grpcclient.InferInput("INPUT", list(x.shape), "FP32")
    ginp.set_data_from_numpy(x)
    grpc_trace = "aaaabbbbccccddddeeeeffff00001111"
    result = grpc.infer("digits", [ginp], headers={"traceparent": traceparent(grpc_trace)})
    assert result.as_numpy("LABEL").ravel().tolist() == [2, 0, 4, 9]
    _check_request_trace(_trace(receiver, grpc_trace, 5), PARENT_ID, "grpc")

    # a failing request is an error span (and the receive it got through) in the caller's trace
    failed_trace = "0123456789abcdef0123456789abcdef"
    with pytest.raises(Exception, match=r"unknown model|not found"):
        http.infer("nope", [inp], headers={"traceparent": traceparent(failed_trace)})
    spans = _trace(receiver, failed_trace, 2)
    assert sorted(s["name"] for s in spans) == ["InferRequest", "receive"]
    (root,) = [s for s in spans if s["name"] == "InferRequest"]
    assert root["error"] and root["attributes"]["model_name"] == "nope"

    # rate=1 also traces requests without a traceparent, each in a trace of its own
    before = {s["trace_id"] for s in receiver.spans}
    http.infer("digits", [inp])
    wait_for(lambda: len({s["trace_id"] for s in receiver.spans} - before) == 1, "a new trace")
    assert server.stop() == 0


@pytest.mark.slow
def test_native_grpc_front_end_traces(
    start_server: ServerFactory, receiver: _Receiver, digits_repository: Path
) -> None:
    """The native front end keeps a call's traceparent (only while tracing is on) and hands it
    to Python: the request's spans join the caller's trace."""
    import tritonclient.grpc as grpcclient

    server = start_server(digits_repository, "--grpc-frontend", "native", *_otlp_flags(receiver))
    x = _sample()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    inp = grpcclient.InferInput("INPUT", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    trace_id = "99998888777766665555444433332222"
    result = client.infer("digits", [inp], headers={"traceparent": traceparent(trace_id)})
    assert result.as_numpy("LABEL").ravel().tolist() == [2, 0, 4, 9]
    _check_request_trace(_trace(receiver, trace_id, 5), PARENT_ID, "grpc")
    assert server.stop() == 0


def test_grpc_trace_context_from_metadata() -> None:
    class Context:
        def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
            return (("x-other", "1"), ("traceparent", traceparent()), ("tracestate", "a=b"))

    assert tracing.grpc_traceparent(None) == (None, None)
    assert tracing.grpc_traceparent(Context()) == (traceparent(), "a=b")
    assert tracing.grpc_traceparent((("traceparent", traceparent().encode()),)) == (
        traceparent(), None)
