"""TLS in the native gRPC front end (server._native.GrpcFrontend with server_cert / server_key):
grpcio over TLS and mutual TLS, large messages across many TLS records, clients refused
(cleartext, no client certificate or a stranger's, no ALPN "h2", TLS 1.1), the handshake
timeout, stop() with a handshake pending, and files that do not load. Whole servers on both
front ends are in test_tls.py; the certificates are its throwaway PKI."""

from __future__ import annotations

import os
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from server import _native
from tests.test_native_grpc import wait_items
from tests.test_tls import Pki, make_pki

pytestmark = pytest.mark.skipif(
    not getattr(_native, "HAVE_GRPC_FRONTEND", False), reason="built without the front end"
)

LIMIT = 8 << 20
SERVICE = "test.Echo"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_frontend(pki: Pki, *, mutual: bool = False, handshake_timeout: float = 10.0) -> Any:
    fe = _native.GrpcFrontend(
        "127.0.0.1", 0, LIMIT, service=SERVICE, streaming_methods=["Chat"],
        server_cert=str(pki.server_cert), server_key=str(pki.server_key),
        root_cert=str(pki.ca) if mutual else "", mutual=mutual,
        tls_handshake_timeout_s=handshake_timeout,
    )
    fe.start()
    return fe


@pytest.fixture
def frontend(pki: Pki) -> Iterator[Any]:
    fe = tls_frontend(pki)
    yield fe
    fe.stop(1.0)


@pytest.fixture
def mutual(pki: Pki) -> Iterator[Any]:
    fe = tls_frontend(pki, mutual=True)
    yield fe
    fe.stop(1.0)


def secure_channel(fe: Any, pki: Pki, cert: Path | None = None,
                   key: Path | None = None) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        pki.ca.read_bytes(),
        None if key is None else key.read_bytes(),
        None if cert is None else cert.read_bytes(),
    )
    options = [("grpc.max_receive_message_length", LIMIT),
               ("grpc.max_send_message_length", LIMIT)]
    return grpc.secure_channel(f"127.0.0.1:{fe.port}", credentials, options=options)


def echo(fe: Any, channel: grpc.Channel, message: bytes) -> bytes:
    """One unary call, answered with its message reversed."""
    future = channel.unary_unary(f"/{SERVICE}/Say").future(message, timeout=10)
    [(call_id, method, got, kind)] = wait_items(fe, 1)
    assert (method, got, kind) == ("Say", message, 0)
    fe.respond([(call_id, got[::-1], 0, "")])
    answer: bytes = future.result()
    return answer


def refused(channel: grpc.Channel) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        channel.unary_unary(f"/{SERVICE}/Say")(b"x", timeout=5)
    code: grpc.StatusCode = info.value.code()  # type: ignore[attr-defined]
    return code


