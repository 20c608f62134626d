"""Server settings: the command-line flags, Triton's names and defaults where they mean the same."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


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
    server_id: str = "tachyon"
    extra: dict[str, str] = field(default_factory=dict)
