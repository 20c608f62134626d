"""The command line, the Dockerfile lint, and perf_analyzer against a real server."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import (
    ROOT,
    RunningServer,
    ServerFactory,
    assert_perf_analyzer_runs,
    tachyon_command,
)


def test_serve_help_reads_well() -> None:
    result = subprocess.run(
        [*tachyon_command(), "serve", "--help"], capture_output=True, text=True, check=True
    )
    for flag in ("--model-repository", "--http-port", "--grpc-port", "--metrics-port",
                 "--host", "--strict-model-config", "--model-control-mode"):
        assert flag in result.stdout
    assert re.search(r"gRPC port \(default:\s+8001\)", result.stdout)


def test_serve_refuses_a_missing_repository(tmp_path: Path) -> None:
    result = subprocess.run(
        [*tachyon_command(), "serve", "--model-repository", str(tmp_path / "nope")],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert "is not a directory" in result.stderr


def test_native_frontend_missing_from_the_build_is_refused(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from server import _native, cli

    monkeypatch.setattr(_native, "HAVE_GRPC_FRONTEND", False, raising=False)
    code = cli.main(["serve", "--model-repository", str(tmp_path), "--grpc-frontend", "native"])
    assert code == 2
    error = capsys.readouterr().err
    assert "--grpc-frontend native: this build of server._native has no native gRPC" in error
    assert "add --grpc-frontend grpcio" in error


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run(
        [hadolint, "--config", str(ROOT / ".hadolint.yaml"), str(ROOT / "Dockerfile")],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    text = (ROOT / "Dockerfile").read_text()
    assert "HEALTHCHECK" in text and "/v2/health/ready" in text
    assert re.search(r"^USER (?!root|0\b)", text, re.MULTILINE)
    assert "EXPOSE 8000 8001 8002" in text
    assert "[gpu]" in text


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_perf_analyzer_runs_without_errors(bundled: RunningServer, protocol: str) -> None:
    url = bundled.grpc_url if protocol == "grpc" else bundled.http_url
    assert_perf_analyzer_runs(url, protocol, concurrency=2)


def test_json_logs_carry_the_request_id(start_server: ServerFactory, tmp_path: Path) -> None:
    import json
    import shutil

    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    shutil.copytree(ROOT / "model_repository" / "identity_fp32", tmp_path / "identity_fp32")
    server = start_server(tmp_path, "--log-format", "json", "--log-verbose", "1")
    client = grpcclient.InferenceServerClient(server.grpc_url)
    bad = grpcclient.InferInput("INPUT0", [1, 15], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 15), dtype=np.float32))
    with pytest.raises(InferenceServerException):
        client.infer("identity_fp32", [bad], request_id="req-bad-42")
    good = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
    good.set_data_from_numpy(np.zeros((1, 16), dtype=np.float32))
    client.infer("identity_fp32", [good], request_id="req-good-7")
    server.stop()
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    assert lines and all({"time", "level", "logger", "message"} <= set(e) for e in lines)
    failed = [e for e in lines if e.get("request_id") == "req-bad-42"]
    assert len(failed) == 1 and "expected [-1, 16]" in failed[0]["message"]
    assert any(e.get("request_id") == "req-good-7" for e in lines)


def test_id_names_the_server_in_metadata(start_server: ServerFactory, tmp_path: Path) -> None:
    """Triton's --id: what ServerMetadata and GET /v2 call the server (Triton's client examples
    check for its default, 'triton')."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    repository = tmp_path / "repo"
    shutil.copytree(ROOT / "model_repository" / "identity_fp32", repository / "identity_fp32")
    server = start_server(repository, "--id", "triton")
    assert grpcclient.InferenceServerClient(server.grpc_url).get_server_metadata().name == "triton"
    assert httpclient.InferenceServerClient(server.http_url).get_server_metadata()["name"] == (
        "triton")
