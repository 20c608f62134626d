"""Entering the `tensorrt` package (the [tensorrt] extra) with its failures as ConfigErrors that
name the model (or command) and the cause, for the plan backend and `tachyon trt build`.

What the real package does that this handles (TensorRT 10.13 - 11.x):
* `import tensorrt` raises ImportError when libnvinfer / libnvonnxparser do not load (the
  bindings wheel is on PyPI, the libraries' wheel downloads from NVIDIA's own index);
* `trt.Runtime(logger)` and `trt.Builder(logger)` raise TypeError ("factory function returned
  nullptr") when CUDA does not start (no GPU, no driver), after logging the reason;
* TensorRT keeps the first logger it is given for the whole process, so there is one logger:
  it forwards to Python logging and keeps each thread's recent errors, so that a failed call
  can say what TensorRT said.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any

from server import extras
from server.backends import _cudart
from server.model_config import ConfigError

log = logging.getLogger("server.backends.tensorrt")

# TensorRT's ILogger.Severity values
INTERNAL_ERROR, ERROR, WARNING, INFO = 0, 1, 2, 3
_LEVELS = {INTERNAL_ERROR: logging.ERROR, ERROR: logging.ERROR, WARNING: logging.WARNING}
KEPT = 4  # recent messages kept per thread


class Recorder:
    """Each thread's last few TensorRT errors and warnings (TensorRT logs a failure on the
    thread whose call failed)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def _recent(self) -> deque[str]:
        recent: deque[str] | None = getattr(self._local, "recent", None)
        if recent is None:
            recent = self._local.recent = deque(maxlen=KEPT)
        return recent

    def record(self, severity: int, message: str) -> None:
        level = _LEVELS.get(severity)
        if level is None:
            return  # INFO and VERBOSE: neither logged nor kept
        log.log(level, "TensorRT: %s", message)
        self._recent().append(message.strip())

    def take(self) -> list[str]:
        """The calling thread's recorded messages, oldest first; forgets them."""
        recent = self._recent()
        taken = list(recent)
        recent.clear()
        return taken

    def reason(self, fallback: str) -> str:
        """What TensorRT said on this thread since the last `take`, else `fallback`."""
        return "; ".join(self.take()) or fallback


RECORDER = Recorder()
_LOGGER: Any = None
_LOGGER_LOCK = threading.Lock()


def import_tensorrt(what: str) -> Any:
    try:
        import tensorrt
    except ImportError as exc:
        raise ConfigError(extras.missing(what, "tensorrt", exc)) from None
    return tensorrt


def logger(trt: Any) -> Any:
    """The process's one TensorRT logger (an ILogger that records into RECORDER)."""
    global _LOGGER
    with _LOGGER_LOCK:
        if _LOGGER is None:

            class _Logger(trt.ILogger):
                def __init__(self) -> None:
                    trt.ILogger.__init__(self)

                def log(self, severity: Any, msg: str) -> None:
                    RECORDER.record(int(severity), msg)

            _LOGGER = _Logger()
        return _LOGGER


def use_device(where: str, device: int) -> None:
    """Make `device` current on this thread, or ConfigError naming CUDA's reason."""
    try:
        _cudart.set_device(device)
    except _cudart.CudaError as exc:
        raise ConfigError(f"{where}: TensorRT needs a CUDA GPU, but {exc}") from None


def create(trt: Any, kind: str, where: str) -> Any:
    """`trt.Runtime` or `trt.Builder` with the logger, or ConfigError with TensorRT's reason."""
    RECORDER.take()
    try:
        made = getattr(trt, kind)(logger(trt))
    except TypeError as exc:  # pybind11: "factory function returned nullptr"
        made, error = None, str(exc)
    else:
        error = "it returned nothing"
    if made is None:
        raise ConfigError(
            f"{where}: TensorRT {trt.__version__} could not create its {kind}: "
            f"{RECORDER.reason(error)} (expected a GPU and a driver that CUDA starts on)"
        )
    return made
