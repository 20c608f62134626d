"""Restricted APIs as Triton's `--grpc-restricted-protocol` / `--http-restricted-api`: parsing,
the group of every RPC and endpoint, and real servers refusing calls without the header (and
doing nothing: an unload without it leaves the model loaded) while other groups stay open. The
gRPC cases run on both front ends (native and grpcio)."""

from __future__ import annotations

import contextlib
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from starlette.routing import Route

from server import cli, proto
from server.grpc.health import HEALTH_SERVICE, REFLECTION_SERVICES
from server.grpc.restricted import by_native_method
from server.http.server import HttpApp
from server.restricted import (
    GROUPS,
    GRPC_HEADER_PREFIX,
    Restriction,
    RestrictionError,
    grpc_group,
    http_group,
    parse,
)
from tests.conftest import BUNDLED, RunningServer, ServerFactory

MODEL = "identity_fp32"
ADMIN = ("admin-key", "s3cret")
INFER = ("infer-key", "let-me-in")

# -- parsing ---------------------------------------------------------------------------------


def test_parse_groups_keys_and_values() -> None:
    restrictions = parse(
        ["model-repository,model-config:Admin-Key=s3cret", "inference:infer-key=a=b"],
        "--grpc-restricted-protocol", GRPC_HEADER_PREFIX,
    )
    admin = Restriction("triton-grpc-protocol-admin-key", "s3cret")
    assert dict(restrictions.by_group) == {
        "model-repository": admin, "model-config": admin,
        "inference": Restriction("triton-grpc-protocol-infer-key", "a=b"),
    }
    assert "health" not in restrictions and restrictions.get("health") is None
    http = parse(["health:X-Token=t"], "--http-restricted-api")
    assert http.get("health") == Restriction("x-token", "t")
    assert not parse([], "--http-restricted-api")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("inference", "expected <group>[,<group>...]:<key>=<value>"),
        ("inference:key", "expected <group>[,<group>...]:<key>=<value>"),
        ("inference:=v", "expected <group>[,<group>...]:<key>=<value>"),
        ("inference:k=", "expected <group>[,<group>...]:<key>=<value>"),
        (",inference:k=v", "expected <group>[,<group>...]:<key>=<value>"),
        ("infer:k=v", "unknown group 'infer', expected some of health, metadata, inference"),
        ("health:bad key=v", "key 'bad key' is not an HTTP header name"),
        ("health:k=caf\u00e9", "the value must be printable ASCII"),
    ],
)
def test_parse_refuses_malformed_values(value: str, expected: str) -> None:
    with pytest.raises(RestrictionError) as info:
        parse([value], "--http-restricted-api")
    assert str(info.value).startswith("--http-restricted-api=")
    assert expected in str(info.value)


def test_parse_refuses_a_group_in_two_restrictions_and_hides_the_value() -> None:
    with pytest.raises(RestrictionError) as info:
        parse(["health,inference:a=secret1", "inference:b=secret2"], "--http-restricted-api")
    assert "group 'inference' is already restricted" in str(info.value)
    assert "secret" not in str(info.value)


def test_grpc_keys_are_metadata_keys() -> None:
    with pytest.raises(RestrictionError, match="not a gRPC metadata key"):
        parse(["health:token-bin=v"], "--grpc-restricted-protocol", GRPC_HEADER_PREFIX)


def test_restriction_compares_the_exact_value() -> None:
    restriction = Restriction("k", "s3cret")
    assert restriction.allows("s3cret") and restriction.allows(b"s3cret")
    assert not any(restriction.allows(v) for v in (None, "", "s3cre", "s3cret ", "S3CRET"))


# -- the group of every RPC and endpoint -----------------------------------------------------


