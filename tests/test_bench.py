"""`tachyon bench`: unit tests of its parts, then end-to-end runs against a real `tachyon serve`
(short closed and open loops over gRPC and HTTP, report files, a scenario that starts its own
server, and bad input refused before any load is sent)."""

from __future__ import annotations

import base64
import json
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.bench import inputs, scenario
from server.bench.client import WorkerResult
from server.bench.control import StatsSnapshot
from server.bench.errors import BenchError
from server.bench.inputs import ModelInfo, TensorInfo
from server.bench.results import ServerSplit, merge, percentile_ns
from server.bench.scenario import Point
from tests.conftest import BUNDLED, ROOT, RunningServer, free_port

SCENARIOS = ROOT / "benchmarks" / "scenarios"
IDENTITY = ModelInfo("identity_fp32", "", (TensorInfo("INPUT0", "FP32", (-1, 16)),),
                     (TensorInfo("OUTPUT0", "FP32", (-1, 16)),), 64)

# -- units ---------------------------------------------------------------------------------


def test_percentiles_are_nearest_rank() -> None:
    values = np.arange(1, 101, dtype=np.int64)
    assert percentile_ns(values, 50) == 50
    assert percentile_ns(values, 99) == 99
    assert percentile_ns(values, 99.9) == 100
    assert percentile_ns(values, 1) == 1
    assert np.isnan(percentile_ns(np.zeros(0, np.int64), 50))


def test_merge_keeps_every_sample_of_every_process() -> None:
    a = WorkerResult(np.array([5, 1, 3], np.int64), 3, {"UNAVAILABLE": 1}, 4)
    b = WorkerResult(np.array([2, 4, 100], np.int64), 2, {"UNAVAILABLE": 2, "HTTP 500": 1}, 5)
    merged = merge(Point("closed", 4), [a, b], 2.0, 8, None)
    assert merged.latencies_ns.tolist() == [1, 2, 3, 4, 5, 100]
    assert merged.requests == 5 and merged.throughput == 2.5 and merged.samples_per_s == 20
    assert merged.errors == {"HTTP 500": 1, "UNAVAILABLE": 3}
    assert merged.sent == 9 and merged.procs == 2
    assert merged.latency_ms(50) == 3e-6


def test_server_split_is_per_request_from_deltas() -> None:
    before = StatsSnapshot(success_count=10, success_ns=10_000, queue_count=10, queue_ns=1_000)
    after = StatsSnapshot(success_count=20, success_ns=50_000, queue_count=20, queue_ns=11_000,
                          compute_infer_count=10, compute_infer_ns=20_000,
                          inference_count=40, execution_count=5)
    split = ServerSplit.from_delta(before, after)
    assert split is not None
    assert split.requests == 10 and split.request_us == 4.0 and split.queue_us == 1.0
    assert split.compute_infer_us == 2.0 and split.overhead_us == 1.0 and split.avg_batch == 8
    assert ServerSplit.from_delta(None, after) is None
    assert ServerSplit.from_delta(after, after) is None


def test_stats_from_triton_json() -> None:
    entry = {"inference_count": "7", "execution_count": 2,
             "inference_stats": {"success": {"count": "7", "ns": "700"},
                                 "queue": {"count": 7, "ns": 70}}}
    stats = StatsSnapshot.from_json(entry)
    assert (stats.success_count, stats.success_ns, stats.queue_ns) == (7, 700, 70)
    assert (stats.inference_count, stats.execution_count, stats.compute_infer_ns) == (7, 2, 0)


def test_shapes_default_the_batch_dimension_and_take_overrides() -> None:
    assert inputs.resolve_shapes(IDENTITY, {}) == {"INPUT0": (1, 16)}
    assert inputs.resolve_shapes(IDENTITY, {"INPUT0": (8, 16)}) == {"INPUT0": (8, 16)}
    assert inputs.resolve_shapes(IDENTITY, {"": (16,)}) == {"INPUT0": (1, 16)}
    with pytest.raises(BenchError, match="does not fit input 'INPUT0'"):
        inputs.resolve_shapes(IDENTITY, {"INPUT0": (1, 15)})
    with pytest.raises(BenchError, match="max_batch_size 64"):
        inputs.resolve_shapes(IDENTITY, {"INPUT0": (65, 16)})
    with pytest.raises(BenchError, match="not an input"):
        inputs.resolve_shapes(IDENTITY, {"X": (1, 16)})
    variable = ModelInfo("v", "", (TensorInfo("T", "BYTES", (-1,)),), (), 0)
    with pytest.raises(BenchError, match="--shape T:1"):
        inputs.resolve_shapes(variable, {})
    assert inputs.resolve_shapes(variable, {"T": (3,)}) == {"T": (3,)}
    # without ModelConfig (MLServer), a leading -1 on every input is taken as the batch
    assert inputs.resolve_shapes(ModelInfo("m", "", IDENTITY.inputs, (), None), {}) == {
        "INPUT0": (1, 16)}


