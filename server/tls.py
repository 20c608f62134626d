"""TLS for the gRPC and HTTP front ends, with Triton's flags.

`--grpc-use-ssl`, `--grpc-use-ssl-mutual`, `--grpc-server-cert`, `--grpc-server-key` and
`--grpc-root-cert` are Triton's; the `--http-*` flags mirror them (Triton's own HTTP front end has
no TLS). Mutual TLS implies TLS and needs the root certificate that clients' certificates are
checked against. The files are read and checked when the flags are read, so a missing file, a
key that does not match its certificate or a root without a certificate stops the server before
it loads any model, with a message naming the flag and the path.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class TlsError(ValueError):
    """A TLS flag or file that cannot be used; the message names the flag and the path."""


@dataclass(frozen=True, slots=True)
class TlsSettings:
    server_cert: Path
    """PEM server certificate (chain), as --<protocol>-server-cert."""
    server_key: Path
    """PEM private key of server_cert (not encrypted), as --<protocol>-server-key."""
    root_cert: Path | None = None
    """PEM certificates that client certificates must chain to (--<protocol>-root-cert)."""
    mutual: bool = False
    """Clients must present a certificate that chains to root_cert (--<protocol>-use-ssl-mutual)."""


def from_flags(
    protocol: str,
    use_ssl: bool,
    mutual: bool,
    server_cert: Path | None,
    server_key: Path | None,
    root_cert: Path | None,
) -> TlsSettings | None:
    """The TLS settings of one protocol ("grpc" or "http") from its flags, checked; None for
    cleartext. Raises TlsError when the flags disagree or a file cannot be used."""
    flag = f"--{protocol}"
    files = {"server-cert": server_cert, "server-key": server_key, "root-cert": root_cert}
    if not (use_ssl or mutual):
        given = [f"{flag}-{name}" for name, path in files.items() if path is not None]
        if given:
            raise TlsError(
                f"{', '.join(given)} given but {flag}-use-ssl is not true: pass "
                f"{flag}-use-ssl=true to serve {protocol} over TLS, or leave the files out"
            )
        return None
    if server_cert is None or server_key is None:
        raise TlsError(f"{flag}-use-ssl needs {flag}-server-cert and {flag}-server-key")
    if mutual and root_cert is None:
        raise TlsError(
            f"{flag}-use-ssl-mutual needs {flag}-root-cert: the CA that client certificates "
            "are checked against"
        )
    for name, path in files.items():
        if path is not None:
            _readable(f"{flag}-{name}", path)
    settings = TlsSettings(server_cert, server_key, root_cert, mutual)
    _check_pair(settings, flag)
    return settings


def _readable(flag: str, path: Path) -> None:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TlsError(f"{flag} {path}: cannot read it: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise TlsError(f"{flag} {path}: not a PEM file (no '-----BEGIN' line)")


def _no_password() -> bytes:
    raise TlsError("encrypted private keys are not supported: decrypt it (openssl pkey -in ...)")


def _check_pair(settings: TlsSettings, flag: str) -> None:
    """Loads the files the way a server does; raises TlsError naming `flag` and the files when
    they do not load (gRPC core's own errors say neither)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(settings.server_cert, settings.server_key, password=_no_password)
    except TlsError as exc:
        raise TlsError(f"{flag}-server-key {settings.server_key}: {exc}") from None
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(
            f"{flag}-server-cert {settings.server_cert} and {flag}-server-key "
            f"{settings.server_key}: not a certificate and its private key ({exc})"
        ) from None
    if settings.root_cert is not None:
        try:
            context.load_verify_locations(cafile=settings.root_cert)
        except (ssl.SSLError, OSError) as exc:
            raise TlsError(
                f"{flag}-root-cert {settings.root_cert}: no usable certificate in it ({exc})"
            ) from None


def grpc_credentials(settings: TlsSettings) -> Any:
    """grpc.ServerCredentials for add_secure_port: the key pair, and with mutual TLS the root
    certificates client certificates must chain to (required)."""
    import grpc

    root = settings.root_cert.read_bytes() if settings.root_cert is not None else None
    return grpc.ssl_server_credentials(
        [(settings.server_key.read_bytes(), settings.server_cert.read_bytes())],
        root_certificates=root,
        require_client_auth=settings.mutual,
    )
