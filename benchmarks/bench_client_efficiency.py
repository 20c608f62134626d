"""How cheap is `tachyon bench`'s client? Against the bare grpc.aio echo server (no model, no
batching: the client is a large share of the work), its infer/s beside NVIDIA perf_analyzer's at
concurrency 32, alternated 3 times on one echo server (target: >= 0.9x perf_analyzer).

    python benchmarks/bench_client_efficiency.py [--rounds 3] [--procs 1] [--seconds 5]

perf_analyzer: `perf_analyzer -m mlp_fp32 -u 127.0.0.1:PORT -i grpc --concurrency-range 32
--measurement-interval 5000` (it repeats 5 s windows until three agree);
tachyon bench: `python -m server.bench run --url 127.0.0.1:PORT --model mlp_fp32 --concurrency 32
--duration 5 --warmup 2` (one 5 s window). Also records each client's CPU time (its process
tree, from getrusage) over its wall time. Prints the command, the machine, medians and the ratio,
and writes the raw numbers to benchmarks/results/client-efficiency-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "bench"
WORK = Path(os.environ.get("WORK", Path.home() / ".cache" / "tachyon-peers"))
RESULTS = ROOT / "benchmarks" / "results"
PERF_ANALYZER = ROOT / ".tools" / "perf_analyzer" / "perf_analyzer"
PA_LINE = re.compile(r"Concurrency: (\d+), throughput: ([\d.]+) infer/sec, latency (\d+) usec")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"echo server did not listen on {port}")


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(command: list[str]) -> tuple[subprocess.CompletedProcess[str], float, float]:
    """Runs a client; returns its output, wall seconds and CPU seconds (whole process tree)."""
    print("$", " ".join(shlex.quote(c) for c in command), flush=True)
    cpu, wall = children_cpu(), time.monotonic()
    out = subprocess.run(command, capture_output=True, text=True, check=False, timeout=300)
    return out, time.monotonic() - wall, children_cpu() - cpu


def perf_analyzer(port: int, seconds: int) -> dict[str, float]:
    out, wall, cpu = timed([str(PERF_ANALYZER), "-m", "mlp_fp32", "-u", f"127.0.0.1:{port}",
                            "-i", "grpc", "--concurrency-range", "32",
                            "--measurement-interval", str(seconds * 1000)])
    match = PA_LINE.search(out.stdout)
    if out.returncode or not match:
        raise RuntimeError(f"perf_analyzer failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    result = {"infer_per_s": float(match[2]), "avg_latency_us": float(match[3]),
              "wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}
    print(f"   perf_analyzer: {result}", flush=True)
    return result


def tachyon_bench(port: int, seconds: int, procs: int, out_dir: Path) -> dict[str, float]:
    command = [sys.executable, "-m", "server.bench", "run", "--url", f"127.0.0.1:{port}",
               "--model", "mlp_fp32", "--concurrency", "32", "--duration", str(seconds),
               "--warmup", "2", "--procs", str(procs), "--no-progress", "--out", str(out_dir)]
    out, wall, cpu = timed(command)
    if out.returncode:
        raise RuntimeError(f"tachyon bench failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    point = json.loads((out_dir / "raw.json").read_text())["points"][0]
    result = {"infer_per_s": point["infer_per_s"], "p50_ms": point["latency_ms"]["p50"],
              "p99_ms": point["latency_ms"]["p99"], "errors": point["error_count"],
              "wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}
    print(f"   tachyon bench: {result}", flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--procs", type=int, default=1, help="tachyon bench client processes")
    parser.add_argument("--seconds", type=int, default=5, help="measurement window")
    args = parser.parse_args()
    machine = (f"{platform.node()} {platform.machine()}, {os.cpu_count()} cpus, "
               f"Python {platform.python_version()}, load average {os.getloadavg()[0]:.2f}")
    print("command:", " ".join([sys.executable, *sys.argv]))
    print("machine:", machine)
    port = free_port()
    echo = subprocess.Popen([str(WORK / "v-client" / "bin" / "python"),
                             str(SHARED / "echo_server.py"), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    rounds: list[dict[str, Any]] = []
    try:
        wait_port(port)
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(args.rounds):
                print(f"round {i + 1}/{args.rounds}", flush=True)
                pa = perf_analyzer(port, args.seconds)
                tb = tachyon_bench(port, args.seconds, args.procs, Path(tmp) / f"r{i}")
                rounds.append({"perf_analyzer": pa, "tachyon_bench": tb,
                               "ratio": round(tb["infer_per_s"] / pa["infer_per_s"], 3)})
    finally:
        os.killpg(echo.pid, signal.SIGTERM)
        echo.wait(10)
    pa_median = statistics.median(r["perf_analyzer"]["infer_per_s"] for r in rounds)
    tb_median = statistics.median(r["tachyon_bench"]["infer_per_s"] for r in rounds)
    ratio = tb_median / pa_median
    print()
    print("| client | infer/s per round | median | client CPU s / wall s |")
    print("| --- | --- | --- | --- |")
    for key, name, median in (("perf_analyzer", "perf_analyzer", pa_median),
                              ("tachyon_bench", f"tachyon bench --procs {args.procs}",
                               tb_median)):
        per = ", ".join(f"{r[key]['infer_per_s']:,.0f}" for r in rounds)
        cpu = ", ".join(f"{r[key]['cpu_s']:.1f}/{r[key]['wall_s']:.1f}" for r in rounds)
        print(f"| {name} | {per} | {median:,.0f} | {cpu} |")
    print(f"\nratio of medians, tachyon bench / perf_analyzer at c32: {ratio:.3f} "
          f"(target >= 0.9): {'PASS' if ratio >= 0.9 else 'FAIL'}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"client-efficiency-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({
        "command": " ".join(sys.argv), "machine": machine, "procs": args.procs,
        "seconds": args.seconds, "rounds": rounds, "perf_analyzer_median": pa_median,
        "tachyon_bench_median": tb_median, "ratio": round(ratio, 4),
    }, indent=2))
    print(f"wrote {path}")
    return 0 if ratio >= 0.9 else 1


if __name__ == "__main__":
    raise SystemExit(main())
