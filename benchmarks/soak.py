"""Soak: mixed valid and invalid traffic against one real `tachyon serve`, bounded in time.

    python benchmarks/soak.py [--minutes 10 | --seconds S] [--frontend native|grpcio]
        [--reload-secs 15] [--sample-secs 5] [--out DIR]

One server (poll mode, --repository-poll-secs 1, --max-request-bytes 2 MiB) on loopback serves a
temporary repository: the bundled identity_fp32, digits, string_upper and add_sub, and three
models built here with `onnx`:

- `reload`  OUTPUT0 = INPUT0 + version, GEN = the file's generation. Every --reload-secs the
            reloader either adds version N+1 (staged, renamed in), waits until it answers and
            removes N, or rewrites N's model.onnx in place (os.replace) with a new generation.
- `flaky`   VALUE = Gather(table[8], INDEX): ONNX Runtime raises on an index out of range, so a
            batch holding one bad index fails as a whole; its requests get what the server
            answers (INTERNAL), the others succeed.
- `slow`    OUTPUT0 = INPUT0 after SPIN iterations of a MatMul loop: requests still queued or
            running when their client goes away.

Traffic, all at once, each class on its own threads (tritonclient.grpc, tritonclient.grpc.aio,
tritonclient.http, raw grpcio and raw sockets):

- valid:        gRPC (2 threads), HTTP JSON, HTTP binary to identity_fp32, digits (rows of
                sample.json), string_upper, add_sub and reload; every answer checked.
- invalid:      wrong datatypes and shapes, unknown models and versions, oversize shapes, too
                large bodies, malformed JSON / binary / BYTES, garbage protobuf bytes; each
                must get its own status (INVALID_ARGUMENT/400, NOT_FOUND/404, ...).
- flaky:        4 asyncio clients, one request in 8 with an out-of-range index.
- cancelled:    gRPC calls to `slow` ended by client_timeout, by cancel(), or by closing the
                channel; then one valid `slow` call.
- disconnects:  raw HTTP sockets closed after the request, mid-body, at once, or with RST.

Every --sample-secs: the server's VmRSS, Threads and open fds (/proc), and requests per class.
At the end: a verdict from the rules printed with it, a Markdown table, and
benchmarks/results/soak-<timestamp>.{json,md} with the command and the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import http.client
import json
import os
import random
import re
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import ROOT, Tachyon, print_header

BUNDLED = ROOT / "model_repository"
INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
MAX_REQUEST_BYTES = 2 * 1024 * 1024
TIMEOUT_S = 30.0  # a request unanswered after this long is a hang
INVALID_PAUSE_S = 0.004  # between invalid requests: most of the traffic stays valid
SLOW_SPIN = 400  # iterations of the slow model's loop (about 35 ms) for calls that go away
FLAKY_TABLE = np.arange(10, 18, dtype=np.float32)
# rules on the server's resources: last window against the baseline window
RSS_GROWTH = 0.10
THREADS_SLACK = 4
FDS_SLACK = 16


# -- the repository -------------------------------------------------------------------------


def _save(graph: Any, path: Path, doc: str = "") -> None:
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], doc_string=doc)
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def _config(name: str, inputs: str, outputs: str, batch: int, extra: str = "") -> str:
    return (f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {batch}\n'
            f"input [ {inputs} ]\noutput [ {outputs} ]\n"
            'instance_group [ { count: 1 kind: KIND_CPU } ]\n'
            'parameters { key: "intra_op_thread_count" value: { string_value: "1" } }\n' + extra)


def reload_model(path: Path, version: int, generation: int) -> None:
    """OUTPUT0 = INPUT0 + version, GEN = generation (one per row)."""
    from onnx import TensorProto, helper, numpy_helper

    inits = [
        numpy_helper.from_array(np.array(version, np.float32), "version"),
        numpy_helper.from_array(np.array([[generation]], np.int64), "generation"),
        numpy_helper.from_array(np.array([0], np.int64), "first"),
        numpy_helper.from_array(np.array([1], np.int64), "one"),
    ]
    nodes = [
        helper.make_node("Add", ["INPUT0", "version"], ["OUTPUT0"]),
        helper.make_node("Shape", ["INPUT0"], ["shape"]),
        helper.make_node("Gather", ["shape", "first"], ["rows"]),
        helper.make_node("Concat", ["rows", "one"], ["gen_shape"], axis=0),
        helper.make_node("Expand", ["generation", "gen_shape"], ["GEN"]),
    ]
    graph = helper.make_graph(
        nodes, "reload",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["b", 16])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["b", 16]),
         helper.make_tensor_value_info("GEN", TensorProto.INT64, ["b", 1])],
        inits,
    )
    _save(graph, path, doc=f"version {version} generation {generation}")


def flaky_model(path: Path) -> None:
    """VALUE = table[INDEX]: ONNX Runtime fails the run when an index is out of range."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "INDEX"], ["VALUE"], axis=0)], "flaky",
        [helper.make_tensor_value_info("INDEX", TensorProto.INT64, ["b", 1])],
        [helper.make_tensor_value_info("VALUE", TensorProto.FLOAT, ["b", 1])],
        [numpy_helper.from_array(FLAKY_TABLE, "table")],
    )
    _save(graph, path)


def slow_model(path: Path, width: int = 128) -> None:
    """OUTPUT0 = INPUT0 after SPIN iterations of MatMul+Tanh (the caller picks the time)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = (rng.standard_normal((width, width)) * 0.05).astype(np.float32)
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
        [numpy_helper.from_array(weights, "w")],
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
        helper.make_node("MatMul", ["spun", "zero"], ["z"]),
        helper.make_node("ReduceSum", ["z"], ["zsum"], keepdims=0),
        helper.make_node("Add", ["INPUT0", "zsum"], ["OUTPUT0"]),
    ]
    graph = helper.make_graph(
        nodes, "slow",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, [16]),
         helper.make_tensor_value_info("SPIN", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, [16])],
        inits,
    )
    _save(graph, path)


def make_repository(repo: Path) -> None:
    for name in ("identity_fp32", "digits", "string_upper", "add_sub"):
        shutil.copytree(BUNDLED / name, repo / name)
    fp16 = '{ name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] }'
    reload_model(repo / "reload" / "1" / "model.onnx", 1, 0)
    (repo / "reload" / "config.pbtxt").write_text(_config(
        "reload", fp16, '{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] }, '
        '{ name: "GEN" data_type: TYPE_INT64 dims: [ 1 ] }', 16, "dynamic_batching { }\n"))
    flaky_model(repo / "flaky" / "1" / "model.onnx")
    (repo / "flaky" / "config.pbtxt").write_text(_config(
        "flaky", '{ name: "INDEX" data_type: TYPE_INT64 dims: [ 1 ] }',
        '{ name: "VALUE" data_type: TYPE_FP32 dims: [ 1 ] }', 16,
        "dynamic_batching { max_queue_delay_microseconds: 2000 }\n"))
    slow_model(repo / "slow" / "1" / "model.onnx")
    (repo / "slow" / "config.pbtxt").write_text(_config(
        "slow", f'{fp16}, {{ name: "SPIN" data_type: TYPE_INT64 dims: [ 1 ] }}',
        '{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] }', 0))


# -- the tally ------------------------------------------------------------------------------


@dataclass
class ClassTally:
    requests: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    broken: int = 0  # outcomes that break a rule
    examples: list[str] = field(default_factory=list)  # the first few of them
    max_s: float = 0.0  # the longest request timed


class Tally:
    """Requests per traffic class and outcome, from every worker thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.classes: dict[str, ClassTally] = {}
        self.answered: Counter[str] = Counter()  # correct answers by model

    def record(self, cls: str, outcome: str, problem: str | None = None, *, model: str = "",
               seconds: float = 0.0) -> None:
        """One request of class `cls` ended with `outcome`; `problem` says why that breaks a
        rule (a wrong answer, an unexpected status, a hang). `model`: given for a correct
        answer."""
        with self._lock:
            entry = self.classes.setdefault(cls, ClassTally())
            entry.requests += 1
            entry.outcomes[outcome] += 1
            entry.max_s = max(entry.max_s, seconds)
            if model and problem is None:
                self.answered[model] += 1
            if problem is not None:
                entry.broken += 1
                if len(entry.examples) < 8:
                    entry.examples.append(f"{outcome}: {problem}"[:400])

    def snapshot(self) -> dict[str, dict[str, int]]:
        """Per class so far: requests, errors (every outcome but a correct answer or a closed
        socket: most are the statuses that invalid requests should get) and rule breakers."""
        with self._lock:
            return {
                "requests": {n: c.requests for n, c in self.classes.items()},
                "errors": {n: sum(v for k, v in c.outcomes.items()
                                  if not k.startswith(("OK", "closed")))
                           for n, c in self.classes.items()},
                "broken": {n: c.broken for n, c in self.classes.items()},
            }


