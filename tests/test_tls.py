"""TLS with Triton's flags: real servers, tritonclient over TLS and mutual TLS, plaintext and
certificate-less clients refused, bad flags and files refused at start naming the flag. The gRPC
cases run on both front ends (native and grpcio); HTTP's beside the native one.

The test makes its own CA, a server certificate for 127.0.0.1/localhost and client
certificates (one from the CA, one from a stranger CA) with `cryptography`.
"""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import json
import shutil
import ssl
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from tritonclient.utils import InferenceServerException

from server import cli
from tests.conftest import BUNDLED, RunningServer, ServerFactory, tachyon_command

MODEL = "identity_fp32"
NATIVE = "native"
FRONTENDS = (NATIVE, "grpcio")
over_both_frontends = pytest.mark.parametrize("frontend", FRONTENDS, indirect=True)
"""Runs a test once per gRPC front end (the servers it asks for serve gRPC with that one)."""
beside_native = pytest.mark.parametrize("frontend", [NATIVE], indirect=True)
"""HTTP tests: on the gRPC tests' native servers (no server started for HTTP alone)."""


# -- a throwaway PKI ------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path
    """A client certificate from another CA: mutual TLS must refuse it."""
    stranger_key: Path
    encrypted_server_key: Path
    """server_key under a passphrase: refused, the server cannot prompt for it."""


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    server: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer or (_name(subject), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
    )
    if issuer is None:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
    else:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
           ) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))
    return cert_path, key_path


def make_pki(directory: Path) -> Pki:
    ca_key, stranger_ca_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(
        ec.SECP256R1()
    )
    ca = _certificate("Tachyon test CA", ca_key, None)
    stranger_ca = _certificate("Stranger CA", stranger_ca_key, None)
    ca_path, _ = _write(directory, "ca", ca, ca_key)
    keys = {name: ec.generate_private_key(ec.SECP256R1()) for name in ("server", "client", "x")}
    server = _certificate("127.0.0.1", keys["server"], (ca.subject, ca_key), server=True)
    client = _certificate("client", keys["client"], (ca.subject, ca_key))
    stranger = _certificate("stranger", keys["x"], (stranger_ca.subject, stranger_ca_key))
    server_cert, server_key = _write(directory, "server", server, keys["server"])
    client_cert, client_key = _write(directory, "client", client, keys["client"])
    stranger_cert, stranger_key = _write(directory, "stranger", stranger, keys["x"])
    encrypted = directory / "server-encrypted.key"
    encrypted.write_bytes(keys["server"].private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase"),
    ))
    return Pki(ca_path, server_cert, server_key, client_cert, client_key, stranger_cert,
               stranger_key, encrypted)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Only identity_fp32: quick to load."""
    root = tmp_path_factory.mktemp("repo")
    shutil.copytree(BUNDLED / MODEL, root / MODEL)
    return root


def tls_flags(protocol: str, pki: Pki, mutual: bool) -> list[str]:
    flags = [f"--{protocol}-server-cert", str(pki.server_cert),
             f"--{protocol}-server-key", str(pki.server_key)]
    if mutual:
        return [f"--{protocol}-use-ssl-mutual=true", f"--{protocol}-root-cert", str(pki.ca),
                *flags]
    return [f"--{protocol}-use-ssl=true", *flags]


def client_context(pki: Pki, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


@pytest.fixture(scope="module")
def frontend(request: pytest.FixtureRequest) -> str:
    """The gRPC front end of the servers below (over_both_frontends, beside_native)."""
    return str(request.param)


@pytest.fixture(scope="module")
def tls_server(start_server: ServerFactory, pki: Pki, repository: Path,
               frontend: str) -> RunningServer:
    return start_server(
        repository, "--grpc-frontend", frontend, *tls_flags("grpc", pki, mutual=False),
        *tls_flags("http", pki, mutual=False), ssl_context=client_context(pki),
    )


@pytest.fixture(scope="module")
def mutual_server(start_server: ServerFactory, pki: Pki, repository: Path,
                  frontend: str) -> RunningServer:
    return start_server(
        repository, "--grpc-frontend", frontend, *tls_flags("grpc", pki, mutual=True),
        *tls_flags("http", pki, mutual=True),
        ssl_context=client_context(pki, pki.client_cert, pki.client_key),
    )


# -- clients ---------------------------------------------------------------------------------


def grpc_client(server: RunningServer, pki: Pki | None, cert: Path | None = None,
                key: Path | None = None) -> grpcclient.InferenceServerClient:
    if pki is None:
        return grpcclient.InferenceServerClient(server.grpc_url)
    return grpcclient.InferenceServerClient(
        server.grpc_url, ssl=True, root_certificates=str(pki.ca),
        private_key=None if key is None else str(key),
        certificate_chain=None if cert is None else str(cert),
    )


def http_client(server: RunningServer, pki: Pki, cert: Path | None = None,
                key: Path | None = None) -> httpclient.InferenceServerClient:
    import gevent.ssl

    def context() -> ssl.SSLContext:
        made = gevent.ssl.create_default_context(cafile=str(pki.ca))
        if cert is not None:
            made.load_cert_chain(str(cert), str(key))
        return made

    return httpclient.InferenceServerClient(
        server.http_url, ssl=True, ssl_context_factory=context, connection_timeout=5,
        network_timeout=5,
    )


def infer_identity(client: grpcclient.InferenceServerClient | httpclient.InferenceServerClient,
                   module: object) -> None:
    x = np.arange(16, dtype=np.float32).reshape(1, 16)
    tensor = module.InferInput("INPUT0", [1, 16], "FP32")  # type: ignore[attr-defined]
    tensor.set_data_from_numpy(x)
    np.testing.assert_array_equal(client.infer(MODEL, [tensor]).as_numpy("OUTPUT0"), x)


def refused_over_grpc(client: grpcclient.InferenceServerClient) -> str:
    with pytest.raises(InferenceServerException) as info:
        client.is_server_live(client_timeout=5)
    return str(info.value.status())


def tritonclient_https() -> bool:
    """tritonclient.http's ssl=True needs geventhttpclient's SSLConnectionPool, which the
    geventhttpclient 2.0.2 that tritonclient 2.41 pins lacks on Python 3.12 (its ssl import
    fails there); the HTTPS tests then talk with the standard library's client instead."""
    from geventhttpclient import connectionpool

    return hasattr(connectionpool, "SSLConnectionPool")


