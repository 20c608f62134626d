"""The two gRPC front ends side by side: grpc.aio and the native one (C++ HTTP/2 I/O thread), the
MLP at concurrency 32 and 1, alternated a -> b -> a -> b in one run.

    python benchmarks/grpc_frontends.py [--rounds 3] [--seconds 5] [--tls]

--tls also measures both front ends over TLS (a throwaway self-signed certificate; the client is
benchmarks/tls_loadgen.py, loadgen.py's loop on a secure channel) and prints TLS / cleartext.

Uses the peers' repository and client (`../shared/bench/run-peers` sets them up under
~/.cache/tachyon-peers). Both servers run for the whole run with metrics off, and are measured in
turn, never at once. The native one is `tachyon serve --grpc-frontend native` when the CLI has the
flag, else tests/native_frontend_server.py. Prints the command, the machine, every measurement,
the medians and the ratios; writes the raw numbers to benchmarks/results/grpc-frontends-*.json.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "bench"
WORK = Path(os.environ.get("WORK", Path.home() / ".cache" / "tachyon-peers"))
TACHYON = ROOT / ".venv" / "bin" / "tachyon"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def throwaway_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key (PEM files in `directory`)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "server.crt", directory / "server.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def server_command(frontend: str, http: int, grpc: int, tls: tuple[Path, Path] | None = None,
                   tachyon: Path = TACHYON) -> list[str]:
    common = ["--model-repository", str(WORK / "repo"), "--host", "127.0.0.1",
              "--http-port", str(http), "--grpc-port", str(grpc)]
    if tls is not None:
        common += ["--grpc-use-ssl=true", "--grpc-server-cert", str(tls[0]),
                   "--grpc-server-key", str(tls[1])]
    help_text = subprocess.run([str(tachyon), "serve", "--help"], capture_output=True,
                               text=True, check=True).stdout
    if frontend == "grpcio" or "--grpc-frontend" in help_text:
        flag = ["--grpc-frontend", frontend] if "--grpc-frontend" in help_text else []
        return [str(tachyon), "serve", *common, "--metrics-port", str(free_port()),
                "--allow-metrics", "false", *flag]
    return [sys.executable, "-m", "tests.native_frontend_server", *common]


def start(frontend: str, tls: tuple[Path, Path] | None = None, tachyon: Path = TACHYON
          ) -> tuple[subprocess.Popen[bytes], int]:
    http, grpc = free_port(), free_port()
    process = subprocess.Popen(server_command(frontend, http, grpc, tls, tachyon), cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    client = grpcclient.InferenceServerClient(
        f"127.0.0.1:{grpc}", ssl=tls is not None,
        root_certificates=None if tls is None else str(tls[0]),
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if client.is_server_ready():
                return process, grpc
        except InferenceServerException:
            time.sleep(0.2)
    raise RuntimeError(f"the {frontend} server did not start")


def measure(port: int, concurrency: int, seconds: int, ca: Path | None = None
            ) -> dict[str, float]:
    """loadgen.py's figures; with `ca`, over TLS (tls_loadgen.py, the same loop)."""
    script = [str(SHARED / "loadgen.py")] if ca is None else [
        str(ROOT / "benchmarks" / "tls_loadgen.py"), "--ca", str(ca)]
    client = [str(WORK / "v-client" / "bin" / "python"), *script, "--url",
              f"127.0.0.1:{port}", "--model", "mlp_fp32", "--shape", "1,784",
              "--concurrency", str(concurrency), "--seconds", str(seconds)]
    line = subprocess.run(client, capture_output=True, text=True, check=True).stdout.strip()
    found = dict(re.findall(r"(infer/s|p50_ms|p99_ms|errors)=([\d.,]+)", line))
    assert len(found) == 4 and found["errors"] == "0", line
    return {key: float(value.replace(",", "")) for key, value in found.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--tls", action="store_true",
                        help="also measure both front ends over TLS")
    args = parser.parse_args()
    print("command:", " ".join([sys.executable, *sys.argv]))
    machine = f"{platform.machine()} {os.cpu_count()} cpus, Python {platform.python_version()}"
    print("machine:", machine)
    tls = throwaway_certificate(Path(tempfile.mkdtemp(prefix="tachyon-tls-"))) if args.tls else None
    servers = {name: start(name) for name in ("grpcio", "native")}
    if tls is not None:
        servers.update({f"{name}-tls": start(name, tls) for name in ("grpcio", "native")})
    runs: dict[str, dict[int, list[dict[str, float]]]] = {
        name: {32: [], 1: []} for name in servers
    }
    try:
        for round_ in range(args.rounds):
            for name, (_, port) in servers.items():
                for concurrency in (32, 1):
                    load = os.getloadavg()[0]
                    ca = tls[0] if tls is not None and name.endswith("-tls") else None
                    result = measure(port, concurrency, args.seconds, ca)
                    runs[name][concurrency].append({**result, "load": load})
                    print(f"  round {round_ + 1} {name:10} c{concurrency:<2} load {load:4.2f}: "
                          f"{result['infer/s']:7,.0f} infer/s  p50 {result['p50_ms']:.2f} ms  "
                          f"p99 {result['p99_ms']:.2f} ms", flush=True)
    finally:
        for process, _ in servers.values():
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(30)
    medians = {
        name: {c: {k: statistics.median(r[k] for r in rs) for k in ("infer/s", "p50_ms")}
               for c, rs in by_c.items()}
        for name, by_c in runs.items()
    }
    for concurrency in (32, 1):
        a, b = medians["grpcio"][concurrency], medians["native"][concurrency]
        ratio = b["infer/s"] / a["infer/s"]
        print(f"median c{concurrency}: grpc.aio {a['infer/s']:,.0f} infer/s p50 "
              f"{a['p50_ms']:.2f} ms; native {b['infer/s']:,.0f} infer/s p50 "
              f"{b['p50_ms']:.2f} ms; native/grpc.aio throughput x{ratio:.2f}")
        if tls is not None:
            ta, tb = medians["grpcio-tls"][concurrency], medians["native-tls"][concurrency]
            over_a, over_b = ta["infer/s"] / a["infer/s"], tb["infer/s"] / b["infer/s"]
            print(f"median c{concurrency} over TLS: grpc.aio {ta['infer/s']:,.0f} infer/s p50 "
                  f"{ta['p50_ms']:.2f} ms; native {tb['infer/s']:,.0f} infer/s p50 "
                  f"{tb['p50_ms']:.2f} ms; TLS/cleartext throughput grpc.aio x{over_a:.2f}, "
                  f"native x{over_b:.2f}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = ROOT / "benchmarks" / "results" / f"grpc-frontends-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "seconds": args.seconds, "runs": runs,
                               "medians": medians}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
