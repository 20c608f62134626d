"""The grpc.aio front end (`--grpc-frontend grpcio`), now the fallback, keeps working: every
bundled model's inference, a bad request, and a stream, through the unmodified tritonclient."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.conftest import BUNDLED, RunningServer, ServerFactory
from tests.test_e2e_infer import assert_outputs, cases, datatype_of


@pytest.fixture(scope="module")
def grpcio_server(start_server: ServerFactory) -> RunningServer:
    return start_server(BUNDLED, "--grpc-frontend", "grpcio")


@pytest.mark.parametrize(("model", "feed"), cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_grpcio_frontend_infers(
    grpcio_server: RunningServer, model: str, feed: dict[str, np.ndarray]
) -> None:
    client = grpcclient.InferenceServerClient(grpcio_server.grpc_url)
    inputs = []
    for name, array in feed.items():
        tensor = grpcclient.InferInput(name, list(array.shape), datatype_of(array))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    assert_outputs(model, feed, client.infer(model, inputs).as_numpy)


def test_grpcio_frontend_errors_and_streams(grpcio_server: RunningServer) -> None:
    client = grpcclient.InferenceServerClient(grpcio_server.grpc_url)
    bad = grpcclient.InferInput("INPUT0", [1, 16], "FP64")
    bad.set_data_from_numpy(np.zeros((1, 16), dtype=np.float64))
    with pytest.raises(InferenceServerException) as info:
        client.infer("identity_fp32", [bad])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "expected FP32" in (info.value.message() or "")
    results: list[object] = []
    client.start_stream(callback=lambda result, error: results.append(error or result))
    good = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
    good.set_data_from_numpy(np.ones((1, 16), dtype=np.float32))
    for _ in range(3):
        client.async_stream_infer("identity_fp32", [good])
    client.stop_stream()
    assert len(results) == 3 and all(isinstance(r, grpcclient.InferResult) for r in results)