def grpc_code(exc: BaseException) -> str:
    """tritonclient's 'StatusCode.X' or a grpc.RpcError's code, as 'X'."""
    code = exc.code() if hasattr(exc, "code") else exc.status()  # type: ignore[attr-defined]
    return str(code or "NONE").removeprefix("StatusCode.")


# -- valid traffic --------------------------------------------------------------------------

Getter = Callable[[str], "np.ndarray[Any, Any] | None"]
Check = Callable[[Getter, str], "str | None"]


@dataclass
class Case:
    """One valid request and how to check its answer (outputs by name, the version)."""

    model: str
    inputs: list[tuple[str, np.ndarray[Any, Any], str]]
    outputs: list[str]
    check: Check


def _equal(name: str, got: np.ndarray[Any, Any] | None, want: np.ndarray[Any, Any]) -> str | None:
    if got is None:
        return f"no output '{name}'"
    if got.shape != want.shape or not np.array_equal(got, want):
        return f"'{name}' = {got.ravel()[:6]} {got.shape}, expected {want.ravel()[:6]} {want.shape}"
    return None


def _first(*problems: str | None) -> str | None:
    return next((p for p in problems if p is not None), None)


class Cases:
    """Random valid requests for every served model, each with its check."""

    def __init__(self, rng: random.Random, generations: dict[int, set[int]]) -> None:
        self.rng = rng
        self.generations = generations  # reload: generations written per version
        sample = json.loads((BUNDLED / "digits" / "sample.json").read_text())
        tensor = sample["request"]["inputs"][0]
        self.digits = np.array(tensor["data"], np.float32).reshape(tensor["shape"])
        self.labels = np.array(sample["labels"], np.int64)
        self.makers = [self.identity, self.digits_case, self.upper, self.add_sub, self.reload]

    def next(self) -> Case:
        return self.rng.choice(self.makers)()

    def _floats(self, rows: int) -> np.ndarray[Any, Any]:
        data = [self.rng.uniform(-100, 100) for _ in range(rows * 16)]
        return np.array(data, np.float32).reshape(rows, 16)

    def identity(self) -> Case:
        x = self._floats(self.rng.randint(1, 8))
        return Case("identity_fp32", [("INPUT0", x, "FP32")], ["OUTPUT0"],
                    lambda out, _: _equal("OUTPUT0", out("OUTPUT0"), x))

    def digits_case(self) -> Case:
        rows = [self.rng.randrange(4) for _ in range(self.rng.randint(1, 4))]
        labels = self.labels[rows].reshape(-1, 1)

        def check(out: Getter, _: str) -> str | None:
            probabilities = out("PROBABILITIES")
            if probabilities is None or probabilities.shape != (len(rows), 10):
                return f"PROBABILITIES shape {getattr(probabilities, 'shape', None)}"
            if not np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-4):
                return f"PROBABILITIES rows sum to {probabilities.sum(axis=1)}"
            return _equal("LABEL", out("LABEL"), labels)

        return Case("digits", [("INPUT", self.digits[rows], "FP32")], ["LABEL", "PROBABILITIES"],
                    check)

    def upper(self) -> Case:
        alphabet = "abcXYZ019 -_.üé日本"
        words = ["".join(self.rng.choice(alphabet) for _ in range(self.rng.randint(1, 12)))
                 for _ in range(self.rng.randint(1, 4))]
        text = np.array([w.encode() for w in words], dtype=np.object_)
        # the model upper-cases ASCII letters only (locale "C"), as bytes.upper() does
        want = np.array([w.encode().upper() for w in words], dtype=np.object_)

        def check(out: Getter, _: str) -> str | None:
            got = out("UPPER")
            if got is None:
                return "no output 'UPPER'"
            as_bytes = np.array([x.encode() if isinstance(x, str) else bytes(x)
                                 for x in got.ravel()], dtype=np.object_).reshape(got.shape)
            return _equal("UPPER", as_bytes, want)

        return Case("string_upper", [("TEXT", text, "BYTES")], ["UPPER"], check)

    def add_sub(self) -> Case:
        rows = self.rng.randint(1, 4)  # max_batch_size 4: completed from the graph
        a, b = self._floats(rows), self._floats(rows)
        return Case("add_sub", [("INPUT0", a, "FP32"), ("INPUT1", b, "FP32")],
                    ["OUTPUT0", "OUTPUT1"],
                    lambda out, _: _first(_equal("OUTPUT0", out("OUTPUT0"), a + b),
                                          _equal("OUTPUT1", out("OUTPUT1"), a - b)))

    def reload(self) -> Case:
        x = self._floats(self.rng.randint(1, 4))
        return Case("reload", [("INPUT0", x, "FP32")], ["OUTPUT0", "GEN"],
                    lambda out, version: self.check_reload(x, out, version))

    def check_reload(self, x: np.ndarray[Any, Any], out: Getter, version: str) -> str | None:
        if not version.isdigit() or int(version) not in self.generations:
            return f"answered by version '{version}', never written"
        v = int(version)
        gen = out("GEN")
        if gen is None or gen.shape != (len(x), 1) or len(set(gen.ravel().tolist())) != 1:
            return f"GEN {gen}"
        if int(gen.ravel()[0]) not in self.generations[v]:
            return f"version {v} answered generation {gen.ravel()[0]}, never written to it"
        return _equal("OUTPUT0", out("OUTPUT0"), x + np.float32(v))


