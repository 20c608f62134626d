"""What the response cache buys: repeated requests (hits) against always-new ones (misses).

    flock /tmp/tachyon-bench.lock python benchmarks/response_cache.py [--rounds 5] [--requests 200]

One `tachyon serve --cache-config local,size=64MiB` serves the 784-1024-1024-10 FP32 MLP
(tools/make_models.py make_mlp) with `response_cache { enable: true }`. One client at a time
(c1) sends `--rows`-row requests over gRPC and HTTP (tritonclient, binary tensors): the same
input again and again (every one a hit, the first one untimed), and fresh random inputs (every
one a miss), alternating sides each round in one run. The statistics endpoint confirms that
every hit counted as a cache hit and every miss as a miss.

Prints the command, the machine, each block's median, then per protocol the median latency of
hits and misses and the speed-up (miss / hit) against the issue's 2x target; writes every
request's latency to benchmarks/results/response-cache-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from _harness import ROOT, Tachyon, print_header
from make_models import make_mlp

PORTS = (18520, 18521, 18522)
MODEL = "mlp_cached"
CONFIG = f"""
name: "{MODEL}"
platform: "onnxruntime_onnx"
max_batch_size: 64
input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ 784 ] }} ]
output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 10 ] }} ]
dynamic_batching {{ }}
instance_group [ {{ count: 1, kind: KIND_CPU }} ]
parameters {{ key: "intra_op_thread_count" value {{ string_value: "1" }} }}
response_cache {{ enable: true }}
"""
TARGET = 2.0


def make_repo(work: Path) -> Path:
    repo = work / "repo"
    make_mlp(repo / MODEL / "1" / "model.onnx")
    (repo / MODEL / "config.pbtxt").write_text(CONFIG)
    return repo


Send = Callable[[np.ndarray], None]


def senders() -> dict[str, Send]:
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    g = grpcclient.InferenceServerClient(f"127.0.0.1:{PORTS[1]}")
    h = httpclient.InferenceServerClient(f"127.0.0.1:{PORTS[0]}")

    def grpc_send(data: np.ndarray) -> None:
        tensor = grpcclient.InferInput("INPUT0", list(data.shape), "FP32")
        tensor.set_data_from_numpy(data)
        g.infer(MODEL, [tensor])

    def http_send(data: np.ndarray) -> None:
        tensor = httpclient.InferInput("INPUT0", list(data.shape), "FP32")
        tensor.set_data_from_numpy(data, binary_data=True)
        h.infer(MODEL, [tensor])

    return {"grpc": grpc_send, "http": http_send}


def cache_counts() -> tuple[int, int]:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(f"127.0.0.1:{PORTS[0]}")
    stats = client.get_inference_statistics(MODEL)["model_stats"][0]["inference_stats"]
    return int(stats["cache_hit"]["count"]), int(stats["cache_miss"]["count"])


def block(send: Send, inputs: list[np.ndarray]) -> list[float]:
    """Milliseconds per request, one request at a time."""
    times = []
    for data in inputs:
        started = time.perf_counter()
        send(data)
        times.append((time.perf_counter() - started) * 1000)
    return times


def run(args: argparse.Namespace, rng: np.random.Generator) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    send = senders()
    for round_ in range(args.rounds):
        sides = ("hit", "miss") if round_ % 2 == 0 else ("miss", "hit")
        for protocol, sender in send.items():
            for side in sides:
                if side == "hit":
                    repeated = rng.standard_normal((args.rows, 784)).astype(np.float32)
                    sender(repeated)  # the one miss that fills the entry, untimed
                    inputs = [repeated] * args.requests
                else:
                    inputs = [rng.standard_normal((args.rows, 784)).astype(np.float32)
                              for _ in range(args.requests)]
                hits, misses = cache_counts()
                times = block(sender, inputs)
                after_hits, after_misses = cache_counts()
                counted = after_hits - hits if side == "hit" else after_misses - misses
                if counted != args.requests:
                    raise RuntimeError(f"{side} block counted {counted} of {args.requests}")
                rows.append({"round": round_, "protocol": protocol, "side": side,
                             "ms": times})
                print(f"  round {round_} {protocol:4} {side:4} median "
                      f"{statistics.median(times):.3f} ms", flush=True)
    return rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    summary = []
    print(f"medians over all requests (c1), speed-up = miss / hit, target >= {TARGET:g}x:")
    for protocol in ("grpc", "http"):
        med = {
            side: statistics.median(
                t for r in rows if r["protocol"] == protocol and r["side"] == side
                for t in r["ms"])
            for side in ("hit", "miss")
        }
        ratio = med["miss"] / med["hit"]
        verdict = "meets" if ratio >= TARGET else "MISSES"
        print(f"  {protocol:4}: hit {med['hit']:.3f} ms, miss {med['miss']:.3f} ms, "
              f"speed-up {ratio:.2f}x ({verdict} the {TARGET:g}x target)")
        summary.append({"protocol": protocol, "hit_p50_ms": med["hit"],
                        "miss_p50_ms": med["miss"], "speedup": ratio})
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=200, help="per block")
    parser.add_argument("--rows", type=int, default=16, help="rows per request")
    args = parser.parse_args()
    machine = print_header()
    work = Path(tempfile.mkdtemp(prefix="response-cache-"))
    try:
        repo = make_repo(work)
        with Tachyon(repo, *PORTS, "--cache-config", f"local,size={64 << 20}",
                     ready_model=MODEL):
            rows = run(args, np.random.default_rng(0))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = summarize(rows)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = ROOT / "benchmarks" / "results" / f"response-cache-{stamp}.json"
    out.write_text(json.dumps({
        "machine": machine, "command": sys.argv, "model": "mlp 784-1024-1024-10 FP32",
        "rows_per_request": args.rows, "requests_per_block": args.requests,
        "rows": rows, "summary": summary,
    }, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
