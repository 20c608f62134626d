"""GPU benchmark (issue 12): the served MLP on the CUDA EP beside the CPU-only server, batching
on and off, in-process ONNX Runtime beside it, FAISS Flat on GPU vs CPU; one run, one machine.

    python benchmarks/gpu_bench.py            # on a GPU host (scripts/device-check runs it)
    python benchmarks/gpu_bench.py --cpu-only --seconds 1 --concurrency 1,8 --faiss-vectors 50000
    ... [--client auto|h2load|python] [--h2load-threads 4] [--grpc-io-threads 4]

1. MLP 784-1024-1024-10 FP32, single-sample gRPC requests (shape [1, 784]) at each
   concurrency, one `tachyon serve` process per device: batching on (max_batch_size 512,
   dynamic batching) and off (max_batch_size 0), both servers with the same
   --grpc-io-threads. The client (--client auto: h2load when there is one) is h2load
   (nghttp2's, C: `H2LOAD`, else the one on PATH) replaying one prebuilt gRPC frame on
   connections x streams = c (the most connections up to 16 that divide c; threads at most
   --h2load-threads), as benchmarks/native_request_path.py does,
   or this script's closed-loop grpc.aio generator in 8 processes (far slower: on a fast
   server it measures itself). Each point also reads the model's statistics: gRPC errors
   (h2load counts an HTTP 200 with an error status as a success), rows per batch and how busy
   the model instance was, which tell whether the model or the front end limits. Targets:
   CUDA at the highest concurrency >= 3x the CPU server; batching on >= 10x off.
2. In-process ONNX Runtime on the same model at batch 1 / 64 / 512 (CUDA EP with I/O binding
   and the CPU EP), the ceiling the server is measured against.
3. FAISS IndexFlatL2 1M x 128, k=10, batches of 1,024 queries, on GPU vs CPU (when a GPU build
   of FAISS is there).
Prints the command, the machine, medians of the repeats and the ratios; writes
benchmarks/results/gpu-<stamp>.{json,md} (gpu-dryrun-* with --cpu-only). Needs no tritonclient
(both clients send our own serialized ModelInferRequest).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._harness import ROOT, print_header
from benchmarks.native_request_path import (
    frame,
    free_port,
    h2load_output,
    measured,
    parse_h2load,
)
from tools.make_models import make_mlp

METHOD = "/inference.GRPCInferenceService/ModelInfer"
RESULTS = ROOT / "benchmarks" / "results"
CLIENT_PROCESSES = 8
WARMUP_S = 1.0  # both clients: h2load's --warm-up-time 1, the Python client's own
H2_MAX_CONNECTIONS = 16
REQUEST_TIME = re.compile(r"time for request:\s+\S+\s+\S+\s+(?P<mean>[\d.]+)(?P<unit>us|ms|s)\s")
UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


# -- the server ----------------------------------------------------------------------------


def write_repository(root: Path, mlp: Path, kind: str) -> Path:
    """mlp_batch (batching on) and mlp_single (off) on `kind` (KIND_GPU / KIND_CPU)."""
    models = {
        "mlp_batch": ("max_batch_size: 512\ndynamic_batching { max_queue_delay_microseconds: 200 }",
                      "[ 784 ]", "[ 10 ]"),
        "mlp_single": ("max_batch_size: 0", "[ 1, 784 ]", "[ 1, 10 ]"),
    }
    for name, (batching, dims_in, dims_out) in models.items():
        (root / name / "1").mkdir(parents=True)
        shutil.copy(mlp, root / name / "1" / "model.onnx")
        (root / name / "config.pbtxt").write_text(
            f'name: "{name}"\nplatform: "onnxruntime_onnx"\n{batching}\n'
            f'input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: {dims_in} }} ]\n'
            f'output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: {dims_out} }} ]\n'
            f"instance_group [ {{ kind: {kind} count: 1 }} ]\n"
        )
    return root


class Server:
    """`tachyon serve` (python -m server.cli) on free ports, ready on entry."""

    def __init__(self, repository: Path, log: Path, io_threads: int) -> None:
        self.grpc, self.http = free_port(), free_port()
        self.command = [sys.executable, "-m", "server.cli", "serve", "--model-repository",
                        str(repository), "--host", "127.0.0.1", "--http-port", str(self.http),
                        "--grpc-port", str(self.grpc), "--metrics-port", str(free_port()),
                        "--grpc-io-threads", str(io_threads)]
        self.log = log

    def __enter__(self) -> Server:
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(self.command, cwd=ROOT, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/v2/health/ready",
                                            timeout=1):
                    return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"server not ready:\n{self.log.read_text()[-3000:]}")

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(60)


# -- the clients ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Client:
    """What drives the served points: h2load (its path) or, with `h2load` None, the Python
    grpc.aio client; a point is infer/s, mean request ms and `http_ok` (calls answered)."""

    h2load: str | None
    max_threads: int

    @property
    def name(self) -> str:
        if self.h2load is None:
            return f"Python grpc.aio client, {CLIENT_PROCESSES} processes"
        return f"h2load ({self.h2load}), at most {self.max_threads} threads"

    def point(self, port: int, body: Path, concurrency: int, seconds: float) -> dict[str, float]:
        if self.h2load is None:
            return load(f"127.0.0.1:{port}", body.read_bytes()[5:], concurrency, seconds)
        return h2load_point(self.h2load, self.max_threads, port, body, concurrency, seconds)


def choose_client(choice: str, max_threads: int) -> Client:
    """`--client`: python, h2load (`H2LOAD`, else PATH's; missing is an error) or auto (h2load
    when there is one). An `H2LOAD` that names no executable is an error, never a fallback."""
    if choice == "python":
        return Client(None, max_threads)
    named = os.environ.get("H2LOAD")
    found = shutil.which(named) if named else shutil.which("h2load")
    if named and found is None:
        raise SystemExit(f"H2LOAD={named}: no such executable (unset it for PATH's h2load)")
    if found is None and choice == "h2load":
        raise SystemExit("--client h2load: no h2load on PATH (apt-get install nghttp2-client, or "
                         "set H2LOAD)")
    return Client(found, max_threads)


def h2load_shape(concurrency: int) -> tuple[int, int]:
    """Connections x streams making exactly `concurrency`, with the most connections up to 16."""
    top = min(concurrency, H2_MAX_CONNECTIONS)
    connections = max(n for n in range(1, top + 1) if concurrency % n == 0)
    return connections, concurrency // connections


def h2load_point(binary: str, max_threads: int, port: int, body: Path, concurrency: int,
                 seconds: float) -> dict[str, float]:
    connections, streams = h2load_shape(concurrency)
    threads = min(connections, max_threads)
    out = h2load_output(f"http://127.0.0.1:{port}{METHOD}", body, seconds, connections, streams,
                        threads, binary)
    point = parse_h2load(out)
    mean = REQUEST_TIME.search(out)
    if mean is None:
        raise RuntimeError(f"no 'time for request' in h2load's output:\n{out}")
    return {"rps": point["infer_per_s"], "mean_ms": float(mean["mean"]) * UNIT_MS[mean["unit"]],
            "http_ok": point["http_ok"], "connections": connections, "streams": streams,
            "threads": threads}


async def _closed_loop(url: str, payload: bytes, workers: int, warmup: float,
                       seconds: float) -> tuple[list[float], int]:
    """Latencies after the warm-up, and the calls answered (OK or a gRPC error), all told."""
    import grpc

    latencies: list[float] = []
    answered = 0
    async with grpc.aio.insecure_channel(url) as channel:
        call = channel.unary_unary(METHOD)
        start = time.perf_counter()
        measure_from, stop = start + warmup, start + warmup + seconds

        async def worker() -> None:
            nonlocal answered
            while (t0 := time.perf_counter()) < stop:
                try:
                    await call(payload)
                except grpc.RpcError:
                    answered += 1
                    continue
                answered += 1
                if t0 >= measure_from:
                    latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(worker() for _ in range(workers)))
    return latencies, answered


def _client_process(args: tuple[str, bytes, int, float, float], out: Any) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    out.put(asyncio.run(_closed_loop(*args)))


def load(url: str, payload: bytes, concurrency: int, seconds: float) -> dict[str, float]:
    """The Python client: closed-loop requests of `payload` (a serialized ModelInferRequest);
    infer/s, mean, p50 and p99 ms, calls answered, and the loop's wall time (not the spawns')."""
    processes = min(CLIENT_PROCESSES, concurrency)
    shares = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
    queue: Any = mp.get_context("spawn").Queue()
    workers = [mp.get_context("spawn").Process(
        target=_client_process, args=((url, payload, n, WARMUP_S, seconds), queue))
        for n in shares]
    for worker in workers:
        worker.start()
    latencies: list[float] = []
    answered = 0
    for _ in workers:
        found, calls = queue.get(timeout=seconds + 120)
        latencies += found
        answered += calls
    for worker in workers:
        worker.join()
    latencies.sort()
    count = len(latencies)
    return {
        "rps": count / seconds,
        "mean_ms": 1000 * sum(latencies) / count if count else 0.0,
        "p50_ms": 1000 * latencies[count // 2] if count else 0.0,
        "p99_ms": 1000 * latencies[min(count - 1, int(count * 0.99))] if count else 0.0,
        "http_ok": answered,
        "wall_s": WARMUP_S + seconds,
    }


# -- in-process ----------------------------------------------------------------------------


def inprocess(mlp: Path, provider: str, batch: int, seconds: float) -> float:
    """Samples/s of one ONNX Runtime session (I/O binding on the CUDA EP, as served)."""
    import onnxruntime as ort

    providers = list(dict.fromkeys([provider, "CPUExecutionProvider"]))
    session = ort.InferenceSession(str(mlp), providers=providers)
    x = np.random.default_rng(1).standard_normal((batch, 784), np.float32)
    run = session.run
    if provider == "CUDAExecutionProvider":
        binding = session.io_binding()

        def run(_: object, feed: dict[str, np.ndarray]) -> object:
            binding.bind_cpu_input("INPUT0", feed["INPUT0"])
            binding.bind_output("OUTPUT0", "cuda", 0)
            session.run_with_iobinding(binding)
            return binding.copy_outputs_to_cpu()

    for _ in range(20):
        run(None, {"INPUT0": x})
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        run(None, {"INPUT0": x})
        n += 1
    return n * batch / (time.perf_counter() - start)


def faiss_flat(vectors: int, seconds: float, gpu: bool) -> float | None:
    """Queries/s of IndexFlatL2 (vectors x 128, k 10) on batches of 1,024 queries."""
    try:
        import faiss
    except ImportError:
        return None
    if gpu and faiss.get_num_gpus() == 0:
        return None
    rng = np.random.default_rng(2)
    index: Any = faiss.IndexFlatL2(128)
    index.add(rng.standard_normal((vectors, 128), np.float32))
    if gpu:
        resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(resources, 0, index)
    queries = rng.standard_normal((1024, 128), np.float32)
    index.search(queries, 10)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or n == 0:
        index.search(queries, 10)
        n += 1
    return n * 1024 / (time.perf_counter() - start)


# -- the run -------------------------------------------------------------------------------


def serve_points(repo: Path, work: Path, client: Client, io_threads: int,
                 concurrencies: list[int], seconds: float,
                 repeats: int) -> dict[str, dict[int, dict[str, float]]]:
    points: dict[str, dict[int, dict[str, float]]] = {}
    with Server(repo, work / f"{repo.name}.log", io_threads) as server:
        for model in ("mlp_batch", "mlp_single"):
            body = work / f"{model}.grpc"
            body.write_bytes(frame(model, 784))
            points[model] = {}
            for concurrency in concurrencies:
                run = partial(client.point, server.grpc, body, concurrency, seconds)
                runs = [measured(server.http, model, run) for _ in range(repeats)]
                median = statistics.median(r["rps"] for r in runs)
                best = min(runs, key=lambda r: abs(r["rps"] - median))
                points[model][concurrency] = {**best, "rps": median}
                print(f"  {repo.name} {model} c{concurrency}: {median:,.0f} infer/s, "
                      f"gRPC errors {best['grpc_errors']:.0f}, mean {best['mean_ms']:.2f} ms, "
                      f"{best['mean_batch_rows']:.1f} rows a batch, instance busy "
                      f"{best['instance_busy']:.0%}", flush=True)
    return points


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-only", action="store_true",
                        help="no CUDA parts (a dry run of the script on a CPU host)")
    parser.add_argument("--concurrency", default="1,64,256")
    parser.add_argument("--seconds", type=float, default=4.0,
                        help="per point (h2load: whole seconds), after a 1 s warm-up")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--batches", default="1,64,512")
    parser.add_argument("--faiss-vectors", type=int, default=1_000_000)
    parser.add_argument("--client", choices=("auto", "h2load", "python"), default="auto",
                        help="auto: h2load (H2LOAD, else PATH's) when there is one")
    parser.add_argument("--h2load-threads", type=int, default=4,
                        help="h2load's threads at most (never more than its connections)")
    parser.add_argument("--grpc-io-threads", type=int, default=4,
                        help="both servers' native gRPC I/O threads")
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="where gpu-*.{json,md} go (default benchmarks/results)")
    args = parser.parse_args()
    machine = print_header()
    client = choose_client(args.client, args.h2load_threads)
    print(f"client: {client.name}; servers: --grpc-io-threads {args.grpc_io_threads}",
          flush=True)
    import onnxruntime as ort

    cuda = "CUDAExecutionProvider" in ort.get_available_providers() and not args.cpu_only
    if not cuda and not args.cpu_only:
        print("no CUDA EP here: run with --cpu-only, or install onnxruntime-gpu", file=sys.stderr)
        return 2
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    work = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    mlp = make_mlp(work / "mlp.onnx")
    result: dict[str, Any] = {"machine": machine, "command": " ".join(sys.argv),
                              "seconds": args.seconds, "repeats": args.repeats,
                              "client": client.name, "grpc_io_threads": args.grpc_io_threads}
    devices = (["KIND_GPU"] if cuda else []) + ["KIND_CPU"]
    for kind in devices:
        print(f"served, {kind}:", flush=True)
        repo = write_repository(work / kind.lower(), mlp, kind)
        result[kind] = serve_points(repo, work, client, args.grpc_io_threads, concurrencies,
                                    args.seconds, args.repeats)
    result["inprocess"] = {}
    for provider in (["CUDAExecutionProvider"] if cuda else []) + ["CPUExecutionProvider"]:
        result["inprocess"][provider] = {
            b: inprocess(mlp, provider, b, min(args.seconds, 2.0)) for b in batches}
        print(f"in-process {provider}: " + ", ".join(
            f"batch {b} {v:,.0f}/s" for b, v in result["inprocess"][provider].items()), flush=True)
    result["faiss"] = {
        "vectors": args.faiss_vectors,
        "gpu": faiss_flat(args.faiss_vectors, 2.0, gpu=True) if cuda else None,
        "cpu": faiss_flat(args.faiss_vectors, 2.0, gpu=False),
    }
    print(f"faiss Flat {args.faiss_vectors:,} x 128: {result['faiss']}", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    write_report(result, concurrencies, cuda, args.results)
    return 0


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.1f}x" if a and b else "n/a"


def served_table(result: dict[str, Any]) -> list[str]:
    lines = ["| server | model | c | infer/s | gRPC errors | mean ms | rows a batch | "
             "instance busy |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for kind in ("KIND_GPU", "KIND_CPU"):
        for model, points in result.get(kind, {}).items():
            for c, p in points.items():
                lines.append(f"| {kind} | {model} | {c} | {p['rps']:,.0f} | "
                             f"{p['grpc_errors']:.0f} | {p['mean_ms']:.2f} | "
                             f"{p['mean_batch_rows']:.1f} | {p['instance_busy']:.0%} |")
    return lines


def ratio_lines(result: dict[str, Any], top: int) -> list[str]:
    def rps(kind: str, model: str) -> float:
        return float(result[kind][model][top]["rps"])

    lines = [f"Ratios at c{top} (client: {result['client']}):", ""]
    if "KIND_GPU" in result:
        lines.append(f"- CUDA server vs CPU server, batching on: "
                     f"{_ratio(rps('KIND_GPU', 'mlp_batch'), rps('KIND_CPU', 'mlp_batch'))} "
                     "(target >= 3x)")
    for kind, name in (("KIND_GPU", "CUDA"), ("KIND_CPU", "CPU")):
        if kind in result:
            lines.append(f"- {name} server, batching on vs off: "
                         f"{_ratio(rps(kind, 'mlp_batch'), rps(kind, 'mlp_single'))}"
                         + (" (target >= 10x)" if kind == "KIND_GPU" else ""))
    return lines


def write_report(result: dict[str, Any], concurrencies: list[int], cuda: bool,
                 results: Path) -> None:
    lines = [
        "# GPU benchmark" + ("" if cuda else " (CPU-only dry run: no GPU figures)"), "",
        f"- command: `{result['command']}`", f"- machine: {result['machine']}",
        f"- {result['seconds']} s per point after a 1 s warm-up, median of "
        f"{result['repeats']}; single-sample gRPC requests; client: {result['client']}; "
        f"servers: --grpc-io-threads {result['grpc_io_threads']}",
        "- gRPC errors: calls answered that the model's statistics do not count as successes; "
        "rows a batch and instance busy (compute over the point's wall time, warm-up included) "
        "from the same statistics", "",
        *served_table(result), "", *ratio_lines(result, max(concurrencies)),
    ]
    lines += ["", "In-process ONNX Runtime (samples/s):", "", "| provider | "
              + " | ".join(f"batch {b}" for b in next(iter(result["inprocess"].values())))
              + " |", "| --- |" + " --- |" * len(next(iter(result["inprocess"].values())))]
    for provider, values in result["inprocess"].items():
        lines.append(f"| {provider} | " + " | ".join(f"{v:,.0f}" for v in values.values()) + " |")
    faiss = result["faiss"]
    gpu_qps, cpu_qps = (f"{faiss[d]:,.0f}" if faiss[d] else "n/a" for d in ("gpu", "cpu"))
    lines += ["", f"FAISS IndexFlatL2 {faiss['vectors']:,} x 128, k 10, batches of 1,024: "
              f"GPU {gpu_qps} q/s, CPU {cpu_qps} q/s, GPU/CPU "
              f"{_ratio(faiss['gpu'], faiss['cpu'])}", ""]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    prefix = "gpu" if cuda else "gpu-dryrun"
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{prefix}-{stamp}.json").write_text(json.dumps(result, indent=1, default=str))
    (results / f"{prefix}-{stamp}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {results / f'{prefix}-{stamp}.md'}")

if __name__ == "__main__":
    sys.exit(main())