def grpc_valid(ctx: Soak, index: int) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(ctx.grpc_url)
    cases = Cases(random.Random(100 + index), ctx.generations)
    while not ctx.stop.is_set():
        case = cases.next()
        tensors = []
        for name, array, datatype in case.inputs:
            tensor = grpcclient.InferInput(name, list(array.shape), datatype)
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        start = time.monotonic()
        try:
            result = client.infer(case.model, tensors, client_timeout=TIMEOUT_S)
        except InferenceServerException as exc:
            ctx.tally.record("grpc valid", grpc_code(exc), f"{case.model}: {exc.message()}",
                             seconds=time.monotonic() - start)
            continue
        seconds = time.monotonic() - start
        problem = case.check(result.as_numpy, result.get_response().model_version)
        ctx.tally.record("grpc valid", "OK" if problem is None else "wrong answer",
                         None if problem is None else f"{case.model}: {problem}",
                         model=case.model, seconds=seconds)
    client.close()


def http_valid(ctx: Soak, binary: bool) -> None:
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    cls = "http binary valid" if binary else "http JSON valid"
    client = httpclient.InferenceServerClient(ctx.http_url, network_timeout=TIMEOUT_S,
                                              connection_timeout=TIMEOUT_S)
    cases = Cases(random.Random(200 + binary), ctx.generations)
    while not ctx.stop.is_set():
        case = cases.next()
        tensors = []
        for name, array, datatype in case.inputs:
            tensor = httpclient.InferInput(name, list(array.shape), datatype)
            tensor.set_data_from_numpy(array, binary_data=binary)
            tensors.append(tensor)
        outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in case.outputs]
        start = time.monotonic()
        try:
            result = client.infer(case.model, tensors, outputs=outputs)
        except InferenceServerException as exc:
            ctx.tally.record(cls, f"HTTP {exc.status()}", f"{case.model}: {exc.message()}",
                             seconds=time.monotonic() - start)
            continue
        except Exception as exc:  # a timeout or a dropped connection: no answer
            ctx.tally.record(cls, type(exc).__name__, f"{case.model}: {exc!r}",
                             seconds=time.monotonic() - start)
            _close_http(client)
            client = httpclient.InferenceServerClient(ctx.http_url, network_timeout=TIMEOUT_S,
                                                      connection_timeout=TIMEOUT_S)
            continue
        seconds = time.monotonic() - start
        problem = case.check(result.as_numpy, str(result.get_response()["model_version"]))
        ctx.tally.record(cls, "OK" if problem is None else "wrong answer",
                         None if problem is None else f"{case.model}: {problem}",
                         model=case.model, seconds=seconds)
    _close_http(client)


def _close_http(client: Any) -> None:
    """Close and collect a tritonclient.http client on the thread that used it: its gevent
    pool belongs to this thread's hub, and a finalizer run elsewhere at exit fails."""
    client.close()
    del client
    gc.collect()


# -- invalid traffic ------------------------------------------------------------------------


def _infer_message(model: str, inputs: list[tuple[str, str, list[int], bytes]],
                   version: str = "") -> bytes:
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name=model, model_version=version)
    for name, datatype, shape, raw in inputs:
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        request.raw_input_contents.append(raw)
    return bytes(request.SerializeToString())


ROW = bytes(64)  # one FP32 [1, 16] row of zeros


def grpc_invalid_cases(rng: random.Random) -> list[tuple[str, bytes, set[str]]]:
    """(label, serialized ModelInferRequest or garbage, the status codes that are right)."""
    invalid, missing = {"INVALID_ARGUMENT"}, {"NOT_FOUND"}
    garbage = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64)))
    return [
        ("wrong datatype", _infer_message("identity_fp32", [("INPUT0", "INT32", [1, 16], ROW)]),
         invalid),
        ("wrong shape", _infer_message("identity_fp32", [("INPUT0", "FP32", [1, 15], ROW[:60])]),
         invalid),
        ("raw size != shape",
         _infer_message("identity_fp32", [("INPUT0", "FP32", [1, 16], ROW[:60])]), invalid),
        ("negative dim", _infer_message("identity_fp32", [("INPUT0", "FP32", [-1, 16], ROW)]),
         invalid),
        ("oversize shape",
         _infer_message("identity_fp32", [("INPUT0", "FP32", [2**40, 16], ROW)]), invalid),
        ("batch > max_batch_size",
         _infer_message("identity_fp32", [("INPUT0", "FP32", [65, 16], ROW * 65)]), invalid),
        ("unknown datatype", _infer_message("identity_fp32", [("INPUT0", "FP99", [1, 16], ROW)]),
         invalid),
        ("missing input", _infer_message("add_sub", [("INPUT0", "FP32", [1, 16], ROW)]), invalid),
        ("unknown input", _infer_message("identity_fp32", [("INPUT0", "FP32", [1, 16], ROW),
                                                           ("EXTRA", "FP32", [1, 16], ROW)]),
         invalid),
        ("malformed BYTES",
         _infer_message("string_upper", [("TEXT", "BYTES", [1], b"\x05\x00\x00\x00ab")]), invalid),
        ("BYTES not UTF-8",
         _infer_message("string_upper", [("TEXT", "BYTES", [1], b"\x02\x00\x00\x00\xff\xfe")]),
         invalid),
        ("unknown model", _infer_message("no_such_model", [("INPUT0", "FP32", [1, 16], ROW)]),
         missing),
        ("unknown version",
         _infer_message("identity_fp32", [("INPUT0", "FP32", [1, 16], ROW)], "99"), missing),
        ("garbage protobuf", b"\xff" * 16, invalid),
        ("truncated protobuf", _infer_message("identity_fp32",
                                              [("INPUT0", "FP32", [1, 16], ROW)])[:-7], invalid),
        # random bytes may parse (as unknown fields): then the request names no model
        ("random bytes", garbage, invalid | missing),
    ]


def grpc_invalid(ctx: Soak) -> None:
    import grpc

    rng = random.Random(300)
    channel = grpc.insecure_channel(ctx.grpc_url, options=[("grpc.max_send_message_length", -1)])
    call = channel.unary_unary(INFER_METHOD)
    oversize = _infer_message("identity_fp32", [("INPUT0", "FP32", [1, 16], ROW)]) + bytes(
        MAX_REQUEST_BYTES + 1024)  # trailing zero bytes: the message is too large, not broken
    count = 0
    while not ctx.stop.is_set():
        cases = grpc_invalid_cases(rng)
        if count % 10 == 0:
            cases.append(("message > max", oversize, {"RESOURCE_EXHAUSTED"}))
        count += 1
        for label, body, expected in cases:
            try:
                call(body, timeout=TIMEOUT_S)
                ctx.tally.record("grpc invalid", "OK", f"{label}: accepted")
            except grpc.RpcError as exc:
                code = grpc_code(exc)
                problem = None if code in expected else (
                    f"{label}: expected {'/'.join(sorted(expected))}: {exc.details()}")
                ctx.tally.record("grpc invalid", code, problem)
            ctx.stop.wait(INVALID_PAUSE_S)
    channel.close()


def _json(inputs: list[dict[str, Any]]) -> bytes:
    return json.dumps({"inputs": inputs}).encode()


def _fp32(shape: list[int], count: int, datatype: str = "FP32") -> dict[str, Any]:
    return {"name": "INPUT0", "datatype": datatype, "shape": shape, "data": [0.5] * count}


def _binary(shape: list[int], declared: int, raw: bytes) -> tuple[bytes, dict[str, str]]:
    header = _json([{"name": "INPUT0", "datatype": "FP32", "shape": shape,
                     "parameters": {"binary_data_size": declared}}])
    return header + raw, {"Inference-Header-Content-Length": str(len(header))}