def test_every_grpc_method_has_its_triton_group() -> None:
    for name in proto.METHODS:
        assert grpc_group(proto.full_method_name(name)) in GROUPS, name
    expected = {
        "ServerLive": "health", "ModelReady": "health", "ServerMetadata": "metadata",
        "ModelMetadata": "metadata", "ModelInfer": "inference", "ModelStreamInfer": "inference",
        "ModelConfig": "model-config", "ModelStatistics": "statistics",
        "RepositoryIndex": "model-repository", "RepositoryModelUnload": "model-repository",
        "SystemSharedMemoryRegister": "shared-memory", "CudaSharedMemoryStatus": "shared-memory",
        "TraceSetting": "trace", "LogSettings": "logging",
    }
    assert {m: grpc_group(proto.full_method_name(m)) for m in expected} == expected
    assert grpc_group(f"/{HEALTH_SERVICE}/Check") == "health"
    for service in REFLECTION_SERVICES:
        assert grpc_group(f"/{service}/ServerReflectionInfo") == "metadata"
    assert grpc_group("/inference.GRPCInferenceService/Nope") is None


def test_native_method_names_map_to_their_restriction() -> None:
    admin, infer = Restriction("a", "1"), Restriction("b", "2")
    restrictions = parse(["model-repository:a=1", "health,metadata:b=2"],
                         "--grpc-restricted-protocol")
    by_method = by_native_method(restrictions)
    assert by_method["RepositoryModelUnload"] == admin
    assert by_method["ServerLive"] == by_method[f"{HEALTH_SERVICE}/Watch"] == infer
    for service in REFLECTION_SERVICES:
        assert by_method[f"{service}/ServerReflectionInfo"] == infer
    assert "ModelInfer" not in by_method  # inference stays open


def _filled(template: str) -> str:
    return template.replace("{model}", "m").replace("{version}", "3")


def test_every_http_route_has_a_group() -> None:
    """A new route without a group would be open under every restriction: this fails first."""
    app = HttpApp(None, 0).app  # type: ignore[arg-type]  # routes only, never called
    for route in app.routes:
        assert isinstance(route, Route)
        assert http_group(_filled(route.path)) in GROUPS, route.path


@pytest.mark.parametrize(
    ("path", "group"),
    [
        ("/v2/health/live", "health"), ("/v2/health/ready", "health"),
        ("/v2/models/m/ready", "health"), ("/v2/models/m/versions/2/ready", "health"),
        ("/v2", "metadata"), ("/v2/models/m", "metadata"), ("/v2/models/m/versions/2", "metadata"),
        ("/v2/models/m/infer", "inference"), ("/v2/models/m/versions/2/infer", "inference"),
        ("/v2/models/m/generate", "inference"), ("/v2/models/m/generate_stream", "inference"),
        ("/v2/models/m/config", "model-config"), ("/v2/models/stats", "statistics"),
        ("/v2/models/m/stats", "statistics"), ("/v2/models/m/versions/1/stats", "statistics"),
        ("/v2/repository/index", "model-repository"),
        ("/v2/repository/models/m/load", "model-repository"),
        ("/v2/repository/models/m/unload", "model-repository"),
        ("/v2/repository/models/m/unload/", "model-repository"),
        ("/v2/systemsharedmemory/status", "shared-memory"),
        ("/v2/cudasharedmemory/region/r/register", "shared-memory"),
        ("/v2/trace/setting", "trace"), ("/v2/models/m/trace/setting", "trace"),
        ("/v2/logging", "logging"),
        ("/metrics", None), ("/v2/nothing/here", None), ("/", None),
    ],
)
def test_http_paths_map_to_tritons_groups(path: str, group: str | None) -> None:
    assert http_group(path) == group


# -- gRPC against a real server --------------------------------------------------------------


@pytest.fixture(scope="module", params=["native", "grpcio"])
def grpc_restricted(start_server: ServerFactory, request: pytest.FixtureRequest) -> RunningServer:
    """Restricted gRPC on each front end."""
    return start_server(
        BUNDLED, "--grpc-frontend", request.param, "--model-control-mode", "explicit",
        "--load-model", MODEL,
        f"--grpc-restricted-protocol=model-repository,model-config:{ADMIN[0]}={ADMIN[1]}",
        f"--grpc-restricted-protocol=inference,health:{INFER[0]}={INFER[1]}",
    )