def test_input_data_forms(tmp_path: Path) -> None:
    raw = np.arange(16, dtype="<f4")
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"data": [
        {"INPUT0": {"content": list(range(16)), "shape": [1, 16]}},
        {"INPUT0": list(range(16))},
        {"INPUT0": {"content": [list(range(16)), list(range(16))], "shape": [2, 16]}},
        {"INPUT0": {"b64": base64.b64encode(raw.tobytes()).decode(), "shape": [16]}},
    ]}))
    requests = inputs.load_input_data(path, IDENTITY, {"INPUT0": (1, 16)})
    assert [r["INPUT0"].shape for r in requests] == [(1, 16), (1, 16), (2, 16), (1, 16)]
    assert all(r["INPUT0"].dtype == np.float32 for r in requests)
    assert np.array_equal(requests[3]["INPUT0"].reshape(-1), raw)


@pytest.mark.parametrize(("document", "message"), [
    ({"data": [{"INPUT0": {"content": [1, 2, 3], "shape": [1, 3]}}]}, "does not fit"),
    ({"data": [{"INPUT0": {"content": [1, 2, 3], "shape": [1, 16]}}]}, "3 values do not fill"),
    ({"data": [{"INPUT1": [1] * 16}]}, "INPUT1 is not an input"),
    ({"data": [{}]}, "INPUT0 of model 'identity_fp32' missing"),
    ({"data": [{"INPUT0": {"content": ["a"] * 16}}]}, "not FP32 numbers"),
    ({"data": []}, "at least one entry"),
    ([{"inputs": []}], "perf_analyzer's --input-data format"),
])
def test_input_data_mismatch_is_named(tmp_path: Path, document: Any, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(document))
    with pytest.raises(BenchError, match=message):
        inputs.load_input_data(path, IDENTITY, {"INPUT0": (1, 16)})


def test_requests_serialize_for_both_protocols() -> None:
    from server import proto

    tensors = inputs.random_tensors(IDENTITY, {"INPUT0": (2, 16)})
    message = proto.ModelInferRequest.FromString(inputs.grpc_payload(IDENTITY, tensors))
    assert message.model_name == "identity_fp32" and list(message.inputs[0].shape) == [2, 16]
    assert message.raw_input_contents[0] == tensors["INPUT0"].astype("<f4").tobytes()
    binary = inputs.http_request(IDENTITY, tensors, binary=True)
    size = int(binary.headers["Inference-Header-Content-Length"])
    header = json.loads(binary.body[:size])
    assert header["inputs"][0]["parameters"] == {"binary_data_size": 128}
    assert header["outputs"] == [{"name": "OUTPUT0", "parameters": {"binary_data": True}}]
    wire = binary.wire("127.0.0.1:1")
    assert wire.startswith(b"POST /v2/models/identity_fp32/infer HTTP/1.1\r\n")
    assert f"Content-Length: {len(binary.body)}\r\n".encode() in wire
    strings = ModelInfo("s", "1", (TensorInfo("T", "BYTES", (-1,)),), (), 0)
    tensors = inputs.random_tensors(strings, {"T": (2,)})
    raw = proto.ModelInferRequest.FromString(inputs.grpc_payload(strings, tensors))
    assert raw.model_version == "1"
    assert struct.unpack_from("<I", raw.raw_input_contents[0])[0] == inputs.STRING_LENGTH