def tls_client(pki: Pki, alpn: list[str] | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    return context


def closed_by_server(sock: socket.socket | ssl.SSLSocket) -> bool:
    """Whether the server closed the connection (EOF or reset) within 5 s."""
    sock.settimeout(5)
    try:
        return sock.recv(1) == b""
    except (ConnectionError, ssl.SSLError):
        return True


# -- serving ---------------------------------------------------------------------------------


def test_unary_calls_over_tls(frontend: Any, pki: Pki) -> None:
    with secure_channel(frontend, pki) as channel:
        assert echo(frontend, channel, b"hello") == b"olleh"
        assert echo(frontend, channel, b"") == b""


def test_large_messages_cross_many_tls_records(frontend: Any, pki: Pki) -> None:
    message = os.urandom(3 << 20)  # ~200 records each way, several reads and writes
    with secure_channel(frontend, pki) as channel:
        assert echo(frontend, channel, message) == message[::-1]


def test_streams_over_tls(frontend: Any, pki: Pki) -> None:
    with secure_channel(frontend, pki) as channel:
        call = channel.stream_stream(f"/{SERVICE}/Chat")(iter([b"a", b"b"]), timeout=10)
        items = wait_items(frontend, 3)
        assert [(m, kind) for _, _, m, kind in items] == [(b"a", 1), (b"b", 1), (b"", 2)]
        call_id = items[0][0]
        frontend.send_stream([(call_id, b"A"), (call_id, b"B")])
        frontend.respond([(call_id, None, 0, "")])
        assert list(call) == [b"A", b"B"]


def test_tls_1_2_with_h2_is_served(frontend: Any, pki: Pki) -> None:
    context = tls_client(pki, ["h2"])
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection(("127.0.0.1", frontend.port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
        assert (sock.version(), sock.selected_alpn_protocol()) == ("TLSv1.2", "h2")


# -- mutual TLS ------------------------------------------------------------------------------


def test_mutual_tls_serves_a_client_the_root_signed(mutual: Any, pki: Pki) -> None:
    with secure_channel(mutual, pki, pki.client_cert, pki.client_key) as channel:
        assert echo(mutual, channel, b"hello") == b"olleh"


def test_mutual_tls_refuses_clients_without_a_signed_certificate(mutual: Any, pki: Pki) -> None:
    with secure_channel(mutual, pki) as channel:
        assert refused(channel) == grpc.StatusCode.UNAVAILABLE
    with secure_channel(mutual, pki, pki.stranger_cert, pki.stranger_key) as channel:
        assert refused(channel) == grpc.StatusCode.UNAVAILABLE
    assert mutual.take() == []  # nothing reached the application


# -- refused ---------------------------------------------------------------------------------


def test_cleartext_client_is_refused(frontend: Any) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{frontend.port}") as channel:
        assert refused(channel) == grpc.StatusCode.UNAVAILABLE


def test_a_client_that_does_not_offer_h2_fails_the_handshake(frontend: Any, pki: Pki) -> None:
    context = tls_client(pki, ["http/1.1"])
    with socket.create_connection(("127.0.0.1", frontend.port), timeout=5) as raw, \
            pytest.raises(ssl.SSLError, match="no application protocol"):
        context.wrap_socket(raw, server_hostname="127.0.0.1")


def test_a_client_without_alpn_is_disconnected_after_the_handshake(
    frontend: Any, pki: Pki
) -> None:
    with socket.create_connection(("127.0.0.1", frontend.port), timeout=5) as raw, \
            tls_client(pki).wrap_socket(raw, server_hostname="127.0.0.1") as sock:
        assert sock.selected_alpn_protocol() is None
        assert closed_by_server(sock)


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_tls_1_1_is_refused(frontend: Any, pki: Pki) -> None:
    context = tls_client(pki, ["h2"])
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # lets this client offer TLS 1.1 at all
    context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_1
    with socket.create_connection(("127.0.0.1", frontend.port), timeout=5) as raw, \
            pytest.raises(ssl.SSLError, match="PROTOCOL_VERSION"):
        context.wrap_socket(raw, server_hostname="127.0.0.1")


def test_an_unfinished_handshake_is_closed_after_the_timeout(pki: Pki) -> None:
    fe = tls_frontend(pki, handshake_timeout=0.3)
    try:
        with socket.create_connection(("127.0.0.1", fe.port), timeout=5) as idle, \
                socket.create_connection(("127.0.0.1", fe.port), timeout=5) as partial:
            partial.sendall(b"\x16\x03\x01\x02\x00")  # a ClientHello's record header, no more
            started = time.monotonic()
            assert closed_by_server(idle) and closed_by_server(partial)
            assert time.monotonic() - started < 3
        with secure_channel(fe, pki) as channel:  # the front end serves on
            assert echo(fe, channel, b"ok") == b"ko"
    finally:
        fe.stop(1.0)


def test_stop_does_not_wait_for_a_pending_handshake(pki: Pki) -> None:
    fe = tls_frontend(pki)
    with socket.create_connection(("127.0.0.1", fe.port), timeout=5) as idle:
        time.sleep(0.1)  # accepted
        started = time.monotonic()
        fe.stop(5.0)
        assert time.monotonic() - started < 2
        assert closed_by_server(idle)


# -- configuration ---------------------------------------------------------------------------


def test_files_that_do_not_load_are_refused_naming_them(pki: Pki, tmp_path: Path) -> None:
    def make(**tls: Any) -> Any:
        return _native.GrpcFrontend("127.0.0.1", 0, LIMIT, **tls)

    missing = tmp_path / "missing.crt"
    with pytest.raises(ValueError, match=f"server certificate '{missing}'"):
        make(server_cert=str(missing), server_key=str(pki.server_key))
    with pytest.raises(ValueError, match=f"server key .*'{pki.client_key}'.*mismatch"):
        make(server_cert=str(pki.server_cert), server_key=str(pki.client_key))
    with pytest.raises(ValueError, match="server key"):  # refused, never prompted for
        make(server_cert=str(pki.server_cert), server_key=str(pki.encrypted_server_key))
    with pytest.raises(ValueError, match="root certificates"):
        make(server_cert=str(pki.server_cert), server_key=str(pki.server_key),
             root_cert=str(pki.server_key), mutual=True)
    with pytest.raises(ValueError, match="mutual TLS needs root_cert"):
        make(server_cert=str(pki.server_cert), server_key=str(pki.server_key), mutual=True)
    with pytest.raises(ValueError, match="both server_cert and server_key"):
        make(server_cert=str(pki.server_cert))
    with pytest.raises(ValueError, match="tls_handshake_timeout_s"):
        make(server_cert=str(pki.server_cert), server_key=str(pki.server_key),
             tls_handshake_timeout_s=0.0)
