"""The native request path (issue 13) against its targets, in one run on one machine:

- in-process ONNX Runtime, the MLP at batch 32 on one thread (samples/s): what the model costs;
- the bare grpc.aio echo server (../shared/bench/echo_server.py: a prebuilt response, no model);
- Tachyon with the native front end, MLP (784-1024-1024-10, single-sample requests) and
  identity_fp32 (1x16), with the native request path (the default) and without it
  (--grpc-native-request-path false, every request through Python as before), and with
  the path and --grpc-io-threads 2 (--io-threads);

each server driven by native clients at concurrency 64: h2load (Debian's nghttp2-client)
replaying one prebuilt gRPC frame on 8 connections x 8 streams, and NVIDIA's perf_analyzer.

    flock /tmp/tachyon-bench.lock python benchmarks/native_request_path.py [--rounds 3]

Targets (issue 13): MLP served infer/s >= 0.5x in-process ORT at batch 32, >= 3x the echo
server; identity >= 5x the echo server. h2load counts an HTTP 200 as a success even when the
gRPC status is an error, so each Tachyon point also reads the model's success count from the
server's statistics and reports the difference (`grpc_errors`). Prints the command, the machine,
every point, the medians and the ratios; writes benchmarks/results/native-request-path-*.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._harness import ROOT, SHARED, Tachyon, print_header
from server import proto
from tools.make_models import make_identity_fp32, make_mlp

PERF_ANALYZER = ROOT / ".tools" / "perf_analyzer" / "perf_analyzer"
ECHO = SHARED / "echo_server.py"
CONCURRENCY = 64
H2_CONNECTIONS = 8
MLP_CONFIG = """name: "mlp_fp32"
platform: "onnxruntime_onnx"
max_batch_size: 64
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 784 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 10 ] } ]
dynamic_batching { }
"""
H2LOAD = re.compile(r"finished in [\d.]+\w*, (?P<rps>[\d.]+) req/s")
DONE = re.compile(r"requests: \d+ total, \d+ started, (?P<done>\d+) done, (?P<ok>\d+) succeeded")
PA = re.compile(r"Throughput: (?P<rps>[\d.]+) infer/sec")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def repository(root: Path) -> Path:
    make_mlp(root / "mlp_fp32" / "1" / "model.onnx")
    (root / "mlp_fp32" / "config.pbtxt").write_text(MLP_CONFIG)
    make_identity_fp32(root / "identity_fp32")
    return root


def ort_batch32(model: Path, seconds: float) -> float:
    """In-process ONNX Runtime, batch 32, one intra-op thread: samples/s."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((32, 784), np.float32)
    for _ in range(20):
        session.run(None, {"INPUT0": x})
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        session.run(None, {"INPUT0": x})
        runs += 1
    return runs * 32 / (time.perf_counter() - started)


def frame(model: str, width: int) -> bytes:
    """One gRPC frame: a single-sample ModelInferRequest, raw FP32 input."""
    message = proto.ModelInferRequest(model_name=model)
    message.inputs.add(name="INPUT0", datatype="FP32", shape=[1, width])
    data = np.random.default_rng(1).random((1, width), np.float32)
    message.raw_input_contents.append(data.tobytes())
    body: bytes = message.SerializeToString()
    return struct.pack(">BI", 0, len(body)) + body


def h2load_output(url: str, body: Path, seconds: float, connections: int, streams: int,
                  threads: int = 1, binary: str = "h2load") -> str:
    """h2load's report of `seconds` (whole) replaying the gRPC frame in `body` at `url`, after a
    1 s warm-up, on `connections` x `streams` spread over `threads` threads."""
    command = [binary, "-c", str(connections), "-m", str(streams), "-t", str(threads),
               "-D", str(int(seconds)), "--warm-up-time", "1", "-d", str(body),
               "-H", "content-type: application/grpc", "-H", "te: trailers", url]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout


