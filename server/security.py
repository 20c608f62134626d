"""Start-time checks of the TLS and restricted-API settings taken together, and their
application to the HTTP server.

Refusals: settings the chosen transports cannot honour, so a server never starts in cleartext
or unrestricted when asked for TLS or restrictions. Both gRPC front ends serve TLS and check
restrictions; what is left is a build without the native front end asked to use it. Warnings:
model control open to the network.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
from typing import cast

import uvicorn
from starlette.types import ASGIApp

from server.config import ServerSettings
from server.http.restricted import RestrictedApi
from server.restricted import Restrictions
from server.tls import TlsSettings

log = logging.getLogger(__name__)


class SecurityError(RuntimeError):
    """Settings the server refuses to start with; the message says what to change."""


def refusals(settings: ServerSettings) -> list[str]:
    """What the chosen transports cannot do of what the settings ask, one message each."""
    if settings.allow_grpc and settings.grpc_frontend == "native" and not _have_native_grpc():
        return [
            "--grpc-frontend native: this build of server._native has no native gRPC front end "
            "(nghttp2, zlib or OpenSSL was missing when it was built); add --grpc-frontend "
            "grpcio, or install libnghttp2-dev zlib1g-dev libssl-dev and reinstall"
        ]
    return []


def _have_native_grpc() -> bool:
    from server import _native

    return bool(getattr(_native, "HAVE_GRPC_FRONTEND", False))


def exposure_warnings(settings: ServerSettings) -> list[str]:
    """With explicit model control on an address other than loopback, a warning for each
    protocol whose model-repository group is open to every client: no restriction on it and no
    mutual TLS."""
    if settings.model_control_mode != "explicit" or _loopback(settings.host):
        return []
    protocols = (
        ("gRPC", settings.allow_grpc, settings.grpc_tls, settings.grpc_restricted,
         "--grpc-restricted-protocol"),
        ("HTTP", settings.allow_http, settings.http_tls, settings.http_restricted,
         "--http-restricted-api"),
    )
    return [
        f"--model-control-mode explicit on {settings.host}: any client that reaches {name} can "
        f"load and unload models; restrict it with {flag}=model-repository:<key>=<value>, "
        "or bind --host 127.0.0.1"
        for name, allowed, tls, restricted, flag in protocols
        if allowed and "model-repository" not in restricted and not (tls and tls.mutual)
    ]


def check(settings: ServerSettings) -> None:
    """Raises SecurityError on any refusal; logs the exposure warnings."""
    problems = refusals(settings)
    if problems:
        raise SecurityError("; ".join(problems))
    for warning in exposure_warnings(settings):
        log.warning("%s", warning)


def secure_http(
    config: uvicorn.Config, tls_settings: TlsSettings | None, restrictions: Restrictions
) -> None:
    """Makes the HTTP server's config serve HTTPS with `tls_settings` and refuse restricted
    requests without their header; call before the server is started (uvicorn reads both when
    it loads the config)."""
    if tls_settings is not None:
        config.ssl_certfile = tls_settings.server_cert
        config.ssl_keyfile = tls_settings.server_key
        config.ssl_ca_certs = tls_settings.root_cert
        config.ssl_cert_reqs = ssl.CERT_REQUIRED if tls_settings.mutual else ssl.CERT_NONE
    if restrictions:
        config.app = RestrictedApi(cast(ASGIApp, config.app), restrictions)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
