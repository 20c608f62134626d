"""The `tachyon` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from server import (
    __version__,
    bench,
    index_build,
    logs,
    optimize,
    restricted,
    security,
    tls,
    tracing,
)
from server.backends import tensorrt_build
from server.cache import CacheConfigError, parse_cache_config
from server.config import GrpcConnections, ServerSettings


def _io_threads(value: str) -> int:
    """--grpc-io-threads: 1..64."""
    try:
        count = int(value)
    except ValueError:
        count = 0
    if not 1 <= count <= 64:
        raise argparse.ArgumentTypeError(f"expected 1..64 I/O threads, got '{value}'")
    return count


def _bool(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _buckets(value: str) -> tuple[float, ...]:
    try:
        buckets = tuple(sorted(float(v) for v in value.split(",") if v.strip()))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected seconds like 0.001,0.01,0.1, got {value!r}"
        ) from None
    if not buckets or buckets[0] <= 0:
        raise argparse.ArgumentTypeError(f"expected positive seconds, got {value!r}")
    return buckets


def _default_frontend() -> str:
    """The native gRPC front end when this build has it (nghttp2, zlib and OpenSSL were found),
    else grpc.aio."""
    from server import _native

    return "native" if getattr(_native, "HAVE_GRPC_FRONTEND", False) else "grpcio"


def _serve_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model repository over gRPC and HTTP",
        description="Serve the models of a Triton-layout repository over KServe v2 gRPC and "
        "HTTP/REST (flag names and default ports follow Triton's).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model-repository", "--model-store", type=Path, required=True,
                   metavar="DIR", help="the repository: DIR/<model>/config.pbtxt, DIR/<model>/<n>/")
    p.add_argument("--host", default="0.0.0.0", help="address the gRPC and HTTP servers bind")
    p.add_argument("--http-port", type=int, default=8000, help="HTTP/REST port")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port")
    p.add_argument("--metrics-port", type=int, default=8002,
                   help="Prometheus metrics port (/metrics)")
    p.add_argument("--grpc-frontend", choices=("native", "grpcio"), default=_default_frontend(),
                   help="gRPC transport: native (HTTP/2 on nghttp2 in a C++ I/O thread, about 2x "
                   "grpc.aio's throughput) or grpcio (grpc.aio)")
    p.add_argument("--grpc-io-threads", type=_io_threads, default=1, metavar="N",
                   help="native front end: N I/O threads (1..64), each with its own listener on "
                   "the gRPC port (SO_REUSEPORT), so HTTP/2 and the native request path scale "
                   "with cores")
    p.add_argument("--grpc-native-request-path", type=_bool, default=True, metavar="BOOL",
                   help="native front end: plain ModelInfer requests to fixed-size tensor models "
                   "are parsed, validated and coalesced in C++ (one Python step per batch); "
                   "false: every request takes the Python path")
    p.add_argument("--allow-http", type=_bool, default=True, metavar="BOOL",
                   help="serve HTTP/REST")
    p.add_argument("--allow-grpc", type=_bool, default=True, metavar="BOOL", help="serve gRPC")
    p.add_argument("--allow-metrics", type=_bool, default=True, metavar="BOOL",
                   help="serve Prometheus metrics")
    p.add_argument("--metrics-latency-buckets", type=_buckets, default=(), metavar="S,S,...",
                   help="histogram bucket boundaries in seconds (default: 100us .. 5s)")
    p.add_argument("--model-control-mode", choices=("none", "poll", "explicit"), default="none",
                   help="none: load every model at start; poll: also follow the repository's "
                   "changes; explicit: load only --load-model models and what load requests ask")
    p.add_argument("--load-model", action="append", default=[], metavar="NAME",
                   help="with explicit mode: a model to load at start (repeatable; '*' = all)")
    p.add_argument("--repository-poll-secs", type=float, default=15.0, metavar="S",
                   help="with poll mode: seconds between repository scans")
    p.add_argument("--strict-model-config", type=_bool, nargs="?", const=True, default=False,
                   metavar="BOOL",
                   help="refuse models whose config.pbtxt does not list inputs and outputs, "
                   "instead of completing them from the model file")
    p.add_argument("--default-max-batch-size", type=int, default=4, metavar="N",
                   help="max_batch_size given to batchable models whose config has none")
    p.add_argument("--max-request-bytes", type=int, default=64 * 1024 * 1024, metavar="N",
                   help="largest request accepted (bigger: RESOURCE_EXHAUSTED / 413)")
    p.add_argument("--strict-readiness", type=_bool, default=True, metavar="BOOL",
                   help="ready only while every model meant to be served is READY (false: "
                   "ready once the server is up)")
    p.add_argument("--exit-on-error", type=_bool, default=True, metavar="BOOL",
                   help="exit at start when a model fails to load (false: serve the others)")
    p.add_argument("--exit-timeout-secs", type=float, default=30.0, metavar="S",
                   help="on SIGTERM, seconds admitted requests have to finish")
    p.add_argument("--default-max-queue-size", type=int, default=10_000, metavar="N",
                   help="requests a model's queue holds when its config sets no max_queue_size "
                   "(0: unbounded); more are refused with RESOURCE_EXHAUSTED / 503")
    p.add_argument("--model-load-thread-count", type=int, default=4, metavar="N",
                   help="threads that load models in parallel")
    p.add_argument("--id", dest="server_id", default="tachyon", metavar="NAME",
                   help="the server's name in server metadata (Triton's --id; its default is "
                   "'triton', which some clients' examples check)")
    p.add_argument("--log-verbose", type=int, default=0, metavar="N",
                   help="0: info; 1: debug, a line per request; 2: also library debug lines")
    p.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="text lines, or one JSON object per line")
    p.add_argument("--trace-config", action="append", default=[],
                   metavar="[MODE,]SETTING=VALUE",
                   help="request tracing, Triton's settings (repeatable): mode=opentelemetry, "
                   "level=TIMESTAMPS, rate=N (every N-th request; 0: only requests carrying a "
                   "traceparent), count=N, opentelemetry,url=HOST:PORT/v1/traces, "
                   "opentelemetry,resource=KEY=VALUE, opentelemetry,bsp_schedule_delay=MS; off "
                   "unless mode=opentelemetry and level=TIMESTAMPS")
    p.add_argument("--cache-config", action="append", default=[], metavar="local,size=BYTES",
                   help="the response cache, Triton's setting: local,size=BYTES (repeatable); "
                   "models with response_cache { enable: true } then answer repeated requests "
                   "from it")
    p.add_argument("--response-cache-byte-size", type=int, metavar="BYTES",
                   help="deprecated (as in Triton): the same as --cache-config local,size=BYTES")
    _security_flags(p)
    _grpc_connection_flags(p)


def _at_least(low: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
        if number < low:
            raise argparse.ArgumentTypeError(f"expected at least {low}, got {number}")
        return number

    return parse


def _grpc_connection_flags(p: argparse.ArgumentParser) -> None:
    """Triton's --reuse-grpc-port and keepalive flags (grpc-core's channel arguments, same
    defaults), and --grpc-max-connections; both gRPC front ends honour them."""
    d = GrpcConnections()
    p.add_argument("--reuse-grpc-port", type=_bool, nargs="?", const=True, default=d.reuse_port,
                   metavar="BOOL", help="SO_REUSEPORT: let other servers that set it listen on "
                   "the same gRPC port (the kernel spreads connections among them)")
    p.add_argument("--grpc-max-connections", type=_at_least(0), default=d.max_connections,
                   metavar="N", help="gRPC connections beyond this many are closed at once "
                   "(native: GOAWAY ENHANCE_YOUR_CALM 'too many connections'); 0: no limit")
    p.add_argument("--grpc-keepalive-time", type=_at_least(1), default=d.keepalive_time_ms,
                   metavar="MS", help="a keepalive PING this long after the client was last "
                   "heard from")
    p.add_argument("--grpc-keepalive-timeout", type=_at_least(1),
                   default=d.keepalive_timeout_ms, metavar="MS",
                   help="close a connection whose keepalive PING is not answered this long")
    p.add_argument("--grpc-keepalive-permit-without-calls", type=_bool, nargs="?", const=True,
                   default=d.keepalive_permit_without_calls, metavar="BOOL",
                   help="keepalive PINGs also without calls in flight (ours, and the client's "
                   "without counting strikes)")
    p.add_argument("--grpc-http2-max-pings-without-data", type=_at_least(0),
                   default=d.http2_max_pings_without_data, metavar="N",
                   help="keepalive PINGs sent with no data or headers in between; 0: no limit")
    p.add_argument("--grpc-http2-min-recv-ping-interval-without-data", type=_at_least(0),
                   default=d.http2_min_recv_ping_interval_without_data_ms, metavar="MS",
                   help="a client PING sooner than this after its previous one is a strike")
    p.add_argument("--grpc-http2-max-ping-strikes", type=_at_least(0),
                   default=d.http2_max_ping_strikes, metavar="N",
                   help="more strikes earn GOAWAY(ENHANCE_YOUR_CALM, 'too_many_pings') and the "
                   "connection closes; 0: any number")


def _cache_values(args: argparse.Namespace) -> list[str]:
    values = list(args.cache_config)
    if args.response_cache_byte_size is not None:
        values.append(f"local,size={args.response_cache_byte_size}")
    return values


def _grpc_connections(args: argparse.Namespace) -> GrpcConnections:
    return GrpcConnections(
        reuse_port=args.reuse_grpc_port,
        max_connections=args.grpc_max_connections,
        keepalive_time_ms=args.grpc_keepalive_time,
        keepalive_timeout_ms=args.grpc_keepalive_timeout,
        keepalive_permit_without_calls=args.grpc_keepalive_permit_without_calls,
        http2_max_pings_without_data=args.grpc_http2_max_pings_without_data,
        http2_min_recv_ping_interval_without_data_ms=(
            args.grpc_http2_min_recv_ping_interval_without_data
        ),
        http2_max_ping_strikes=args.grpc_http2_max_ping_strikes,
    )


def _security_flags(p: argparse.ArgumentParser) -> None:
    """Triton's TLS and restricted-API flags (the --http-*-ssl ones mirror the gRPC ones)."""
    groups = ", ".join(restricted.GROUPS)
    for protocol, name in (("grpc", "gRPC"), ("http", "HTTP")):
        p.add_argument(f"--{protocol}-use-ssl", type=_bool, nargs="?", const=True, default=False,
                       metavar="BOOL", help=f"serve {name} over TLS (needs "
                       f"--{protocol}-server-cert and --{protocol}-server-key)")
        p.add_argument(f"--{protocol}-use-ssl-mutual", type=_bool, nargs="?", const=True,
                       default=False, metavar="BOOL", help=f"serve {name} over TLS and require a "
                       f"client certificate that chains to --{protocol}-root-cert")
        p.add_argument(f"--{protocol}-server-cert", type=Path, metavar="PEM",
                       help=f"{name} server certificate (chain)")
        p.add_argument(f"--{protocol}-server-key", type=Path, metavar="PEM",
                       help=f"{name} server private key")
        p.add_argument(f"--{protocol}-root-cert", type=Path, metavar="PEM",
                       help=f"CA certificates that {name} client certificates must chain to")
    p.add_argument("--grpc-restricted-protocol", action="append", default=[],
                   metavar="GROUPS:KEY=VALUE",
                   help="gRPC calls of these comma-separated groups need the metadata "
                   f"triton-grpc-protocol-KEY: VALUE, else UNAVAILABLE (repeatable; groups: "
                   f"{groups})")
    p.add_argument("--http-restricted-api", action="append", default=[],
                   metavar="GROUPS:KEY=VALUE",
                   help="HTTP requests to endpoints of these comma-separated groups need the "
                   f"header KEY: VALUE, else 403 (repeatable; groups: {groups})")


