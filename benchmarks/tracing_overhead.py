"""What tracing costs, two ways.

    python benchmarks/tracing_overhead.py [--rounds 3] [--seconds 5] [--concurrency 1,8]

1. In process, CPU time per traced request (robust on a busy machine): the off path (the one
   attribute check), recording a request's five spans (Tracer.start .. finish, the SDK's batch
   processor included, exporter discarding), and encoding them as OTLP protobuf (what the
   exporter's thread adds).
2. End to end: the digits model over gRPC and HTTP with tracing off, on for every request
   (rate=1, every span exported over OTLP/HTTP) and at Triton's default sampling (rate=1000),
   alternated in one run. The spans go to an OTLP/HTTP receiver in this process on loopback,
   which parses each ExportTraceServiceRequest and counts its spans (so "on" really
   exported). Load comes from the bundled suite (`tachyon bench run --url`).

Prints the command, the machine, every point, the medians and the on/off ratios; writes the raw
numbers to benchmarks/results/tracing-overhead-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import ROOT, Tachyon, print_header

MODES = {
    "off": [],
    "rate=1": ["mode=opentelemetry", "level=TIMESTAMPS", "rate=1"],
    "rate=1000": ["mode=opentelemetry", "level=TIMESTAMPS", "rate=1000"],
}
PORTS = (18500, 18501, 18502)


class Receiver(ThreadingHTTPServer):
    spans = 0
    requests = 0


class Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
        self.server.spans += sum(
            len(scope.spans) for rs in request.resource_spans for scope in rs.scope_spans
        )
        self.server.requests += 1
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def point(protocol: str, concurrency: int, seconds: float, out: Path) -> dict[str, float]:
    """One closed-loop point with `tachyon bench run`; infer/s, p50 and p99 (ms)."""
    port = PORTS[1] if protocol == "grpc" else PORTS[0]
    command = [str(ROOT / ".venv" / "bin" / "tachyon"), "bench", "run", "--url",
               f"127.0.0.1:{port}", "--model", "digits", "--protocol", protocol,
               "--concurrency", str(concurrency), "--duration", str(seconds), "--warmup", "1",
               "--no-progress", "--out", str(out)]
    subprocess.run(command, check=True, capture_output=True, text=True)
    raw = json.loads((out / "raw.json").read_text())
    result = raw["points"][0]
    if result["error_count"]:
        raise RuntimeError(f"{result['error_count']} requests failed: {result['errors']}")
    return {"infer_per_s": result["infer_per_s"], "p50_ms": result["latency_ms"]["p50"],
            "p99_ms": result["latency_ms"]["p99"]}


def micro(requests: int = 20_000) -> dict[str, float]:
    """CPU microseconds per request: off, recording the spans, encoding them for OTLP."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from server import tracing

    class Discard(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    def record(tracer: Any) -> float:
        started = time.process_time()
        for _ in range(requests):
            trace = tracer.start("grpc", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            trace.received()
            t = trace.received_ns
            trace.scheduled("digits", t, t + 1000, (t + 2000, 100, 5000, 100), 4)
            trace.responding()
            trace.finish("digits", "1", "")
        tracer.shutdown()  # the batch processor's thread finishes its work inside the clock
        return (time.process_time() - started) / requests * 1e6

    settings = tracing.parse(["mode=opentelemetry", "level=TIMESTAMPS", "rate=1",
                              "opentelemetry,bsp_max_queue_size=200000"])
    off_tracer = None
    started = time.perf_counter()
    for _ in range(requests * 10):
        if off_tracer is not None:  # the transports' check when tracing is off
            raise AssertionError
    off_us = (time.perf_counter() - started) / (requests * 10) * 1e6
    record_us = record(tracing.Tracer(settings, Discard()))
    memory = InMemorySpanExporter()
    record(tracing.Tracer(settings, memory))
    spans = memory.get_finished_spans()
    started = time.process_time()
    for start in range(0, len(spans), 512):  # the batch processor's export batch size
        encode_spans(spans[start:start + 512]).SerializeToString()
    encode_us = (time.process_time() - started) / requests * 1e6
    result = {"off_check_us": off_us, "record_us": record_us, "encode_us": encode_us,
              "spans_per_request": len(spans) / requests}
    print(f"in process, CPU per request: off {off_us * 1000:.0f} ns (the attribute check); "
          f"on: {record_us:.1f} us recording {result['spans_per_request']:.0f} spans + "
          f"{encode_us:.1f} us OTLP encoding", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--protocols", default="grpc,http")
    parser.add_argument("--micro-only", action="store_true", help="skip the end-to-end part")
    args = parser.parse_args()
    machine = print_header()
    in_process = micro()
    if args.micro_only:
        write(machine, args, in_process, [], [])
        return
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    protocols = args.protocols.split(",")
    receiver = Receiver(("127.0.0.1", 0), Handler)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    url = f"127.0.0.1:{receiver.server_address[1]}/v1/traces"
    work = Path(tempfile.mkdtemp(prefix="tracing-overhead-"))
    shutil.copytree(ROOT / "model_repository" / "digits", work / "repo" / "digits")
    rows: list[dict[str, Any]] = []
    try:
        for round_ in range(args.rounds):
            for mode, settings in MODES.items():
                flags = [*settings, f"opentelemetry,url={url}"] if settings else []
                extra = [a for f in flags for a in ("--trace-config", f)]
                spans_before = receiver.spans
                with Tachyon(work / "repo", *PORTS, *extra):
                    for protocol in protocols:
                        for c in concurrencies:
                            out = work / f"r{round_}-{mode}-{protocol}-{c}"
                            result = point(protocol, c, args.seconds, out)
                            rows.append({"round": round_, "mode": mode, "protocol": protocol,
                                         "concurrency": c, **result})
                            print(f"  round {round_} {mode:>9} {protocol:4} c{c:<3} "
                                  f"{result['infer_per_s']:8,.0f} infer/s  p50 "
                                  f"{result['p50_ms']:.3f} ms  p99 {result['p99_ms']:.3f} ms",
                                  flush=True)
                exported = receiver.spans - spans_before
                print(f"  round {round_} {mode:>9}: {exported:,} spans exported", flush=True)
                rows.append({"round": round_, "mode": mode, "spans_exported": exported})
    finally:
        shutil.rmtree(work, ignore_errors=True)
        receiver.shutdown()
    write(machine, args, in_process, rows, summarize(rows, protocols, concurrencies))


def write(machine: str, args: argparse.Namespace, in_process: dict[str, float],
          rows: list[dict[str, Any]], summary: list[dict[str, Any]]) -> None:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = ROOT / "benchmarks" / "results" / f"tracing-overhead-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "command": sys.argv, "seconds": args.seconds,
                               "in_process": in_process, "rows": rows, "summary": summary},
                              indent=2))
    print(f"wrote {out}")


