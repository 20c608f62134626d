"""GPU benchmark (issue 12): the served MLP on the CUDA EP beside the CPU-only server, batching
on and off, in-process ONNX Runtime beside it, FAISS Flat on GPU vs CPU; one run, one machine.

    python benchmarks/gpu_bench.py            # on a GPU host (scripts/device-check runs it)
    python benchmarks/gpu_bench.py --cpu-only --seconds 1 --concurrency 1,8 --faiss-vectors 50000

1. MLP 784-1024-1024-10 FP32, single-sample gRPC requests (shape [1, 784]) at each
   concurrency, one `tachyon serve` process per device: batching on (max_batch_size 512,
   dynamic batching) and off (max_batch_size 0); the client is this script's closed-loop
   grpc.aio generator in 8 processes. Targets: CUDA at the highest concurrency >= 3x the CPU
   server; batching on >= 10x off.
2. In-process ONNX Runtime on the same model at batch 1 / 64 / 512 (CUDA EP with I/O binding
   and the CPU EP), the ceiling the server is measured against.
3. FAISS IndexFlatL2 1M x 128, k=10, batches of 1,024 queries, on GPU vs CPU (when a GPU build
   of FAISS is there).
Prints the command, the machine, medians of the repeats and the ratios; writes
benchmarks/results/gpu-<stamp>.{json,md}. Needs no tritonclient (the client sends our own
serialized ModelInferRequest).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _harness import print_header  # noqa: E402
from make_models import make_mlp  # noqa: E402

METHOD = "/inference.GRPCInferenceService/ModelInfer"
RESULTS = ROOT / "benchmarks" / "results"
CLIENT_PROCESSES = 8


# -- the server ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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

    def __init__(self, repository: Path, log: Path) -> None:
        self.grpc, self.http = free_port(), free_port()
        self.command = [sys.executable, "-m", "server.cli", "serve", "--model-repository",
                        str(repository), "--host", "127.0.0.1", "--http-port", str(self.http),
                        "--grpc-port", str(self.grpc), "--metrics-port", str(free_port())]
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


# -- the client ----------------------------------------------------------------------------


def request_bytes(model: str) -> bytes:
    from server import proto

    request = proto.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 784])
    assert tensor is not None
    x = np.random.default_rng(0).standard_normal((1, 784), np.float32)
    request.raw_input_contents.append(x.tobytes())
    return bytes(request.SerializeToString())


async def _closed_loop(url: str, payload: bytes, workers: int, warmup: float,
                       seconds: float) -> tuple[list[float], int]:
    import grpc

    latencies: list[float] = []
    errors = 0
    async with grpc.aio.insecure_channel(url) as channel:
        call = channel.unary_unary(METHOD)
        start = time.perf_counter()
        measure_from, stop = start + warmup, start + warmup + seconds

        async def worker() -> None:
            nonlocal errors
            while (t0 := time.perf_counter()) < stop:
                try:
                    await call(payload)
                except grpc.RpcError:
                    errors += 1
                    continue
                if t0 >= measure_from:
                    latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(worker() for _ in range(workers)))
    return latencies, errors


def _client_process(args: tuple[str, bytes, int, float, float], out: Any) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    out.put(asyncio.run(_closed_loop(*args)))


def load(url: str, model: str, concurrency: int, seconds: float) -> dict[str, float]:
    """Closed-loop single-sample requests; requests/s, p50 and p99 in ms."""
    payload = request_bytes(model)
    processes = min(CLIENT_PROCESSES, concurrency)
    shares = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
    queue: Any = mp.get_context("spawn").Queue()
    workers = [mp.get_context("spawn").Process(
        target=_client_process, args=((url, payload, n, 1.0, seconds), queue)) for n in shares]
    for worker in workers:
        worker.start()
    latencies: list[float] = []
    errors = 0
    for _ in workers:
        found, failed = queue.get(timeout=seconds + 120)
        latencies += found
        errors += failed
    for worker in workers:
        worker.join()
    latencies.sort()
    count = len(latencies)
    return {
        "rps": count / seconds,
        "p50_ms": 1000 * latencies[count // 2] if count else 0.0,
        "p99_ms": 1000 * latencies[min(count - 1, int(count * 0.99))] if count else 0.0,
        "errors": errors,
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
    index = faiss.IndexFlatL2(128)
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


def serve_points(repo: Path, log: Path, concurrencies: list[int], seconds: float,
                 repeats: int) -> dict[str, dict[int, dict[str, float]]]:
    points: dict[str, dict[int, dict[str, float]]] = {}
    with Server(repo, log) as server:
        url = f"127.0.0.1:{server.grpc}"
        for model in ("mlp_batch", "mlp_single"):
            points[model] = {}
            for concurrency in concurrencies:
                runs = [load(url, model, concurrency, seconds) for _ in range(repeats)]
                median = statistics.median(r["rps"] for r in runs)
                best = min(runs, key=lambda r: abs(r["rps"] - median))
                points[model][concurrency] = {**best, "rps": median}
                print(f"  {repo.name} {model} c{concurrency}: {median:,.0f} infer/s, "
                      f"p50 {best['p50_ms']:.2f} ms, p99 {best['p99_ms']:.2f} ms, "
                      f"errors {best['errors']}", flush=True)
    return points


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-only", action="store_true",
                        help="no CUDA parts (a dry run of the script on a CPU host)")
    parser.add_argument("--concurrency", default="1,64,256")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--batches", default="1,64,512")
    parser.add_argument("--faiss-vectors", type=int, default=1_000_000)
    args = parser.parse_args()
    machine = print_header()
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
                              "seconds": args.seconds, "repeats": args.repeats}
    devices = (["KIND_GPU"] if cuda else []) + ["KIND_CPU"]
    for kind in devices:
        print(f"served, {kind}:", flush=True)
        repo = write_repository(work / kind.lower(), mlp, kind)
        result[kind] = serve_points(repo, work / f"{kind}.log", concurrencies, args.seconds,
                                    args.repeats)
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
    write_report(result, concurrencies, cuda)
    return 0


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.1f}x" if a and b else "n/a"


def write_report(result: dict[str, Any], concurrencies: list[int], cuda: bool) -> None:
    top = max(concurrencies)
    cpu = result["KIND_CPU"]
    lines = [
        "# GPU benchmark" + ("" if cuda else " (CPU-only dry run: no GPU figures)"), "",
        f"- command: `{result['command']}`", f"- machine: {result['machine']}",
        f"- {result['seconds']} s per point, median of {result['repeats']}; single-sample "
        f"gRPC requests, {CLIENT_PROCESSES} client processes", "",
        "| server | model | " + " | ".join(f"c{c} infer/s (p50 / p99 ms)" for c in concurrencies)
        + " |", "| --- | --- |" + " --- |" * len(concurrencies),
    ]
    for kind in ("KIND_GPU", "KIND_CPU"):
        for model, points in result.get(kind, {}).items():
            cells = [f"{p['rps']:,.0f} ({p['p50_ms']:.2f} / {p['p99_ms']:.2f})"
                     for p in points.values()]
            lines.append(f"| {kind} | {model} | " + " | ".join(cells) + " |")
    lines += ["", "Ratios at the highest concurrency:", ""]
    if cuda:
        gpu = result["KIND_GPU"]
        lines.append(f"- CUDA server vs CPU server, batching on, c{top}: "
                     f"{_ratio(gpu['mlp_batch'][top]['rps'], cpu['mlp_batch'][top]['rps'])} "
                     "(target >= 3x)")
        lines.append(f"- CUDA server, batching on vs off, c{top}: "
                     f"{_ratio(gpu['mlp_batch'][top]['rps'], gpu['mlp_single'][top]['rps'])} "
                     "(target >= 10x)")
    lines.append(f"- CPU server, batching on vs off, c{top}: "
                 f"{_ratio(cpu['mlp_batch'][top]['rps'], cpu['mlp_single'][top]['rps'])}")
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
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{prefix}-{stamp}.json").write_text(json.dumps(result, indent=1, default=str))
    (RESULTS / f"{prefix}-{stamp}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {RESULTS / f'{prefix}-{stamp}.md'}")


if __name__ == "__main__":
    sys.exit(main())
