"""What every benchmark script shares: the machine line, a `tachyon serve` it starts and stops,
and the peers' client (`../shared/bench/loadgen.py`) with its output parsed."""

from __future__ import annotations

import os
import platform
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import TracebackType

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "bench"
WORK = Path(os.environ.get("WORK", Path.home() / ".cache" / "tachyon-peers"))
LOADGEN = re.compile(
    r"infer/s=(?P<rps>[\d,]+) samples/s=(?P<sps>[\d,]+) p50_ms=(?P<p50>[\d.]+) "
    r"p99_ms=(?P<p99>[\d.]+) errors=(?P<err>\d+)"
)


def machine() -> str:
    return (f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus, "
            f"Python {platform.python_version()}, load average {os.getloadavg()[0]:.2f}")


def print_header() -> str:
    """Print the command and the machine; returns the machine line."""
    print("command:", " ".join([sys.executable, *sys.argv]))
    line = machine()
    print("machine:", line)
    return line


class Tachyon:
    """`tachyon serve` on a repository and fixed ports, ready on entry, stopped on exit."""

    def __init__(self, repository: Path, http: int, grpc: int, metrics: int,
                 *extra: str, ready_model: str = "") -> None:
        self.command = [str(ROOT / ".venv" / "bin" / "tachyon"), "serve", "--model-repository",
                        str(repository), "--host", "127.0.0.1", "--http-port", str(http),
                        "--grpc-port", str(grpc), "--metrics-port", str(metrics), *extra]
        path = f"/v2/models/{ready_model}/ready" if ready_model else "/v2/health/ready"
        self.ready_url = f"http://127.0.0.1:{http}{path}"

    def __enter__(self) -> Tachyon:
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.ready_url, timeout=1):
                    return self
            except OSError:
                if self.process.poll() is not None:
                    break
                time.sleep(0.1)
        self.__exit__(None, None, None)
        raise RuntimeError(f"tachyon did not become ready: {' '.join(self.command)}")

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(60)


def loadgen(url: str, model: str, shape: str, concurrency: int, seconds: float) -> dict[str, float]:
    """One closed-loop point with the peers' client; the numbers it printed."""
    command = [str(WORK / "v-client" / "bin" / "python"), str(SHARED / "loadgen.py"), "--url", url,
               "--model", model, "--shape", shape, "--concurrency", str(concurrency),
               "--seconds", str(seconds)]
    line = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()
    match = LOADGEN.search(line)
    if match is None:
        raise RuntimeError(f"unexpected loadgen output: {line}")
    return {"infer_per_s": float(match["rps"].replace(",", "")),
            "samples_per_s": float(match["sps"].replace(",", "")),
            "p50_ms": float(match["p50"]), "p99_ms": float(match["p99"]),
            "errors": float(match["err"]), "line": line}  # type: ignore[dict-item]
