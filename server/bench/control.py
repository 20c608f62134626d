"""The benchmark's control connection to a server (not the load): is it there, what is the
model, one probe request, and the model's statistics before and after each point.

Blocking calls on purpose: they run in the coordinating process, between or beside the load,
never in a client process.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import grpc

from server import proto
from server.bench.errors import BenchError
from server.bench.inputs import HttpRequest, ModelInfo, TensorInfo, model_path

CONTROL_TIMEOUT_S = 10.0
PROBE_TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True)
class StatsSnapshot:
    """A model's cumulative statistics (Triton's ModelStatistics), summed over versions."""

    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    queue_count: int = 0
    queue_ns: int = 0
    compute_input_count: int = 0
    compute_input_ns: int = 0
    compute_infer_count: int = 0
    compute_infer_ns: int = 0
    compute_output_count: int = 0
    compute_output_ns: int = 0
    inference_count: int = 0
    execution_count: int = 0

    def __add__(self, other: StatsSnapshot) -> StatsSnapshot:
        return StatsSnapshot(*(getattr(self, f.name) + getattr(other, f.name)
                               for f in fields(self)))

    def __sub__(self, other: StatsSnapshot) -> StatsSnapshot:
        return StatsSnapshot(*(getattr(self, f.name) - getattr(other, f.name)
                               for f in fields(self)))

    @classmethod
    def from_json(cls, entry: Mapping[str, Any]) -> StatsSnapshot:
        """From one `model_stats` entry, JSON as the HTTP API (or MessageToDict) writes it."""
        stats = entry.get("inference_stats") or {}

        def duration(key: str) -> tuple[int, int]:
            value = stats.get(key) or {}
            return int(value.get("count", 0)), int(value.get("ns", 0))

        success, fail = duration("success"), duration("fail")
        queue, c_in = duration("queue"), duration("compute_input")
        c_infer, c_out = duration("compute_infer"), duration("compute_output")
        return cls(success[0], success[1], fail[0], *queue, *c_in, *c_infer, *c_out,
                   int(entry.get("inference_count", 0)), int(entry.get("execution_count", 0)))


def _model_info(name: str, version: str, metadata: Mapping[str, Any],
                config: Mapping[str, Any] | None) -> ModelInfo:
    def tensors(key: str) -> tuple[TensorInfo, ...]:
        return tuple(TensorInfo(str(t["name"]), str(t["datatype"]),
                                tuple(int(d) for d in t.get("shape", [])))
                     for t in metadata.get(key, []))

    max_batch = None if config is None else int(config.get("max_batch_size", 0))
    return ModelInfo(name, version, tensors("inputs"), tensors("outputs"), max_batch)


class Control(ABC):
    """One server's control calls; every failure that stops a benchmark is a BenchError."""

    def __init__(self, url: str, headers: Mapping[str, str] | None = None) -> None:
        self.url = url
        self.headers = dict(headers or {})  # sent with every control call (access tokens)

    @abstractmethod
    def check_live(self) -> None:
        """Raises BenchError when no KServe v2 server answers at the URL."""

    @abstractmethod
    def model_info(self, model: str, version: str) -> ModelInfo:
        """The model's metadata; BenchError when the server does not serve it ready."""

    @abstractmethod
    def stats(self, model: str, version: str) -> StatsSnapshot | None:
        """The model's statistics, None when the server has none for it."""

    @abstractmethod
    def probe(self, payload: bytes | HttpRequest) -> None:
        """Sends one request; BenchError with the server's message when it fails."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Releases connections."""


