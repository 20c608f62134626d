"""What metrics cost: the MLP at concurrency 32 with metrics on and off, alternated in one run.

    python benchmarks/metrics_overhead.py [--rounds 3] [--seconds 8]

Uses the peers' repository and client (`../shared/bench/run-peers` sets them up under
~/.cache/tachyon-peers). Prints the command, the machine, every round, the medians and the
ratio; writes the raw numbers to benchmarks/results/metrics-overhead-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import ROOT, WORK, Tachyon, loadgen, print_header


def measure(metrics: bool, seconds: int, concurrency: int) -> float:
    server = Tachyon(WORK / "repo", 18400, 18401, 18402, "--allow-metrics", str(metrics).lower())
    with server:
        result = loadgen("127.0.0.1:18401", "mlp_fp32", "1,784", concurrency, seconds)
        if metrics:  # the metrics were really collected
            with urllib.request.urlopen("http://127.0.0.1:18402/metrics", timeout=5) as response:
                assert b"tachyon_inference_request_success_total" in response.read()
    print(f"  metrics {'on ' if metrics else 'off'}: {result['line']}", flush=True)
    return result["infer_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    machine = print_header()
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