def _grpc_headers(pair: tuple[str, str]) -> dict[str, str]:
    return {GRPC_HEADER_PREFIX + pair[0]: pair[1]}


def _grpc_refusal(call: Any) -> str:
    with pytest.raises(grpcclient.InferenceServerException) as info:
        call()
    assert info.value.status() == "StatusCode.UNAVAILABLE"
    return str(info.value.message())


def _identity_input(module: Any) -> Any:
    tensor = module.InferInput("INPUT0", [1, 16], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 16), dtype=np.float32))
    return tensor


def test_grpc_unload_without_the_header_is_refused_and_does_nothing(
    grpc_restricted: RunningServer,
) -> None:
    client = grpcclient.InferenceServerClient(grpc_restricted.grpc_url)
    infer = _grpc_headers(INFER)
    message = _grpc_refusal(lambda: client.unload_model(MODEL))
    expected = "This protocol is restricted, expecting header 'triton-grpc-protocol-admin-key'"
    assert message == expected
    _grpc_refusal(lambda: client.unload_model(MODEL, headers=_grpc_headers((ADMIN[0], "wrong"))))
    _grpc_refusal(lambda: client.unload_model(MODEL, headers=infer))  # another group's header
    assert client.is_model_ready(MODEL, headers=infer)
    _grpc_refusal(lambda: client.get_model_config(MODEL))
    assert client.get_model_config(MODEL, headers=_grpc_headers(ADMIN), as_json=True)
    # unrestricted groups stay open
    assert client.get_model_metadata(MODEL).name == MODEL
    assert client.get_inference_statistics(MODEL).model_stats


def test_grpc_inference_and_health_need_their_header(grpc_restricted: RunningServer) -> None:
    client = grpcclient.InferenceServerClient(grpc_restricted.grpc_url)
    infer = _grpc_headers(INFER)
    _grpc_refusal(lambda: client.infer(MODEL, [_identity_input(grpcclient)]))
    result = client.infer(MODEL, [_identity_input(grpcclient)], headers=infer)
    assert result.as_numpy("OUTPUT0").shape == (1, 16)
    _grpc_refusal(client.is_server_live)
    assert client.is_server_live(headers=infer)
    # the streaming RPC is refused as a whole
    errors: list[object] = []
    client.start_stream(callback=lambda result, error: errors.append(error))
    # grpc.aio refuses on the stream's headers, maybe before the request is queued (the client
    # then says the stream failed); the native front end on its first message
    with contextlib.suppress(grpcclient.InferenceServerException):
        client.async_stream_infer(MODEL, [_identity_input(grpcclient)])
    client.stop_stream()
    assert len(errors) == 1 and "This protocol is restricted" in str(errors[0])
    # grpc.health.v1 is in the health group too, Check and (streaming) Watch
    with grpc.insecure_channel(grpc_restricted.grpc_url) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        metadata = list(infer.items())
        answer = stub.Check(health_pb2.HealthCheckRequest(), timeout=5, metadata=metadata)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            next(stub.Watch(health_pb2.HealthCheckRequest(), timeout=5))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "This protocol is restricted" in str(info.value.details())
        watch = stub.Watch(health_pb2.HealthCheckRequest(), timeout=5, metadata=metadata)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()


def test_grpc_unload_with_the_header_unloads(grpc_restricted: RunningServer) -> None:
    client = grpcclient.InferenceServerClient(grpc_restricted.grpc_url)
    client.unload_model(MODEL, headers=_grpc_headers(ADMIN))
    assert not client.is_model_ready(MODEL, headers=_grpc_headers(INFER))
    client.load_model(MODEL, headers=_grpc_headers(ADMIN))
    assert client.is_model_ready(MODEL, headers=_grpc_headers(INFER))


# -- HTTP against a real server --------------------------------------------------------------


