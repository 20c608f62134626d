"""The connection flags (Triton's --reuse-grpc-port and keepalive flags, --grpc-max-connections)
reach both gRPC front ends, and a native I/O thread that dies makes the server not live and
stop with an error."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import grpc
import pytest

from server import _native, app, cli
from server.app import TachyonServer, TransportFailed
from server.config import GrpcConnections, ServerSettings
from server.grpc import native_frontend
from tests.conftest import ServerFactory, free_port
from tests.h2_wire import ENHANCE_YOUR_CALM, Wire

native_only = pytest.mark.skipif(
    not getattr(_native, "HAVE_GRPC_FRONTEND", False), reason="built without nghttp2"
)


def parse(*flags: str) -> GrpcConnections:
    args = cli.build_parser().parse_args(["serve", "--model-repository", ".", *flags])
    return cli._grpc_connections(args)


def test_defaults_are_tritons() -> None:
    assert parse() == GrpcConnections()
    assert GrpcConnections() == GrpcConnections(
        reuse_port=False, max_connections=10_000, keepalive_time_ms=7_200_000,
        keepalive_timeout_ms=20_000, keepalive_permit_without_calls=False,
        http2_max_pings_without_data=2, http2_min_recv_ping_interval_without_data_ms=300_000,
        http2_max_ping_strikes=2,
    )


def test_flags_set_every_field() -> None:
    assert parse(
        "--reuse-grpc-port", "true", "--grpc-max-connections", "7", "--grpc-keepalive-time",
        "1000", "--grpc-keepalive-timeout", "500", "--grpc-keepalive-permit-without-calls",
        "--grpc-http2-max-pings-without-data", "0",
        "--grpc-http2-min-recv-ping-interval-without-data", "10000",
        "--grpc-http2-max-ping-strikes", "5",
    ) == GrpcConnections(True, 7, 1000, 500, True, 0, 10_000, 5)


@pytest.mark.parametrize("flags", [("--grpc-keepalive-time", "0"),
                                   ("--grpc-max-connections", "-1"),
                                   ("--grpc-http2-max-ping-strikes", "x")])
def test_bad_values_are_refused(flags: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse(*flags)
    assert flags[0] in capsys.readouterr().err


def test_grpcio_gets_the_same_policy_as_channel_arguments() -> None:
    options = dict(GrpcConnections(reuse_port=True, keepalive_time_ms=1234).grpc_options())
    assert options["grpc.so_reuseport"] == 1
    assert options["grpc.keepalive_time_ms"] == 1234
    assert options["grpc.keepalive_timeout_ms"] == 20_000
    assert options["grpc.http2.min_ping_interval_without_data_ms"] == 300_000
    assert options["grpc.http2.max_ping_strikes"] == 2
    assert dict(GrpcConnections().grpc_options())["grpc.so_reuseport"] == 0


@native_only
@pytest.mark.parametrize("frontend", ["native", "grpcio"])
@pytest.mark.parametrize("reuse", [True, False])
def test_so_reuseport_only_with_reuse_grpc_port(
    frontend: str, reuse: bool, start_server: ServerFactory, tmp_path: Path
) -> None:
    repo = tmp_path / "empty"
    repo.mkdir()
    server = start_server(repo, "--grpc-frontend", frontend, "--model-control-mode", "explicit",
                          "--allow-metrics", "false", "--reuse-grpc-port", str(reuse).lower())
    with socket.socket() as other:  # binds beside it only if the server set SO_REUSEPORT too
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if reuse:
            other.bind(("127.0.0.1", server.grpc_port))
        else:
            with pytest.raises(OSError):
                other.bind(("127.0.0.1", server.grpc_port))


@native_only
def test_grpc_ping_strikes_follow_the_flags(start_server: ServerFactory, tmp_path: Path) -> None:
    repo = tmp_path / "empty"
    repo.mkdir()
    server = start_server(repo, "--grpc-frontend", "native", "--model-control-mode", "explicit",
                          "--allow-metrics", "false", "--grpc-http2-max-ping-strikes", "0")
    wire = Wire(server.grpc_port)
    wire.send(*[wire.ping(bytes([i]) * 8) for i in range(20)])
    wire.settle(0.5)
    assert not wire.goaways and not wire.closed  # 0: any number of pings
    wire.close()
    server = start_server(repo, "--grpc-frontend", "native", "--model-control-mode", "explicit",
                          "--allow-metrics", "false")
    wire = Wire(server.grpc_port)
    wire.send(*[wire.ping(bytes([i]) * 8) for i in range(20)])
    assert wire.wait_closed()
    assert [code for _, code, _ in wire.goaways] == [ENHANCE_YOUR_CALM]
    wire.close()


@native_only
def test_a_dead_io_thread_makes_the_server_not_live_and_stop_with_an_error(
    tmp_path: Path,
) -> None:
    settings = ServerSettings(
        model_repository=tmp_path, host="127.0.0.1", http_port=free_port(),
        grpc_port=free_port(), allow_metrics=False, model_control_mode="explicit",
        grpc_frontend="native", exit_timeout_secs=1.0,
    )
    tachyon = TachyonServer(settings)

    async def scenario() -> None:
        running = asyncio.get_running_loop().create_task(tachyon.run_until_signal())
        while not isinstance(tachyon.grpc, native_frontend.NativeGrpcServer):
            assert not running.done(), running
            await asyncio.sleep(0.05)
        assert tachyon.dataplane.live()
        tachyon.grpc.inject_failure("epoll_wait: injected")
        deadline = time.monotonic() + 10
        while tachyon.dataplane.live():
            assert time.monotonic() < deadline, "still live"
            await asyncio.sleep(0.01)
        with pytest.raises(TransportFailed, match="epoll_wait: injected"):
            await asyncio.wait_for(running, 20)

    asyncio.run(scenario())
    with pytest.raises(grpc.RpcError), grpc.insecure_channel(
        f"127.0.0.1:{settings.grpc_port}"
    ) as channel:
        channel.unary_unary("/inference.GRPCInferenceService/ServerLive")(b"", timeout=1)


def test_run_exits_non_zero_when_a_transport_failed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    async def failing(self: TachyonServer) -> None:
        raise TransportFailed("the I/O thread died")

    monkeypatch.setattr(TachyonServer, "run_until_signal", failing)
    with pytest.raises(SystemExit) as exited:
        app.run(ServerSettings(model_repository=tmp_path))
    assert exited.value.code == 1

