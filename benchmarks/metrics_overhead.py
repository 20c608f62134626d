"""What metrics cost: the MLP at concurrency 32 with metrics on and off, alternated in one run.

    python benchmarks/metrics_overhead.py [--rounds 3] [--seconds 8]

Uses the peers' repository and client (`../shared/bench/run-peers` sets them up under
~/.cache/tachyon-peers). Prints the command, the machine, every round, the medians and the
ratio; writes the raw numbers to benchmarks/results/metrics-overhead-<timestamp>.json.
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
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "bench"
WORK = Path(os.environ.get("WORK", Path.home() / ".cache" / "tachyon-peers"))


def measure(metrics: bool, seconds: int, concurrency: int) -> float:
    command = [str(ROOT / ".venv" / "bin" / "tachyon"), "serve", "--model-repository",
               str(WORK / "repo"), "--host", "127.0.0.1", "--http-port", "18400", "--grpc-port",
               "18401", "--metrics-port", "18402", "--allow-metrics", str(metrics).lower()]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        for _ in range(300):
            try:
                with urllib.request.urlopen("http://127.0.0.1:18400/v2/health/ready", timeout=1):
                    break
            except OSError:
                time.sleep(0.1)
        client = [str(WORK / "v-client" / "bin" / "python"), str(SHARED / "loadgen.py"), "--url",
                  "127.0.0.1:18401", "--model", "mlp_fp32", "--shape", "1,784",
                  "--concurrency", str(concurrency), "--seconds", str(seconds)]
        line = subprocess.run(client, capture_output=True, text=True, check=True).stdout
        if metrics:  # the metrics were really collected
            with urllib.request.urlopen("http://127.0.0.1:18402/metrics", timeout=5) as response:
                assert b"tachyon_inference_request_success_total" in response.read()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
    match = re.search(r"infer/s=([\d,]+)", line)
    assert match, line
    print(f"  metrics {'on ' if metrics else 'off'}: {line.strip()}", flush=True)
    return float(match[1].replace(",", ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    print("command:", " ".join([sys.executable, *sys.argv]))
    machine = f"{platform.machine()} {os.cpu_count()} cpus, Python {platform.python_version()}"
    print("machine:", machine)
    on, off = [], []
    for _ in range(args.rounds):
        on.append(measure(True, args.seconds, args.concurrency))
        off.append(measure(False, args.seconds, args.concurrency))
    ratio = statistics.median(on) / statistics.median(off)
    print(f"median infer/s: metrics on {statistics.median(on):,.0f}, off "
          f"{statistics.median(off):,.0f}, on/off = {ratio:.3f} (target >= 0.95)")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = ROOT / "benchmarks" / "results" / f"metrics-overhead-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "concurrency": args.concurrency,
                               "seconds": args.seconds, "on": on, "off": off,
                               "ratio_of_medians": ratio}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
