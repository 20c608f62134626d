"""Ensembles through a real server: steps chained in-process, each through its model's batcher;
config errors caught at load with a clear reason."""

from __future__ import annotations

import asyncio
import shutil

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcclient_aio
import tritonclient.http as httpclient

from tests.conftest import BUNDLED, RunningServer, ServerFactory

CHAIN = """
name: "chain"
platform: "ensemble"
max_batch_size: 4
input [ { name: "A" data_type: TYPE_FP32 dims: [ 16 ] },
        { name: "B" data_type: TYPE_FP32 dims: [ 16 ] } ]
output [ { name: "OUT_SUM" data_type: TYPE_FP32 dims: [ 16 ] },
         { name: "DIFF" data_type: TYPE_FP32 dims: [ 16 ] } ]
ensemble_scheduling { step [
  { model_name: "add_sub" model_version: -1
    input_map { key: "INPUT0" value: "A" } input_map { key: "INPUT1" value: "B" }
    output_map { key: "OUTPUT0" value: "sum" } output_map { key: "OUTPUT1" value: "DIFF" } },
  { model_name: "identity_fp32" model_version: 1
    input_map { key: "INPUT0" value: "sum" } output_map { key: "OUTPUT0" value: "OUT_SUM" } }
] }
"""

BROKEN = {
    "unknown_model": (CHAIN.replace('"identity_fp32" model_version: 1',
                                    '"nope" model_version: 1'),
                      "unknown model: 'nope' is not found in the model repository"),
    "unmapped": (CHAIN.replace('value: "sum" } output_map { key: "OUTPUT0"',
                               'value: "summ" } output_map { key: "OUTPUT0"'),
                 "reads ['summ'], which no ensemble input or earlier step output provides"),
    "wrong_type": (CHAIN.replace('name: "B" data_type: TYPE_FP32',
                                 'name: "B" data_type: TYPE_INT32'),
                   "input 'INPUT1' is FP32 [-1, 16], but tensor 'B' is INT32 [-1, 16]"),
    "wrong_shape": (CHAIN.replace('name: "A" data_type: TYPE_FP32 dims: [ 16 ]',
                                  'name: "A" data_type: TYPE_FP32 dims: [ 8 ]'),
                    "input 'INPUT0' is FP32 [-1, 16], but tensor 'A' is FP32 [-1, 8]"),
    "no_producer": (CHAIN.replace('{ name: "DIFF" data_type', '{ name: "DIFF2" data_type'),
                    "output 'DIFF2' is produced by no step's output_map"),
}


def cycle_configs() -> dict[str, str]:
    one = CHAIN.replace('name: "chain"', 'name: "cycle_a"').replace(
        '"identity_fp32" model_version: 1', '"cycle_b" model_version: 1')
    two = CHAIN.replace('name: "chain"', 'name: "cycle_b"').replace(
        '"identity_fp32" model_version: 1', '"cycle_a" model_version: 1')
    return {"cycle_a": one, "cycle_b": two}


@pytest.fixture(scope="module")
def server(start_server: ServerFactory, tmp_path_factory: pytest.TempPathFactory) -> RunningServer:
    repo = tmp_path_factory.mktemp("pipeline_repo")
    for model in ("add_sub", "identity_fp32"):
        shutil.copytree(BUNDLED / model, repo / model)
    configs = {"chain": CHAIN, **{f"broken_{k}": v for k, (v, _) in BROKEN.items()},
               **cycle_configs()}
    for name, text in configs.items():
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "config.pbtxt").write_text(text.replace('name: "chain"', f'name: "{name}"'))
    return start_server(repo, "--exit-on-error", "false")


def test_chain_over_both_transports(server: RunningServer) -> None:
    rng = np.random.default_rng(3)
    a = rng.standard_normal((3, 16)).astype(np.float32)
    b = rng.standard_normal((3, 16)).astype(np.float32)
    g = grpcclient.InferenceServerClient(server.grpc_url)
    inputs = []
    for name, data in (("A", a), ("B", b)):
        tensor = grpcclient.InferInput(name, [3, 16], "FP32")
        tensor.set_data_from_numpy(data)
        inputs.append(tensor)
    before = g.get_inference_statistics("identity_fp32", as_json=True)["model_stats"][0]
    result = g.infer("chain", inputs)
    np.testing.assert_allclose(result.as_numpy("OUT_SUM"), a + b, rtol=1e-6)
    np.testing.assert_allclose(result.as_numpy("DIFF"), a - b, rtol=1e-6)
    after = g.get_inference_statistics("identity_fp32", as_json=True)["model_stats"][0]
    assert int(after["inference_count"]) - int(before.get("inference_count", 0)) == 3
    h = httpclient.InferenceServerClient(server.http_url)
    h_inputs = []
    for name, data in (("A", a), ("B", b)):
        tensor = httpclient.InferInput(name, [3, 16], "FP32")
        tensor.set_data_from_numpy(data)
        h_inputs.append(tensor)
    only_diff = [httpclient.InferRequestedOutput("DIFF")]
    response = h.infer("chain", h_inputs, outputs=only_diff)
    np.testing.assert_allclose(response.as_numpy("DIFF"), a - b, rtol=1e-6)
    assert response.as_numpy("OUT_SUM") is None
    meta = h.get_model_metadata("chain")
    assert meta["platform"] == "ensemble"
    assert [o["name"] for o in meta["outputs"]] == ["OUT_SUM", "DIFF"]


def test_concurrent_requests_through_the_chain(server: RunningServer) -> None:
    async def run() -> None:
        client = grpcclient_aio.InferenceServerClient(server.grpc_url)

        async def one(i: int) -> None:
            a = np.full((1, 16), i, dtype=np.float32)
            b = np.full((1, 16), 2 * i, dtype=np.float32)
            tensors = []
            for name, data in (("A", a), ("B", b)):
                tensor = grpcclient_aio.InferInput(name, [1, 16], "FP32")
                tensor.set_data_from_numpy(data)
                tensors.append(tensor)
            result = await client.infer("chain", tensors)
            assert np.all(result.as_numpy("OUT_SUM") == 3 * i)
            assert np.all(result.as_numpy("DIFF") == -i)

        try:
            await asyncio.gather(*(one(i) for i in range(48)))
        finally:
            await client.close()

    asyncio.run(run())


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_config_errors_are_caught_at_load(server: RunningServer, case: str) -> None:
    index = grpcclient.InferenceServerClient(server.grpc_url).get_model_repository_index(
        as_json=True
    )["models"]
    entry = next(m for m in index if m["name"] == f"broken_{case}")
    assert entry["state"] == "UNAVAILABLE"
    assert BROKEN[case][1] in entry["reason"], entry["reason"]


def test_cycles_are_refused(server: RunningServer) -> None:
    index = grpcclient.InferenceServerClient(server.grpc_url).get_model_repository_index(
        as_json=True
    )["models"]
    for name in ("cycle_a", "cycle_b"):
        entry = next(m for m in index if m["name"] == name)
        assert entry["state"] == "UNAVAILABLE"
        assert "ensemble steps form a cycle" in entry["reason"], entry["reason"]
    assert grpcclient.InferenceServerClient(server.grpc_url).is_model_ready("chain")

