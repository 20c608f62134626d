"""Tachyon beside its peers, in one run on this machine (issue "Dynamic batching").

    python benchmarks/peers.py [--seconds 8] [--peers mlserver triton echo]

1. `../shared/bench/run-peers` with Tachyon included (TACHYON_CMD): MLServer, Triton (through
   PyTriton), the bare grpc.aio echo server and Tachyon, MLP single-sample gRPC requests at
   concurrency 1 and 32, the same closed-loop client (loadgen.py) for all.
2. The in-process ONNX Runtime limit for the MLP (one thread, batch 1 and 32).
3. Tachyon with 32-row requests at concurrency 4, beside (2).
4. NVIDIA's perf_analyzer against Tachyon (gRPC, concurrency 1 and 32).

Prints the command, the machine and a table with medians and ratios, and writes the raw lines
and the table to benchmarks/results/peers-<timestamp>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import ROOT, SHARED, WORK, Tachyon

RESULTS = ROOT / "benchmarks" / "results"
LINE = re.compile(
    r"^(?P<peer>\S+)\s+model=(?P<model>\S+) conc=(?P<conc>\d+) procs=\d+ infer/s=(?P<rps>[\d,]+) "
    r"samples/s=(?P<sps>[\d,]+) p50_ms=(?P<p50>[\d.]+) p99_ms=(?P<p99>[\d.]+) errors=(?P<err>\d+)"
)


def number(text: str) -> float:
    return float(text.replace(",", ""))


def run_peers(peers: list[str], seconds: int) -> list[dict[str, object]]:
    tachyon = ROOT / ".venv" / "bin" / "tachyon"
    env = {
        **os.environ,
        "TACHYON_CMD": f"{tachyon} serve --model-repository {{repo}} --host 127.0.0.1 "
        "--http-port {http} --grpc-port {grpc} --metrics-port {metrics}",
        "POINT_SECONDS": str(seconds),
        "CONCURRENCY": "1 32",
        "MODELS": "mlp_fp32",
    }
    command = [str(SHARED / "run-peers"), *peers]
    print("$", " ".join(shlex.quote(c) for c in command), flush=True)
    output = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    rows = []
    for line in output.stdout.splitlines():
        print("  ", line, flush=True)
        match = LINE.match(line.strip())
        if match:
            rows.append({
                "peer": match["peer"], "model": match["model"], "concurrency": int(match["conc"]),
                "infer_per_s": number(match["rps"]), "samples_per_s": number(match["sps"]),
                "p50_ms": float(match["p50"]), "p99_ms": float(match["p99"]),
                "errors": int(match["err"]),
            })
    if output.returncode:
        print(output.stderr[-2000:], file=sys.stderr)
    return rows


def inproc(threads: int = 1) -> dict[int, float]:
    model = WORK / "models" / "mlp_fp32" / "model.onnx"
    command = [str(WORK / "v-client" / "bin" / "python"), str(SHARED / "inproc_limit.py"),
               str(model), "784", str(threads)]
    print("$", " ".join(command), flush=True)
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    limits = {}
    for line in output.splitlines():
        print("  ", line)
        match = re.search(r"bs=(\d+): ([\d,]+) samples/s", line)
        if match:
            limits[int(match[1])] = number(match[2])
    return limits


def loadgen(shape: str, concurrency: int, seconds: int) -> dict[str, object]:
    command = [str(WORK / "v-client" / "bin" / "python"), str(SHARED / "loadgen.py"), "--url",
               "127.0.0.1:18101", "--model", "mlp_fp32", "--shape", shape, "--concurrency",
               str(concurrency), "--seconds", str(seconds)]
    print("$", " ".join(command), flush=True)
    line = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()
    print("  ", line)
    match = LINE.match("tachyon " + line)
    assert match, line
    return {"samples_per_s": number(match["sps"]), "infer_per_s": number(match["rps"]),
            "p50_ms": float(match["p50"]), "p99_ms": float(match["p99"])}


def perf_analyzer(concurrency: int) -> str:
    binary = ROOT / ".tools" / "perf_analyzer" / "perf_analyzer"
    command = [str(binary), "-m", "mlp_fp32", "-u", "127.0.0.1:18101", "-i", "grpc",
               "--concurrency-range", str(concurrency), "--measurement-interval", "4000"]
    print("$", " ".join(command), flush=True)
    output = subprocess.run(command, capture_output=True, text=True, check=False)
    text = output.stdout + output.stderr
    summary = [line for line in text.splitlines()
               if "Concurrency:" in line or "p50 latency" in line or "p99 latency" in line]
    for line in summary:
        print("  ", line)
    return "\n".join(summary) or text[-500:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--peers", nargs="*", default=["mlserver", "triton", "echo"])
    args = parser.parse_args()
    print("command:", " ".join([sys.executable, *sys.argv]))
    machine = f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus, " \
              f"Python {platform.python_version()}"
    print("machine:", machine)
    rows = run_peers([*args.peers, "tachyon"], args.seconds)
    limits = inproc(1)
    with Tachyon(WORK / "repo", 18100, 18101, 18102):
        rows32 = loadgen("32,784", 4, args.seconds)
        pa = {c: perf_analyzer(c) for c in (1, 32)}

    def pick(peer: str, conc: int) -> dict[str, object] | None:
        return next((r for r in rows if r["peer"] == peer and r["concurrency"] == conc), None)

    lines = ["| peer | c1 infer/s | c1 p50 ms | c32 infer/s | c32 p50 ms | c32 p99 ms |",
             "| --- | --- | --- | --- | --- | --- |"]
    for peer in [*args.peers, "tachyon"]:
        one, many = pick(peer, 1), pick(peer, 32)
        if one and many:
            lines.append(f"| {peer} | {one['infer_per_s']:,.0f} | {one['p50_ms']} | "
                         f"{many['infer_per_s']:,.0f} | {many['p50_ms']} | {many['p99_ms']} |")
    peers32 = [pick(p, 32) for p in ("mlserver", "triton")]
    best = max((r for r in peers32 if r), key=lambda r: float(r["infer_per_s"]), default=None)
    tach = pick("tachyon", 32)
    lines.append("")
    if best and tach:
        lines.append(
            f"- c32: Tachyon / best peer ({best['peer']}) = "
            f"{float(tach['infer_per_s']) / float(best['infer_per_s']):.2f}x infer/s "
            "(target >= 2), "
            f"p99 {tach['p99_ms']} vs {best['p99_ms']} ms = "
            f"{float(tach['p99_ms']) / float(best['p99_ms']):.2f} (target <= 0.5)")
    one, echo = pick("tachyon", 1), pick("echo", 1)
    if one:
        floor = (f"; the bare echo server (no model) in the same run: p50 {echo['p50_ms']} ms"
                 if echo else "")
        lines.append(f"- c1: Tachyon p50 {one['p50_ms']} ms (target <= 0.6){floor}")
    lines.append(
        f"- 32-row requests at c4: {rows32['samples_per_s']:,.0f} samples/s = "
        f"{float(rows32['samples_per_s']) / limits[32]:.2f}x in-process ONNX Runtime batch 32 on "
        f"one thread ({limits[32]:,.0f}) (target >= 0.7)")
    table = "\n".join(lines)
    print()
    print(table)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"peers-{stamp}.md").write_text(
        f"command: {' '.join(sys.argv)}\nmachine: {machine}\n\n{table}\n\nperf_analyzer:\n"
        + "\n".join(f"c{c}:\n{text}" for c, text in pa.items()) + "\n"
    )
    (RESULTS / f"peers-{stamp}.json").write_text(json.dumps(
        {"machine": machine, "rows": rows, "inproc_samples_per_s": limits,
         "tachyon_32rows_c4": rows32, "perf_analyzer": pa}, indent=2))
    print(f"wrote {RESULTS / f'peers-{stamp}.md'}")


if __name__ == "__main__":
    main()