def parse_h2load(out: str) -> dict[str, float]:
    """Requests/s, requests done and HTTP successes (gRPC errors included) from h2load's report."""
    rate, done = H2LOAD.search(out), DONE.search(out)
    if rate is None or done is None:
        raise RuntimeError(f"unexpected h2load output:\n{out}")
    return {"infer_per_s": float(rate["rps"]), "done": float(done["done"]),
            "http_ok": float(done["ok"])}


def h2load(port: int, body: Path, seconds: float) -> dict[str, float]:
    url = f"http://127.0.0.1:{port}/inference.GRPCInferenceService/ModelInfer"
    return parse_h2load(h2load_output(url, body, seconds, H2_CONNECTIONS,
                                      CONCURRENCY // H2_CONNECTIONS))


def perf_analyzer(port: int, model: str, seconds: float) -> float:
    command = [str(PERF_ANALYZER), "-m", model, "-u", f"127.0.0.1:{port}", "-i", "grpc",
               "--concurrency-range", str(CONCURRENCY), "--measurement-interval",
               str(int(seconds * 1000)), "--stability-percentage", "100", "--max-trials", "3"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=300)
    found = PA.search(out.stdout)
    if found is None:
        raise RuntimeError(f"perf_analyzer failed:\n{out.stdout}\n{out.stderr}")
    return float(found["rps"])


def counters(http: int, model: str) -> dict[str, float]:
    """The model's successes, rows, executions and ns spent in the backend (all batches)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/models/{model}/stats") as r:
        stats = json.load(r)["model_stats"][0]
    infer_ns = sum(int(b["compute_infer"].get("ns", 0)) for b in stats.get("batch_stats", []))
    return {"success": int(stats["inference_stats"]["success"].get("count", 0)),
            "rows": int(stats.get("inference_count", 0)),
            "executions": int(stats.get("execution_count", 0)), "infer_ns": infer_ns}


def measured(http: int, model: str, run: Callable[[], dict[str, float]]) -> dict[str, float]:
    """`run()`'s point with what the server's statistics say of it: `grpc_errors` (the point's
    `http_ok` calls that the model did not count as successes), and what limits: rows per batch
    and how busy the model instance was (compute time over the run's wall time, warm-up
    included; the point's `wall_s` when it gives one, else the time `run()` took)."""
    before = counters(http, model)
    started = time.perf_counter()
    point = run()
    wall = point.pop("wall_s", time.perf_counter() - started)
    time.sleep(0.5)  # the last answers' statistics
    after = counters(http, model)
    delta = {k: after[k] - before[k] for k in after}
    point["grpc_errors"] = max(0.0, point["http_ok"] - delta["success"])
    point["mean_batch_rows"] = delta["rows"] / max(delta["executions"], 1)
    point["instance_busy"] = delta["infer_ns"] / 1e9 / wall
    return point


def measure_tachyon(repo: Path, native: bool, bodies: dict[str, Path], seconds: float,
                    io_threads: int = 1) -> dict[str, dict[str, float]]:
    http, grpc, metrics = free_port(), free_port(), free_port()
    flag = "true" if native else "false"
    points: dict[str, dict[str, float]] = {}
    label = ("native" if native else "python") + (f", {io_threads} I/O threads"
                                                  if io_threads > 1 else "")
    with Tachyon(repo, http, grpc, metrics, "--grpc-frontend", "native",
                 "--grpc-native-request-path", flag, "--grpc-io-threads", str(io_threads),
                 ready_model="mlp_fp32"):
        for model, body in bodies.items():
            point = measured(http, model, partial(h2load, grpc, body, seconds))
            point["perf_analyzer"] = perf_analyzer(grpc, model, seconds)
            points[model] = point
            print(f"  tachyon ({label}) {model}: h2load "
                  f"{point['infer_per_s']:,.0f} infer/s (gRPC errors {point['grpc_errors']:.0f}, "
                  f"{point['mean_batch_rows']:.1f} rows a batch, instance busy "
                  f"{point['instance_busy']:.0%}),"
                  f" perf_analyzer {point['perf_analyzer']:,.0f} infer/s", flush=True)
    return points


def measure_echo(body: Path, seconds: float) -> dict[str, float]:
    port = free_port()
    process = subprocess.Popen([sys.executable, str(ECHO), str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(2)
        point = h2load(port, body, seconds)
        point["perf_analyzer"] = perf_analyzer(port, "mlp_fp32", seconds)
    finally:
        process.terminate()
        process.wait(30)
    print(f"  echo: h2load {point['infer_per_s']:,.0f} infer/s, perf_analyzer "
          f"{point['perf_analyzer']:,.0f} infer/s", flush=True)
    return point


def median(rounds: list[dict[str, Any]], *path: str) -> float:
    values = []
    for r in rounds:
        value: Any = r
        for key in path:
            value = value[key]
        values.append(float(value))
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--io-threads", type=int, default=2,
                        help="also measure the native path with this many I/O threads (1: not)")
    args = parser.parse_args()
    machine = print_header()
    for tool in ("h2load", str(PERF_ANALYZER)):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is missing: scripts/setup --test installs it")
    with tempfile.TemporaryDirectory() as tmp:
        repo = repository(Path(tmp) / "repo")
        bodies = {}
        for model, width in (("mlp_fp32", 784), ("identity_fp32", 16)):
            bodies[model] = Path(tmp) / f"{model}.grpc"
            bodies[model].write_bytes(frame(model, width))
        rounds = []
        for number in range(args.rounds):
            print(f"round {number + 1}:", flush=True)
            ort = ort_batch32(repo / "mlp_fp32" / "1" / "model.onnx", args.seconds)
            print(f"  in-process ORT MLP batch 32, 1 thread: {ort:,.0f} samples/s", flush=True)
            rounds.append({
                "ort_batch32_samples_per_s": ort,
                "echo": measure_echo(bodies["mlp_fp32"], args.seconds),
                "native": measure_tachyon(repo, True, bodies, args.seconds),
                "python": measure_tachyon(repo, False, bodies, args.seconds),
            })
            if args.io_threads > 1:
                rounds[-1]["native_io"] = measure_tachyon(repo, True, bodies, args.seconds,
                                                          args.io_threads)
    report(rounds, machine, args)


def report(rounds: list[dict[str, Any]], machine: str, args: argparse.Namespace) -> None:
    ort = median(rounds, "ort_batch32_samples_per_s")
    print(f"\nmedians of {len(rounds)} round(s), concurrency {CONCURRENCY}:")
    summary: dict[str, float] = {"ort_batch32_samples_per_s": ort}
    for client, key in (("h2load", "infer_per_s"), ("perf_analyzer", "perf_analyzer")):
        echo = median(rounds, "echo", key)
        summary[f"echo_{client}"] = echo
        print(f"  {client}: echo {echo:,.0f} infer/s")
        for path in ("native", "python", "native_io")[:3 if args.io_threads > 1 else 2]:
            mlp = median(rounds, path, "mlp_fp32", key)
            ident = median(rounds, path, "identity_fp32", key)
            summary[f"{path}_mlp_{client}"] = mlp
            summary[f"{path}_identity_{client}"] = ident
            name = f"native path, {args.io_threads} I/O threads" if path == "native_io" else (
                f"{path} path")
            print(f"    {name}: MLP {mlp:,.0f} infer/s = {mlp / ort:.2f}x ORT b32 "
                  f"(target 0.5), {mlp / echo:.2f}x echo (target 3); identity {ident:,.0f} "
                  f"infer/s = {ident / echo:.2f}x echo (target 5)")
        native, python = summary[f"native_mlp_{client}"], summary[f"python_mlp_{client}"]
        print(f"    native / python path: MLP {native / python:.2f}x, identity "
              f"{summary[f'native_identity_{client}'] / summary[f'python_identity_{client}']:.2f}x")
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    out = ROOT / "benchmarks" / "results" / f"native-request-path-{stamp}.json"
    out.write_text(json.dumps({
        "command": " ".join([sys.executable, *sys.argv]), "machine": machine,
        "concurrency": CONCURRENCY, "seconds": args.seconds, "io_threads": args.io_threads,
        "rounds": rounds,
        "medians": summary,
    }, indent=2))
    print(f"raw results: {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
