"""The versioned repository through a real server: version policies, poll and explicit
control modes, reloads under load that fail nothing, broken new versions, warmup, safe names,
and memory that comes back after unloads."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import tempfile
import threading
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcclient_aio
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.conftest import BUNDLED, RunningServer, ServerFactory, wait_for
from tests.conftest import repository_index as index

CONFIG = """
name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ 16 ] }} ]
output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 16 ] }} ]
dynamic_batching {{ }}
{extra}
"""


def adder_bytes(value: float) -> bytes:
    """An ONNX model computing OUTPUT0 = INPUT0 + value: each version tells itself apart."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["INPUT0", "c"], ["OUTPUT0"])], "adder",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["b", 16])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["b", 16])],
        [numpy_helper.from_array(np.full((16,), value, np.float32), "c")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def add_version(model_dir: Path, version: int, content: bytes | None = None) -> None:
    """Write a version folder atomically (a poll never sees it half-written)."""
    staging = model_dir.parent / f".staging-{model_dir.name}-{version}"
    (staging).mkdir(parents=True, exist_ok=True)
    (staging / "model.onnx").write_bytes(adder_bytes(version) if content is None else content)
    staging.rename(model_dir / str(version))


def write_config(model_dir: Path, extra: str = "") -> None:
    tmp = model_dir / ".config.tmp"
    tmp.write_text(CONFIG.format(name=model_dir.name, extra=extra))
    tmp.rename(model_dir / "config.pbtxt")


def infer_version(client: grpcclient.InferenceServerClient, model: str, version: str = "") -> str:
    data = np.zeros((1, 16), dtype=np.float32)
    tensor = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
    tensor.set_data_from_numpy(data)
    result = client.infer(model, [tensor], model_version=version)
    out = result.as_numpy("OUTPUT0")
    served = result.get_response().model_version
    assert np.all(out == float(served)), (served, out)  # the output proves the version
    return str(served)


class LoadGenerator:
    """16 concurrent gRPC clients in a background thread until stopped; every response is
    checked against the version that says it served it."""

    def __init__(self, url: str, model: str, clients: int = 16) -> None:
        self.url, self.model, self.clients = url, model, clients
        self.ok = 0
        self.failures: list[str] = []
        self.versions: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        client = grpcclient_aio.InferenceServerClient(self.url)
        rng = np.random.default_rng(1)

        async def worker() -> None:
            while not self._stop.is_set():
                data = rng.standard_normal((1, 16)).astype(np.float32)
                tensor = grpcclient_aio.InferInput("INPUT0", [1, 16], "FP32")
                tensor.set_data_from_numpy(data)
                try:
                    result = await client.infer(self.model, [tensor])
                except InferenceServerException as exc:
                    self.failures.append(f"{exc.status()}: {exc.message()}")
                    continue
                version = result.get_response().model_version
                expected = data + float(version)
                if not np.allclose(result.as_numpy("OUTPUT0"), expected):
                    self.failures.append(f"version {version} gave a wrong result")
                self.versions.add(version)
                self.ok += 1

        try:
            await asyncio.gather(*(worker() for _ in range(self.clients)))
        finally:
            await client.close()

    def __enter__(self) -> LoadGenerator:
        self._thread.start()
        wait_for(lambda: self.ok > 50, "the load generator to get going")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def make_repo(root: Path, versions: tuple[int, ...] = (1,), extra: str = "") -> Path:
    repo = root / "repo"
    model = repo / "adder"
    model.mkdir(parents=True)
    write_config(model, extra)
    for v in versions:
        add_version(model, v)
    return repo


# -- version policies ---------------------------------------------------------------------


def test_version_policy_and_addressing_both_transports(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    repo = make_repo(tmp_path, (1, 2, 3), "version_policy { latest { num_versions: 2 } }")
    server = start_server(repo)
    g = grpcclient.InferenceServerClient(server.grpc_url)
    h = httpclient.InferenceServerClient(server.http_url)
    assert infer_version(g, "adder") == "3"
    assert infer_version(g, "adder", "2") == "2"
    with pytest.raises(InferenceServerException) as info:
        infer_version(g, "adder", "1")
    assert info.value.status() == "StatusCode.NOT_FOUND"
    assert g.get_model_metadata("adder", as_json=True)["versions"] == ["2", "3"]
    assert h.get_model_metadata("adder", "2")["versions"] == ["2", "3"]
    assert h.is_model_ready("adder", "2") and not h.is_model_ready("adder", "1")
    data = np.zeros((1, 16), dtype=np.float32)
    tensor = httpclient.InferInput("INPUT0", [1, 16], "FP32")
    tensor.set_data_from_numpy(data)
    assert h.infer("adder", [tensor], model_version="2").get_response()["model_version"] == "2"
    stats = h.get_inference_statistics("adder", "2")["model_stats"]
    assert [(s["version"], s["inference_stats"]["success"]["count"]) for s in stats] == [("2", 2)]


def test_specific_and_all_policies(start_server: ServerFactory, tmp_path: Path) -> None:
    repo = make_repo(tmp_path, (1, 2, 3), "version_policy { specific { versions: [1, 3] } }")
    (repo / "adder" / "not-a-version").mkdir()
    server = start_server(repo)
    entries = index(server)
    assert {k[1] for k in entries if k[0] == "adder"} == {"1", "3"}
    assert "ignoring folder 'not-a-version'" in server.log()


# -- poll mode -----------------------------------------------------------------------------


def test_poll_mode_reloads_under_load_without_a_failure(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    repo = make_repo(tmp_path, (1,))
    model = repo / "adder"
    server = start_server(repo, "--model-control-mode", "poll", "--repository-poll-secs", "0.2")
    with LoadGenerator(server.grpc_url, "adder") as load:
        add_version(model, 2)  # latest 1: version 2 replaces version 1
        wait_for(lambda: index(server).get(("adder", "2"), {}).get("state") == "READY", "v2")
        wait_for(lambda: "2" in load.versions, "traffic on v2")
        write_config(model, "version_policy { all { } }")  # both serve
        wait_for(lambda: index(server).get(("adder", "1"), {}).get("state") == "READY", "v1 back")
        shutil.rmtree(model / "1")  # remove version 1 from disk
        wait_for(lambda: index(server).get(("adder", "1"), {}).get("state") == "UNAVAILABLE",
                 "v1 unloaded")
        threads = 'parameters { key: "intra_op_thread_count" value { string_value: "1" } }'
        write_config(model, "version_policy { all { } }\n" + threads)
        wait_for(lambda: "intra_op_thread_count" in json.dumps(
            httpclient.InferenceServerClient(server.http_url).get_model_config("adder")),
            "the changed config")
        ok_before = load.ok
        wait_for(lambda: load.ok > ok_before + 100, "traffic after the config change")
    assert load.failures == []
    assert load.versions == {"1", "2"}
    assert load.ok > 300
    print(f"poll reload under load: {load.ok} requests, 0 failed, versions {load.versions}")


def test_broken_new_versions_leave_the_old_one_serving(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    repo = make_repo(tmp_path, (1,), "version_policy { all { } }")
    model = repo / "adder"
    server = start_server(repo, "--model-control-mode", "poll", "--repository-poll-secs", "0.2")
    g = grpcclient.InferenceServerClient(server.grpc_url)
    add_version(model, 2, b"this is not an ONNX model")
    wait_for(lambda: index(server).get(("adder", "2"), {}).get("state") == "UNAVAILABLE", "v2")
    assert index(server)[("adder", "2")]["reason"]
    assert infer_version(g, "adder") == "1"
    (model / "config.pbtxt").write_text("max_batch_size: [[[ broken")
    wait_for(lambda: ("adder", "") in index(server), "the config error in the index")
    entry = index(server)[("adder", "")]
    assert entry["state"] == "UNAVAILABLE" and "config.pbtxt is not valid" in entry["reason"]
    assert infer_version(g, "adder") == "1"  # still serving
    write_config(model, "version_policy { all { } }")
    add_version(model, 3)
    wait_for(lambda: index(server).get(("adder", "3"), {}).get("state") == "READY", "v3")
    assert ("adder", "") not in index(server)
    assert infer_version(g, "adder") == "3"


# -- explicit mode -------------------------------------------------------------------------


@pytest.fixture
def explicit(start_server: ServerFactory, tmp_path: Path) -> tuple[RunningServer, Path]:
    repo = make_repo(tmp_path, (1,))
    shutil.copytree(BUNDLED / "identity_fp32", repo / "identity_fp32")
    server = start_server(repo, "--model-control-mode", "explicit", "--load-model", "adder")
    return server, repo


def test_explicit_mode_loads_and_unloads_on_request(
    explicit: tuple[RunningServer, Path],
) -> None:
    server, _ = explicit
    g = grpcclient.InferenceServerClient(server.grpc_url)
    h = httpclient.InferenceServerClient(server.http_url)
    assert g.is_model_ready("adder") and not g.is_model_ready("identity_fp32")
    h.load_model("identity_fp32")
    assert g.is_model_ready("identity_fp32")
    g.unload_model("identity_fp32")
    assert not h.is_model_ready("identity_fp32")
    assert index(server)[("identity_fp32", "1")]["state"] == "UNAVAILABLE"
    # a config override, as JSON, and model files carried in the request
    override = {"name": "adder", "platform": "onnxruntime_onnx", "max_batch_size": 4,
                "input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [16]}],
                "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [16]}]}
    g.load_model("adder", config=json.dumps(override),
                 files={"file:7/model.onnx": adder_bytes(7)})
    assert infer_version(g, "adder") == "7"
    assert g.get_model_config("adder").config.max_batch_size == 4
    h.load_model("adder")  # back to the repository's own files
    assert infer_version(g, "adder") == "1"


def test_repository_index_lists_never_loaded_models_by_name_as_triton_does(
    explicit: tuple[RunningServer, Path],
) -> None:
    """Triton's index in explicit mode: a model never loaded has its name only; a loaded one
    its versions; after an unload its versions stay, UNAVAILABLE with reason "unloaded"."""
    server, _ = explicit
    g = grpcclient.InferenceServerClient(server.grpc_url)

    def http_index(ready: bool = False) -> list[dict[str, str]]:
        request = urllib.request.Request(
            f"http://{server.http_url}/v2/repository/index",
            data=json.dumps({"ready": ready}).encode(), method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            entries: list[dict[str, str]] = json.loads(response.read())
        return entries

    def grpc_index() -> list[dict[str, str]]:
        entries: list[dict[str, str]] = g.get_model_repository_index(as_json=True)["models"]
        return entries

    for listing in (grpc_index(), http_index()):
        assert {"name": "identity_fp32"} in listing
        assert {"name": "adder", "version": "1", "state": "READY"} in listing
    assert all(e["name"] != "identity_fp32" for e in http_index(ready=True))
    g.load_model("identity_fp32")
    assert {"name": "identity_fp32", "version": "1", "state": "READY"} in http_index()
    g.unload_model("identity_fp32")
    unloaded = {"name": "identity_fp32", "version": "1", "state": "UNAVAILABLE",
                "reason": "unloaded"}
    for listing in (grpc_index(), http_index()):
        assert unloaded in listing
        assert {"name": "identity_fp32"} not in listing
    assert all(e["name"] != "identity_fp32" for e in http_index(ready=True))


def scratch_folders(name: str) -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob(f"tachyon-{name}-*"))


def test_file_parameters_scratch_folders_go_with_their_model(
    explicit: tuple[RunningServer, Path],
) -> None:
    """A load's `file:` files live in a scratch folder until the model is loaded from other
    files or unloaded, not until the server stops."""
    server, _ = explicit
    g = grpcclient.InferenceServerClient(server.grpc_url)
    name = f"carried{os.getpid()}"
    config = json.dumps({
        "name": name, "platform": "onnxruntime_onnx", "max_batch_size": 4,
        "input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [16]}],
        "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [16]}]})
    g.load_model(name, config=config, files={"file:3/model.onnx": adder_bytes(3)})
    first = scratch_folders(name)
    assert len(first) == 1 and (next(iter(first)) / "3" / "model.onnx").is_file()
    assert infer_version(g, name) == "3"
    g.load_model(name, config=config, files={"file:4/model.onnx": adder_bytes(4)})
    assert infer_version(g, name) == "4"
    second = scratch_folders(name)
    assert len(second) == 1 and not (first & second)  # the first one is gone
    g.unload_model(name)
    assert scratch_folders(name) == set()


def test_explicit_reload_under_load_without_a_failure(
    explicit: tuple[RunningServer, Path],
) -> None:
    server, repo = explicit
    g = grpcclient.InferenceServerClient(server.grpc_url)
    with LoadGenerator(server.grpc_url, "adder") as load:
        add_version(repo / "adder", 2)
        g.load_model("adder")
        wait_for(lambda: "2" in load.versions, "traffic on v2")
        write_config(repo / "adder", "version_policy { specific { versions: [1] } }")
        g.load_model("adder")
        count = load.ok
        wait_for(lambda: load.ok > count + 100, "traffic after switching back to v1")
        write_config(repo / "adder", "version_policy { specific { versions: [1] } }\n"
                     'parameters { key: "allow_spinning" value { string_value: "0" } }')
        g.load_model("adder")
        count = load.ok
        wait_for(lambda: load.ok > count + 100, "traffic after the config change")
    assert load.failures == []
    assert load.versions == {"1", "2"}
    assert index(server)[("adder", "2")]["state"] == "UNAVAILABLE"
    print(f"explicit reload under load: {load.ok} requests, 0 failed")


def test_a_failed_explicit_reload_keeps_the_old_version(
    explicit: tuple[RunningServer, Path],
) -> None:
    server, repo = explicit
    g = grpcclient.InferenceServerClient(server.grpc_url)
    (repo / "adder" / "1" / "model.onnx").write_bytes(b"corrupt")
    with pytest.raises(InferenceServerException):
        g.load_model("adder")
    assert infer_version(g, "adder") == "1"
    assert "reload failed" in index(server)[("adder", "1")]["reason"]


@pytest.mark.parametrize("name", ["..", "../adder", "a/b", ".hidden"])
def test_names_that_escape_the_repository_are_refused(
    explicit: tuple[RunningServer, Path], name: str
) -> None:
    server, _ = explicit
    with grpc.insecure_channel(server.grpc_url) as channel:
        from tritonclient.grpc import service_pb2, service_pb2_grpc

        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.RepositoryModelLoad(service_pb2.RepositoryModelLoadRequest(model_name=name))
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "not allowed" in (info.value.details() or "")
    quoted = urllib.request.quote(name, safe="")
    request = urllib.request.Request(
        f"http://{server.http_url}/v2/repository/models/{quoted}/load", data=b"{}", method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as http_info:
        urllib.request.urlopen(request, timeout=10)
    assert http_info.value.code in (400, 404)
    http_info.value.close()


@pytest.mark.parametrize("key", ["file:../1/model.onnx", "file:/etc/passwd", "file:1/../../x"])
def test_file_parameters_that_escape_are_refused(
    explicit: tuple[RunningServer, Path], key: str
) -> None:
    server, _ = explicit
    body = json.dumps({"parameters": {"config": json.dumps({"name": "adder"}),
                                      key: base64.b64encode(b"x").decode()}}).encode()
    request = urllib.request.Request(
        f"http://{server.http_url}/v2/repository/models/adder/load", data=body, method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    assert info.value.code == 400
    assert "not allowed" in json.loads(info.value.read())["error"]
    info.value.close()


def test_load_is_refused_outside_explicit_mode(bundled: RunningServer) -> None:
    with pytest.raises(InferenceServerException) as info:
        grpcclient.InferenceServerClient(bundled.grpc_url).load_model("digits")
    assert "--model-control-mode explicit" in (info.value.message() or "")


# -- warmup ------------------------------------------------------------------------------


def test_warmup_runs_before_ready_and_a_bad_one_fails_the_load(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    warm = """model_warmup [
      { name: "zeros" batch_size: 2 count: 2
        inputs { key: "INPUT0" value { data_type: TYPE_FP32 dims: [16] zero_data: true } } },
      { name: "random" batch_size: 1
        inputs { key: "INPUT0" value { data_type: TYPE_FP32 dims: [16] random_data: true } } },
      { name: "file" batch_size: 1
        inputs { key: "INPUT0" value { data_type: TYPE_FP32 dims: [16]
                                       input_data_file: "input0.bin" } } } ]"""
    repo = make_repo(tmp_path, (1,), warm)
    (repo / "adder" / "warmup").mkdir()
    np.arange(16, dtype=np.float32).tofile(repo / "adder" / "warmup" / "input0.bin")
    bad = repo / "bad_warmup"
    bad.mkdir()
    write_config(bad, warm.replace("dims: [16] zero_data", "dims: [15] zero_data"))
    add_version(bad, 1)
    server = start_server(repo, "--exit-on-error", "false")
    log = server.log()
    for name in ("zeros", "random", "file"):
        assert f"warmup '{name}' done" in log
    assert log.index("warmup 'file' done") < log.index("model 'adder' version 1 is READY")
    entry = index(server)[("bad_warmup", "1")]
    assert entry["state"] == "UNAVAILABLE" and "warmup 'zeros' failed" in entry["reason"]


# -- memory --------------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_memory_comes_back_after_100_loads_and_unloads(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    """A 7 MB MLP (784-1024-1024-10) loaded and unloaded 100 times: RSS stays within 60 MB of
    where it was after the first cycle (a leak of the model's weights alone would be 700 MB)."""
    import subprocess
    import sys

    repo = tmp_path / "repo"
    subprocess.run([sys.executable, str(BUNDLED.parent / "tools" / "make_models.py"), "--out",
                    str(repo), "--only", "mlp_fp32"], check=True, capture_output=True)
    server = start_server(repo, "--model-control-mode", "explicit")
    g = grpcclient.InferenceServerClient(server.grpc_url)
    data = np.random.default_rng(0).random((4, 784), dtype=np.float32)

    def cycle() -> None:
        g.load_model("mlp_fp32")
        tensor = grpcclient.InferInput("INPUT0", [4, 784], "FP32")
        tensor.set_data_from_numpy(data)
        assert g.infer("mlp_fp32", [tensor]).as_numpy("OUTPUT0").shape == (4, 10)
        g.unload_model("mlp_fp32")

    for _ in range(3):
        cycle()
    start = rss_mb(server.process.pid)
    for _ in range(100):
        cycle()
    end = rss_mb(server.process.pid)
    print(f"RSS after 3 cycles {start:.1f} MB, after 103 cycles {end:.1f} MB "
          f"(+{end - start:.1f} MB)")
    assert end - start < 60, (start, end)
    assert os.path.exists(f"/proc/{server.process.pid}")
