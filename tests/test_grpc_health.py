"""The standard gRPC health service and server reflection, on both gRPC transports, through
grpcio's own health stubs and reflection client (what Kubernetes probes and grpcurl use)."""

from __future__ import annotations

import contextlib
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from tests.conftest import BUNDLED, RunningServer, ServerFactory, wait_for

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN

FRONTENDS = ["native", "grpcio"]


@pytest.fixture(scope="module", params=FRONTENDS)
def server(request: pytest.FixtureRequest, start_server: ServerFactory) -> RunningServer:
    return start_server(BUNDLED, "--grpc-frontend", request.param)


@pytest.fixture
def channel(server: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.grpc_url) as channel:
        yield channel


@pytest.mark.parametrize("service", ["", "inference.GRPCInferenceService"])
def test_check_is_serving_when_ready(channel: grpc.Channel, service: str) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    assert answer.status == SERVING


def test_check_of_an_unknown_service_is_not_found(channel: grpc.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no.such.Service" in (caught.value.details() or "")


def test_watch_of_an_unknown_service_says_service_unknown(channel: grpc.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    stream = stub.Watch(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
    assert next(stream).status == SERVICE_UNKNOWN
    stream.cancel()


def test_reflection_lists_and_describes_the_services(channel: grpc.Channel) -> None:
    database = ProtoReflectionDescriptorDatabase(channel)
    services = set(database.get_services())
    assert {
        "inference.GRPCInferenceService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= services
    pool = descriptor_pool.DescriptorPool(database)
    service = pool.FindServiceByName("inference.GRPCInferenceService")
    infer = service.methods_by_name["ModelInfer"]
    assert infer.input_type.full_name == "inference.ModelInferRequest"
    assert "raw_input_contents" in infer.input_type.fields_by_name
    config = pool.FindMessageTypeByName("inference.ModelConfig")
    assert "dynamic_batching" in config.fields_by_name


def test_reflection_v1_answers_like_v1alpha(channel: grpc.Channel) -> None:
    """grpcurl asks grpc.reflection.v1 first; its messages are v1alpha's on the wire."""
    from grpc_reflection.v1alpha import reflection_pb2

    call = channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    answers = list(call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                        timeout=10))
    assert len(answers) == 1
    names = {s.name for s in answers[0].list_services_response.service}
    assert "inference.GRPCInferenceService" in names


@pytest.mark.parametrize("frontend", FRONTENDS)
def test_watch_goes_not_serving_at_shutdown(
    frontend: str, start_server: ServerFactory, tmp_path: Path
) -> None:
    """A Watch stream gets SERVING, then NOT_SERVING as soon as SIGTERM arrives, and the server
    still exits 0 (the stream does not hold the shutdown)."""
    repository = tmp_path / "repo"
    repository.mkdir()
    shutil.copytree(BUNDLED / "identity_fp32", repository / "identity_fp32")
    server = start_server(repository, "--grpc-frontend", frontend)
    seen: list[int] = []
    with grpc.insecure_channel(server.grpc_url) as channel:
        stream = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=30
        )

        def read() -> None:
            with contextlib.suppress(grpc.RpcError):  # the stream may end with the server
                for answer in stream:
                    seen.append(answer.status)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        wait_for(lambda: seen == [SERVING], "the first Watch answer")
        assert server.stop() == 0
        reader.join(10)
        assert seen[:2] == [SERVING, NOT_SERVING], seen
