"""Health, metadata, config, statistics and repository index through both transports."""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.conftest import BUNDLED, RunningServer, ServerFactory

MODELS = [
    "add_sub", "digits", "docs_lookup", "identity_all", "identity_fp32", "minilm_embed",
    "minilm_tokenizer", "semantic_search", "stdlib_docs", "string_upper",
]
ONNX_MODELS = ["add_sub", "digits", "identity_all", "identity_fp32", "string_upper"]


def versions(model: str) -> list[str]:
    """digits has two: version 2 is its int8 copy (tachyon optimize), served beside version 1."""
    return ["1", "2"] if model == "digits" else ["1"]


def test_health_both_transports(bundled: RunningServer) -> None:
    g = grpcclient.InferenceServerClient(bundled.grpc_url)
    h = httpclient.InferenceServerClient(bundled.http_url)
    assert g.is_server_live() and g.is_server_ready()
    assert h.is_server_live() and h.is_server_ready()
    for model in MODELS:
        assert g.is_model_ready(model) and h.is_model_ready(model)
        assert g.is_model_ready(model, "1") and h.is_model_ready(model, "1")
    assert not g.is_model_ready("nope") and not h.is_model_ready("nope")
    assert not g.is_model_ready("digits", "9") and not h.is_model_ready("digits", "9")


def test_server_metadata(bundled: RunningServer) -> None:
    g = grpcclient.InferenceServerClient(bundled.grpc_url).get_server_metadata(as_json=True)
    h = httpclient.InferenceServerClient(bundled.http_url).get_server_metadata()
    assert g["name"] == h["name"] == "tachyon"
    assert g["extensions"] == h["extensions"]
    assert {"binary_tensor_data", "model_configuration", "statistics"} <= set(h["extensions"])


