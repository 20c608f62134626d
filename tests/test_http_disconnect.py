"""An HTTP client that goes away while its request waits in the queue takes the request out:
it never executes and is counted as cancelled, through a real server."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

from tests.conftest import RunningServer, ServerFactory, wait_for

HELD_CONFIG = """
name: "held"
platform: "onnxruntime_onnx"
max_batch_size: 0
input [
  { name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] },
  { name: "SPIN" data_type: TYPE_INT64 dims: [ 1 ] }
]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
"""


def held_model(path: Path, width: int = 128) -> None:
    """OUTPUT0 = INPUT0 after SPIN iterations of a MatMul+Tanh loop: the caller decides how
    long the model's only instance stays busy."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(
        (rng.standard_normal((width, width)) * 0.05).astype(np.float32), "w"
    )
    body = helper.make_graph(
        [helper.make_node("MatMul", ["v_in", "w"], ["m"]),
         helper.make_node("Tanh", ["m"], ["v_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "spin",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [width, width])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [width, width])],
        [w],
    )
    inits = [
        numpy_helper.from_array(np.ones((width, width), np.float32), "start"),
        numpy_helper.from_array(np.array(True), "true"),
        numpy_helper.from_array(np.array([], np.int64), "scalar"),
        numpy_helper.from_array(np.zeros((width, 16), np.float32), "zero"),
    ]
    nodes = [
        helper.make_node("Reshape", ["SPIN", "scalar"], ["trips"]),
        helper.make_node("Loop", ["trips", "true", "start"], ["spun"], body=body),
        helper.make_node("MatMul", ["spun", "zero"], ["z"]),  # [width, 16] of zeros
        helper.make_node("ReduceSum", ["z"], ["zsum"], keepdims=0, axes=None),
        helper.make_node("Add", ["INPUT0", "zsum"], ["OUTPUT0"]),
    ]
    graph = helper.make_graph(
        nodes, "held",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, [16]),
         helper.make_tensor_value_info("SPIN", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, [16])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


@pytest.fixture(scope="module")
def held(start_server: ServerFactory, tmp_path_factory: pytest.TempPathFactory) -> RunningServer:
    repo = tmp_path_factory.mktemp("held_repo")
    held_model(repo / "held" / "1" / "model.onnx")
    (repo / "held" / "config.pbtxt").write_text(HELD_CONFIG)
    return start_server(repo)


def infer_body(spin: int, value: float) -> bytes:
    return json.dumps({"inputs": [
        {"name": "INPUT0", "shape": [16], "datatype": "FP32", "data": [value] * 16},
        {"name": "SPIN", "shape": [1], "datatype": "INT64", "data": [spin]},
    ]}).encode()


def infer(server: RunningServer, spin: int, value: float = 1.0) -> float:
    """One inference that keeps the instance busy for `spin` iterations; returns seconds."""
    start = time.monotonic()
    request = urllib.request.Request(
        f"http://{server.http_url}/v2/models/held/infer", data=infer_body(spin, value)
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        output = json.loads(response.read())["outputs"][0]["data"]
    assert output == [value] * 16
    return time.monotonic() - start


def metric(server: RunningServer, name: str, **labels: str) -> float:
    """The value of one series of model `held` in the Prometheus text (0 when absent)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics") as response:
        text = response.read().decode()
    wanted = {"model": "held", "version": "1", **labels}
    for found in re.finditer(rf"^{name}{{(.*)}} (\S+)$", text, re.MULTILINE):
        series = dict(re.findall(r'(\w+)="([^"]*)"', found[1]))
        if series == wanted:
            return float(found[2])
    return 0.0


def stats(server: RunningServer) -> dict[str, int]:
    entry = httpclient.InferenceServerClient(server.http_url).get_inference_statistics("held")
    model = entry["model_stats"][0]
    return {"success": model["inference_stats"]["success"]["count"],
            "fail": model["inference_stats"]["fail"]["count"],
            "executions": model["execution_count"]}


def test_disconnected_client_leaves_the_queue(held: RunningServer) -> None:
    infer(held, 1)  # warm
    per_trip = infer(held, 200) / 200
    spin = max(200, int(4.0 / per_trip))  # about 4 s of the instance's time
    before = stats(held)

    blocker = threading.Thread(target=infer, args=(held, spin, 2.0))
    blocker.start()
    time.sleep(0.3)  # the blocker is executing: nothing is queued
    assert metric(held, "tachyon_inference_pending_requests") == 0

    body = infer_body(1, 3.0)
    victim = socket.create_connection(("127.0.0.1", held.http_port))
    victim.sendall(
        b"POST /v2/models/held/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
    )
    wait_for(lambda: metric(held, "tachyon_inference_pending_requests") == 1, "the queued one")
    victim.close()  # the client goes away while its request waits behind the blocker
    wait_for(lambda: metric(held, "tachyon_inference_pending_requests") == 0, "it to leave",
             timeout=2.0)
    assert blocker.is_alive(), f"the blocker finished too early ({spin} trips), raise them"
    assert metric(held, "tachyon_inference_request_failure_total", reason="cancelled") == 1

    blocker.join(120)
    after = stats(held)
    assert after["success"] == before["success"] + 1  # the blocker only
    assert after["executions"] == before["executions"] + 1  # the victim never ran
    assert after["fail"] == before["fail"] + 1
