"""I/O binding through the batcher, on the CPU EP (the same code path as on a GPU): the batch
is gathered once into the instance's own buffers, bound, run, and its outputs copied back;
the answers are identical to the plain `session.run` path under concurrent batched load, on
real ONNX models, in-process and through a real server."""

from __future__ import annotations

import asyncio
import logging
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from server import gpus
from server.backends import _cudart
from server.backends.buffers import HostBuffer, pinned_memory_works
from server.backends.onnxruntime import OnnxRuntimeBackend
from server.batching import DynamicBatcher
from server.model_config import ConfigError, ModelSpec, parse_config, to_spec
from server.statistics import ModelStats
from server.types import Array, DataType

from .conftest import BUNDLED, ROOT, ServerFactory

sys.path.insert(0, str(ROOT / "tools"))
from make_models import make_mlp

MLP_CONFIG = """
name: "mlp"
max_batch_size: 64
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 784 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 10 ] } ]
dynamic_batching { max_queue_delay_microseconds: 2000 }
instance_group [ { kind: KIND_CPU count: 2 } ]
parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
"""
NUMERIC = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
           "FP16", "FP32", "FP64"]


@pytest.fixture(scope="module")
def mlp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    version = tmp_path_factory.mktemp("mlp") / "1"
    make_mlp(version / "model.onnx")
    return version


def spec_of(text: str, binding: str) -> ModelSpec:
    extra = f'parameters {{ key: "io_binding" value: {{ string_value: "{binding}" }} }}'
    config = parse_config(text + extra, "m")
    return to_spec(config, "onnxruntime")


def loaded(spec: ModelSpec, version: Path) -> list[OnnxRuntimeBackend]:
    backends = [OnnxRuntimeBackend(spec, version, i) for i in range(spec.instance_count)]
    for backend in backends:
        backend.load()
    return backends


def through_batcher(
    spec: ModelSpec, backends: list[OnnxRuntimeBackend], requests: list[dict[str, Array]],
    outputs: list[str],
) -> tuple[list[dict[str, Array]], ModelStats]:
    """Every request submitted at once; their answers, in order, and the batcher's stats."""
    stats = ModelStats()

    async def main() -> list[dict[str, Array]]:
        batcher = DynamicBatcher(spec, backends, stats)
        batcher.start()
        answers = await asyncio.gather(*(
            batcher.submit(r, outputs, int(next(iter(r.values())).shape[0])) for r in requests
        ))
        await batcher.drain()
        return answers

    return asyncio.run(main()), stats


def test_bound_mlp_answers_like_the_plain_session_under_batched_load(mlp_dir: Path) -> None:
    rng = np.random.default_rng(7)
    requests = [{"INPUT0": rng.standard_normal((int(rng.integers(1, 4)), 784), np.float32)}
                for _ in range(300)]
    reference = ort.InferenceSession(str(mlp_dir / "model.onnx"),
                                     providers=["CPUExecutionProvider"])
    for binding in ("true", "false"):
        spec = spec_of(MLP_CONFIG, binding)
        backends = loaded(spec, mlp_dir)
        assert (backends[0].gather([requests[0]]) is not None) == (binding == "true")
        answers, stats = through_batcher(spec, backends, requests, ["OUTPUT0"])
        for request, answer in zip(requests, answers, strict=True):
            (expected,) = reference.run(["OUTPUT0"], request)
            np.testing.assert_allclose(answer["OUTPUT0"], expected, rtol=1e-5, atol=1e-5)
        assert stats.inference_count == sum(len(r["INPUT0"]) for r in requests)
        assert max(stats.batches) > 3, "requests shared batches"
        for backend in backends:
            backend.unload()