def test_scenario_files_parse_and_bad_ones_are_named(tmp_path: Path) -> None:
    names = {p.stem for p in SCENARIOS.glob("*.toml")}
    assert {"identity_fp32_grpc_closed", "digits_http_binary_closed",
            "identity_fp32_grpc_poisson"} <= names
    for name in names:
        sc = scenario.load(name)
        assert sc.points and sc.repository is not None and sc.repository.is_dir()
    poisson = scenario.load("identity_fp32_grpc_poisson")
    assert poisson.mode == "open" and poisson.arrival == "poisson"
    assert [p.value for p in poisson.points] == [500, 1000, 2000]
    bad = tmp_path / "bad.toml"
    for text, message in [
        ('model = "m"\nconcurency = [1]\n', "unknown field.*concurency"),
        ('model = "m"\nconcurrency = [1]\nrate = [5]\n', "exactly one of"),
        ('model = "m"\nconcurrency = [0]\n', "positive integers"),
        ('concurrency = [1]\n', "'model'.*required"),
        ('model = "m"\nconcurrency = [1]\nprotocol = "tcp"\n', "grpc, http"),
        ('model = "m"\nconcurrency = [1]\ninput_data = "nope.json"\n', "does not exist"),
        ('model = "m"\nconcurrency = [1\n', "not valid TOML"),
    ]:
        bad.write_text(text)
        with pytest.raises(BenchError, match=message):
            scenario.load(str(bad))


def test_http_client_reads_every_framing_and_reuses_connections() -> None:
    import asyncio

    from server.bench.client import CONNECTION_ERROR, HttpTransport, WorkerSpec

    replies = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
        b"3;x=y\r\nabc\r\n0\r\n\r\n",
        b"HTTP/1.1 400 Bad Request\r\ncontent-length: 2\r\n\r\nno",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n",
    ]
    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while replies:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            reply = replies.pop(0)
            writer.write(reply)
            await writer.drain()
            if b"Connection: close" in reply or b"400" in reply:
                break  # after the 400: closed as an idle timeout would, without a word
        writer.close()

    async def scenario() -> list[str | None]:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        request = b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc"
        transport = HttpTransport(WorkerSpec("http", f"127.0.0.1:{port}", "", (), None))
        await transport.connect()
        statuses = [await transport.call(request) for _ in range(5)]
        server.close()
        await server.wait_closed()
        statuses.append(await transport.call(request))  # nothing listens any more
        await transport.close()
        return statuses

    statuses = asyncio.run(scenario())
    assert statuses == [None, None, "HTTP 400", None, "HTTP 503", CONNECTION_ERROR]
    # kept alive; the silently closed one was retried once on a new connection
    assert connections == 3


# -- end to end ----------------------------------------------------------------------------


