"""Start-time checks of the TLS and restricted-API settings taken together, and their
application to the HTTP server.

Refusals: settings the chosen transports cannot honour (the native gRPC front end has no TLS
and does not hand request metadata to Python yet), so a server never starts in cleartext or
unrestricted when asked for TLS or restrictions. Warnings: model control open to the network.
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
    problems = []
    if settings.allow_grpc and settings.grpc_frontend == "native":
        if settings.grpc_tls is not None:
            problems.append(
                "--grpc-use-ssl: the native gRPC front end serves cleartext HTTP/2 only; add "
                "--grpc-frontend grpcio to serve gRPC over TLS"
            )
        if settings.grpc_restricted:
            problems.append(
                "--grpc-restricted-protocol: the native gRPC front end does not hand request "
                "metadata to Python yet, so it cannot check the header; add --grpc-frontend "
                "grpcio to restrict gRPC"
            )
    return problems


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
