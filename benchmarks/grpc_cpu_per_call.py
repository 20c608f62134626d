"""Server CPU per gRPC call of the native front end: builds side by side (an A/B of a change), in
cleartext and over TLS. On a shared, busy machine throughput swings by 2x from one run to the
next; the CPU a server spends per call does not, so a small regression shows here first.

    python benchmarks/grpc_cpu_per_call.py [--build base=/tmp/base/.venv/bin/tachyon]
        [--tls] [--rounds 6] [--seconds 4] [--concurrency 8]

Each build is a `tachyon` executable (`this`: this checkout's, always measured; with --tls also
over TLS, as `this-tls`: a build from before TLS would refuse it). identity_fp32
[1,16] from the peers' repository (../shared/bench/run-peers; $WORK), driven by loadgen.py
(tls_loadgen.py over TLS) without warm-up; the server's utime + stime over the run divided by the
calls answered. The servers run for the whole run and are measured in turn, in alternating order
per round. Prints the command, the machine, every measurement and the medians; writes the raw
numbers to benchmarks/results/grpc-cpu-per-call-*.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from grpc_frontends import ROOT, SHARED, TACHYON, WORK, start, throwaway_certificate

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def measure(pid: int, port: int, ca: Path | None, concurrency: int, seconds: int
            ) -> dict[str, float]:
    script = [str(SHARED / "loadgen.py")] if ca is None else [
        str(ROOT / "benchmarks" / "tls_loadgen.py"), "--ca", str(ca)]
    client = [str(WORK / "v-client" / "bin" / "python"), *script, "--url", f"127.0.0.1:{port}",
              "--model", "identity_fp32", "--shape", "1,16", "--concurrency", str(concurrency),
              "--seconds", str(seconds), "--warmup", "0"]
    before = cpu_seconds(pid)
    line = subprocess.run(client, capture_output=True, text=True, check=True).stdout
    used = cpu_seconds(pid) - before
    found = dict(re.findall(r"(infer/s|errors)=([\d.,]+)", line))
    assert len(found) == 2 and found["errors"] == "0", line
    rate = float(found["infer/s"].replace(",", ""))
    return {"infer/s": rate, "us_per_call": used / (rate * seconds) * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", action="append", default=[], metavar="NAME=TACHYON",
                        help="another build to measure beside this checkout's (repeatable)")
    parser.add_argument("--tls", action="store_true",
                        help="also measure this checkout's build over TLS")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    print("command:", " ".join([sys.executable, *sys.argv]))
    machine = f"{platform.machine()} {os.cpu_count()} cpus, Python {platform.python_version()}"
    print("machine:", machine)
    builds = {"this": TACHYON} | {
        name: Path(path) for name, _, path in (b.partition("=") for b in args.build)}
    tls = throwaway_certificate(Path(tempfile.mkdtemp(prefix="tachyon-tls-"))) if args.tls else None
    servers: dict[str, tuple[subprocess.Popen[bytes], int, Path | None]] = {
        name: (*start("native", None, tachyon), None) for name, tachyon in builds.items()}
    if tls is not None:
        servers["this-tls"] = (*start("native", tls), tls[0])
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in servers}
    try:
        for round_ in range(args.rounds):
            order = list(servers) if round_ % 2 == 0 else list(reversed(servers))
            for name in order:
                process, port, ca = servers[name]
                result = measure(process.pid, port, ca, args.concurrency, args.seconds)
                runs[name].append(result)
                print(f"  round {round_ + 1} {name:10} load {os.getloadavg()[0]:4.2f}: "
                      f"{result['infer/s']:7,.0f} infer/s  server CPU "
                      f"{result['us_per_call']:6.1f} us/call", flush=True)
    finally:
        for process, _, _ in servers.values():
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(30)
    medians = {name: {key: statistics.median(r[key] for r in rs)
                      for key in ("infer/s", "us_per_call")} for name, rs in runs.items()}
    this = medians["this"]["us_per_call"]
    for name, m in medians.items():
        print(f"median {name:10}: {m['us_per_call']:6.1f} us/call (x{m['us_per_call'] / this:.2f} "
              f"of this), {m['infer/s']:7,.0f} infer/s")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = ROOT / "benchmarks" / "results" / f"grpc-cpu-per-call-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "builds": {k: str(v) for k, v in builds.items()},
                               "concurrency": args.concurrency, "seconds": args.seconds,
                               "runs": runs, "medians": medians}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
