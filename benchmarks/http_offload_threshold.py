"""Where should HTTP decoding leave the event loop? Decode cost inline and through a thread hop
(asyncio.to_thread) by body size, and what watching for disconnects adds to each request.

    python benchmarks/http_offload_threshold.py [--repeat 7]

In-process, no server: `decode_infer_request` on FP32 bodies (JSON and binary) of 1 KB to
64 MB, run inline on the loop and through `asyncio.to_thread`; then `unless_disconnected`
around an already-finished inference against awaiting it directly. Prints the command, the
machine, medians per size and the ratios; writes the raw numbers to
benchmarks/results/http-offload-threshold-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import ROOT, print_header

from server.http._body import OFFLOAD_BYTES
from server.http._codec import JSON_OFFLOAD_BYTES, decode_infer_request, decode_offloaded
from server.http.server import unless_disconnected

SIZES = (1 << 10, 4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20)


def bodies(size: int) -> dict[str, tuple[bytes, int | None]]:
    count = max(size // 4, 1)
    values = np.full(count, 0.5, np.float32)
    header = json.dumps({"inputs": [{"name": "INPUT0", "shape": [count], "datatype": "FP32",
                                     "parameters": {"binary_data_size": values.nbytes}}]})
    text = json.dumps({"inputs": [{"name": "INPUT0", "shape": [count], "datatype": "FP32",
                                   "data": values.tolist()}]})
    return {"binary": (header.encode() + values.tobytes(), len(header)),
            "json": (text.encode(), None)}


async def timed(run: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        await run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


async def decode_costs(repeat: int) -> list[dict[str, Any]]:
    rows = []
    for size in SIZES:
        for kind, (body, header_length) in bodies(size).items():
            if kind == "json" and size > (16 << 20):
                continue  # minutes of work, and JSON this large is what binary is for

            async def inline(body: bytes = body, length: int | None = header_length) -> None:
                decode_infer_request("m", "", body, length)

            async def threaded(body: bytes = body, length: int | None = header_length) -> None:
                await asyncio.to_thread(decode_infer_request, "m", "", body, length)

            row: dict[str, Any] = {"kind": kind, "bytes": len(body),
                                   "inline_us": await timed(inline, repeat),
                                   "thread_us": await timed(threaded, repeat),
                                   "offloaded": decode_offloaded(len(body), header_length)}
            rows.append(row)
            print(f"  {kind:6} {len(body):>10,} B: inline {row['inline_us']:10.1f} us  "
                  f"thread {row['thread_us']:10.1f} us  "
                  f"(thread/inline {row['thread_us'] / row['inline_us']:5.2f})  "
                  f"{'thread' if row['offloaded'] else 'inline'} now", flush=True)
    return rows


async def watcher_cost(repeat: int) -> dict[str, float]:
    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()  # the client never goes away
        return {"type": "http.disconnect"}

    async def work() -> int:
        await asyncio.sleep(0)
        return 1

    async def direct() -> None:
        for _ in range(1000):
            await work()

    async def watched() -> None:
        for _ in range(1000):
            await unless_disconnected(receive, work())

    plain = await timed(direct, repeat) / 1000
    guarded = await timed(watched, repeat) / 1000
    print(f"  disconnect watcher: {plain:.2f} us -> {guarded:.2f} us a request "
          f"(+{guarded - plain:.2f} us)")
    return {"direct_us": plain, "watched_us": guarded}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    machine = print_header()
    print(f"decode_infer_request, median of {args.repeat} (on a thread above "
          f"{JSON_OFFLOAD_BYTES:,} B of JSON or {OFFLOAD_BYTES:,} B of binary tensors)")
    rows = asyncio.run(decode_costs(args.repeat))
    watcher = asyncio.run(watcher_cost(args.repeat))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = ROOT / "benchmarks" / "results" / f"http-offload-threshold-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join([sys.executable, *sys.argv]),
                               "machine": machine, "json_threshold": JSON_OFFLOAD_BYTES,
                               "binary_threshold": OFFLOAD_BYTES,
                               "decode": rows, "watcher": watcher}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
