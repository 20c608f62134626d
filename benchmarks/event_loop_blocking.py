"""Does a large request block the event loop? Small requests' latency with and without a
client that keeps sending 64 MB requests.

    python benchmarks/event_loop_blocking.py [--seconds 8] [--rounds 2] [--mb 64]
        [--server before=DIR --server after=DIR] [--backgrounds none,http-binary,...]

Small traffic: identity_fp32 [1,16] at concurrency 4 (threads, keep-alive connections), over
HTTP (JSON) and gRPC, measured alone and while a second process sends 64 MB requests back to
back to `big_sum` (FP32 [-1] -> its sum, so the large part is the request) as HTTP binary
tensors, HTTP JSON tensors, and gRPC raw_input_contents. Prints the command, the machine, each
phase, the medians of p50/p99 and their ratios against the quiet phase; writes the raw numbers
to benchmarks/results/event-loop-blocking-<timestamp>.json.

`--server NAME=DIR` serves from a copy of the package (DIR/server, with its `_native`
extension) instead of the installed one; given twice (before=DIR after=DIR) the two snapshots
alternate round by round, so both see the same machine, unaffected by edits or rebuilds of the
working tree while it runs.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import ROOT, Tachyon, print_header

HTTP_PORT, GRPC_PORT, METRICS_PORT = 18470, 18471, 18472
INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
GRPC_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
BACKGROUNDS = ("none", "http-binary", "http-json", "grpc")
SMALL = ("http", "grpc")
# `python -c LAUNCH DIR serve ...`: the CLI imported from DIR, bypassing the editable install
LAUNCH = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if not "
          "type(f).__module__.startswith('_editable')]; sys.path.insert(0, sys.argv.pop(1)); "
          "from server.cli import main; sys.exit(main())")


def make_repository(root: Path) -> Path:
    """The bundled identity_fp32 and big_sum: FP32 [-1] -> OUTPUT0 FP32 [1], no batching."""
    import onnx
    from onnx import TensorProto, helper

    repo = root / "repo"
    shutil.copytree(ROOT / "model_repository" / "identity_fp32", repo / "identity_fp32")
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["INPUT0"], ["OUTPUT0"], keepdims=1)], "big_sum",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    (repo / "big_sum" / "1").mkdir(parents=True)
    onnx.save(model, str(repo / "big_sum" / "1" / "model.onnx"))
    (repo / "big_sum" / "config.pbtxt").write_text(
        'name: "big_sum"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 0\n'
        'input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]\n'
        'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
    )
    return repo


def grpc_body(model: str, array: np.ndarray) -> bytes:
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name="INPUT0", datatype="FP32", shape=list(array.shape))
    request.raw_input_contents.append(array.tobytes())
    return bytes(request.SerializeToString())


# -- the background process: large requests back to back ---------------------------------


def large_sender(kind: str, mb: int, counter: Path) -> None:
    values = np.full(mb * 1024 * 1024 // 4, 0.5, dtype=np.float32)
    sent = 0
    if kind == "grpc":
        import grpc

        channel = grpc.insecure_channel(f"127.0.0.1:{GRPC_PORT}", options=GRPC_OPTIONS)
        call = channel.unary_unary(INFER_METHOD)
        body = grpc_body("big_sum", values)
        while True:
            call(body, timeout=120)
            sent += 1
            _count(counter, sent)
    if kind == "http-binary":
        raw = values.tobytes()
        header = json.dumps({"inputs": [{"name": "INPUT0", "shape": [values.size],
                                         "datatype": "FP32",
                                         "parameters": {"binary_data_size": len(raw)}}]}).encode()
        payload = header + raw
        headers = {"Inference-Header-Content-Length": str(len(header))}
    else:  # JSON: "0.5," is 4 bytes, so about `mb` MB of text
        count = mb * 1024 * 1024 // 4
        payload = (b'{"inputs":[{"name":"INPUT0","datatype":"FP32","shape":[%d],"data":[' % count
                   + b"0.5," * (count - 1) + b"0.5]}]}")
        headers = {"Content-Type": "application/json"}
    connection = http.client.HTTPConnection("127.0.0.1", HTTP_PORT, timeout=120)
    while True:
        connection.request("POST", "/v2/models/big_sum/infer", body=payload, headers=headers)
        response = connection.getresponse()
        response.read()
        assert response.status == 200, response.status
        sent += 1
        _count(counter, sent)


def _count(counter: Path, sent: int) -> None:
    """Publish the count atomically: the parent never reads a half-written file."""
    partial = counter.with_suffix(".tmp")
    partial.write_text(str(sent))
    partial.replace(counter)


# -- the measured small traffic -------------------------------------------------------------


def small_worker(transport: str, stop: threading.Event, latencies: list[float],
                 errors: list[str]) -> None:
    x = np.arange(16, dtype=np.float32).reshape(1, 16)
    if transport == "grpc":
        import grpc

        channel = grpc.insecure_channel(f"127.0.0.1:{GRPC_PORT}", options=GRPC_OPTIONS)
        call = channel.unary_unary(INFER_METHOD)
        body = grpc_body("identity_fp32", x)

        def once() -> None:
            call(body, timeout=30)
    else:
        connection = http.client.HTTPConnection("127.0.0.1", HTTP_PORT, timeout=30)
        body = json.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32",
                                       "data": x.ravel().tolist()}]}).encode()

        def once() -> None:
            connection.request("POST", "/v2/models/identity_fp32/infer", body=body)
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}")

    while not stop.is_set():
        start = time.perf_counter()
        try:
            once()
        except Exception as exc:  # counted, reported
            errors.append(repr(exc))
            continue
        latencies.append(time.perf_counter() - start)


def measure_small(transport: str, concurrency: int, seconds: float) -> dict[str, Any]:
    stop = threading.Event()
    latencies: list[float] = []
    errors: list[str] = []
    threads = [threading.Thread(target=small_worker, args=(transport, stop, latencies, errors))
               for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)  # warm up
    latencies.clear()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    ms = np.array(latencies) * 1000
    return {"count": len(ms), "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(ms.max()),
            "errors": len(errors), "infer_per_s": len(ms) / seconds}


def phase(background: str, transport: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    sender = None
    counter = work / f"sent-{background}-{transport}"
    counter.write_text("0")
    if background != "none":
        sender = subprocess.Popen([sys.executable, __file__, "--send", background,
                                   "--mb", str(args.mb), "--counter", str(counter)])
        deadline = time.monotonic() + 120
        while counter.read_text() in ("", "0"):  # the large requests flow
            if sender.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the {background} sender did not get a request through")
            time.sleep(0.05)
    start = int(counter.read_text() or 0)
    try:
        result = measure_small(transport, args.concurrency, args.seconds)
    finally:
        if sender is not None:
            sender.kill()
            sender.wait()
    result["large_per_s"] = (int(counter.read_text() or 0) - start) / (args.seconds + 1.0)
    result |= {"background": background, "transport": transport}
    print(f"  {transport:4} small c{args.concurrency}, large {background:11}: "
          f"p50 {result['p50_ms']:7.2f} ms  p99 {result['p99_ms']:8.2f} ms  "
          f"max {result['max_ms']:8.1f} ms  {result['infer_per_s']:7.0f} small/s  "
          f"{result['large_per_s']:5.2f} large/s  errors {result['errors']}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--mb", type=int, default=64, help="size of each large request's tensor")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--backgrounds", default=",".join(BACKGROUNDS))
    parser.add_argument("--server", action="append", default=[], metavar="NAME=DIR",
                        help="serve from DIR/server instead of the installed package; give "
                        "several to alternate them round by round (before=... after=...)")
    parser.add_argument("--label", default="", help="a word for the results file")
    parser.add_argument("--send", choices=BACKGROUNDS[1:], help=argparse.SUPPRESS)
    parser.add_argument("--counter", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.send:
        large_sender(args.send, args.mb, args.counter)
        return
    machine = print_header()
    backgrounds = args.backgrounds.split(",")
    trees = dict(item.split("=", 1) for item in args.server) or {"installed": ""}
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        repo = make_repository(work)
        limit = str((args.mb + 32) * 1024 * 1024)  # 64 MB of tensor plus the JSON text around it
        for round_ in range(args.rounds):
            for name, tree in trees.items():
                print(f"round {round_ + 1}/{args.rounds}, server {name}", flush=True)
                server = Tachyon(repo, HTTP_PORT, GRPC_PORT, METRICS_PORT,
                                 "--max-request-bytes", limit)
                if tree:
                    path = str(Path(tree).resolve())
                    server.command = [sys.executable, "-c", LAUNCH, path, *server.command[1:]]
                with server:
                    for background in backgrounds:
                        for transport in SMALL:
                            row = phase(background, transport, args, work)
                            results.append(row | {"round": round_, "server": name})
    summary = summarize(results, list(trees), backgrounds)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    label = args.label or "-".join(trees)
    out = ROOT / "benchmarks" / "results" / f"event-loop-blocking-{label}-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": " ".join([sys.executable, *sys.argv]), "machine": machine,
        "commit": _commit(), "servers": trees, "mb": args.mb, "seconds": args.seconds,
        "concurrency": args.concurrency, "phases": results, "summary": summary}, indent=2))
    print(f"wrote {out}")


def summarize(
    results: list[dict[str, Any]], servers: list[str], backgrounds: list[str]
) -> list[dict[str, Any]]:
    """Medians over rounds; ratios against the same server's quiet phase and, for every
    server after the first, against the first server."""
    print("medians over rounds (x: against the same small traffic with no large requests; "
          f"vs: against server {servers[0]!r})")

    def median(server: str, transport: str, background: str, key: str) -> float:
        rows = [r[key] for r in results if (r["server"], r["transport"], r["background"])
                == (server, transport, background)]
        return statistics.median(rows) if rows else float("nan")

    summary = []
    for server in servers:
        for transport in SMALL:
            for background in backgrounds:
                row: dict[str, Any] = {"server": server, "transport": transport,
                                       "background": background}
                line = f"  {server:9} {transport:4} large {background:11}:"
                for key in ("p50_ms", "p99_ms"):
                    value = median(server, transport, background, key)
                    quiet = median(server, transport, "none", key)
                    first = median(servers[0], transport, background, key)
                    row |= {key: value, f"{key}_x_quiet": value / quiet,
                            f"{key}_vs_first": value / first}
                    line += f"  {key[:3]} {value:8.2f} ms (x{value / quiet:7.2f}"
                    line += f", vs {value / first:5.2f})" if server != servers[0] else ")"
                row["large_per_s"] = median(server, transport, background, "large_per_s")
                print(line + f"  {row['large_per_s']:5.2f} large/s")
                summary.append(row)
    return summary


def _commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