def _tls(args: argparse.Namespace, protocol: str) -> tls.TlsSettings | None:
    """One protocol's TLS settings from its flags; raises TlsError naming the flag."""
    return tls.from_flags(
        protocol,
        getattr(args, f"{protocol}_use_ssl"),
        getattr(args, f"{protocol}_use_ssl_mutual"),
        getattr(args, f"{protocol}_server_cert"),
        getattr(args, f"{protocol}_server_key"),
        getattr(args, f"{protocol}_root_cert"),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tachyon",
        description="Tachyon: a KServe v2 / Open Inference Protocol model server.",
    )
    parser.add_argument("--version", action="version", version=f"tachyon {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _serve_parser(sub)
    index_build.add_parser(sub)
    bench.add_parser(sub)
    optimize.add_parser(sub)
    tensorrt_build.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "index":
        return index_build.run(args)
    if args.command == "bench":
        return bench.run(args)
    if args.command == "trt":
        return tensorrt_build.run(args)
    if args.command == "optimize":
        return optimize.run(args, list(argv) if argv is not None else None)
    if args.command == "serve":
        logs.configure(args.log_verbose, args.log_format)
        if not args.model_repository.is_dir():
            print(f"tachyon: --model-repository {args.model_repository} is not a directory",
                  file=sys.stderr)
            return 2
        try:
            grpc_tls, http_tls = _tls(args, "grpc"), _tls(args, "http")
            grpc_restricted = restricted.parse(
                args.grpc_restricted_protocol, "--grpc-restricted-protocol",
                restricted.GRPC_HEADER_PREFIX,
            )
            http_restricted = restricted.parse(args.http_restricted_api, "--http-restricted-api")
            trace = tracing.parse(args.trace_config)
            tracing.check_installed(trace)
            cache_settings = parse_cache_config(_cache_values(args))
        except (
            tls.TlsError, restricted.RestrictionError, tracing.TraceConfigError, CacheConfigError,
        ) as exc:
            print(f"tachyon: {exc}", file=sys.stderr)
            return 2
        settings = ServerSettings(
            model_repository=args.model_repository,
            host=args.host,
            http_port=args.http_port,
            grpc_port=args.grpc_port,
            metrics_port=args.metrics_port,
            allow_http=args.allow_http,
            allow_grpc=args.allow_grpc,
            allow_metrics=args.allow_metrics,
            model_control_mode=args.model_control_mode,
            load_models=tuple(args.load_model),
            repository_poll_secs=args.repository_poll_secs,
            strict_model_config=args.strict_model_config,
            default_max_batch_size=args.default_max_batch_size,
            max_request_bytes=args.max_request_bytes,
            model_load_threads=args.model_load_thread_count,
            metrics_latency_buckets=args.metrics_latency_buckets,
            grpc_frontend=args.grpc_frontend,
            grpc_native_request_path=args.grpc_native_request_path,
            grpc_io_threads=args.grpc_io_threads,
            server_id=args.server_id,
            strict_readiness=args.strict_readiness,
            exit_on_error=args.exit_on_error,
            exit_timeout_secs=args.exit_timeout_secs,
            default_max_queue_size=args.default_max_queue_size,
            grpc_tls=grpc_tls,
            http_tls=http_tls,
            grpc_restricted=grpc_restricted,
            http_restricted=http_restricted,
            trace=trace,
            grpc_connections=_grpc_connections(args),
            cache=cache_settings,
        )
        for warning in tracing.inert(trace):
            print(f"tachyon: warning: {warning}", file=sys.stderr)
        problems = security.refusals(settings)
        for problem in problems:
            print(f"tachyon: {problem}", file=sys.stderr)
        if problems:
            return 2
        from server.app import run

        run(settings)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