HttpCase = tuple[str, str, str, bytes, dict[str, str], int]  # label, method, path, ... status


def http_invalid_cases() -> list[HttpCase]:
    infer = "/v2/models/identity_fp32/infer"
    short_binary, short_headers = _binary([1, 16], 64, ROW[:32])
    long_header = {"Inference-Header-Content-Length": "100000"}
    return [
        ("malformed JSON", "POST", infer, b'{"inputs": [', {}, 400),
        ("JSON not an object", "POST", infer, b"[1, 2, 3]", {}, 400),
        ("no inputs", "POST", infer, b"{}", {}, 400),
        ("JSON not UTF-8", "POST", infer, b'{"inputs": "\xff\xfe"}', {}, 400),
        ("wrong datatype", "POST", infer, _json([_fp32([1, 16], 16, "INT32")]), {}, 400),
        ("unknown datatype", "POST", infer, _json([_fp32([1, 16], 16, "FP99")]), {}, 400),
        ("wrong shape", "POST", infer, _json([_fp32([1, 15], 15)]), {}, 400),
        ("data count != shape", "POST", infer, _json([_fp32([1, 16], 15)]), {}, 400),
        ("oversize shape", "POST", infer, _json([_fp32([2**40, 16], 16)]), {}, 400),
        ("strings as FP32", "POST", infer,
         _json([{"name": "INPUT0", "datatype": "FP32", "shape": [1, 16], "data": ["a"] * 16}]),
         {}, 400),
        ("binary shorter than declared", "POST", infer, short_binary, short_headers, 400),
        ("header length > body", "POST", infer, _json([_fp32([1, 16], 16)]), long_header, 400),
        ("unknown model", "POST", "/v2/models/no_such_model/infer",
         _json([_fp32([1, 16], 16)]), {}, 404),
        ("unknown version", "POST", "/v2/models/identity_fp32/versions/99/infer",
         _json([_fp32([1, 16], 16)]), {}, 404),
        ("GET on infer", "GET", infer, b"", {}, 405),
        ("unknown path", "GET", "/v2/no/such/path", b"", {}, 404),
        ("unsupported encoding", "POST", infer, _json([_fp32([1, 16], 16)]),
         {"Content-Encoding": "br"}, 415),
        ("gzip that is not", "POST", infer, b"not gzip at all", {"Content-Encoding": "gzip"},
         400),
    ]


def _http_call(ctx: Soak, conn: http.client.HTTPConnection | None, case: HttpCase
               ) -> tuple[http.client.HTTPConnection | None, int, bytes]:
    """Send one request on a keep-alive connection; a new one when the server closed it."""
    _, method, path, body, headers, _ = case
    if conn is not None:
        try:
            return _http_send(conn, method, path, body, headers)
        except (ConnectionError, http.client.RemoteDisconnected):
            conn.close()  # the server closed the idle keep-alive connection: once more
    conn = http.client.HTTPConnection("127.0.0.1", ctx.http_port, timeout=TIMEOUT_S)
    return _http_send(conn, method, path, body, headers)


def _http_send(conn: http.client.HTTPConnection, method: str, path: str, body: bytes,
               headers: dict[str, str]) -> tuple[http.client.HTTPConnection | None, int, bytes]:
    conn.request(method, path, body=body, headers=headers)
    response = conn.getresponse()
    data = response.read()
    if response.will_close:
        conn.close()
        return None, response.status, data
    return conn, response.status, data


def http_invalid(ctx: Soak) -> None:
    conn: http.client.HTTPConnection | None = None
    too_large: HttpCase = ("body > max", "POST", "/v2/models/identity_fp32/infer",
                 bytes(MAX_REQUEST_BYTES + 1024), {}, 413)
    count = 0
    while not ctx.stop.is_set():
        cases = http_invalid_cases()
        if count % 10 == 0:
            cases.append(too_large)
        count += 1
        for case in cases:
            label, expected = case[0], case[5]
            try:
                conn, status, data = _http_call(ctx, conn, case)
            except Exception as exc:  # no answer at all
                conn = None
                ctx.tally.record("http invalid", type(exc).__name__, f"{label}: {exc!r}")
                continue
            problem = None
            if status != expected:
                problem = f"{label}: expected {expected}: {data[:200]!r}"
            elif not _json_error(data):
                problem = f"{label}: body is not a JSON error: {data[:200]!r}"
            ctx.tally.record("http invalid", f"HTTP {status}", problem)
            ctx.stop.wait(INVALID_PAUSE_S)
    if conn is not None:
        conn.close()


def _json_error(data: bytes) -> bool:
    try:
        return isinstance(json.loads(data).get("error"), str)
    except (ValueError, AttributeError):
        return False


# -- the raising backend --------------------------------------------------------------------


def flaky(ctx: Soak, clients: int = 4) -> None:
    asyncio.run(_flaky(ctx, clients))


async def _flaky(ctx: Soak, clients: int) -> None:
    import tritonclient.grpc.aio as aioclient

    client = aioclient.InferenceServerClient(ctx.grpc_url)

    async def one(rng: random.Random) -> None:
        while not ctx.stop.is_set():
            bad = rng.random() < 1 / 8
            index = rng.choice([8, 100, -9, 2**40]) if bad else rng.randrange(-8, 8)
            tensor = aioclient.InferInput("INDEX", [1, 1], "INT64")
            tensor.set_data_from_numpy(np.array([[index]], np.int64))
            await _flaky_one(ctx, client, tensor, index, bad)

    try:
        await asyncio.gather(*(one(random.Random(400 + i)) for i in range(clients)))
    finally:
        await client.close()


async def _flaky_one(ctx: Soak, client: Any, tensor: Any, index: int, bad: bool) -> None:
    from tritonclient.utils import InferenceServerException

    cls = "flaky (raising backend)"
    try:
        result = await client.infer("flaky", [tensor], client_timeout=TIMEOUT_S)
    except InferenceServerException as exc:
        code = grpc_code(exc)
        if code != "INTERNAL" or "model 'flaky' failed" not in (exc.message() or ""):
            ctx.tally.record(cls, code, f"index {index}: {exc.message()}")
        elif bad:
            ctx.tally.record(cls, "INTERNAL, bad index")
        else:
            ctx.tally.record(cls, "INTERNAL, good index in a failing batch")
        return
    if bad:
        ctx.tally.record(cls, "OK, bad index", f"index {index} answered")
        return
    problem = _equal("VALUE", result.as_numpy("VALUE"), FLAKY_TABLE[[[index]]])
    ctx.tally.record(cls, "OK" if problem is None else "wrong answer", problem, model="flaky")


# -- clients that go away -------------------------------------------------------------------


def _slow_inputs(grpcclient: Any, x: np.ndarray[Any, Any], spin: int) -> list[Any]:
    tensors = [grpcclient.InferInput("INPUT0", [16], "FP32"),
               grpcclient.InferInput("SPIN", [1], "INT64")]
    tensors[0].set_data_from_numpy(x)
    tensors[1].set_data_from_numpy(np.array([spin], np.int64))
    return tensors