@pytest.fixture(scope="module")
def http_restricted(start_server: ServerFactory) -> RunningServer:
    """Bound to every address, gRPC left open: the explicit-mode warning names gRPC only."""
    return start_server(
        BUNDLED, "--host", "0.0.0.0", "--grpc-frontend", "grpcio",
        "--model-control-mode", "explicit", "--load-model", MODEL,
        f"--http-restricted-api=model-repository:{ADMIN[0]}={ADMIN[1]}",
        f"--http-restricted-api=health,inference:{INFER[0]}={INFER[1]}",
        probe_headers=dict([INFER]),
    )


def _http(server: RunningServer, method: str, path: str, body: Any = None,
          headers: dict[str, str] | None = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://{server.http_url}{path}", data=data,
                                     method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            payload = response.read()
            return response.status, json.loads(payload) if payload else None
    except urllib.error.HTTPError as error:
        payload = error.read()
        return error.code, json.loads(payload) if payload else None


def test_http_unload_without_the_header_is_403_and_does_nothing(
    http_restricted: RunningServer,
) -> None:
    unload = f"/v2/repository/models/{MODEL}/unload"
    status, body = _http(http_restricted, "POST", unload)
    expected = {"error": "This API is restricted, expecting header 'admin-key'"}
    assert (status, body) == (403, expected)
    assert _http(http_restricted, "POST", unload, headers={ADMIN[0]: "nope"})[0] == 403
    assert _http(http_restricted, "POST", unload + "/")[0] == 403  # trailing slash, same group
    assert _http(http_restricted, "POST", "/v2/repository/index", {})[0] == 403
    ready = f"/v2/models/{MODEL}/ready"
    assert _http(http_restricted, "GET", ready)[0] == 403  # health is restricted too
    assert _http(http_restricted, "GET", ready, headers=dict([INFER]))[0] == 200
    # unrestricted groups stay open
    assert _http(http_restricted, "GET", f"/v2/models/{MODEL}")[0] == 200
    assert _http(http_restricted, "GET", f"/v2/models/{MODEL}/config")[0] == 200


def test_http_infer_needs_its_header_and_unload_with_header_unloads(
    http_restricted: RunningServer,
) -> None:
    body = {"inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32",
                        "data": [1.0] * 16}]}
    infer = f"/v2/models/{MODEL}/infer"
    assert _http(http_restricted, "POST", infer, body)[0] == 403
    status, answer = _http(http_restricted, "POST", infer, body, headers=dict([INFER]))
    assert status == 200 and answer["outputs"][0]["data"] == [1.0] * 16
    admin, repository = dict([ADMIN]), f"/v2/repository/models/{MODEL}"
    assert _http(http_restricted, "POST", f"{repository}/unload", {}, admin)[0] == 200
    ready = f"/v2/models/{MODEL}/ready"
    assert _http(http_restricted, "GET", ready, headers=dict([INFER]))[0] != 200
    assert _http(http_restricted, "POST", f"{repository}/load", {}, admin)[0] == 200
    assert _http(http_restricted, "GET", ready, headers=dict([INFER]))[0] == 200


def test_explicit_mode_on_a_network_address_warns_of_open_model_control(
    http_restricted: RunningServer,
) -> None:
    log = http_restricted.log()
    assert "--model-control-mode explicit on 0.0.0.0: any client that reaches gRPC" in log
    assert "reaches HTTP" not in log  # HTTP restricts model-repository


def test_loopback_explicit_mode_does_not_warn(grpc_restricted: RunningServer) -> None:
    assert "--model-control-mode explicit on" not in grpc_restricted.log()


# -- refused at start ------------------------------------------------------------------------


def test_malformed_restriction_is_refused_at_start(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code = cli.main(["serve", "--model-repository", str(tmp_path),
                     "--http-restricted-api=everything:k=v"])
    assert code == 2
    assert "--http-restricted-api=everything:k=...: unknown group 'everything'" in (
        capsys.readouterr().err
    )