def https_infer(server: RunningServer, context: ssl.SSLContext) -> None:
    """identity_fp32 over HTTPS with the standard library's client (JSON)."""
    data = list(range(16))
    body = json.dumps({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 16],
                                   "data": data}]}).encode()
    request = urllib.request.Request(f"https://{server.http_url}/v2/models/{MODEL}/infer",
                                     data=body, method="POST")
    with urllib.request.urlopen(request, timeout=5, context=context) as response:
        assert json.loads(response.read())["outputs"][0]["data"] == data


def http_get(server: RunningServer, scheme: str, context: ssl.SSLContext | None = None) -> int:
    url = f"{scheme}://{server.http_url}/v2/health/live"
    with urllib.request.urlopen(url, timeout=5, context=context) as response:
        return int(response.status)


# -- TLS -------------------------------------------------------------------------------------


@over_both_frontends
def test_grpc_over_tls_with_tritonclient(tls_server: RunningServer, pki: Pki) -> None:
    client = grpc_client(tls_server, pki)
    assert client.is_server_live()
    infer_identity(client, grpcclient)


@over_both_frontends
def test_grpc_plaintext_client_is_refused(tls_server: RunningServer) -> None:
    assert refused_over_grpc(grpc_client(tls_server, None)) == "StatusCode.UNAVAILABLE"


@beside_native
def test_https_with_tritonclient(tls_server: RunningServer, pki: Pki) -> None:
    if tritonclient_https():
        client = http_client(tls_server, pki)
        assert client.is_server_live()
        infer_identity(client, httpclient)
    https_infer(tls_server, client_context(pki))
    assert http_get(tls_server, "https", client_context(pki)) == 200


@beside_native
def test_http_plaintext_client_is_refused(tls_server: RunningServer) -> None:
    with pytest.raises(OSError):  # the TLS server drops a cleartext request
        http_get(tls_server, "http")


@beside_native
def test_https_client_that_does_not_trust_the_server_refuses_it(tls_server: RunningServer) -> None:
    with pytest.raises(urllib.error.URLError) as info:
        http_get(tls_server, "https", ssl.create_default_context())
    assert isinstance(info.value.reason, ssl.SSLCertVerificationError)


# -- mutual TLS ------------------------------------------------------------------------------