class Outcomes:
    """Callbacks of async_infer calls, awaited with a deadline."""

    def __init__(self) -> None:
        self.done: list[tuple[Any, Any]] = []
        self.cond = threading.Condition()

    def __call__(self, result: Any, error: Any) -> None:
        with self.cond:
            self.done.append((result, error))
            self.cond.notify_all()

    def wait(self, count: int, timeout: float) -> list[tuple[Any, Any]]:
        with self.cond:
            self.cond.wait_for(lambda: len(self.done) >= count, timeout)
            return list(self.done)


def grpc_cancel(ctx: Soak) -> None:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(ctx.grpc_url)
    rng = random.Random(500)
    round_ = 0
    while not ctx.stop.wait(0.3):
        x = np.array([rng.uniform(-1, 1) for _ in range(16)], np.float32)
        how = ("timeout", "cancel", "close channel")[round_ % 3]
        round_ += 1
        if how == "close channel":
            # a client of its own whose channel closes under calls in flight
            other = grpcclient.InferenceServerClient(ctx.grpc_url)
            _cancel_burst(ctx, other, x, how)
            other.close()
        else:
            _cancel_burst(ctx, client, x, how)
        _slow_valid(ctx, client, x)
    client.close()


def _cancel_burst(ctx: Soak, client: Any, x: np.ndarray[Any, Any], how: str) -> None:
    """Three calls to the slow model (one runs, two queue), ended before their answers."""
    import tritonclient.grpc as grpcclient

    outcomes = Outcomes()
    timeout = 0.01 if how == "timeout" else TIMEOUT_S
    calls = [client.async_infer("slow", _slow_inputs(grpcclient, x, SLOW_SPIN), outcomes,
                                client_timeout=timeout) for _ in range(3)]
    time.sleep(0.01)
    if how == "cancel":
        for call in calls:
            call.cancel()
    elif how == "close channel":
        client.close()
    done = outcomes.wait(len(calls), TIMEOUT_S + 5)
    expected = {"DEADLINE_EXCEEDED", "CANCELLED"}
    for result, error in done:
        if error is None:
            problem = _equal("OUTPUT0", result.as_numpy("OUTPUT0"), x)
            ctx.tally.record("grpc cancelled", "OK (answered first)", problem)
            continue
        code = grpc_code(error)
        ctx.tally.record("grpc cancelled", f"{code} ({how})",
                         None if code in expected else f"{how}: {error.message()}")
    for _ in range(len(calls) - len(done)):
        ctx.tally.record("grpc cancelled", "no callback", f"{how}: no outcome in {TIMEOUT_S} s")


def _slow_valid(ctx: Soak, client: Any, x: np.ndarray[Any, Any]) -> None:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    start = time.monotonic()
    try:
        result = client.infer("slow", _slow_inputs(grpcclient, x, 2), client_timeout=TIMEOUT_S)
    except InferenceServerException as exc:
        ctx.tally.record("slow valid (after cancels)", grpc_code(exc), exc.message(),
                         seconds=time.monotonic() - start)
        return
    seconds = time.monotonic() - start
    problem = _equal("OUTPUT0", result.as_numpy("OUTPUT0"), x)
    ctx.tally.record("slow valid (after cancels)", "OK" if problem is None else "wrong answer",
                     problem, seconds=seconds)


def http_disconnect(ctx: Soak) -> None:
    body = _json([{"name": "INPUT0", "datatype": "FP32", "shape": [16], "data": [0.5] * 16},
                  {"name": "SPIN", "datatype": "INT64", "shape": [1], "data": [SLOW_SPIN]}])
    head = (f"POST /v2/models/slow/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    ways = {
        "after request": head + body,
        "mid-body": head + body[: len(body) // 2],
        "mid-headers": head[:30],
        "at once": b"",
        "RST after request": head + body,
    }
    raw_disconnects(ctx, ctx.http_port, ways, "http disconnects")


def grpc_disconnect(ctx: Soak) -> None:
    """HTTP/2 by hand (h2) on the gRPC port: a ModelInfer to the slow model, then gone."""
    import h2.config
    import h2.connection

    message = _infer_message("slow", [("INPUT0", "FP32", [16], ROW),
                                      ("SPIN", "INT64", [1], struct.pack("<q", SLOW_SPIN))])
    framed = b"\x00" + len(message).to_bytes(4, "big") + message
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(1, [(":method", "POST"), (":scheme", "http"), (":path", INFER_METHOD),
                          (":authority", "127.0.0.1"), ("content-type", "application/grpc"),
                          ("te", "trailers")])
    conn.send_data(1, framed, end_stream=True)
    call = conn.data_to_send()
    ways = {
        "after call": call,
        "mid-message": call[: len(call) - len(framed) // 2],
        "mid-preface": call[:12],
        "at once": b"",
        "RST after call": call,
        "not HTTP/2": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    }
    raw_disconnects(ctx, ctx.grpc_port, ways, "grpc raw disconnects")


def raw_disconnects(ctx: Soak, port: int, ways: dict[str, bytes], cls: str) -> None:
    """Connect, send one of `ways` (or nothing), close: FIN, or RST for the "RST" ways."""
    names = list(ways)
    round_ = 0
    while not ctx.stop.wait(0.2):
        how = names[round_ % len(names)]
        round_ += 1
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                if how.startswith("RST"):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.sendall(ways[how])
                time.sleep(0.005)
        except OSError as exc:
            ctx.tally.record(cls, type(exc).__name__, f"{how}: {exc!r}")
            continue
        ctx.tally.record(cls, f"closed {how}")


# -- reloads (poll mode) --------------------------------------------------------------------


@dataclass
class Reload:
    kind: str
    version: int
    generation: int
    seconds: float  # from the file change to the first answer from it
    ok: bool


def reloader(ctx: Soak) -> None:
    """Every reload_secs: a new version in, then the old one out; or the served version's file
    rewritten in place. Waits until the change answers before the next one."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(ctx.grpc_url)
    model_dir = ctx.repo / "reload"
    version, generation, round_ = 1, 0, 0
    while not ctx.stop.wait(ctx.reload_secs):
        generation += 1
        stage = ctx.stage / f"{round_}"
        if round_ % 2 == 0:
            kind, old = "new version, old removed", version
            version += 1
            ctx.generations[version] = {generation}
            reload_model(stage / "model.onnx", version, generation)
            start = time.monotonic()
            stage.rename(model_dir / str(version))
        else:
            kind, old = "file rewritten in place", 0
            ctx.generations[version].add(generation)
            reload_model(stage / "model.onnx", version, generation)
            start = time.monotonic()
            os.replace(stage / "model.onnx", model_dir / str(version) / "model.onnx")
        round_ += 1
        ok = _wait_served(ctx, client, version, generation)
        ctx.reloads.append(Reload(kind, version, generation, time.monotonic() - start, ok))
        if old:
            shutil.rmtree(model_dir / str(old))
    client.close()


def _wait_served(ctx: Soak, client: Any, version: int, generation: int) -> bool:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    deadline = time.monotonic() + TIMEOUT_S
    x = np.zeros((1, 16), np.float32)
    while time.monotonic() < deadline:
        tensor = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
        tensor.set_data_from_numpy(x)
        try:
            result = client.infer("reload", [tensor], client_timeout=TIMEOUT_S)
        except InferenceServerException as exc:
            ctx.tally.record("reload probes", grpc_code(exc), exc.message())
            time.sleep(0.05)
            continue
        problem = ctx.cases.check_reload(x, result.as_numpy, result.get_response().model_version)
        ctx.tally.record("reload probes", "OK" if problem is None else "wrong answer", problem,
                         model="reload")
        gen = result.as_numpy("GEN")
        if gen is not None and int(gen.ravel()[0]) == generation:
            return True
        time.sleep(0.05)
    return False


# -- sampling -------------------------------------------------------------------------------


def proc_sample(pid: int) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {"rss_mb": int(fields["VmRSS"].split()[0]) / 1024,
            "threads": int(fields["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def sampler(ctx: Soak) -> None:
    next_print = 0.0
    while True:
        t = time.monotonic() - ctx.started
        try:
            sample: dict[str, Any] = {"t": round(t, 2), **proc_sample(ctx.pid)}
        except (FileNotFoundError, ProcessLookupError):
            ctx.server_died = True
            return
        sample.update(ctx.tally.snapshot())
        ctx.samples.append(sample)
        if t >= next_print:
            next_print += 30
            broken = sum(sample["broken"].values())
            print(f"  t={t:6.1f}s  requests={sum(sample['requests'].values()):>8,}  "
                  f"rss={sample['rss_mb']:.1f} MB  threads={sample['threads']}  "
                  f"fds={sample['fds']}  reloads={len(ctx.reloads)}  broken={broken}",
                  flush=True)
        if ctx.stop.wait(ctx.sample_secs):
            return


def server_counts(metrics_port: int) -> dict[str, dict[str, float]]:
    """The server's own request counts by model (summed over versions): successes,
    failures by reason, batches run and requests pending."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    families = {"tachyon_inference_request_success_total": "success",
                "tachyon_inference_request_failure_total": "failure",
                "tachyon_inference_exec_count_total": "batches",
                "tachyon_inference_pending_requests": "pending"}
    counts: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        match = re.match(r"(\w+)\{(.*)\} (\S+)$", line)
        if match is None or match[1] not in families:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match[2]))
        key = families[match[1]] + (f" {labels['reason']}" if "reason" in labels else "")
        model = counts.setdefault(labels.get("model", ""), {})
        model[key] = model.get(key, 0.0) + float(match[3])
    return counts