def test_model_metadata_matches_between_transports(bundled: RunningServer) -> None:
    g = grpcclient.InferenceServerClient(bundled.grpc_url)
    h = httpclient.InferenceServerClient(bundled.http_url)
    for model in MODELS:
        gm = g.get_model_metadata(model, as_json=True)
        hm = h.get_model_metadata(model)
        assert hm["name"] == gm["name"] == model
        assert hm["versions"] == gm["versions"] == versions(model)
        assert hm["platform"] == gm["platform"]
        if model in ONNX_MODELS:
            assert hm["platform"] == "onnxruntime_onnx"
        for kind in ("inputs", "outputs"):
            assert [(t["name"], t["datatype"], t["shape"]) for t in hm[kind]] == [
                (t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in gm[kind]
            ]
    digits = h.get_model_metadata("digits", "1")
    assert digits["inputs"] == [{"name": "INPUT", "datatype": "FP32", "shape": [-1, 64]}]


def test_model_config_both_transports(bundled: RunningServer) -> None:
    g = grpcclient.InferenceServerClient(bundled.grpc_url)
    h = httpclient.InferenceServerClient(bundled.http_url)
    gc = g.get_model_config("add_sub").config  # completed from the ONNX graph
    assert gc.max_batch_size == 4
    assert [i.name for i in gc.input] == ["INPUT0", "INPUT1"]
    assert list(gc.input[0].dims) == [16]
    assert gc.version_policy.latest.num_versions == 1
    hc = h.get_model_config("digits")
    assert hc["max_batch_size"] == 64
    assert hc["input"][0]["dims"] == [64]
    assert hc["input"][0]["data_type"] == "TYPE_FP32"
    assert hc["dynamic_batching"]["max_queue_delay_microseconds"] == 500


def test_statistics_count_requests(bundled: RunningServer) -> None:
    g = grpcclient.InferenceServerClient(bundled.grpc_url)
    h = httpclient.InferenceServerClient(bundled.http_url)
    before = h.get_inference_statistics("identity_fp32")["model_stats"][0]
    data = np.ones((3, 16), dtype=np.float32)
    tensor = grpcclient.InferInput("INPUT0", [3, 16], "FP32")
    tensor.set_data_from_numpy(data)
    for _ in range(5):
        g.infer("identity_fp32", [tensor])
    with pytest.raises(InferenceServerException):
        bad = grpcclient.InferInput("INPUT0", [3, 15], "FP32")
        bad.set_data_from_numpy(np.ones((3, 15), dtype=np.float32))
        g.infer("identity_fp32", [bad])
    after = g.get_inference_statistics("identity_fp32", as_json=True)["model_stats"][0]
    after_http = h.get_inference_statistics("identity_fp32", "1")["model_stats"][0]
    success = int(after["inference_stats"]["success"]["count"])
    assert success - before["inference_stats"]["success"]["count"] == 5
    assert int(after["inference_stats"]["fail"]["count"]) == (
        before["inference_stats"]["fail"]["count"] + 1
    )
    assert int(after["inference_count"]) - before["inference_count"] == 15
    assert int(after["inference_stats"]["compute_infer"]["ns"]) > 0
    assert after_http["inference_stats"]["success"]["count"] == success
    everything = h.get_inference_statistics()["model_stats"]
    assert sorted(s["name"] for s in everything) == [m for m in MODELS for _ in versions(m)]


def test_repository_index(bundled: RunningServer) -> None:
    g = grpcclient.InferenceServerClient(bundled.grpc_url).get_model_repository_index(
        as_json=True
    )
    h = httpclient.InferenceServerClient(bundled.http_url).get_model_repository_index()
    assert [(m["name"], m["version"], m["state"]) for m in g["models"]] == [
        (name, version, "READY") for name in MODELS for version in versions(name)
    ]
    assert [(m["name"], m["state"]) for m in h] == [
        (name, "READY") for name in MODELS for _ in versions(name)
    ]


def test_unbuilt_rpcs_answer_unimplemented(bundled: RunningServer) -> None:
    with grpc.insecure_channel(bundled.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.CudaSharedMemoryRegister(service_pb2.CudaSharedMemoryRegisterRequest())
        assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED
        assert "CUDA shared memory is not supported" in (info.value.details() or "")


def test_stream_infer(bundled: RunningServer) -> None:
    """ModelStreamInfer: every request answered, errors in-band, the stream goes on."""
    results: list[object] = []
    client = grpcclient.InferenceServerClient(bundled.grpc_url)
    client.start_stream(callback=lambda result, error: results.append(error or result))
    good = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
    good.set_data_from_numpy(np.arange(16, dtype=np.float32).reshape(1, 16))
    bad = grpcclient.InferInput("INPUT0", [1, 16], "INT32")
    bad.set_data_from_numpy(np.arange(16, dtype=np.int32).reshape(1, 16))
    for i in range(4):
        client.async_stream_infer("identity_fp32", [good], request_id=f"g{i}")
    client.async_stream_infer("identity_fp32", [bad], request_id="bad")
    client.stop_stream()  # waits for the responses
    errors = [r for r in results if isinstance(r, InferenceServerException)]
    answers = [r for r in results if isinstance(r, grpcclient.InferResult)]
    assert len(answers) == 4 and len(errors) == 1
    assert "expected FP32" in errors[0].message()
    for answer in answers:
        np.testing.assert_array_equal(
            answer.as_numpy("OUTPUT0"), np.arange(16, dtype=np.float32).reshape(1, 16)
        )


@pytest.fixture(scope="module")
def broken(start_server: ServerFactory, tmp_path_factory: pytest.TempPathFactory) -> RunningServer:
    """The bundled models plus a broken config and a corrupt model file."""
    repo = tmp_path_factory.mktemp("broken_repo")
    for name in ("identity_fp32", "add_sub"):
        shutil.copytree(BUNDLED / name, repo / name)
    (repo / "bad_config").mkdir()
    shutil.copytree(BUNDLED / "identity_fp32" / "1", repo / "bad_config" / "1")
    (repo / "bad_config" / "config.pbtxt").write_text("max_batch_size: [[[ not protobuf")
    (repo / "bad_file" / "1").mkdir(parents=True)
    (repo / "bad_file" / "1" / "model.onnx").write_bytes(b"this is not an onnx model")
    return start_server(repo, "--exit-on-error", "false")


def test_broken_models_are_unavailable_and_others_serve(broken: RunningServer) -> None:
    g = grpcclient.InferenceServerClient(broken.grpc_url)
    h = httpclient.InferenceServerClient(broken.http_url)
    index = {m["name"]: m for m in g.get_model_repository_index(as_json=True)["models"]}
    assert index["bad_config"]["state"] == "UNAVAILABLE"
    assert "config.pbtxt is not valid" in index["bad_config"]["reason"]
    assert index["bad_file"]["state"] == "UNAVAILABLE"
    assert "bad_file" in index["bad_file"]["reason"]
    assert index["identity_fp32"]["state"] == index["add_sub"]["state"] == "READY"
    assert not h.is_model_ready("bad_file")
    assert not g.is_server_ready()  # strict readiness, as in Triton
    assert g.is_server_live()
    with pytest.raises(InferenceServerException) as info:
        tensor = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
        tensor.set_data_from_numpy(np.zeros((1, 16), dtype=np.float32))
        g.infer("bad_file", [tensor])
    assert "UNAVAILABLE" in str(info.value.status())
    tensor = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 16), dtype=np.float32))
    result = g.infer("identity_fp32", [tensor])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.ones((1, 16), dtype=np.float32))
    assert "bad_config" in broken.log() and "is unavailable" in broken.log()
    try:
        urllib.request.urlopen(f"http://{broken.http_url}/v2/health/ready", timeout=5)
        raise AssertionError("ready must fail while a model is unavailable")
    except urllib.error.HTTPError as exc:
        assert exc.code == 400


def test_strict_model_config_refuses_incomplete_configs(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    shutil.copytree(BUNDLED / "add_sub", tmp_path / "add_sub")
    shutil.copytree(BUNDLED / "identity_fp32", tmp_path / "identity_fp32")
    server = start_server(tmp_path, "--strict-model-config", "--exit-on-error", "false")
    with urllib.request.urlopen(
        urllib.request.Request(f"http://{server.http_url}/v2/repository/index", method="POST")
    ) as response:
        index = {m["name"]: m for m in json.loads(response.read())}
    assert index["identity_fp32"]["state"] == "READY"
    assert index["add_sub"]["state"] == "UNAVAILABLE"
    assert "--strict-model-config" in index["add_sub"]["reason"]
    assert server.stop() == 0