def summarize(rows: list[dict[str, Any]], protocols: list[str],
              concurrencies: list[int]) -> list[dict[str, Any]]:
    summary = []
    print("medians (on/off ratio of infer/s; p50 added):")
    for protocol in protocols:
        for c in concurrencies:
            med: dict[str, dict[str, float]] = {}
            for mode in MODES:
                points = [r for r in rows if r.get("protocol") == protocol
                          and r.get("concurrency") == c and r["mode"] == mode]
                med[mode] = {k: statistics.median(p[k] for p in points)
                             for k in ("infer_per_s", "p50_ms", "p99_ms")}
            off = med["off"]
            line = {"protocol": protocol, "concurrency": c, **{
                f"{mode}_{k}": v for mode, m in med.items() for k, v in m.items()}}
            text = [f"{protocol:4} c{c:<3} off {off['infer_per_s']:8,.0f} infer/s "
                    f"p50 {off['p50_ms']:.3f} ms"]
            for mode in ("rate=1", "rate=1000"):
                ratio = med[mode]["infer_per_s"] / off["infer_per_s"]
                added_us = (med[mode]["p50_ms"] - off["p50_ms"]) * 1000
                line[f"{mode}_ratio"] = ratio
                line[f"{mode}_p50_added_us"] = added_us
                text.append(f"{mode} {med[mode]['infer_per_s']:8,.0f} ({ratio:.3f}x, p50 "
                            f"{added_us:+.0f} us)")
            print("  " + " | ".join(text))
            summary.append(line)
    return summary


if __name__ == "__main__":
    main()
