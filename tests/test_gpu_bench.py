"""benchmarks/gpu_bench.py, the benchmark scripts/device-check runs on the GPU machine, runs
here in its CPU-only form with both of its clients: real servers, real load, and answers the
servers' statistics count as successes (a broken request frame or parse would show as gRPC
errors or a missing point). No figure is asserted: performance is the benchmark's to measure.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("client", ["h2load", "python"])
def test_the_device_benchmark_runs_its_cpu_half(client: str, tmp_path: Path) -> None:
    if client == "h2load" and shutil.which("h2load") is None:
        pytest.skip("needs h2load (Debian's nghttp2-client; scripts/setup --test installs it)")
    command = [sys.executable, "benchmarks/gpu_bench.py", "--cpu-only", "--seconds", "1",
               "--concurrency", "1,4", "--batches", "1", "--faiss-vectors", "2000",
               "--client", client, "--results", str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [report] = tmp_path.glob("gpu-dryrun-*.json")
    result = json.loads(report.read_text())
    assert result["client"].lower().startswith(client)
    for model in ("mlp_batch", "mlp_single"):
        points = result["KIND_CPU"][model]
        assert sorted(points) == ["1", "4"]
        for point in points.values():
            assert point["rps"] > 0
            assert point["grpc_errors"] == 0
            assert point["mean_batch_rows"] >= 1.0
    assert set(result["inprocess"]) == {"CPUExecutionProvider"}
    assert result["faiss"]["cpu"] > 0 and result["faiss"]["gpu"] is None
    assert (tmp_path / report.name.replace(".json", ".md")).read_text().startswith(
        "# GPU benchmark (CPU-only dry run")