def bench(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`tachyon bench ARGS` (through `python -m server.bench`, the same entry point)."""
    return subprocess.run([sys.executable, "-m", "server.bench", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, check=False)


def wait_model_ready(server: RunningServer, model: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    url = f"http://{server.http_url}/v2/models/{model}/ready"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"model {model} not ready")


def inference_count(server: RunningServer) -> int:
    """Requests the server has answered, all models."""
    with urllib.request.urlopen(f"http://{server.http_url}/v2/models/stats", timeout=10) as r:
        stats = json.loads(r.read())["model_stats"]
    return sum(int(s["inference_stats"]["success"]["count"]) +
               int(s["inference_stats"]["fail"]["count"]) for s in stats)


def raw_points(out: Path) -> list[dict[str, Any]]:
    points: list[dict[str, Any]] = json.loads((out / "raw.json").read_text())["points"]
    return points


def assert_sane(point: dict[str, Any]) -> None:
    assert point["requests"] > 0 and point["infer_per_s"] > 0, point
    assert point["error_count"] == 0 and point["errors"] == {}, point
    lat = point["latency_ms"]
    ordered = [lat["min"], lat["p50"], lat["p90"], lat["p95"], lat["p99"], lat["p99.9"],
               lat["max"]]
    assert ordered == sorted(ordered) and lat["min"] > 0, lat
    server = point["server"]
    assert server is not None, point
    assert server["requests"] > 0 and server["request_us"] > 0, server
    assert server["compute_infer_us"] > 0 and server["execution_count"] > 0, server
    raw = point["raw"]
    assert len(raw["percentiles_us"]) > 100 and sum(raw["histogram"]["counts"]) == \
        point["latency_count"]


def is_png(path: Path) -> bool:
    data = path.read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return False
    length, kind = struct.unpack(">I4s", data[8:16])
    crc = struct.unpack(">I", data[16 + length:20 + length])[0]
    width, height = struct.unpack(">II", data[16:24])
    return kind == b"IHDR" and crc == zlib.crc32(data[12:16 + length]) and width > 100 < height


@pytest.fixture(scope="module")
def ready(bundled: RunningServer) -> RunningServer:
    for model in ("identity_fp32", "digits"):
        wait_model_ready(bundled, model)
    return bundled


def test_closed_loop_grpc(ready: RunningServer, tmp_path: Path) -> None:
    out = tmp_path / "grpc"
    done = bench("run", "--url", ready.grpc_url, "--model", "identity_fp32", "--concurrency",
                 "1,4", "--duration", "1.5", "--warmup", "0.3", "--out", str(out))
    assert done.returncode == 0, done.stderr
    points = raw_points(out)
    assert [p["label"] for p in points] == ["c1", "c4"]
    for point in points:
        assert_sane(point)
        # the server saw about what the client counted in the window
        assert 0.5 < point["server"]["requests"] / point["requests"] < 1.5, point
    report = (out / "report.md").read_text()
    assert "| c1 |" in report and "| c4 |" in report and "p99.9 ms" in report
    assert is_png(out / "throughput_latency.png") and is_png(out / "latency_histogram.png")
    assert "| c4 |" in done.stdout


@pytest.mark.parametrize("http_format", ["binary", "json"])
def test_closed_loop_http_with_two_client_processes(ready: RunningServer, tmp_path: Path,
                                                    http_format: str) -> None:
    out = tmp_path / http_format
    done = bench("run", "--url", ready.http_url, "--protocol", "http", "--http-format",
                 http_format, "--model", "digits", "--input-data",
                 str(SCENARIOS / "digits_data.json"), "--concurrency", "3", "--procs", "2",
                 "--duration", "1.5", "--warmup", "0.3", "--out", str(out))
    assert done.returncode == 0, done.stderr
    [point] = raw_points(out)
    assert_sane(point)
    assert point["procs"] == 2
    info = json.loads((out / "raw.json").read_text())
    assert info["data"].endswith("digits_data.json") and info["requests_prebuilt"] == 4


@pytest.mark.parametrize(("arrival", "rate", "low", "high"), [
    ("poisson", 40, 0.6, 1.4),  # 80 expected in the window, Poisson sd ~9
    ("constant", 50, 0.95, 1.05),
])
def test_open_loop_sends_about_the_rate(ready: RunningServer, tmp_path: Path, arrival: str,
                                        rate: int, low: float, high: float) -> None:
    out = tmp_path / arrival
    before = inference_count(ready)
    done = bench("run", "--url", ready.grpc_url, "--model", "identity_fp32", "--rate",
                 str(rate), "--arrival", arrival, "--duration", "2", "--warmup", "0.5",
                 "--out", str(out))
    assert done.returncode == 0, done.stderr
    [point] = raw_points(out)
    assert_sane(point)
    expected = rate * 2
    assert low * expected <= point["latency_count"] <= high * expected, point
    assert low * rate * 2.5 <= point["sent"] <= high * rate * 2.5, point
    # +1: the probe request sent before the load
    assert inference_count(ready) - before == point["sent"] + 1
    assert point["send_lag_ms"]["p50"] is not None
    assert "send lag p99 ms" in (out / "report.md").read_text()


def test_failed_requests_are_counted_by_status(ready: RunningServer, tmp_path: Path) -> None:
    out = tmp_path / "timeouts"
    done = bench("run", "--url", ready.http_url, "--protocol", "http", "--model",
                 "identity_fp32", "--concurrency", "2", "--timeout", "0.000001", "--duration",
                 "0.5", "--warmup", "0.1", "--out", str(out))
    assert done.returncode == 0, done.stderr
    [point] = raw_points(out)
    assert point["requests"] == 0 and point["latency_count"] == 0, point
    assert list(point["errors"]) == ["TIMEOUT"] and point["error_count"] > 0, point
    assert point["latency_ms"]["p99"] is None
    assert "| c2 | 0.0 |" in (out / "report.md").read_text()


def test_run_scenario_starts_and_stops_its_own_server(tmp_path: Path) -> None:
    out = tmp_path / "scenario"
    done = bench("run", "identity_fp32_grpc_closed", "--concurrency", "1,2", "--duration",
                 "0.5", "--warmup", "0.2", "--out", str(out))
    assert done.returncode == 0, done.stderr
    info = json.loads((out / "raw.json").read_text())
    assert info["server"].startswith("tachyon serve (started")
    assert [p["label"] for p in info["points"]] == ["c1", "c2"]
    for point in info["points"]:
        assert_sane(point)
    assert (out / "server.log").stat().st_size > 0
    host, port = info["url"].split(":")
    with pytest.raises(OSError), socket.create_connection((host, int(port)), timeout=1):
        pass  # the server it started is gone


def test_bad_input_exits_before_any_load(ready: RunningServer, tmp_path: Path) -> None:
    bad_data = tmp_path / "bad.json"
    bad_data.write_text(json.dumps({"data": [{"INPUT0": {"content": [1.0] * 10,
                                                         "shape": [1, 10]}}]}))
    cases = [
        (["--url", ready.grpc_url, "--model", "no_such_model"],
         "model 'no_such_model' is not available"),
        (["--url", ready.http_url, "--protocol", "http", "--model", "no_such_model"],
         "model 'no_such_model' is not available"),
        (["--url", f"127.0.0.1:{free_port()}", "--model", "identity_fp32"],
         "cannot reach a KServe v2 gRPC server"),
        (["--url", f"127.0.0.1:{free_port()}", "--protocol", "http", "--model",
          "identity_fp32"], "cannot reach a KServe v2 HTTP server"),
        (["--url", ready.grpc_url, "--model", "identity_fp32", "--input-data", str(bad_data)],
         "shape [1, 10] does not fit input 'INPUT0'"),
    ]
    for args, message in cases:
        before = inference_count(ready)
        out = tmp_path / "never"
        done = bench("run", *args, "--concurrency", "4", "--duration", "1", "--out", str(out))
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert message in done.stderr and done.stderr.startswith("tachyon bench: error:"), \
            done.stderr
        assert "Traceback" not in done.stderr
        assert inference_count(ready) == before, args
        assert not out.exists()


def test_bad_scenario_and_flags_exit_2(tmp_path: Path) -> None:
    done = bench("run", "no_such_scenario")
    assert done.returncode == 2 and "scenario 'no_such_scenario' not found" in done.stderr
    done = bench("run", "--model", "identity_fp32")
    assert done.returncode == 2 and "--concurrency" in done.stderr
    done = bench("run", "--model", "m", "--concurrency", "0")
    assert done.returncode == 2 and "positive" in done.stderr  # argparse's own exit status


def test_compare_writes_one_table_and_plot(tmp_path: Path) -> None:
    import shutil

    # the peers' layout (run-peers' WORK/models/<name>/model.onnx), with Tachyon's own copy
    # of the identity model, so the test needs no run-peers set-up
    work = tmp_path / "work"
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_models.py"), "--out",
                    str(tmp_path / "built"), "--only", "mlp_fp32"], check=True,
                   capture_output=True)
    for name, source in (("identity_fp32", BUNDLED / "identity_fp32" / "1" / "model.onnx"),
                         ("mlp_fp32", tmp_path / "built" / "mlp_fp32" / "1" / "model.onnx")):
        (work / "models" / name).mkdir(parents=True)
        shutil.copy(source, work / "models" / name / "model.onnx")
    out = tmp_path / "compare"
    done = bench("compare", "identity_fp32_grpc_closed", "--peers", "tachyon", "--concurrency",
                 "1,2", "--duration", "0.5", "--warmup", "0.2", "--out", str(out),
                 "--peers-work", str(work))
    assert done.returncode == 0, done.stderr
    table = (out / "compare.md").read_text()
    assert "| c1 |" in table and "| c2 |" in table and "Tachyon: infer/s" in table
    assert is_png(out / "compare.png")
    assert is_png(out / "tachyon" / "throughput_latency.png")
    summary = json.loads((out / "compare.json").read_text())
    for point in summary["servers"]["tachyon"]:
        assert point["requests"] > 0 and point["error_count"] == 0


def test_compare_names_missing_peer_setup(tmp_path: Path) -> None:
    done = bench("compare", "identity_fp32_grpc_closed", "--peers-work", str(tmp_path),
                 "--duration", "0.5")
    assert done.returncode == 2 and "run-peers" in done.stderr and "missing" in done.stderr
    done = bench("compare", "digits_http_binary_closed")
    assert done.returncode == 2 and "compare runs on the peers' models" in done.stderr
