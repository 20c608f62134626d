"""System shared memory against tensors on the wire: one client's sequential calls to an FP32
identity model (no batching), the input and output either in the message (gRPC
raw_input_contents / HTTP binary tensors) or in registered shared memory regions.

Per transport (gRPC on the native front end, HTTP) and tensor size, the median latency of
`--calls` sequential calls, over `--rounds` rounds that alternate the two ways; the ratio is
shared memory / wire (below 1: shared memory is faster). Run it under the benchmark lock:

    flock /tmp/tachyon-bench.lock .venv/bin/python benchmarks/shared_memory.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from _harness import ROOT, Tachyon, print_header

with warnings.catch_warnings():  # tritonclient 2.41 imports the deprecated pkg_resources
    warnings.simplefilter("ignore", UserWarning)
    import tritonclient.utils.shared_memory as shm

HTTP_PORT, GRPC_PORT, METRICS_PORT = 18480, 18481, 18482
MODEL = "big_identity"
TRANSPORTS = ("grpc", "http")
MODES = ("wire", "shm")


def make_repository(root: Path) -> Path:
    """big_identity: FP32 [-1] -> FP32 [-1] (ONNX Identity), no batching."""
    import onnx
    from onnx import TensorProto, helper

    repo = root / "repo"
    graph = helper.make_graph(
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])], MODEL,
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["n"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    (repo / MODEL / "1").mkdir(parents=True)
    onnx.save(model, str(repo / MODEL / "1" / "model.onnx"))
    (repo / MODEL / "config.pbtxt").write_text(
        f'name: "{MODEL}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 0\n'
        'input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]\n'
        'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]\n'
    )
    return repo


class Point:
    """One transport and size: a client, the array, and the two regions it may use."""

    def __init__(self, transport: str, size: int) -> None:
        self.transport, self.size = transport, size
        self.module: Any = grpcclient if transport == "grpc" else httpclient
        url = f"127.0.0.1:{GRPC_PORT if transport == 'grpc' else HTTP_PORT}"
        self.client = self.module.InferenceServerClient(url)
        self.array = np.random.default_rng(0).random(size // 4, dtype=np.float32)
        tag = uuid.uuid4().hex[:8]
        self.names = (f"in-{tag}", f"out-{tag}")
        self.handles = [shm.create_shared_memory_region(n, f"/{n}", size) for n in self.names]
        shm.set_shared_memory_region(self.handles[0], [self.array])
        for name in self.names:
            self.client.register_system_shared_memory(name, f"/{name}", size)

    def call(self, mode: str) -> Callable[[], None]:
        tensor = self.module.InferInput("INPUT0", [self.array.size], "FP32")
        if self.transport == "http":
            output = self.module.InferRequestedOutput("OUTPUT0", binary_data=True)
        else:
            output = self.module.InferRequestedOutput("OUTPUT0")
        if mode == "shm":
            tensor.set_shared_memory(self.names[0], self.size)
            output.set_shared_memory(self.names[1], self.size)
        elif self.transport == "http":
            tensor.set_data_from_numpy(self.array, binary_data=True)
        else:
            tensor.set_data_from_numpy(self.array)

        def run() -> None:
            result = self.client.infer(MODEL, [tensor], outputs=[output])
            if mode == "wire":
                result.as_numpy("OUTPUT0")

        return run

    def check(self) -> None:
        self.call("shm")()
        got = shm.get_contents_as_numpy(self.handles[1], np.float32, [self.array.size])
        assert np.array_equal(got, self.array), "the output region does not hold the input"

    def close(self) -> None:
        for name in self.names:
            self.client.unregister_system_shared_memory(name)
        for handle in self.handles:
            shm.destroy_shared_memory_region(handle)
        self.client.close()


def median_ms(run: Callable[[], None], calls: int) -> float:
    for _ in range(3):
        run()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-kib", default="64,1024,16384")
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    machine = print_header()
    sizes = [int(s) * 1024 for s in args.sizes_kib.split(",")]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp, Tachyon(
        make_repository(Path(tmp)), HTTP_PORT, GRPC_PORT, METRICS_PORT,
        "--max-request-bytes", str(4 * max(sizes) + (1 << 20)),
    ):
        points = [Point(t, size) for t in TRANSPORTS for size in sizes]
        try:
            for point in points:
                point.check()
            for round_ in range(args.rounds):
                for point in points:
                    for mode in (MODES if round_ % 2 == 0 else MODES[::-1]):
                        ms = median_ms(point.call(mode), args.calls)
                        rows.append({"round": round_, "transport": point.transport,
                                     "bytes": point.size, "mode": mode, "median_ms": ms})
        finally:
            for point in points:
                point.close()
    summary = summarize(rows, sizes)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = ROOT / "benchmarks" / "results" / f"shared-memory-{stamp}.json"
    out.write_text(json.dumps({"command": " ".join([sys.executable, *sys.argv]),
                               "machine": machine, "calls": args.calls, "rows": rows,
                               "summary": summary}, indent=2))
    print(f"wrote {out}")


def summarize(rows: list[dict[str, Any]], sizes: list[int]) -> list[dict[str, Any]]:
    print("median over rounds of each round's median call latency (ms); ratio shm / wire")
    summary = []
    for transport in TRANSPORTS:
        for size in sizes:
            med = {mode: statistics.median(
                r["median_ms"] for r in rows
                if (r["transport"], r["bytes"], r["mode"]) == (transport, size, mode)
            ) for mode in MODES}
            ratio = med["shm"] / med["wire"]
            print(f"  {transport:4} {size // 1024:6} KiB: wire {med['wire']:8.3f}  "
                  f"shm {med['shm']:8.3f}  ratio {ratio:5.2f}")
            summary.append({"transport": transport, "bytes": size, **med, "ratio": ratio})
    return summary


if __name__ == "__main__":
    main()
