"""../shared/bench/loadgen.py over TLS: the same closed-loop client (its request, its warm-up, its
report line) on a secure channel that trusts --ca. One client process, as grpc_frontends.py runs
loadgen.py. Runs in the peers' client venv (grpc, tritonclient, numpy, uvloop).

    python benchmarks/tls_loadgen.py --ca ca.crt --url 127.0.0.1:8001 --model mlp_fp32 \
        --shape 1,784 --concurrency 32 --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import grpc
import numpy as np
from tritonclient.grpc import service_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent / "shared" / "bench"))
from loadgen import build_request


async def run(args: argparse.Namespace) -> tuple[list[float], int]:
    credentials = grpc.ssl_channel_credentials(Path(args.ca).read_bytes())
    request = build_request(args.model, args.shape, args.dtype)
    options = [("grpc.max_receive_message_length", 1 << 30)]
    async with grpc.aio.secure_channel(args.url, credentials, options=options) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        latencies: list[float] = []
        errors = 0
        stop_warm = time.perf_counter() + args.warmup
        stop = stop_warm + args.seconds

        async def worker() -> None:
            nonlocal errors
            while (start := time.perf_counter()) < stop:
                try:
                    await stub.ModelInfer(request)
                except grpc.RpcError:
                    errors += 1
                    continue
                if start >= stop_warm:
                    latencies.append(time.perf_counter() - start)

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    return latencies, errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ca", required=True, help="PEM root the server's certificate chains to")
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--shape", default="1,784")
    parser.add_argument("--dtype", default="FP32")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--warmup", type=float, default=2)
    args = parser.parse_args()
    args.shape = [int(s) for s in args.shape.split(",")]
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    latencies, errors = asyncio.run(run(args))
    ms = np.array(latencies) * 1e3
    print(f"model={args.model} conc={args.concurrency} procs=1 "
          f"infer/s={len(ms) / args.seconds:,.0f} "
          f"samples/s={len(ms) * args.shape[0] / args.seconds:,.0f} "
          f"p50_ms={np.percentile(ms, 50):.2f} p99_ms={np.percentile(ms, 99):.2f} errors={errors}")


if __name__ == "__main__":
    main()
