"""How long ONNX Runtime takes for one batch-1 run of the MLP after an idle gap, in process.

A server at concurrency 1 never runs the model back to back: between two requests the client
and the front end run, and the model's thread sleeps. This measures what that costs the model
itself, with no server involved: the same session (one intra-op thread, spinning off, as Tachyon
configures it), run back to back, after a sleep, after a busy-wait of the same length, and after
touching 16 MiB of other memory (cache eviction).

    python benchmarks/ort_idle_gap.py [--model PATH] [--gap-us 500] [--runs 3000]

Prints the command, the machine, and per mode the median and p90 wall time of a run and the
process CPU time per iteration; writes them to benchmarks/results/ort-idle-gap-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import ROOT, WORK

RESULTS = ROOT / "benchmarks" / "results"


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def measure(run: Callable[[], object], mode: str, gap_s: float, runs: int) -> dict[str, float]:
    other = np.zeros(16 << 20 if mode == "evict 16 MiB" else 0, np.uint8)
    walls = []
    cpu0 = time.process_time()
    for _ in range(runs):
        if mode == "sleep":
            time.sleep(gap_s)
        elif mode == "busy-wait":
            end = time.perf_counter() + gap_s
            while time.perf_counter() < end:
                pass
        elif mode == "evict 16 MiB":
            other[:] = 1
        start = time.perf_counter_ns()
        run()
        walls.append(time.perf_counter_ns() - start)
    cpu = (time.process_time() - cpu0) / runs
    return {
        "p50_us": float(np.median(walls)) / 1e3,
        "p90_us": float(np.percentile(walls, 90)) / 1e3,
        "process_cpu_per_iteration_us": cpu * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=WORK / "models" / "mlp_fp32" / "model.onnx")
    parser.add_argument("--gap-us", type=float, default=500.0)
    parser.add_argument("--runs", type=int, default=3000)
    args = parser.parse_args()
    print("command:", " ".join([Path(sys.executable).name, *sys.argv]))
    machine = f"{platform.machine()} {os.cpu_count()} cpus, Python {platform.python_version()}, " \
              f"onnxruntime {ort.__version__}"
    print("machine:", machine)
    sess = session(args.model)
    name = sess.get_inputs()[0].name
    width = sess.get_inputs()[0].shape[1]
    x = np.random.default_rng(0).random((1, width), dtype=np.float32)

    def run() -> None:
        sess.run(None, {name: x})

    for _ in range(300):
        run()
    results = {}
    # Twice each, interleaved, so a drift of the machine shows as disagreement between rounds.
    for round_ in (1, 2):
        for mode in ("back to back", "sleep", "busy-wait", "evict 16 MiB"):
            r = measure(run, mode, args.gap_us / 1e6, args.runs)
            results[f"{mode} #{round_}"] = r
            print(f"{mode + ' #' + str(round_):<20} p50 {r['p50_us']:7.1f} us  "
                  f"p90 {r['p90_us']:7.1f} us  process CPU per iteration "
                  f"{r['process_cpu_per_iteration_us']:7.1f} us")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"ort-idle-gap-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"machine": machine, "model": str(args.model),
                               "gap_us": args.gap_us, "runs": args.runs,
                               "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
