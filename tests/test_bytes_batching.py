"""One client's non-UTF-8 text for an ONNX string tensor fails that request alone, never the
other requests it would have shared a batch with."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import tritonclient.grpc as grpcclient
from onnx import TensorProto, helper
from tritonclient.utils import InferenceServerException

from tests.conftest import ServerFactory

CONFIG = """
name: "text_identity"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ { name: "TEXT" data_type: TYPE_STRING dims: [ 1 ] } ]
output [ { name: "OUT" data_type: TYPE_STRING dims: [ 1 ] } ]
dynamic_batching { max_queue_delay_microseconds: 20000 }
"""


def _repository(root: Path) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["TEXT"], ["OUT"])], "text_identity",
        [helper.make_tensor_value_info("TEXT", TensorProto.STRING, ["b", 1])],
        [helper.make_tensor_value_info("OUT", TensorProto.STRING, ["b", 1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (root / "text_identity" / "1").mkdir(parents=True)
    onnx.save(model, str(root / "text_identity" / "1" / "model.onnx"))
    (root / "text_identity" / "config.pbtxt").write_text(CONFIG)
    return root


def test_bad_text_fails_only_its_own_request(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    server = start_server(_repository(tmp_path))
    outcomes: Counter[tuple[bool, str]] = Counter()
    messages: list[str] = []

    def client(text: bytes, valid: bool) -> None:
        connection = grpcclient.InferenceServerClient(server.grpc_url)
        for _ in range(25):
            tensor = grpcclient.InferInput("TEXT", [1, 1], "BYTES")
            tensor.set_data_from_numpy(np.array([[text]], dtype=np.object_))
            try:
                result = connection.infer("text_identity", [tensor])
                assert result.as_numpy("OUT").ravel().tolist() == [text]
                outcomes[(valid, "OK")] += 1
            except InferenceServerException as exc:
                outcomes[(valid, str(exc.status()))] += 1
                messages.append(exc.message() or "")

    threads = [threading.Thread(target=client, args=(b"hello", True)) for _ in range(4)]
    threads.append(threading.Thread(target=client, args=(b"\xff\xfe", False)))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert outcomes == {(True, "OK"): 100, (False, "StatusCode.INVALID_ARGUMENT"): 25}, outcomes
    assert all("input 'TEXT'" in m and "not UTF-8" in m for m in messages), messages[:3]
