"""`tachyon optimize`: each target writes the next version of a real model (the digits
classifier) that a running `tachyon serve` picks up and answers from; the report carries the
figures; refusals name what is wrong and leave the repository as it was; the bundled int8
digits meets the issue's targets."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from server import cli
from server.optimize import OptimizeError, Request, optimize
from tests.conftest import BUNDLED, ROOT, ServerFactory, tachyon_command, wait_for

sys.path.insert(0, str(ROOT / "tools"))
from make_models import digits_split, write_digits_data

TIMING = ["--timing-runs", "3"]  # the figures are the report's business, not this test's


@pytest.fixture(scope="module")
def digits_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_digits_data(tmp_path_factory.mktemp("digits_data"))


def digits_repository(root: Path, config_text: str | None = None) -> Path:
    """A repository with digits version 1 only (and its config, or `config_text`)."""
    model = root / "digits"
    (model / "1").mkdir(parents=True)
    shutil.copy(BUNDLED / "digits" / "1" / "model.onnx", model / "1" / "model.onnx")
    text = config_text or (BUNDLED / "digits" / "config.pbtxt").read_text()
    (model / "config.pbtxt").write_text(text)
    return root


def run_optimize(*args: str) -> subprocess.CompletedProcess[str]:
    """The `tachyon optimize` command, in its own process."""
    return subprocess.run([*tachyon_command(), "optimize", *args], capture_output=True,
                          text=True, timeout=180)


def main_optimize(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """The same command through `server.cli.main` in this process (no interpreter start and
    no imports to pay for): exit code, stdout, stderr."""
    code = cli.main(["optimize", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def sample() -> tuple[np.ndarray, list[int]]:
    found = json.loads((BUNDLED / "digits" / "sample.json").read_text())
    tensor = found["request"]["inputs"][0]
    return np.array(tensor["data"], np.float32).reshape(tensor["shape"]), found["labels"]


def infer(url: str, version: str) -> tuple[np.ndarray, np.ndarray, str]:
    x, _ = sample()
    client = grpcclient.InferenceServerClient(url)
    tensor = grpcclient.InferInput("INPUT", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer("digits", [tensor], model_version=version)
    response = result.get_response()
    return result.as_numpy("LABEL"), result.as_numpy("PROBABILITIES"), response.model_version


def in_process(path: Path) -> tuple[np.ndarray, np.ndarray]:
    x, _ = sample()
    label, probabilities = ort.InferenceSession(str(path)).run(None, {"INPUT": x})
    return label, probabilities


def assert_serves(url: str, version_dir: Path) -> None:
    """The server answers from the new version exactly as ONNX Runtime does in-process."""
    label, probabilities, served = infer(url, version_dir.name)
    want_label, want_probabilities = in_process(version_dir / "model.onnx")
    assert served == version_dir.name
    assert label[:, 0].tolist() == sample()[1]  # [2, 0, 4, 9]
    np.testing.assert_array_equal(label, want_label)
    np.testing.assert_allclose(probabilities, want_probabilities, rtol=1e-5, atol=1e-6)


def assert_report(version_dir: Path, target: str, source_version: int, labelled: bool) -> None:
    for name in ("report.md", "report.png", "report.json"):
        assert (version_dir / name).stat().st_size > 0, name
    assert (version_dir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    raw = json.loads((version_dir / "report.json").read_text())
    assert raw["target"] == target and raw["source_version"] == source_version
    assert raw["size_bytes"]["target"] == (version_dir / "model.onnx").stat().st_size
    assert raw["size_bytes"]["source"] == (BUNDLED / "digits" / "1" / "model.onnx").stat().st_size
    assert raw["latency"]["source"]["batch"] == 1 and raw["throughput"]["target"]["batch"] == 32
    assert raw["latency"]["target"]["median_s"] > 0 and raw["latency_speedup"] > 0
    assert [a["output"] for a in raw["agreement"]] == ["LABEL", "PROBABILITIES"]
    markdown = (version_dir / "report.md").read_text()
    assert "optimize --repository" in markdown and f"--to {target}" in markdown
    assert f"{raw['size_ratio']:.2f}x" in markdown and "latency, batch 1" in markdown
    assert "throughput, batch 32" in markdown
    if labelled:
        assert raw["accuracy"]["output"] == "LABEL" and raw["rows"] == 450
        assert abs(raw["accuracy"]["target"] - raw["accuracy"]["source"]) <= 0.01
        assert "accuracy (LABEL, 450 labelled rows)" in markdown
    else:
        assert raw["accuracy"] is None and raw["generated_data"]
        assert "No --validation data was given" in markdown


def test_every_target_is_picked_up_by_a_polling_server(
    start_server: ServerFactory, tmp_path: Path, digits_data: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    calibration, validation = digits_data
    repo = digits_repository(tmp_path)
    server = start_server(repo, "--model-control-mode", "poll", "--repository-poll-secs", "0.2")
    client = httpclient.InferenceServerClient(server.http_url)
    runs = [
        ("int8-static", ["--calibration", str(calibration), "--validation", str(validation)]),
        ("fp16", ["--from-version", "1"]),  # agreement on generated rows
        ("int8-dynamic", ["--from-version", "1", "--validation", str(validation)]),
    ]
    for number, (target, extra) in enumerate(runs, start=2):
        args = ["--repository", str(repo), "--model", "digits", "--to", target, *extra, *TIMING]
        if number == 2:  # the real command once; then in this process, to keep the test short
            done = run_optimize(*args)
            code, out, err = done.returncode, done.stdout, done.stderr
        else:
            code, out, err = main_optimize(capsys, *args)
        assert code == 0, err
        assert f"version {number} ({target} of version 1)" in out
        assert "poll mode picks" in out
        version_dir = repo / "digits" / str(number)
        wait_for(lambda n=number: client.is_model_ready("digits", str(n)),
                 f"digits version {number} ready")
        assert_serves(server.grpc_url, version_dir)
        assert_report(version_dir, target, 1, labelled=target != "fp16")
    assert sorted(p.name for p in (repo / "digits").iterdir()) == [
        "1", "2", "3", "4", "config.pbtxt"]
    assert not [p for p in repo.iterdir() if p.name.startswith(".")]  # no staging left


def test_explicit_mode_serves_it_after_a_load_request(
    start_server: ServerFactory, tmp_path: Path, digits_data: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    repo = digits_repository(tmp_path)
    server = start_server(repo, "--model-control-mode", "explicit", "--load-model", "digits")
    code, out, err = main_optimize(capsys, "--repository", str(repo), "--model", "digits",
                                   "--to", "int8-static", "--calibration", str(digits_data[0]),
                                   *TIMING)
    assert code == 0, err
    assert "explicit mode after a load request" in out
    client = grpcclient.InferenceServerClient(server.grpc_url)
    assert not client.is_model_ready("digits", "2")
    client.load_model("digits")
    assert client.is_model_ready("digits", "2") and client.is_model_ready("digits", "1")
    assert_serves(server.grpc_url, repo / "digits" / "2")


SPECIFIC = (BUNDLED / "digits" / "config.pbtxt").read_text().replace(
    "version_policy: { all { } }", "version_policy: { specific { versions: [ 1 ] } }")


def test_a_policy_that_would_not_serve_it_is_said_and_left_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = digits_repository(tmp_path, SPECIFIC)
    config = repo / "digits" / "config.pbtxt"
    code, out, err = main_optimize(capsys, "--repository", str(repo), "--model", "digits",
                                   "--to", "int8-dynamic", *TIMING)
    assert code == 0, err
    assert "does not serve version 2; config.pbtxt is unchanged" in out
    assert "--update-policy" in out
    assert config.read_text() == SPECIFIC
    code, out, err = main_optimize(capsys, "--repository", str(repo), "--model", "digits",
                                   "--to", "int8-dynamic", "--from-version", "1",
                                   "--update-policy", *TIMING)
    assert code == 0, err
    assert "added version 3 to the version_policy" in out
    assert "serves versions [1, 3]" in out
    text = config.read_text()
    assert "versions: 1" in text and "versions: 3" in text and "versions: 2" not in text
    assert 'max_queue_delay_microseconds: 500' in text  # the rest of the config is kept


def _request(repo: Path, **changes: object) -> Request:
    fields: dict[str, object] = {
        "repository": repo, "model": "digits", "target": "int8-dynamic", "timing_runs": 2,
    }
    fields.update(changes)
    return Request(**fields)  # type: ignore[arg-type]


def _refused(request: Request, *fragments: str) -> None:
    repo = request.repository
    before = sorted(str(p.relative_to(repo)) for p in repo.rglob("*"))
    with pytest.raises(OptimizeError) as info:
        optimize(request)
    for fragment in fragments:
        assert fragment in info.value.message, info.value.message
    assert sorted(str(p.relative_to(repo)) for p in repo.rglob("*")) == before


def test_an_existing_version_is_never_overwritten(tmp_path: Path) -> None:
    repo = digits_repository(tmp_path)
    _refused(_request(repo, version=1), "--version 1", "version 1 exists",
             "never overwrites", "omit --version to write 2")
    _refused(_request(repo, from_version=5), "--from-version 5", "expected one of [1]")


def test_int8_static_without_calibration_is_refused(tmp_path: Path) -> None:
    _refused(_request(digits_repository(tmp_path), target="int8-static"),
             "--to int8-static needs --calibration DATA", "int8-dynamic")


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


BAD_DATA = [
    ({"IMAGE": np.zeros((4, 64), np.float32)}, "array 'IMAGE' is not an input",
     "expected input names ['INPUT']"),
    ({"INPUT": np.zeros((4, 63), np.float32)}, "input 'INPUT' has shape [4, 63]",
     "expected float32 [N, 64]"),
    ({"INPUT": np.zeros((4, 64))}, "input 'INPUT' has dtype float64", "expected float32 (FP32)"),
    ({"INPUT": np.zeros((4, 64), np.float32), "labels": np.zeros(3, np.int64)},
     "'labels' has dtype int64 and shape [3]", "integer class indices shaped [4]"),
    ({"INPUT": np.zeros((4, 64), np.float32), "labels": np.zeros(4, np.float32)},
     "'labels' has dtype float32", "integer class indices"),
    ({"labels": np.zeros(4, np.int64)}, "no array for input 'INPUT'", "float32 [N, 64]"),
    ({"INPUT": np.zeros((0, 64), np.float32)}, "0 rows", "at least 1"),
]


@pytest.mark.parametrize(("arrays", "first", "second"), BAD_DATA)
def test_bad_validation_data_names_the_field(
    tmp_path: Path, arrays: dict[str, np.ndarray], first: str, second: str
) -> None:
    repo = digits_repository(tmp_path / "repo")
    data = _npz(tmp_path / "bad.npz", **arrays)
    _refused(_request(repo, validation=data), f"--validation {data}", first, second)


def test_bad_calibration_data_and_files_are_refused(tmp_path: Path) -> None:
    repo = digits_repository(tmp_path / "repo")
    wide = _npz(tmp_path / "wide.npz", INPUT=np.zeros((4, 65), np.float32))
    _refused(_request(repo, target="int8-static", calibration=wide),
             f"--calibration {wide}", "shape [4, 65]")
    text = tmp_path / "data.txt"
    text.write_text("1 2 3")
    _refused(_request(repo, validation=text), "suffix '.txt'", "expected .npz or .npy")
    _refused(_request(repo, validation=tmp_path / "none.npz"), "does not exist")
    pickled = tmp_path / "objects.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    _refused(_request(repo, validation=pickled), "without Python objects")
    _refused(_request(repo, label_output="NOPE", validation=_npz(
        tmp_path / "ok.npz", INPUT=np.zeros((4, 64), np.float32), labels=np.zeros(4, np.int64))),
        "--label-output 'NOPE'", "['LABEL', 'PROBABILITIES']")


def test_a_npy_file_feeds_a_one_input_model(tmp_path: Path) -> None:
    repo = digits_repository(tmp_path / "repo")
    _, x_test, _, _ = digits_split()
    np.save(tmp_path / "rows.npy", x_test[:40])
    result = optimize(_request(repo, target="int8-static", calibration=tmp_path / "rows.npy",
                               validation=tmp_path / "rows.npy"))
    assert result.version == 2 and result.report.comparison.rows == 40
    assert result.report.comparison.accuracy is None  # a .npy carries no labels
    assert "rows.npy: 40 rows" in result.report.data_origin


def test_models_that_are_not_onnx_are_refused(tmp_path: Path) -> None:
    import faiss

    repo = tmp_path
    index = faiss.IndexFlatL2(4)
    index.add(np.eye(4, dtype=np.float32))
    (repo / "neighbours" / "1").mkdir(parents=True)
    faiss.write_index(index, str(repo / "neighbours" / "1" / "index.faiss"))
    (repo / "neighbours" / "config.pbtxt").write_text(textwrap.dedent("""\
        backend: "faiss"
        max_batch_size: 8
        input [ { name: "QUERY" data_type: TYPE_FP32 dims: [ 4 ] } ]
        output [ { name: "IDS" data_type: TYPE_INT64 dims: [ 2 ] } ]
        """))
    (repo / "pipeline" / "1").mkdir(parents=True)
    (repo / "pipeline" / "config.pbtxt").write_text('platform: "ensemble"\n')
    _refused(_request(repo, model="neighbours"), "model 'neighbours' has platform/backend 'faiss'",
             "expected an ONNX model")
    _refused(_request(repo, model="pipeline"), "model 'pipeline' has platform/backend 'ensemble'")
    _refused(_request(repo, model="nope"), "--model 'nope' is not in",
             "['neighbours', 'pipeline']")
    (repo / "words" / "1").mkdir(parents=True)
    (repo / "words" / "1" / "model.onnx").write_bytes(b"not onnx")
    _refused(_request(repo, model="words"), "cannot read", "model.onnx")


def test_the_command_line_exits_2_with_the_message(tmp_path: Path) -> None:
    repo = digits_repository(tmp_path)
    done = run_optimize("--repository", str(repo), "--model", "digits", "--to", "int8-static")
    assert done.returncode == 2
    assert done.stderr.startswith("tachyon optimize: error: --to int8-static needs --calibration")
    done = run_optimize("--repository", str(repo), "--model", "digits", "--to", "int4")
    assert done.returncode == 2 and "invalid choice: 'int4'" in done.stderr


def test_the_bundled_int8_digits_meets_the_targets() -> None:
    """Version 2 of the bundled digits (tools/make_models.py --digits-data, then the command in
    its report.md): accuracy within 1 point of version 1 on the held-out quarter, at most
    0.35x its size, and its report shows the measured speed ratio."""
    _, x_test, _, y_test = digits_split()
    folder = BUNDLED / "digits"
    accuracy = {}
    for version in ("1", "2"):
        session = ort.InferenceSession(str(folder / version / "model.onnx"))
        label, _ = session.run(None, {"INPUT": x_test})
        accuracy[version] = float((label[:, 0] == y_test).mean())
    assert abs(accuracy["2"] - accuracy["1"]) <= 0.01, accuracy
    ratio = (folder / "2" / "model.onnx").stat().st_size / (folder / "1" / "model.onnx").stat(
    ).st_size
    assert ratio <= 0.35, ratio
    raw = json.loads((folder / "2" / "report.json").read_text())
    assert raw["target"].startswith("int8") and raw["size_ratio"] == pytest.approx(ratio)
    assert raw["accuracy"]["target"] == pytest.approx(accuracy["2"])
    markdown = (folder / "2" / "report.md").read_text()
    assert f"{raw['latency_speedup']:.2f}x" in markdown
    assert f"{raw['throughput_speedup']:.2f}x" in markdown