def numeric_identity(version: Path) -> Path:
    """An ONNX model with one Identity per numeric datatype (IN_<T> -> OUT_<T>, [batch, n])."""
    import onnx
    from onnx import helper

    inputs, outputs, nodes = [], [], []
    for datatype in NUMERIC:
        elem = helper.np_dtype_to_tensor_dtype(DataType(datatype).numpy)
        inputs.append(helper.make_tensor_value_info(f"IN_{datatype}", elem, ["b", "n"]))
        outputs.append(helper.make_tensor_value_info(f"OUT_{datatype}", elem, ["b", "n"]))
        nodes.append(helper.make_node("Identity", [f"IN_{datatype}"], [f"OUT_{datatype}"]))
    graph = helper.make_graph(nodes, "numeric_identity", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    version.mkdir(parents=True)
    onnx.save(model, str(version / "model.onnx"))
    return version


def test_every_numeric_datatype_round_trips_bit_exact_through_bound_buffers(
    tmp_path: Path,
) -> None:
    """Twelve inputs of twelve datatypes gathered and bound at once."""
    text = (
        "max_batch_size: 8 dynamic_batching { max_queue_delay_microseconds: 2000 } input ["
        + ", ".join(f"{{ name: 'IN_{t}' data_type: TYPE_{t} dims: [-1] }}" for t in NUMERIC)
        + "] output ["
        + ", ".join(f"{{ name: 'OUT_{t}' data_type: TYPE_{t} dims: [-1] }}" for t in NUMERIC)
        + "] "
    )
    spec = spec_of(text, "true")
    backends = loaded(spec, numeric_identity(tmp_path / "1"))
    rng = np.random.default_rng(3)
    requests = [
        {f"IN_{t}": rng.integers(0, 2 if t == "BOOL" else 100, (1, 5)).astype(DataType(t).numpy)
         for t in NUMERIC}
        for _ in range(64)
    ]
    answers, stats = through_batcher(spec, backends, requests, [f"OUT_{t}" for t in NUMERIC])
    for request, answer in zip(requests, answers, strict=True):
        for datatype in NUMERIC:
            sent, got = request[f"IN_{datatype}"], answer[f"OUT_{datatype}"]
            assert got.dtype == sent.dtype and got.tobytes() == sent.tobytes(), datatype
    assert max(stats.batches) > 1
    backends[0].unload()


def test_bytes_models_keep_the_plain_path_and_bad_values_are_refused() -> None:
    text = (BUNDLED / "string_upper" / "config.pbtxt").read_text()
    backend = loaded(spec_of(text, "true"), BUNDLED / "string_upper" / "1")[0]
    assert backend.gather([{"TEXT": np.array([b"a"], dtype=object)}]) is None
    out = backend.execute({"TEXT": np.array([b"abc"], dtype=object)}, ["UPPER"])
    assert out["UPPER"].tolist() == [b"ABC"]
    with pytest.raises(ConfigError, match=r"model 'mlp': parameters\.io_binding 'maybe' is "
                                          r'invalid, expected "true" or "false"'):
        loaded(spec_of(MLP_CONFIG, "maybe"), BUNDLED / "identity_fp32" / "1")


def test_arrays_not_gathered_by_the_backend_are_staged_first(mlp_dir: Path) -> None:
    """execute() called with any arrays (warm-up, a non-contiguous view) copies them in."""
    backend = loaded(spec_of(MLP_CONFIG, "true"), mlp_dir)[0]
    x = np.random.default_rng(1).standard_normal((6, 784 * 2), np.float32)[:, ::2]
    assert not x.flags.c_contiguous
    reference = ort.InferenceSession(str(mlp_dir / "model.onnx"),
                                     providers=["CPUExecutionProvider"])
    (expected,) = reference.run(["OUTPUT0"], {"INPUT0": np.ascontiguousarray(x)})
    got = backend.execute({"INPUT0": x}, ["OUTPUT0"])["OUTPUT0"]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # outputs are the caller's: the next batch does not overwrite them
    backend.execute({"INPUT0": np.zeros((6, 784), np.float32)}, ["OUTPUT0"])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    backend.unload()


def test_a_server_with_bound_models_answers_concurrent_grpc_clients(
    tmp_path: Path, start_server: ServerFactory
) -> None:
    import tritonclient.grpc as grpcclient

    repo = tmp_path / "repo"
    shutil.copytree(BUNDLED / "add_sub", repo / "add_sub")
    (repo / "add_sub" / "config.pbtxt").write_text(
        'name: "add_sub"\nmax_batch_size: 16\ndynamic_batching { max_queue_delay_microseconds: '
        '2000 }\nparameters { key: "io_binding" value: { string_value: "true" } }\n'
        "instance_group [ { kind: KIND_CPU } ]\n"
    )
    server = start_server(repo)
    client = grpcclient.InferenceServerClient(server.grpc_url)
    rng = np.random.default_rng(5)
    pairs = [(rng.standard_normal((1, 16), np.float32), rng.standard_normal((1, 16), np.float32))
             for _ in range(128)]
    results: list[object] = [None] * len(pairs)
    finished = threading.Semaphore(0)  # the callbacks run on the client's threads

    def callback(index: int) -> object:
        def store(result: object, error: object) -> None:
            results[index] = error if error is not None else result
            finished.release()
        return store

    for index, (a, b) in enumerate(pairs):
        inputs = [grpcclient.InferInput("INPUT0", [1, 16], "FP32"),
                  grpcclient.InferInput("INPUT1", [1, 16], "FP32")]
        inputs[0].set_data_from_numpy(a)
        inputs[1].set_data_from_numpy(b)
        client.async_infer("add_sub", inputs, callback(index))
    for _ in pairs:
        assert finished.acquire(timeout=30)
    for (a, b), result in zip(pairs, results, strict=True):
        assert not isinstance(result, Exception), result
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)  # type: ignore[attr-defined]
        np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)  # type: ignore[attr-defined]
    stats = client.get_inference_statistics("add_sub", as_json=True)["model_stats"][0]
    assert int(stats["execution_count"]) < len(pairs)  # batches formed
    client.close()
    assert "model 'add_sub' instance 0 on CPUExecutionProvider with I/O binding" in server.log()


def test_host_buffers_grow_and_know_their_own_views() -> None:
    buffer = HostBuffer(pinned=False)
    small = buffer.view(np.dtype(np.float32), (4, 3))
    assert buffer.holds(small) and buffer.capacity == 48
    large = buffer.view(np.dtype(np.int64), (100,))
    assert buffer.capacity == 800 and buffer.holds(large)
    assert not buffer.holds(np.zeros(3))
    large[:] = 7
    assert buffer.view(np.dtype(np.int64), (2,)).tolist() == [7, 7]  # same memory, no growth
    buffer.release()
    assert buffer.capacity == 0


@pytest.mark.skipif(gpus.visible_gpus() > 0, reason="checks a host without a usable GPU")
def test_without_a_usable_gpu_pinned_memory_is_declined_with_the_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No CUDA runtime, or one without a driver (this development VM has CUDA 13's runtime
    and no GPU): either way a CudaError names the call, and I/O binding stays pageable."""
    caplog.set_level(logging.INFO, logger="server.backends.buffers")
    assert not pinned_memory_works(0)
    assert "pinned host memory is not available" in caplog.text
    if _cudart.available():
        with pytest.raises(_cudart.CudaError, match=r"cudaSetDevice failed: .+ \(cudaError \d+\)"):
            _cudart.set_device(0)
