"""FAISS indexes served by Tachyon beside in-process FAISS, in one run (issue "FAISS ...").

    python benchmarks/faiss_bench.py [--vectors 200000] [--seconds 5]

1. Flat, 200k x 128 FP32, k=10: single-query gRPC requests at concurrency 32 (NVIDIA's
   perf_analyzer as the client) vs an in-process loop calling `index.search` one query at a
   time, and vs in-process `index.search` on batches of 32. Targets: served >= 1.5x the
   one-at-a-time loop and >= 0.5x the batch-32 search.
2. IVF and HNSW examples (smaller, to keep the build short): served queries/s beside
   in-process, and recall@10 against exact search on the same queries.
Prints the command, the machine and a table; writes benchmarks/results/faiss-<stamp>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from server import index_build  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from _harness import Tachyon, print_header  # noqa: E402

PERF_ANALYZER = ROOT / ".tools" / "perf_analyzer" / "perf_analyzer"
DIM, K = 128, 10


def inproc_one_at_a_time(index: faiss.Index, queries: np.ndarray, seconds: float) -> float:
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        index.search(queries[n % len(queries)][None, :], K)
        n += 1
    return n / (time.perf_counter() - start)


def inproc_batches(index: faiss.Index, queries: np.ndarray, batch: int, seconds: float) -> float:
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        i = (n * batch) % (len(queries) - batch)
        index.search(queries[i : i + batch], K)
        n += 1
    return n * batch / (time.perf_counter() - start)


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    hits = sum(len(set(f) & set(e)) for f, e in zip(found, exact, strict=True))
    return hits / exact.size


def served_qps(model: str, concurrency: int, seconds: float) -> tuple[float, str]:
    command = [str(PERF_ANALYZER), "-m", model, "-u", "127.0.0.1:18501", "-i", "grpc",
               "--concurrency-range", str(concurrency), "--measurement-interval",
               str(int(seconds * 1000)), "--stability-percentage", "25", "--max-trials", "6"]
    print("$", " ".join(command), flush=True)
    output = subprocess.run(command, capture_output=True, text=True, check=False)
    text = output.stdout + output.stderr
    match = re.search(r"Concurrency: \d+, throughput: ([\d.]+) infer/sec, latency (\d+) usec", text)
    if not match:
        raise RuntimeError(text[-2000:])
    print("  ", match[0], flush=True)
    return float(match[1]), match[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", type=int, default=200_000)
    parser.add_argument("--small", type=int, default=50_000, help="vectors for IVF and HNSW")
    parser.add_argument("--seconds", type=float, default=5)
    args = parser.parse_args()
    machine = print_header()
    machine += f", faiss {faiss.__version__}, {faiss.omp_get_max_threads()} OpenMP threads"
    print("faiss:", faiss.__version__)
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((args.vectors, DIM)).astype(np.float32)
    queries = rng.standard_normal((2000, DIM)).astype(np.float32)
    results: dict[str, object] = {"machine": machine}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        repo = folder / "repo"
        np.save(folder / "big.npy", vectors)
        np.save(folder / "small.npy", vectors[: args.small])
        builds = [("flat", "big.npy", "Flat"), ("ivf", "small.npy", "IVF256,Flat"),
                  ("hnsw", "small.npy", "HNSW32")]
        for model, data, factory in builds:
            started = time.perf_counter()
            index_build.build(folder / data, factory, repo, model, k=K)
            print(f"built {model} ({factory}) in {time.perf_counter() - started:.1f} s", flush=True)
        indexes = {m: faiss.read_index(str(repo / m / "1" / "index.faiss")) for m, _, _ in builds}
        for name in ("ivf",):
            faiss.ParameterSpace().set_index_parameter(indexes[name], "nprobe", 16)
        faiss.ParameterSpace().set_index_parameter(indexes["hnsw"], "efSearch", 64)
        inproc = {}
        threads = sorted({1, faiss.omp_get_max_threads()})
        for model in indexes:
            # the in-process baselines get their best OpenMP thread count (1 or all cores)
            one = b32 = 0.0
            for count in threads:
                faiss.omp_set_num_threads(count)
                one = max(one, inproc_one_at_a_time(indexes[model], queries, args.seconds / 2))
                b32 = max(b32, inproc_batches(indexes[model], queries, 32, args.seconds / 2))
            inproc[model] = {"one_at_a_time_qps": one, "batch32_qps": b32}
            print(f"in-process {model}: one at a time {one:,.0f} q/s, batches of 32 {b32:,.0f} q/s",
                  flush=True)
        exact_small = faiss.IndexFlatL2(DIM)
        exact_small.add(vectors[: args.small])
        _, truth = exact_small.search(queries[:1000], K)
        recall = {}
        for model in ("ivf", "hnsw"):
            _, found = indexes[model].search(queries[:1000], K)
            recall[model] = recall_at_k(found, truth)
            print(f"recall@10 {model}: {recall[model]:.3f}")
        served = {}
        with Tachyon(repo, 18500, 18501, 18502):
            for model in indexes:
                qps, line = served_qps(model, 32, args.seconds)
                served[model] = {"c32_qps": qps, "perf_analyzer": line}
    flat = inproc["flat"]
    lines = [
        "| index | vectors | served c32 q/s | in-process 1-at-a-time | in-process batch 32 | "
        "served / 1-at-a-time | served / batch 32 | recall@10 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for model, count in (("flat", args.vectors), ("ivf", args.small), ("hnsw", args.small)):
        s, i = float(served[model]["c32_qps"]), inproc[model]  # type: ignore[arg-type]
        lines.append(
            f"| {model} | {count:,} | {s:,.0f} | {i['one_at_a_time_qps']:,.0f} | "
            f"{i['batch32_qps']:,.0f} | {s / i['one_at_a_time_qps']:.2f}x | "
            f"{s / i['batch32_qps']:.2f}x | {recall.get(model, 1.0):.3f} |"
        )
    served_flat = float(served["flat"]["c32_qps"])  # type: ignore[arg-type]
    lines += [
        "",
        f"- Flat targets: served / one-at-a-time = {served_flat / flat['one_at_a_time_qps']:.2f}x "
        f"(>= 1.5), served / batch-32 = {served_flat / flat['batch32_qps']:.2f}x (>= 0.5)",
    ]
    table = "\n".join(lines)
    print()
    print(table)
    results.update({"inproc": inproc, "served": served, "recall_at_10": recall})
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"faiss-{stamp}.json").write_text(json.dumps(results, indent=2))
    (out / f"faiss-{stamp}.md").write_text(
        f"command: {' '.join(sys.argv)}\nmachine: {machine}\n\n{table}\n"
    )
    print(f"wrote {out / f'faiss-{stamp}.md'}")


if __name__ == "__main__":
    main()
