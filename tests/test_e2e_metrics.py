"""Prometheus metrics, scraped by a real Prometheus (Debian's package) from a real server."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.conftest import BUNDLED, ROOT, RunningServer, ServerFactory, free_port

DASHBOARD = ROOT / "deploy" / "grafana" / "tachyon.json"


def scrape(server: RunningServer) -> str:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


class Prometheus:
    def __init__(self, port: int) -> None:
        self.port = port

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": expr}
        )
        with urllib.request.urlopen(url, timeout=10) as response:
            payload = json.loads(response.read())
        assert payload["status"] == "success", payload
        result: list[dict[str, Any]] = payload["data"]["result"]
        return result

    def value(self, expr: str) -> float:
        result = self.query(expr)
        assert len(result) == 1, (expr, result)
        return float(result[0]["value"][1])


@pytest.fixture(scope="module")
def served(start_server: ServerFactory, tmp_path_factory: pytest.TempPathFactory) -> RunningServer:
    repo = tmp_path_factory.mktemp("metrics_repo")
    for name in ("identity_fp32", "digits"):
        shutil.copytree(BUNDLED / name, repo / name)
    return start_server(repo, "--metrics-latency-buckets", "0.0005,0.001,0.005,0.01,0.1,1")


@pytest.fixture(scope="module")
def prometheus(
    served: RunningServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is not installed: run scripts/setup --test")
    folder = tmp_path_factory.mktemp("prometheus")
    config = folder / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: tachyon\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{served.metrics_port}']}}]\n"
    )
    port = free_port()
    with (folder / "log").open("wb") as log:
        process = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={folder / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=log,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise AssertionError((folder / "log").read_text()) from None
                time.sleep(0.2)
        yield Prometheus(port)
    finally:
        process.terminate()
        process.wait(30)


def wait_for_value(prom: Prometheus, expr: str, expected: float, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        result = prom.query(expr)
        if result and float(result[0]["value"][1]) == expected:
            return
        last = result
        time.sleep(0.5)
    raise AssertionError(f"{expr}: expected {expected}, Prometheus says {last}")


def test_prometheus_counts_exactly_what_was_sent(
    served: RunningServer, prometheus: Prometheus
) -> None:
    client = grpcclient.InferenceServerClient(served.grpc_url)
    good = grpcclient.InferInput("INPUT0", [2, 16], "FP32")
    good.set_data_from_numpy(np.ones((2, 16), dtype=np.float32))
    bad = grpcclient.InferInput("INPUT0", [1, 15], "FP32")
    bad.set_data_from_numpy(np.ones((1, 15), dtype=np.float32))
    for _ in range(7):
        client.infer("identity_fp32", [good])
    for _ in range(3):
        with pytest.raises(InferenceServerException):
            client.infer("identity_fp32", [bad])
    model = 'model="identity_fp32",version="1"'
    wait_for_value(prometheus, f"tachyon_inference_request_success_total{{{model}}}", 7)
    wait_for_value(prometheus, f"sum(tachyon_inference_request_failure_total{{{model}}})", 3)
    assert prometheus.value(
        f'tachyon_inference_request_failure_total{{{model},reason="other"}}'
    ) == 3
    assert prometheus.value(f"tachyon_inference_count_total{{{model}}}") == 14
    p50 = prometheus.value(
        f"histogram_quantile(0.5, sum by (le) (tachyon_request_duration_seconds_bucket{{{model}}}))"
    )
    assert 0 < p50 <= 1.0
    # ModelStatistics and the metrics agree
    stats = httpclient.InferenceServerClient(served.http_url).get_inference_statistics(
        "identity_fp32"
    )["model_stats"][0]
    assert stats["inference_stats"]["success"]["count"] == 7
    assert stats["inference_stats"]["fail"]["count"] == 3
    assert stats["execution_count"] == prometheus.value(
        f"tachyon_inference_exec_count_total{{{model}}}"
    )
    assert prometheus.value(f'tachyon_model_state{{{model},state="READY"}}') == 1


def test_promtool_accepts_the_exposition(served: RunningServer) -> None:
    promtool = shutil.which("promtool")
    assert promtool is not None, "promtool comes with Debian's prometheus package"
    result = subprocess.run([promtool, "check", "metrics"], input=scrape(served),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    text = scrape(served)
    assert 'le="0.0005"' in text  # the configured buckets
    assert "tachyon_server_uptime_seconds" in text


def test_every_dashboard_query_runs(served: RunningServer, prometheus: Prometheus) -> None:
    """Every panel's query runs without error; all but the GPU panel return data (this
    machine has no GPU, so the GPU series are absent)."""
    client = grpcclient.InferenceServerClient(served.grpc_url)
    tensor = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 16), dtype=np.float32))
    for _ in range(3):
        for _ in range(20):
            client.infer("identity_fp32", [tensor])
        time.sleep(1.1)  # rate() needs increases across scrapes
    with pytest.raises(InferenceServerException):
        bad = grpcclient.InferInput("INPUT0", [1, 16], "INT32")
        bad.set_data_from_numpy(np.zeros((1, 16), dtype=np.int32))
        client.infer("identity_fp32", [bad])
    time.sleep(2.5)
    dashboard = json.loads(DASHBOARD.read_text())
    checked = 0
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"].replace('model=~"$model"', 'model=~".*"')
            result = prometheus.query(expr)
            if "gpu" not in expr:
                assert result, f"panel '{panel['title']}': {expr} returned no data"
            checked += 1
    assert checked >= 12


def test_metrics_can_be_turned_off(start_server: ServerFactory, tmp_path: Path) -> None:
    shutil.copytree(BUNDLED / "identity_fp32", tmp_path / "identity_fp32")
    server = start_server(tmp_path, "--allow-metrics", "false")
    with pytest.raises(OSError):
        scrape(server)


def test_an_unloaded_version_leaves_no_series(start_server: ServerFactory, tmp_path: Path) -> None:
    """Loading and unloading models must not grow /metrics: an unloaded version's series go
    (counters, histograms, state and pending gauges)."""
    for name in ("identity_fp32", "digits"):
        shutil.copytree(BUNDLED / name, tmp_path / name)
    server = start_server(tmp_path, "--model-control-mode", "explicit", "--load-model", "*")
    client = grpcclient.InferenceServerClient(server.grpc_url)
    tensor = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 16), dtype=np.float32))
    client.infer("identity_fp32", [tensor])
    bad = grpcclient.InferInput("INPUT0", [1, 15], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 15), dtype=np.float32))
    with pytest.raises(InferenceServerException):
        client.infer("identity_fp32", [bad])
    series = 'model="identity_fp32"'
    text = scrape(server)
    assert 'tachyon_inference_request_success_total{model="identity_fp32",version="1"} 1.0' in text
    assert 'failure_total{model="identity_fp32",reason="other",version="1"} 1.0' in text
    client.unload_model("identity_fp32")
    text = scrape(server)
    assert series not in text, [line for line in text.splitlines() if series in line][:5]
    assert 'model="digits"' in text  # the others keep theirs
    client.load_model("identity_fp32")  # back, from zero
    client.infer("identity_fp32", [tensor])
    assert 'tachyon_inference_request_success_total{model="identity_fp32",version="1"} 1.0' in (
        scrape(server))
