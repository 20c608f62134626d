"""Server settings: the command-line flags, Triton's names and defaults where they mean the same."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from server.cache import CacheSettings
from server.restricted import Restrictions
from server.tls import TlsSettings
from server.tracing import TraceSettings


@dataclass(frozen=True, slots=True)
class GrpcConnections:
    """How both gRPC transports treat connections: Triton's --reuse-grpc-port and keepalive
    flags (grpc-core's channel arguments, with Triton's defaults), and --grpc-max-connections."""

    reuse_port: bool = False
    """SO_REUSEPORT: other processes may serve the same port (Triton's --reuse-grpc-port)."""
    max_connections: int = 10_000
    """More connections are closed at once (native: GOAWAY ENHANCE_YOUR_CALM); 0: no limit."""
    keepalive_time_ms: int = 7_200_000
    """A keepalive PING this long after the client was last heard from."""
    keepalive_timeout_ms: int = 20_000
    """No acknowledgement this long after a keepalive PING closes the connection."""
    keepalive_permit_without_calls: bool = False
    """Keepalive PINGs (ours, and the client's without strikes) also without calls in flight."""
    http2_max_pings_without_data: int = 2
    """Keepalive PINGs sent with no HEADERS or DATA in between; 0: no limit."""
    http2_min_recv_ping_interval_without_data_ms: int = 300_000
    """A client PING sooner than this after its previous one is a strike."""
    http2_max_ping_strikes: int = 2
    """More strikes earn GOAWAY(ENHANCE_YOUR_CALM, "too_many_pings"); 0: any number."""

    def grpc_options(self) -> list[tuple[str, int]]:
        """The same policy as grpc.aio server options (grpc-core channel arguments)."""
        return [
            ("grpc.so_reuseport", int(self.reuse_port)),
            ("grpc.max_allowed_incoming_connections", self.max_connections or 2**31 - 1),
            # As the native front end; also what grpc-core's rapid-reset defence counts against.
            ("grpc.max_concurrent_streams", 1024),
            ("grpc.keepalive_time_ms", self.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", self.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", int(self.keepalive_permit_without_calls)),
            ("grpc.http2.max_pings_without_data", self.http2_max_pings_without_data),
            ("grpc.http2.min_ping_interval_without_data_ms",
             self.http2_min_recv_ping_interval_without_data_ms),
            ("grpc.http2.max_ping_strikes", self.http2_max_ping_strikes),
        ]


@dataclass(frozen=True, slots=True)
class ServerSettings:
    model_repository: Path
    host: str = "0.0.0.0"
    http_port: int = 8000
    """HTTP/REST port; 0 disables HTTP... use allow_http instead; -1 is not accepted."""
    grpc_port: int = 8001
    metrics_port: int = 8002
    allow_http: bool = True
    allow_grpc: bool = True
    allow_metrics: bool = True
    model_control_mode: str = "none"
    """none: load everything at start; poll: rescan the repository; explicit: load on request."""
    load_models: tuple[str, ...] = ()
    repository_poll_secs: float = 15.0
    strict_model_config: bool = False
    """Refuse models whose config.pbtxt does not list inputs and outputs."""
    default_max_batch_size: int = 4
    """max_batch_size given to a batchable model whose config leaves it out (Triton: 4)."""
    max_request_bytes: int = 64 * 1024 * 1024
    """Requests above this size are refused with RESOURCE_EXHAUSTED / 413."""
    model_load_threads: int = 4
    metrics_latency_buckets: tuple[float, ...] = ()
    """Histogram bucket boundaries in seconds; empty: server.metrics.DEFAULT_LATENCY_BUCKETS."""
    grpc_frontend: str = "native"
    """gRPC transport: "native" (HTTP/2 on nghttp2 in a C++ I/O thread, server/grpc/
    native_frontend.py) or "grpcio" (grpc.aio)."""
    grpc_native_request_path: bool = True
    grpc_io_threads: int = 1
    """--grpc-io-threads: the native front end's I/O threads, each with its own SO_REUSEPORT
    listener on the gRPC port."""
    """With the native front end: plain ModelInfer requests to fixed-size tensor models are
    parsed, validated and coalesced in C++ (server/grpc/native_path.py)."""
    strict_readiness: bool = True
    """Triton's --strict-readiness: ready only while every model meant to be served is READY;
    false: ready once the server is up (live)."""
    exit_on_error: bool = True
    """Triton's --exit-on-error: exit at start when a model fails to load."""
    exit_timeout_secs: float = 30.0
    """Triton's --exit-timeout-secs: on SIGTERM, how long admitted requests may take to finish."""
    default_max_queue_size: int = 10_000
    """Requests a model version's queue holds when its config sets no max_queue_size (Triton has
    no bound); more are refused with RESOURCE_EXHAUSTED / 503. 0: unbounded."""
    grpc_tls: TlsSettings | None = None
    """--grpc-use-ssl[-mutual] and its files: gRPC over TLS (grpc.aio only); None: cleartext."""
    http_tls: TlsSettings | None = None
    """--http-use-ssl[-mutual] and its files: HTTPS; None: cleartext."""
    grpc_restricted: Restrictions = field(default_factory=Restrictions)
    """--grpc-restricted-protocol: groups whose RPCs need a `triton-grpc-protocol-<key>` header
    (grpc.aio only)."""
    http_restricted: Restrictions = field(default_factory=Restrictions)
    """--http-restricted-api: groups whose endpoints need a header."""
    grpc_connections: GrpcConnections = field(default_factory=GrpcConnections)
    """--reuse-grpc-port, --grpc-max-connections and the keepalive flags, for both transports."""
    server_id: str = "tachyon"
    trace: TraceSettings = field(default_factory=TraceSettings)
    """--trace-config: OpenTelemetry request traces (off by default, as in Triton)."""
    cache: CacheSettings | None = None
    """--cache-config local,size=BYTES: the server-wide response cache; None: no cache."""
    extra: dict[str, str] = field(default_factory=dict)