class GrpcControl(Control):
    def __init__(self, url: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(url, headers)
        self._metadata = tuple((k.lower(), v) for k, v in self.headers.items())
        self._channel = grpc.insecure_channel(
            url, options=[("grpc.max_receive_message_length", 1 << 30),
                          ("grpc.max_send_message_length", 1 << 30)])

    def close(self) -> None:
        self._channel.close()

    def _call(self, rpc: str, request: Any, timeout: float = CONTROL_TIMEOUT_S) -> Any:
        response_cls = proto.METHODS[rpc][1]
        method = self._channel.unary_unary(
            proto.full_method_name(rpc),
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_cls.FromString,
        )
        return method(request, timeout=timeout, metadata=self._metadata)

    def check_live(self) -> None:
        try:
            self._call("ServerLive", proto.ServerLiveRequest())
        except grpc.RpcError as exc:
            raise BenchError(f"cannot reach a KServe v2 gRPC server at {self.url}: "
                             f"{exc.code().name}: {exc.details()}") from None

    def model_info(self, model: str, version: str) -> ModelInfo:
        from google.protobuf import json_format

        try:
            metadata = self._call("ModelMetadata",
                                  proto.ModelMetadataRequest(name=model, version=version))
            ready = self._call("ModelReady", proto.ModelReadyRequest(name=model, version=version))
        except grpc.RpcError as exc:
            raise BenchError(f"model '{model}' is not available on {self.url}: "
                             f"{exc.code().name}: {exc.details()}") from None
        if not ready.ready:
            raise BenchError(f"model '{model}' is not ready on {self.url}")
        try:
            config = self._call("ModelConfig",
                                proto.ModelConfigRequest(name=model, version=version)).config
            config_json = {"max_batch_size": config.max_batch_size}
        except grpc.RpcError:
            config_json = None  # MLServer has no ModelConfig RPC
        meta_json = json_format.MessageToDict(metadata, preserving_proto_field_name=True)
        return _model_info(model, version, meta_json, config_json)

    def stats(self, model: str, version: str) -> StatsSnapshot | None:
        from google.protobuf import json_format

        try:
            response = self._call("ModelStatistics",
                                  proto.ModelStatisticsRequest(name=model, version=version))
        except grpc.RpcError:
            return None
        entries = json_format.MessageToDict(response, preserving_proto_field_name=True)
        return _sum_stats(entries.get("model_stats", []), model)

    def probe(self, payload: bytes | HttpRequest) -> None:
        assert isinstance(payload, bytes)
        method = self._channel.unary_unary(proto.full_method_name("ModelInfer"))
        try:
            method(payload, timeout=PROBE_TIMEOUT_S)
        except grpc.RpcError as exc:
            raise BenchError(f"the server at {self.url} rejected the first request: "
                             f"{exc.code().name}: {exc.details()}") from None


def _sum_stats(entries: list[Mapping[str, Any]], model: str) -> StatsSnapshot | None:
    mine = [e for e in entries if e.get("name", model) == model]
    if not mine:
        return None
    total = StatsSnapshot()
    for entry in mine:
        total += StatsSnapshot.from_json(entry)
    return total


class HttpControl(Control):
    def _request(self, path: str, body: bytes | None = None,
                 headers: Mapping[str, str] | None = None,
                 timeout: float = CONTROL_TIMEOUT_S) -> tuple[int, bytes]:
        request = urllib.request.Request(f"http://{self.url}{path}", data=body,
                                         headers={**self.headers, **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return int(response.status), response.read()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read()
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise BenchError(f"cannot reach a KServe v2 HTTP server at {self.url}: "
                             f"{reason}") from None

    @staticmethod
    def _error(body: bytes) -> str:
        try:
            return str(json.loads(body)["error"])
        except (ValueError, KeyError, TypeError):
            return body.decode(errors="replace")[:500]

    def check_live(self) -> None:
        status, body = self._request("/v2/health/live")
        if status != 200:
            raise BenchError(f"the HTTP server at {self.url} is not live "
                             f"(GET /v2/health/live: {status} {self._error(body)})")

    def model_info(self, model: str, version: str) -> ModelInfo:
        base = model_path(ModelInfo(model, version, (), (), None))
        status, body = self._request(base)
        if status != 200:
            raise BenchError(f"model '{model}' is not available on {self.url}: "
                             f"HTTP {status}: {self._error(body)}")
        status_ready, _ = self._request(base + "/ready")
        if status_ready != 200:
            raise BenchError(f"model '{model}' is not ready on {self.url}")
        status_config, config_body = self._request(base + "/config")
        config = json.loads(config_body) if status_config == 200 else None
        if isinstance(config, Mapping) and "config" in config:  # some servers wrap it
            config = config["config"]
        return _model_info(model, version, json.loads(body), config)

    def stats(self, model: str, version: str) -> StatsSnapshot | None:
        base = model_path(ModelInfo(model, version, (), (), None))
        try:
            status, body = self._request(base + "/stats")
            if status != 200:
                return None
            return _sum_stats(json.loads(body).get("model_stats", []), model)
        except (BenchError, ValueError, AttributeError):
            return None

    def probe(self, payload: bytes | HttpRequest) -> None:
        assert isinstance(payload, HttpRequest)
        status, body = self._request(payload.path, payload.body, payload.headers,
                                     timeout=PROBE_TIMEOUT_S)
        if status != 200:
            raise BenchError(f"the server at {self.url} rejected the first request: "
                             f"HTTP {status}: {self._error(body)}")


def connect(protocol: str, url: str, headers: Mapping[str, str] | None = None) -> Control:
    """A control connection of the scenario's protocol; `headers` go with every call."""
    return GrpcControl(url, headers) if protocol == "grpc" else HttpControl(url, headers)
