"""The two gRPC front ends side by side: grpc.aio and the native one (C++ HTTP/2 I/O thread), the
MLP at concurrency 32 and 1, alternated a -> b -> a -> b in one run.

    python benchmarks/grpc_frontends.py [--rounds 3] [--seconds 5]

Uses the peers' repository and client (`../shared/bench/run-peers` sets them up under
~/.cache/tachyon-peers). Both servers run for the whole run with metrics off, and are measured in
turn, never at once. The native one is `tachyon serve --grpc-frontend native` when the CLI has the
flag, else tests/native_frontend_server.py. Prints the command, the machine, every measurement,
the medians and the ratios; writes the raw numbers to benchmarks/results/grpc-frontends-*.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
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


def server_command(frontend: str, http: int, grpc: int) -> list[str]:
    common = ["--model-repository", str(WORK / "repo"), "--host", "127.0.0.1",
              "--http-port", str(http), "--grpc-port", str(grpc)]
    help_text = subprocess.run([str(TACHYON), "serve", "--help"], capture_output=True,
                               text=True, check=True).stdout
    if frontend == "grpcio" or "--grpc-frontend" in help_text:
        flag = ["--grpc-frontend", frontend] if "--grpc-frontend" in help_text else []
        return [str(TACHYON), "serve", *common, "--metrics-port", str(free_port()),
                "--allow-metrics", "false", *flag]
    return [sys.executable, "-m", "tests.native_frontend_server", *common]


def start(frontend: str) -> tuple[subprocess.Popen[bytes], int]:
    http, grpc = free_port(), free_port()
    process = subprocess.Popen(server_command(frontend, http, grpc), cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc}")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if client.is_server_ready():
                return process, grpc
        except InferenceServerException:
            time.sleep(0.2)
    raise RuntimeError(f"the {frontend} server did not start")


def measure(port: int, concurrency: int, seconds: int) -> dict[str, float]:
    client = [str(WORK / "v-client" / "bin" / "python"), str(SHARED / "loadgen.py"), "--url",
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
    args = parser.parse_args()
    print("command:", " ".join([sys.executable, *sys.argv]))
    machine = f"{platform.machine()} {os.cpu_count()} cpus, Python {platform.python_version()}"
    print("machine:", machine)
    servers = {name: start(name) for name in ("grpcio", "native")}
    runs: dict[str, dict[int, list[dict[str, float]]]] = {
        name: {32: [], 1: []} for name in servers
    }
    try:
        for round_ in range(args.rounds):
            for name, (_, port) in servers.items():
                for concurrency in (32, 1):
                    load = os.getloadavg()[0]
                    result = measure(port, concurrency, args.seconds)
                    runs[name][concurrency].append({**result, "load": load})
                    print(f"  round {round_ + 1} {name:6} c{concurrency:<2} load {load:4.2f}: "
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
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = ROOT / "benchmarks" / "results" / f"grpc-frontends-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "seconds": args.seconds, "runs": runs,
                               "medians": medians}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
