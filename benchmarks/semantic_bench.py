"""The semantic-search ensemble (tokenizer -> MiniLM -> FAISS -> texts) under load.

    python benchmarks/semantic_bench.py [--seconds 5]

A closed loop of gRPC clients sends real English queries at concurrency 1 and 16 to `tachyon
serve` on the bundled repository; prints requests/s and p50/p99 latency, writes
benchmarks/results/semantic-<stamp>.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import ROOT, Tachyon, print_header

QUERIES = [
    "read a JSON document from a file", "copy a directory tree", "square root of a number",
    "compress data with gzip", "parse command line arguments", "current date and time",
    "send an HTTP request", "random number in a range", "split a path into its parts",
    "run a shell command and capture its output", "sort a list in place", "regular expression",
    "encode bytes as base64", "temporary directory", "read a CSV file", "hash a password",
]


def load(concurrency: int, seconds: float) -> dict[str, float]:
    """A closed loop of `concurrency` gRPC clients sending real queries (prebuilt requests;
    the embedding model dominates each request's cost, not this client)."""
    import grpc
    import numpy as np
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    requests = []
    for query in QUERIES:
        request = service_pb2.ModelInferRequest(model_name="semantic_search")
        request.inputs.add(name="QUERY_TEXT", datatype="BYTES", shape=[1, 1])
        encoded = query.encode()
        request.raw_input_contents.append(len(encoded).to_bytes(4, "little") + encoded)
        requests.append(request)

    async def run() -> tuple[list[float], int]:
        latencies: list[float] = []
        errors = 0
        async with grpc.aio.insecure_channel("127.0.0.1:18701") as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            warm_until = time.perf_counter() + 1.0
            stop = warm_until + seconds

            async def worker(offset: int) -> None:
                nonlocal errors
                i = offset
                while (start := time.perf_counter()) < stop:
                    try:
                        await stub.ModelInfer(requests[i % len(requests)])
                    except grpc.RpcError:
                        errors += 1
                        continue
                    if start >= warm_until:
                        latencies.append(time.perf_counter() - start)
                    i += 1

            await asyncio.gather(*(worker(i) for i in range(concurrency)))
        return latencies, errors

    latencies, errors = asyncio.run(run())
    ms = np.array(latencies) * 1000
    result = {"requests_per_s": len(latencies) / seconds, "p50_ms": float(np.percentile(ms, 50)),
              "p99_ms": float(np.percentile(ms, 99)), "errors": errors}
    print(f"  concurrency {concurrency}: {result}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5)
    args = parser.parse_args()
    machine = print_header()
    results = {}
    with Tachyon(ROOT / "model_repository", 18700, 18701, 18702, ready_model="semantic_search"):
        for concurrency in (1, 16):
            results[concurrency] = load(concurrency, args.seconds)
    lines = ["| concurrency | requests/s | p50 ms | p99 ms |", "| --- | --- | --- | --- |"]
    for concurrency, r in results.items():
        lines.append(f"| {concurrency} | {r['requests_per_s']:,.1f} | {r['p50_ms']:.2f} | "
                     f"{r['p99_ms']:.2f} |")
    table = "\n".join(lines)
    print()
    print(table)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"semantic-{stamp}.json").write_text(json.dumps({"machine": machine,
                                                            "results": results}, indent=2))
    (out / f"semantic-{stamp}.md").write_text(
        f"command: {' '.join(sys.argv)}\nmachine: {machine}\n\n{table}\n"
    )
    print(f"wrote {out / f'semantic-{stamp}.md'}")


if __name__ == "__main__":
    main()
