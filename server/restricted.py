"""Restricted APIs, as Triton's `--grpc-restricted-protocol` and `--http-restricted-api`.

Each flag value is `<group>[,<group>...]:<key>=<value>`: a call to an RPC or endpoint of one of
those groups must carry the header `<key>` (HTTP) or `triton-grpc-protocol-<key>` (gRPC
metadata) with exactly `<value>`; otherwise it is refused before it reaches the data plane
(gRPC UNAVAILABLE "This protocol is restricted, expecting header '...'", HTTP 403 "This API is
restricted, expecting header '...'", Triton's codes and messages). A group may appear in one
restriction only. Groups left out stay open.

This module is transport-neutral: the parsing, the group of each gRPC method and HTTP path, and
the header check. `server/grpc/restricted.py` and `server/http/restricted.py` apply it.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

GROUPS = (
    "health",
    "metadata",
    "inference",
    "shared-memory",
    "model-config",
    "model-repository",
    "statistics",
    "trace",
    "logging",
)

GRPC_HEADER_PREFIX = "triton-grpc-protocol-"
"""Triton's prefix of every gRPC restriction header (metadata keys are lowercase on the wire)."""

_GRPC_SERVICE = "/inference.GRPCInferenceService/"
GRPC_METHOD_GROUPS: Mapping[str, str] = MappingProxyType({
    **{_GRPC_SERVICE + m: "health" for m in ("ServerLive", "ServerReady", "ModelReady")},
    **{_GRPC_SERVICE + m: "metadata" for m in ("ServerMetadata", "ModelMetadata")},
    **{_GRPC_SERVICE + m: "inference" for m in ("ModelInfer", "ModelStreamInfer")},
    **{
        f"{_GRPC_SERVICE}{kind}SharedMemory{op}": "shared-memory"
        for kind in ("System", "Cuda")
        for op in ("Status", "Register", "Unregister")
    },
    _GRPC_SERVICE + "ModelConfig": "model-config",
    **{
        _GRPC_SERVICE + m: "model-repository"
        for m in ("RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload")
    },
    _GRPC_SERVICE + "ModelStatistics": "statistics",
    _GRPC_SERVICE + "TraceSetting": "trace",
    _GRPC_SERVICE + "LogSettings": "logging",
    # Triton puts the standard health check in `health`; reflection, which Triton lacks,
    # describes the server's services, so it goes with `metadata`.
    "/grpc.health.v1.Health/Check": "health",
    "/grpc.health.v1.Health/Watch": "health",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": "metadata",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo": "metadata",
})
"""The group of every gRPC method the server answers, by its full name."""

_NAME = r"[^/]+"
_MODEL = rf"/v2/models/{_NAME}(?:/versions/{_NAME})?"
# Triton's HTTPAPIServer::Handle, in its order; matched against the whole path.
_HTTP_PATTERNS = [
    (re.compile(pattern), group)
    for pattern, group in (
        (r"/v2/models/stats", "statistics"),
        (r"/v2/logging", "logging"),
        (rf"{_MODEL}/ready", "health"),
        (rf"{_MODEL}/(?:infer|generate|generate_stream)", "inference"),
        (rf"{_MODEL}/config", "model-config"),
        (rf"{_MODEL}/stats", "statistics"),
        (rf"/v2/models/{_NAME}/trace/setting", "trace"),
        (_MODEL, "metadata"),
        (r"/v2", "metadata"),
        (r"/v2/health/(?:live|ready)", "health"),
        (rf"/v2/(?:system|cuda)sharedmemory(?:/region/{_NAME})?/(?:status|register|unregister)",
         "shared-memory"),
        (rf"/v2/repository(?:/{_NAME})?/index", "model-repository"),
        (rf"/v2/repository(?:/{_NAME})?/models/{_NAME}/(?:load|unload)", "model-repository"),
        (r"/v2/trace/setting", "trace"),
    )
]


def grpc_group(method: str) -> str | None:
    """The group of a gRPC method (`/package.Service/Method`), None for one the server lacks."""
    return GRPC_METHOD_GROUPS.get(method)