def pending_requests(metrics_port: int) -> float:
    return sum(c.get("pending", 0.0) for c in server_counts(metrics_port).values())


# -- the run --------------------------------------------------------------------------------


@dataclass
class Soak:
    """What every worker shares."""

    repo: Path
    stage: Path
    http_port: int
    grpc_port: int
    reload_secs: float
    sample_secs: float
    pid: int = 0
    started: float = 0.0
    stop: threading.Event = field(default_factory=threading.Event)
    tally: Tally = field(default_factory=Tally)
    generations: dict[int, set[int]] = field(default_factory=lambda: {1: {0}})
    reloads: list[Reload] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    server_died: bool = False

    def __post_init__(self) -> None:
        self.cases = Cases(random.Random(0), self.generations)

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"


# `python -c LAUNCH DIR serve ...`: the CLI imported from DIR, bypassing the editable install
# (as benchmarks/event_loop_blocking.py does)
LAUNCH = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if not "
          "type(f).__module__.startswith('_editable')]; sys.path.insert(0, sys.argv.pop(1)); "
          "from server.cli import main; sys.exit(main())")


def snapshot(tree: Path) -> Path:
    """A copy of the package as it is now, with the installed `_native` extension: a rebuild
    of the working tree during the soak (which rewrites the mapped .so: SIGBUS) or an edit of
    a module imported late cannot reach the server under test."""
    import importlib.util

    spec = importlib.util.find_spec("server._native")
    if spec is None or spec.origin is None:
        raise RuntimeError("server._native is not built (scripts/setup)")
    shutil.copytree(ROOT / "server", tree / "server",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    shutil.copy2(spec.origin, tree / "server" / Path(spec.origin).name)
    return tree


def source_state() -> str:
    """The commit, and how many files under server/ and native/ differ from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              check=False).stdout.strip()

    changed = git("status", "--porcelain", "--", "server", "native").splitlines()
    return f"{git('rev-parse', '--short', 'HEAD')} + {len(changed)} uncommitted files in " \
           "server/ and native/"


class LoggedTachyon(Tachyon):
    """The harness's server with its output kept in a file (read for errors at the end),
    run from a snapshot of the package when `tree` is given."""

    def __init__(self, log: Path, tree: Path | None, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.log = log
        self.shown = " ".join(["tachyon", *self.command[1:]])
        if tree is not None:
            self.command = [sys.executable, "-c", LAUNCH, str(tree), *self.command[1:]]
            self.shown += f"  (from a copy of the package: python -c LAUNCH {tree} serve ...)"

    def __enter__(self) -> LoggedTachyon:
        with self.log.open("wb") as sink:
            self.process = subprocess.Popen(self.command, stdout=sink, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and self.process.poll() is None:
            with contextlib.suppress(OSError), urllib.request.urlopen(self.ready_url, timeout=1):
                return self
            time.sleep(0.1)
        self.__exit__(None, None, None)
        raise RuntimeError(f"tachyon did not become ready: {self.log.read_text()[-2000:]}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


WORKERS: list[tuple[str, Callable[..., None], tuple[Any, ...]]] = [
    ("grpc-valid-0", grpc_valid, (0,)),
    ("grpc-valid-1", grpc_valid, (1,)),
    ("http-json", http_valid, (False,)),
    ("http-binary", http_valid, (True,)),
    ("grpc-invalid", grpc_invalid, ()),
    ("http-invalid", http_invalid, ()),
    ("flaky", flaky, ()),
    ("grpc-cancel", grpc_cancel, ()),
    ("http-disconnect", http_disconnect, ()),
    ("grpc-disconnect", grpc_disconnect, ()),
    ("reloader", reloader, ()),
]


def run_traffic(ctx: Soak, seconds: float) -> None:
    def guarded(name: str, target: Callable[..., None], args: tuple[Any, ...]) -> None:
        try:
            target(ctx, *args)
        except Exception as exc:  # a worker that dies is a failure of the soak, not a crash
            ctx.tally.record("soak workers", "worker died", f"{name}: {exc!r}")

    ctx.started = time.monotonic()
    threads = [threading.Thread(target=sampler, args=(ctx,), name="sampler")]
    threads += [threading.Thread(target=guarded, args=w, name=w[0]) for w in WORKERS]
    for thread in threads:
        thread.start()
    ctx.stop.wait(seconds)
    ctx.stop.set()
    for thread in threads:
        thread.join(TIMEOUT_S * 2 + 10)
        if thread.is_alive():
            ctx.tally.record("soak workers", "worker hung", f"{thread.name} did not stop")


def wait_idle(metrics_port: int, timeout: float = 15.0) -> float:
    """The server's pending requests once traffic stopped (0 unless one was lost)."""
    deadline = time.monotonic() + timeout
    pending = pending_requests(metrics_port)
    while pending and time.monotonic() < deadline:
        time.sleep(0.2)
        pending = pending_requests(metrics_port)
    return pending


def log_errors(log: Path) -> list[str]:
    """ERROR and CRITICAL records other than the flaky model's batches, and tracebacks beyond
    the one each of those batches logs (an uncaught error in a thread prints its own)."""
    found, flaky_batches, tracebacks = [], 0, 0
    for line in log.read_text(errors="replace").splitlines():
        tracebacks += line.startswith("Traceback (most recent call last)")
        match = re.match(r"\S+ \S+ (ERROR|CRITICAL) (.*)", line)
        if match and "model 'flaky'" in match[2]:
            flaky_batches += 1
        elif match or line.startswith(("Fatal Python error", "Segmentation fault")):
            found.append(line[:300])
    if tracebacks > flaky_batches:
        found.append(f"{tracebacks - flaky_batches} tracebacks not from the flaky model's batches")
    return found


# -- the verdict ----------------------------------------------------------------------------


def windows(seconds: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """Baseline and final windows: the second minute and the last one, or on runs under three
    minutes the second and the last quarter."""
    if seconds >= 180:
        return (60.0, 120.0), (seconds - 60.0, seconds + 1)
    return (seconds / 4, seconds / 2), (seconds * 3 / 4, seconds + 1)


def window_median(samples: list[dict[str, Any]], key: str, span: tuple[float, float]) -> float:
    values = [s[key] for s in samples if span[0] <= s["t"] < span[1]]
    return float(statistics.median(values)) if values else float("nan")


# not `reload`: a version's counters start again when it is reloaded, and go when it is unloaded
COUNTED = ("identity_fp32", "digits", "string_upper", "add_sub", "flaky")
VALID = ("grpc valid", "http JSON valid", "http binary valid", "slow valid (after cancels)",
         "reload probes")


def verdict(ctx: Soak, seconds: float, extra: dict[str, Any]) -> list[dict[str, Any]]:
    classes = ctx.tally.classes
    rules: list[dict[str, Any]] = []

    def rule(text: str, passed: bool, detail: str) -> None:
        rules.append({"rule": text, "pass": bool(passed), "detail": detail})

    valid = sum(classes[c].requests for c in VALID if c in classes)
    valid_bad = sum(classes[c].broken for c in VALID if c in classes)
    rule("every valid request answered correctly (gRPC, HTTP JSON and binary, reload probes, "
         "slow)", valid > 0 and valid_bad == 0, f"{valid:,} valid, {valid_bad} not")
    for name, text in (("grpc invalid", "every invalid gRPC request got its status"),
                       ("http invalid", "every invalid HTTP request got its status and a JSON "
                                        "error")):
        c = classes.get(name, ClassTally())
        rule(text, c.requests > 0 and c.broken == 0, f"{c.requests:,} sent, {c.broken} wrong")
    internal = {n: c.outcomes[k] for n, c in classes.items() for k in c.outcomes
                if k.startswith(("INTERNAL", "HTTP 500")) and not n.startswith("flaky")}
    rule("no INTERNAL / HTTP 500 except from the raising backend", not internal,
         ", ".join(f"{n}: {v}" for n, v in internal.items()) or "none")
    f = classes.get("flaky (raising backend)", ClassTally())
    rule("raising backend: bad indices INTERNAL, the rest correct or INTERNAL with their batch; "
         "both seen", f.broken == 0 and f.outcomes["OK"] > 0
         and f.outcomes["INTERNAL, bad index"] > 0,
         ", ".join(f"{k}: {v:,}" for k, v in sorted(f.outcomes.items())))
    gone = [classes.get(n, ClassTally())
            for n in ("grpc cancelled", "http disconnects", "grpc raw disconnects")]
    rule("clients that went away: gRPC calls ended DEADLINE_EXCEEDED/CANCELLED (or answered "
         "correctly), every socket accepted", all(c.requests > 0 and c.broken == 0 for c in gone),
         f"{gone[0].requests:,} gRPC calls, {gone[1].requests + gone[2].requests:,} sockets, "
         f"{sum(c.broken for c in gone)} wrong")
    rule("no request left pending once traffic stopped", extra["pending_after"] == 0,
         f"{extra['pending_after']:g} pending")
    counted = {m: extra["server_counts"].get(m, {}).get("success", 0.0) for m in COUNTED}
    differ = {m: (n, ctx.tally.answered[m]) for m, n in counted.items()
              if n != ctx.tally.answered[m]}
    rule("the server's success count equals the client's correct answers, per model ("
         + ", ".join(COUNTED) + ")", not differ,
         "; ".join(f"{m}: server {n:g}, client {c}" for m, (n, c) in differ.items())
         or f"{int(sum(counted.values())):,} both")
    done = [r for r in ctx.reloads if r.ok]
    expected_reloads = max(1, int(seconds / (ctx.reload_secs + 2)) - 1)
    rule(f"reloads: at least {expected_reloads}, each served within {TIMEOUT_S:g} s",
         len(done) == len(ctx.reloads) >= expected_reloads,
         f"{len(ctx.reloads)} done, {len(ctx.reloads) - len(done)} not served; max "
         f"{max((r.seconds for r in ctx.reloads), default=0):.1f} s to serve")
    workers = classes.get("soak workers", ClassTally())
    rule("the server lived, every worker finished, SIGTERM exit 0",
         not ctx.server_died and workers.requests == 0 and extra["exit_code"] == 0,
         f"exit code {extra['exit_code']}; {'; '.join(workers.examples) or 'workers ok'}")
    rule("server log: no ERROR line but the raising backend's", not extra["log_errors"],
         f"{len(extra['log_errors'])} lines")
    rules.extend(resource_rules(ctx.samples, seconds))
    return rules


def resource_rules(samples: list[dict[str, Any]], seconds: float) -> list[dict[str, Any]]:
    base, last = windows(seconds)
    limits = (("rss_mb", f"RSS: final median < baseline median x {1 + RSS_GROWTH:g}",
               lambda b, f: f < b * (1 + RSS_GROWTH)),
              ("threads", f"threads: final median <= baseline median + {THREADS_SLACK}",
               lambda b, f: f <= b + THREADS_SLACK),
              ("fds", f"open fds: final median <= baseline median + {FDS_SLACK}",
               lambda b, f: f <= b + FDS_SLACK))
    rules = []
    for key, text, ok in limits:
        b, f = window_median(samples, key, base), window_median(samples, key, last)
        rules.append({"rule": text, "pass": bool(ok(b, f)),
                      "detail": f"baseline {b:.1f} (t {base[0]:.0f}-{base[1]:.0f} s), "
                                f"final {f:.1f} (t {last[0]:.0f}-{seconds:.0f} s)"})
    return rules


# -- the report -----------------------------------------------------------------------------


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Soak, {report['seconds'] / 60:g} min, {report['frontend']} gRPC front end", "",
             f"command: `{report['command']}`  ", f"machine: {report['machine']}  ",
             f"server: `{report['server_command']}`  ", f"source: {report['source']}", "",
             f"**Verdict: {'PASS' if report['pass'] else 'FAIL'}**", "",
             "| rule | pass | detail |", "| --- | --- | --- |"]
    lines += [f"| {r['rule']} | {'yes' if r['pass'] else '**NO**'} | {r['detail']} |"
              for r in report["rules"]]
    lines += ["", "## Requests by class", "",
              "| class | requests | per s | outcomes | broke a rule | slowest s |",
              "| --- | ---: | ---: | --- | ---: | ---: |"]
    for name, c in report["classes"].items():
        outcomes = ", ".join(f"{k} {v:,}" for k, v in sorted(c["outcomes"].items()))
        slowest = f"{c['max_s']:.3f}" if c["max_s"] else ""
        lines.append(f"| {name} | {c['requests']:,} | {c['requests'] / report['seconds']:.1f} | "
                     f"{outcomes} | {c['broken']} | {slowest} |")
    examples = [(n, e) for n, c in report["classes"].items() for e in c["examples"]]
    if examples:
        lines += ["", "Requests that broke a rule (first few per class):", ""]
        lines += [f"- {n}: `{e}`" for n, e in examples]
    lines += ["", "## Server resources", "",
              "| | first sample | baseline median | final median | last sample |",
              "| --- | ---: | ---: | ---: | ---: |"]
    samples, (base, last) = report["samples"], windows(report["seconds"])
    for key, label in (("rss_mb", "RSS MB"), ("threads", "threads"), ("fds", "open fds")):
        lines.append(f"| {label} | {samples[0][key]:.1f} | "
                     f"{window_median(samples, key, base):.1f} | "
                     f"{window_median(samples, key, last):.1f} | {samples[-1][key]:.1f} |")
    lines += timeline(samples, report["seconds"])
    lines += server_table(report)
    reloads = report["reloads"]
    lines += ["", f"Reloads: {len(reloads)} ("
              + ", ".join(f"{k} {v}" for k, v in Counter(r["kind"] for r in reloads).items())
              + f"), median {_median([r['seconds'] for r in reloads]):.2f} s from the file "
              f"change to its first answer (poll every 1 s).", ""]
    if report["log_errors"]:
        lines += ["Server ERROR lines (first 10):", ""]
        lines += [f"- `{e}`" for e in report["log_errors"][:10]]
    return "\n".join(lines) + "\n"


def timeline(samples: list[dict[str, Any]], seconds: float) -> list[str]:
    """About ten samples across the run (one a minute on a 10-minute run)."""
    step = 60.0 if seconds >= 600 else seconds / 10
    lines = ["", "## Over time", "",
             "| t s | requests | requests/s since the row before | RSS MB | threads | fds | "
             "broke a rule |", "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    previous: dict[str, Any] | None = None
    mark = 0.0
    for sample in samples:
        if sample["t"] < mark and sample is not samples[-1]:
            continue
        mark = sample["t"] + step * 0.99
        total = sum(sample["requests"].values())
        rate = ""
        if previous is not None and sample["t"] > previous["t"]:
            done = total - sum(previous["requests"].values())
            rate = f"{done / (sample['t'] - previous['t']):,.0f}"
        lines.append(f"| {sample['t']:.0f} | {total:,} | {rate} | {sample['rss_mb']:.1f} | "
                     f"{sample['threads']} | {sample['fds']} | "
                     f"{sum(sample['broken'].values())} |")
        previous = sample
    return lines


def server_table(report: dict[str, Any]) -> list[str]:
    lines = ["", "## The server's own counts (/metrics, after the run)", "",
             "| model | correct answers (client) | successes | failures by reason | batches |",
             "| --- | ---: | ---: | --- | ---: |"]
    for model, c in sorted(report["server_counts"].items()):
        failures = ", ".join(f"{k.removeprefix('failure ')} {v:,.0f}"
                             for k, v in sorted(c.items()) if k.startswith("failure") and v)
        lines.append(f"| {model} | {report['answered'].get(model, 0):,} | "
                     f"{c.get('success', 0):,.0f} | {failures or '-'} | "
                     f"{c.get('batches', 0):,.0f} |")
    return lines


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--seconds", type=float, help="overrides --minutes")
    parser.add_argument("--frontend", choices=("native", "grpcio"), default="native")
    parser.add_argument("--reload-secs", type=float, default=15.0)
    parser.add_argument("--sample-secs", type=float,
                        help="default: 5, or less on runs under 2 minutes")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--no-snapshot", dest="snapshot", action="store_false",
                        help="serve the installed package, not a copy taken at the start")
    args = parser.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else args.minutes * 60
    sample_secs = args.sample_secs or min(5.0, max(0.5, seconds / 24))
    machine = print_header()
    source = source_state()
    print("source:", source)
    with tempfile.TemporaryDirectory(prefix="tachyon-soak-") as tmp:
        root = Path(tmp)
        (root / "repo").mkdir()
        (root / "stage").mkdir()
        make_repository(root / "repo")
        ports = free_port(), free_port(), free_port()
        ctx = Soak(root / "repo", root / "stage", ports[0], ports[1],
                   args.reload_secs, sample_secs)
        tree = snapshot(root / "tree") if args.snapshot else None
        server = LoggedTachyon(root / "server.log", tree, root / "repo", *ports,
                               "--model-control-mode", "poll", "--repository-poll-secs", "1",
                               "--max-request-bytes", str(MAX_REQUEST_BYTES),
                               "--grpc-frontend", args.frontend)
        print("server:", server.shown, flush=True)
        with server:
            ctx.pid = server.process.pid
            run_traffic(ctx, seconds)
            pending = wait_idle(ports[2]) if server.process.poll() is None else -1
            counts = server_counts(ports[2]) if server.process.poll() is None else {}
            with contextlib.suppress(FileNotFoundError):
                ctx.samples.append({"t": round(time.monotonic() - ctx.started, 2),
                                    **proc_sample(ctx.pid), **ctx.tally.snapshot()})
        extra = {"pending_after": pending, "exit_code": server.process.returncode,
                 "server_counts": counts,
                 "log_errors": log_errors(root / "server.log")}
        extra["source"] = source + (" (snapshot)" if args.snapshot else "")
        report = build_report(ctx, args, seconds, machine, server.shown, extra)
        stamp = write_report(report, args.out)
        if not report["pass"]:  # the server's log explains a failure
            shutil.copy(root / "server.log", args.out / f"soak-{stamp}-server.log")
    return 0 if report["pass"] else 1


def build_report(ctx: Soak, args: argparse.Namespace, seconds: float, machine: str,
                 server_command: str, extra: dict[str, Any]) -> dict[str, Any]:
    rules = verdict(ctx, seconds, extra)
    return {
        "command": " ".join([sys.executable, *sys.argv]), "machine": machine,
        "server_command": server_command, "frontend": args.frontend,
        "source": extra["source"],
        "seconds": seconds, "reload_secs": args.reload_secs, "sample_secs": ctx.sample_secs,
        "pass": all(r["pass"] for r in rules), "rules": rules,
        "classes": {n: {"requests": c.requests, "outcomes": dict(c.outcomes),
                        "broken": c.broken, "examples": c.examples, "max_s": c.max_s}
                    for n, c in sorted(ctx.tally.classes.items())},
        "reloads": [vars(r) for r in ctx.reloads], "samples": ctx.samples,
        "log_errors": extra["log_errors"], "pending_after": extra["pending_after"],
        "server_counts": extra["server_counts"], "answered": dict(ctx.tally.answered),
        "exit_code": extra["exit_code"],
    }


def write_report(report: dict[str, Any], out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    text = markdown(report)
    (out / f"soak-{stamp}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"soak-{stamp}.md").write_text(text)
    print()
    print(text)
    print(f"wrote {out / f'soak-{stamp}.json'} and .md")
    return stamp


if __name__ == "__main__":
    sys.exit(main())
