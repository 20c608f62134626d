"""`tachyon bench tune` against a real `tachyon serve` and the bundled identity_fp32 ONNX model:
a short brute search writes the best config as a new version that a real server loads and
answers with, the written config is the report's own best trial under the budget, an
impossible budget exits 1 and writes no config, and bad input is refused. The hill-climbing
search is checked on a fixed landscape."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from server import model_config
from server.bench.tune import Space, Trial, TrialConfig, best, brute, candidate, quick
from tests.conftest import BUNDLED, ROOT, ServerFactory

MODEL = "identity_fp32"


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """identity_fp32 with a poor config of its own: every batch waits 100 ms for company."""
    root = tmp_path / "repo"
    shutil.copytree(BUNDLED / MODEL, root / MODEL)
    config = root / MODEL / "config.pbtxt"
    text = config.read_text()
    assert "dynamic_batching { }" in text
    config.write_text(text.replace("dynamic_batching { }",
                                   "dynamic_batching { max_queue_delay_microseconds: 100000 }"))
    return root


def tune(
    repo: Path, out: Path, *extra: str, seconds: float = 0.6
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server.cli", "bench", "tune", "--repository", str(repo),
         "--model", MODEL, "--out", str(out), "--concurrency", "4", "--duration-s", str(seconds),
         "--warmup-s", str(seconds / 3), "--no-progress", *extra],
        capture_output=True, text=True, timeout=180, cwd=ROOT,
    )


SMALL_SPACE = ("--max-batch-size", "1,16", "--max-queue-delay-us", "0,1000", "--instances", "1",
               "--threads", "1", "--search", "brute")


def test_the_best_config_under_budget_is_written_and_serves(
    repo: Path, tmp_path: Path, start_server: ServerFactory
) -> None:
    original = (repo / MODEL / "config.pbtxt").read_text()
    out = tmp_path / "report"
    # over HTTP: the native gRPC path coalesces concurrent requests before the batcher, which
    # then has nothing to wait for
    result = tune(repo, out, "--p99-ms", "60", "--protocol", "http", *SMALL_SPACE)
    assert result.returncode == 0, result.stderr + result.stdout
    trials = json.loads((out / "trials.json").read_text())["trials"]
    assert len(trials) == 5 and all(not t["failure"] and t["errors"] == 0 for t in trials)
    own = trials[0]
    assert own["own_config"] and own["delay_us"] == 100_000 and own["p99_ms"] > 60
    within = [t for t in trials if t["p99_ms"] <= 60]
    top = max(within, key=lambda t: t["infer_per_s"])
    assert [t["best"] for t in trials].count(True) == 1 and top["best"]
    # the new version: the same model file, the best config
    written = model_config.read_config(repo / MODEL)
    assert written is not None
    assert written.max_batch_size == top["max_batch_size"]
    assert written.dynamic_batching.max_queue_delay_microseconds == top["delay_us"]
    assert written.instance_group[0].count == top["instances"]
    assert written.parameters["intra_op_thread_count"].string_value == str(top["threads"])
    assert (repo / MODEL / "2" / "model.onnx").read_bytes() == \
        (BUNDLED / MODEL / "1" / "model.onnx").read_bytes()
    assert (out / "config.pbtxt").read_text() == (repo / MODEL / "config.pbtxt").read_text()
    assert original != (repo / MODEL / "config.pbtxt").read_text()
    report = (out / "report.md").read_text()
    assert "**best**" in report and "p99 <= 60 ms" in report and "own config" in report
    assert "x the model's own config b64 d100000 i1" in result.stdout
    assert (out / "tune.png").read_bytes()[:4] == b"\x89PNG"
    # the written config loads and answers
    server = start_server(repo)
    client = grpcclient.InferenceServerClient(server.grpc_url)
    data = np.arange(16, dtype=np.float32).reshape(1, 16)
    tensor = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
    tensor.set_data_from_numpy(data)
    answer = client.infer(MODEL, [tensor])
    assert answer.get_response().model_version == "2"
    np.testing.assert_array_equal(answer.as_numpy("OUTPUT0"), data)


def test_an_impossible_budget_exits_1_and_writes_no_config(repo: Path, tmp_path: Path) -> None:
    before = sorted(p.name for p in (repo / MODEL).iterdir())
    config = (repo / MODEL / "config.pbtxt").read_text()
    out = tmp_path / "report"
    result = tune(repo, out, "--p99-ms", "0.001", "--max-batch-size", "8",
                  "--max-queue-delay-us", "0", "--instances", "1", "--threads", "1", seconds=0.3)
    assert result.returncode == 1, result.stderr
    assert "no config met p99 <= 0.001 ms at concurrency 4: the lowest p99 was" in result.stderr
    assert "no config written" in result.stderr
    assert sorted(p.name for p in (repo / MODEL).iterdir()) == before
    assert (repo / MODEL / "config.pbtxt").read_text() == config
    assert not (out / "config.pbtxt").exists()
    assert "no trial met p99 <= 0.001 ms" in (out / "report.md").read_text()


def test_output_writes_only_that_file(repo: Path, tmp_path: Path) -> None:
    target = tmp_path / "best" / "config.pbtxt"
    result = tune(repo, tmp_path / "report", "--p99-ms", "1000", "--output", str(target),
                  "--max-batch-size", "4", "--max-queue-delay-us", "100", "--instances", "2",
                  "--threads", "1", seconds=0.3)
    assert result.returncode == 0, result.stderr
    trials = json.loads((tmp_path / "report" / "trials.json").read_text())["trials"]
    (top,) = [t for t in trials if t["best"]]  # the candidate, or the model's own config
    parsed = model_config.parse_config(target.read_text(), MODEL)
    assert parsed.max_batch_size == top["max_batch_size"]
    assert parsed.instance_group[0].count == top["instances"]
    assert sorted(p.name for p in (repo / MODEL).iterdir()) == ["1", "config.pbtxt"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--model", "missing", "--p99-ms", "10"), "--model 'missing' is not in repository"),
        (("--model", MODEL, "--p99-ms", "0"), "--p99-ms 0.0 is invalid"),
        (("--model", MODEL, "--p99-ms", "10", "--instances", "0"), "--instances 0 is invalid"),
    ],
)
def test_bad_input_exits_2(repo: Path, tmp_path: Path, flags: tuple[str, ...],
                           message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "bench", "tune", "--repository", str(repo),
         "--out", str(tmp_path / "r"), *flags],
        capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 2 and message in result.stderr, result.stderr


# -- the search itself -------------------------------------------------------------------------


def landscape(config: TrialConfig) -> Trial:
    """Throughput grows with batch size, instances and threads; p99 with delay and batch."""
    threads = config.threads or 1
    throughput = 100.0 * config.max_batch_size ** 0.5 * config.instances * (0.9 + 0.1 * threads)
    p99 = 1.0 + config.delay_us / 100 + config.max_batch_size / 8
    return Trial(config, throughput, p99 / 2, p99)


def test_quick_search_climbs_to_the_brute_force_best_with_fewer_trials() -> None:
    space = Space((1, 8, 32, 64), (0, 500, 2000), (1, 2), (1, 2))
    everything = brute(space, landscape, 1000)
    assert len(everything) == 48
    want = best(everything, 9.0)
    found = quick(space, landscape, 1000, 9.0)
    assert want is not None and best(found, 9.0) == want
    assert len(found) < len(everything)
    assert want.config == TrialConfig(64, 0, 2, 2)


def test_candidate_sets_every_searched_field() -> None:
    base = model_config.parse_config((BUNDLED / "digits" / "config.pbtxt").read_text(), "digits")
    config = candidate(base, "onnxruntime", TrialConfig(16, 750, 3, 2))
    assert config.max_batch_size == 16 and config.instance_group[0].count == 3
    assert config.dynamic_batching.max_queue_delay_microseconds == 750
    assert config.parameters["intra_op_thread_count"].string_value == "2"
    assert len(config.input) == 1 and base.max_batch_size == 64  # the base is untouched