@over_both_frontends
def test_grpc_mutual_tls(mutual_server: RunningServer, pki: Pki) -> None:
    client = grpc_client(mutual_server, pki, pki.client_cert, pki.client_key)
    assert client.is_server_live()
    infer_identity(client, grpcclient)
    assert refused_over_grpc(grpc_client(mutual_server, pki)) == "StatusCode.UNAVAILABLE"
    stranger = grpc_client(mutual_server, pki, pki.stranger_cert, pki.stranger_key)
    assert refused_over_grpc(stranger) == "StatusCode.UNAVAILABLE"
    assert refused_over_grpc(grpc_client(mutual_server, None)) == "StatusCode.UNAVAILABLE"


@beside_native
def test_https_mutual_tls(mutual_server: RunningServer, pki: Pki) -> None:
    if tritonclient_https():
        client = http_client(mutual_server, pki, pki.client_cert, pki.client_key)
        assert client.is_server_live()
        infer_identity(client, httpclient)
    https_infer(mutual_server, client_context(pki, pki.client_cert, pki.client_key))
    with pytest.raises(OSError):  # no client certificate
        http_get(mutual_server, "https", client_context(pki))
    with pytest.raises(OSError):  # a certificate the server's root did not sign
        http_get(mutual_server, "https", client_context(pki, pki.stranger_cert, pki.stranger_key))
    # the server drops the connection once the handshake shows no client certificate
    if tritonclient_https():
        with pytest.raises((OSError, http.client.HTTPException)):
            http_client(mutual_server, pki).is_server_live()


# -- flags and files refused at start --------------------------------------------------------


def test_unreadable_cert_exits_non_zero_naming_flag_and_path(pki: Pki, repository: Path,
                                                             tmp_path: Path) -> None:
    missing = tmp_path / "nope.crt"
    result = subprocess.run(
        [*tachyon_command(), "serve", "--model-repository", str(repository), "--grpc-frontend",
         "grpcio", "--grpc-use-ssl=true", "--grpc-server-cert", str(missing),
         "--grpc-server-key", str(pki.server_key)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    assert f"--grpc-server-cert {missing}: cannot read it" in result.stderr, result.stderr


def _serve_error(capsys: pytest.CaptureFixture[str], repository: Path, *flags: str) -> str:
    assert cli.main(["serve", "--model-repository", str(repository), *flags]) == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--http-use-ssl=true", "--http-server-cert", "{ca}"],
         "--http-use-ssl needs --http-server-cert and --http-server-key"),
        (["--http-server-cert", "{cert}", "--http-server-key", "{key}"],
         "--http-server-cert, --http-server-key given but --http-use-ssl is not true"),
        (["--grpc-use-ssl-mutual=true", "--grpc-server-cert", "{cert}", "--grpc-server-key",
          "{key}"], "--grpc-use-ssl-mutual needs --grpc-root-cert"),
        (["--http-use-ssl", "--http-server-cert", "{cert}", "--http-server-key", "{ckey}"],
         "--http-server-cert {cert} and --http-server-key {ckey}: not a certificate and its "
         "private key"),
        (["--http-use-ssl", "--http-server-cert", "{cert}", "--http-server-key", "{text}"],
         "--http-server-key {text}: not a PEM file"),
        (["--grpc-use-ssl", "--grpc-server-cert", "{cert}", "--grpc-server-key", "{enc}"],
         "--grpc-server-key {enc}: encrypted private keys are not supported"),
        (["--http-use-ssl-mutual", "--http-server-cert", "{cert}", "--http-server-key", "{key}",
          "--http-root-cert", "{keyfile_as_root}"], "--http-root-cert {keyfile_as_root}: no "
         "usable certificate in it"),
    ],
    ids=["cert-without-key", "files-without-use-ssl", "mutual-without-root", "key-mismatch",
         "not-pem", "encrypted-key", "root-without-cert"],
)
def test_bad_tls_flags_are_refused_naming_the_flag(
    capsys: pytest.CaptureFixture[str], pki: Pki, repository: Path, tmp_path: Path,
    flags: list[str], expected: str,
) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a key\n")
    paths = {"ca": pki.ca, "cert": pki.server_cert, "key": pki.server_key,
             "ckey": pki.client_key, "text": text, "keyfile_as_root": pki.server_key,
             "enc": pki.encrypted_server_key}
    fill = {name: str(path) for name, path in paths.items()}
    error = _serve_error(capsys, repository, *(f.format(**fill) for f in flags))
    assert expected.format(**fill) in error, error