def http_group(path: str) -> str | None:
    """The group of an HTTP path, None for a path no endpoint answers (it gets a 404). A trailing
    slash is ignored: the router redirects such paths to the same endpoint."""
    if len(path) > 1:
        path = path.rstrip("/")
    for pattern, group in _HTTP_PATTERNS:
        if pattern.fullmatch(path):
            return group
    return None


@dataclass(frozen=True, slots=True)
class Restriction:
    header: str
    """The complete header name (gRPC: with `triton-grpc-protocol-`), lowercase."""
    value: str

    def allows(self, sent: str | bytes | None) -> bool:
        """Whether `sent`, the header's value in a call (None: absent), is the expected one.
        Compared in constant time: the value is a secret."""
        if sent is None:
            return False
        if isinstance(sent, str):
            sent = sent.encode("latin-1", "replace")
        return hmac.compare_digest(sent, self.value.encode("latin-1"))

    def grpc_message(self) -> str:
        return f"This protocol is restricted, expecting header '{self.header}'"

    def http_message(self) -> str:
        return f"This API is restricted, expecting header '{self.header}'"


@dataclass(frozen=True, slots=True)
class Restrictions:
    """The restriction of each restricted group; groups not in it are open."""

    by_group: Mapping[str, Restriction] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.by_group)

    def __iter__(self) -> Iterator[str]:
        return iter(self.by_group)

    def __contains__(self, group: object) -> bool:
        return group in self.by_group

    def get(self, group: str | None) -> Restriction | None:
        return None if group is None else self.by_group.get(group)


class RestrictionError(ValueError):
    """A restriction flag that does not parse; the message names the flag and the value."""


_HTTP_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")
_GRPC_KEY = re.compile(r"[0-9a-z_.-]+")
_VALUE = re.compile(r"[\x20-\x7e]+")


def parse(values: Sequence[str], flag: str, header_prefix: str = "") -> Restrictions:
    """Parses repeated `--grpc-restricted-protocol` (header_prefix GRPC_HEADER_PREFIX) or
    `--http-restricted-api` (no prefix) values. Raises RestrictionError naming the flag; the
    messages leave the value (a secret) out."""
    by_group: dict[str, Restriction] = {}
    for raw in values:
        shown = f"{flag}={raw.partition('=')[0]}=..." if "=" in raw else f"{flag}={raw}"
        groups, key, value = _split(raw, shown)
        restriction = Restriction(header_prefix + _key(key, shown, header_prefix), value)
        for group in groups:
            if group not in GROUPS:
                raise RestrictionError(
                    f"{shown}: unknown group '{group}', expected some of {', '.join(GROUPS)}"
                )
            if group in by_group:
                raise RestrictionError(
                    f"{shown}: group '{group}' is already restricted by another {flag}; a group "
                    "may be in one restriction only"
                )
            by_group[group] = restriction
    return Restrictions(MappingProxyType(by_group))


def _split(raw: str, shown: str) -> tuple[list[str], str, str]:
    groups, colon, setting = raw.partition(":")
    key, equals, value = setting.partition("=")
    names = [g.strip() for g in groups.split(",")]
    if not colon or not equals or not key or not value or not all(names):
        raise RestrictionError(
            f"{shown}: expected <group>[,<group>...]:<key>=<value> (groups: {', '.join(GROUPS)})"
        )
    if not _VALUE.fullmatch(value):
        raise RestrictionError(f"{shown}: the value must be printable ASCII (a header value)")
    return names, key, value


def _key(key: str, shown: str, header_prefix: str) -> str:
    if header_prefix:
        # gRPC metadata keys are lowercase on the wire; "-bin" keys carry binary values
        key = key.lower()
        if not _GRPC_KEY.fullmatch(key) or key.endswith("-bin"):
            raise RestrictionError(
                f"{shown}: key '{key}' is not a gRPC metadata key (letters, digits, '-', '_', "
                "'.'; not ending in '-bin')"
            )
        return key
    if not _HTTP_TOKEN.fullmatch(key):
        raise RestrictionError(f"{shown}: key '{key}' is not an HTTP header name")
    return key.lower()
