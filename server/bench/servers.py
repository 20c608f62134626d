"""Servers a benchmark starts itself, on free loopback ports: `tachyon serve` on a scenario's
repository, and the peers that `../shared/bench/run-peers` knows (MLServer, Triton through
PyTriton), started the same way, from the venvs run-peers set up."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from server.bench.errors import BenchError
from server.bench.inputs import ModelInfo, TensorInfo

READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 20.0
PEER_MODELS = {"mlp_fp32": (784, 10), "identity_fp32": (16, 16)}  # name -> (in, out) dims
PEERS = ("tachyon", "mlserver", "triton")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def consecutive_free_ports(count: int) -> int:
    """The first of `count` consecutive free ports (PyTriton takes base, base+1, base+2)."""
    for _ in range(100):
        base = free_port()
        if base + count > 65535:
            continue
        with contextlib.ExitStack() as stack:
            try:
                for port in range(base + 1, base + count):
                    sock = stack.enter_context(socket.socket(socket.AF_INET,
                                                             socket.SOCK_STREAM))
                    sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return base
    raise BenchError(f"found no {count} consecutive free ports on 127.0.0.1")


class ManagedServer:
    """A server process in its own session: started, waited for (server and models ready over
    HTTP), and stopped with SIGTERM to its whole process group."""

    def __init__(self, name: str, command: Sequence[str], http_port: int, grpc_port: int,
                 models: Sequence[str], log_path: Path, cwd: Path | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.command = list(command)
        self.http_port = http_port
        self.grpc_port = grpc_port
        self.models = list(models)
        self.log_path = log_path
        self._cwd = cwd
        self._env = dict(env) if env is not None else None
        self._process: subprocess.Popen[bytes] | None = None
        self.headers: dict[str, dict[str, str]] = {"grpc": {}, "http": {}}
        """Per protocol, headers the control calls need (found once the server is ready)."""

    def url(self, protocol: str) -> str:
        return f"127.0.0.1:{self.grpc_port if protocol == 'grpc' else self.http_port}"

    def __enter__(self) -> ManagedServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self._process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                             cwd=self._cwd, env=self._env,
                                             start_new_session=True)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _ok(self, path: str) -> bool:
        url = f"http://127.0.0.1:{self.http_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return int(response.status) == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        assert self._process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self._process.poll()
            if code is not None:
                raise BenchError(f"{self.name} exited with status {code} before it was ready; "
                                 f"the end of {self.log_path}:\n{self.log_tail()}")
            if self._ok("/v2/health/ready") and all(
                    self._ok(f"/v2/models/{m}/ready") for m in self.models):
                self.headers = triton_access_headers(self._process.pid)
                return
            time.sleep(0.2)
        raise BenchError(f"{self.name} was not ready in {timeout:.0f} s; the end of "
                         f"{self.log_path}:\n{self.log_tail()}")

    def stop(self) -> None:
        process = self._process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def triton_access_headers(session: int) -> dict[str, dict[str, str]]:
    """The headers that open the APIs a tritonserver of this session restricts (PyTriton
    restricts statistics with a random access token, given on tritonserver's command line as
    `--grpc-restricted-protocol APIS:KEY=VALUE`; gRPC calls send it as
    `triton-grpc-protocol-KEY`)."""
    flags = {"--grpc-restricted-protocol": "grpc", "--http-restricted-api": "http"}
    headers: dict[str, dict[str, str]] = {"grpc": {}, "http": {}}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if os.getsid(int(proc.name)) != session:
                continue
            argv = [a.decode(errors="replace")
                    for a in (proc / "cmdline").read_bytes().split(b"\0")]
        except (OSError, ValueError):
            continue
        if not argv or not argv[0].endswith("tritonserver"):
            continue
        args = [part for a in argv[1:]
                for part in (a.split("=", 1) if a.startswith("--") else [a])]
        for flag, value in itertools.pairwise(args):
            _, _, pair = value.partition(":")
            key, _, token = pair.partition("=")
            if flag in flags and key and token:
                # gRPC metadata carries the key with Triton's protocol prefix
                prefix = "triton-grpc-protocol-" if flags[flag] == "grpc" else ""
                headers[flags[flag]][prefix + key] = token
    return headers


def tachyon(repository: Path, server_args: Sequence[str], models: Sequence[str],
            log_path: Path) -> ManagedServer:
    """`tachyon serve` (this interpreter's) on free ports."""
    http, grpc, metrics = free_ports(3)
    command = [sys.executable, "-m", "server.cli", "serve", "--model-repository",
               str(repository), "--host", "127.0.0.1", "--http-port", str(http),
               "--grpc-port", str(grpc), "--metrics-port", str(metrics), *server_args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return ManagedServer("tachyon serve", command, http, grpc, models, log_path, env=env)


# -- peers ---------------------------------------------------------------------------------


def default_work() -> Path:
    """run-peers' folder of venvs and models ($WORK, default ~/.cache/tachyon-peers)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return Path(os.environ.get("WORK", cache / "tachyon-peers"))


def default_kit() -> Path:
    """The shared peer benchmark kit (run-peers, mls_runtime.py, pytriton_serve.py)."""
    return Path(__file__).resolve().parents[3] / "shared" / "bench"


def _need(path: Path, what: str, kit: Path) -> Path:
    if not path.exists():
        raise BenchError(f"{what} {path} is missing: run {kit / 'run-peers'} once to set it up")
    return path


def peer_model_info(model: str) -> ModelInfo:
    """A peer model as run-peers' make_models.py builds it (INPUT0 -> OUTPUT0, FP32 [-1, d]),
    for servers whose metadata leaves the tensors out."""
    dim_in, dim_out = PEER_MODELS[model]
    return ModelInfo(model, "", (TensorInfo("INPUT0", "FP32", (-1, dim_in)),),
                     (TensorInfo("OUTPUT0", "FP32", (-1, dim_out)),), None)


def peer_model_file(work: Path, kit: Path, model: str) -> Path:
    return _need(work / "models" / model / "model.onnx", "the peers' model", kit)


def peer_repository(work: Path, kit: Path, folder: Path) -> Path:
    """The peers' models as a Tachyon repository, configured as run-peers configures it
    (max_batch_size 64, dynamic batching with a 2 ms queue delay)."""
    for model, (dim_in, dim_out) in PEER_MODELS.items():
        version = folder / model / "1"
        version.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(peer_model_file(work, kit, model), version / "model.onnx")
        (folder / model / "config.pbtxt").write_text(
            f'name: "{model}"\nbackend: "onnxruntime"\nmax_batch_size: 64\n'
            f'input [{{ name: "INPUT0" data_type: TYPE_FP32 dims: [{dim_in}] }}]\n'
            f'output [{{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [{dim_out}] }}]\n'
            "dynamic_batching { max_queue_delay_microseconds: 2000 }\n")
    return folder


def mlserver(work: Path, kit: Path, folder: Path, log_path: Path) -> ManagedServer:
    """MLServer with run-peers' settings: the ONNX Runtime runtime of mls_runtime.py, adaptive
    batching (32, 2 ms), parallel_workers 0."""
    binary = _need(work / "v-mlserver" / "bin" / "mlserver", "MLServer's venv", kit)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_need(kit / "mls_runtime.py", "the MLServer runtime", kit),
                    folder / "mls_runtime.py")
    for model in PEER_MODELS:
        (folder / model).mkdir(exist_ok=True)
        shutil.copyfile(peer_model_file(work, kit, model), folder / model / "model.onnx")
        (folder / model / "model-settings.json").write_text(
            f'{{"name":"{model}","implementation":"mls_runtime.OnnxRuntime",'
            '"parameters":{"uri":"./model.onnx"},"max_batch_size":32,"max_batch_time":0.002}\n')
    http, grpc, metrics = free_ports(3)
    (folder / "settings.json").write_text(
        f'{{"http_port":{http},"grpc_port":{grpc},"metrics_port":{metrics},'
        '"host":"127.0.0.1","parallel_workers":0}\n')
    return ManagedServer("MLServer", [str(binary), "start", "."], http, grpc, list(PEER_MODELS),
                         log_path, cwd=folder)


def triton(work: Path, kit: Path, log_path: Path) -> ManagedServer:
    """Triton through PyTriton (pytriton_serve.py: dynamic batching 64, 2 ms), with this venv's
    base Python library first on LD_LIBRARY_PATH, as run-peers does."""
    python = _need(work / "v-triton" / "bin" / "python", "PyTriton's venv", kit)
    script = _need(kit / "pytriton_serve.py", "the PyTriton server script", kit)
    for model in PEER_MODELS:
        peer_model_file(work, kit, model)
    libdir = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
        capture_output=True, text=True, check=True).stdout.strip()
    base = consecutive_free_ports(3)
    env = {**os.environ, "LD_LIBRARY_PATH": libdir}
    return ManagedServer("Triton (PyTriton)",
                         [str(python), str(script), str(work / "models"), str(base)],
                         base, base + 1, list(PEER_MODELS), log_path, env=env)
