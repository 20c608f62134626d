"""One instance's ONNX Runtime session for a ProviderPlan, checked to run where it was asked.

ONNX Runtime's Python API would hide a GPU that did not come up: a session whose EP fails is
retried on the CPU (behind TensorRT: on a CUDA EP without the plan's options and device_id),
with the error printed to stdout; and a CUDA EP whose library does not load (no driver, no
cuBLAS or cuDNN) leaves the session on the CPU with only a log line. Its fallback is turned off
here, and instead:

* TensorRT that does not come up (libnvinfer missing or of another major): one warning and the
  same plan without TensorRT, so the CUDA EP keeps its options and device;
* a CUDA EP that does not come up: KIND_GPU fails the load with ONNX Runtime's reason, any
  other kind (KIND_AUTO) warns and runs on the CPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import logging
from pathlib import Path
from typing import Any

from server.backends.ort_providers import CUDA, TENSORRT, ProviderPlan
from server.model_config import ConfigError, ModelSpec

log = logging.getLogger(__name__)

_PROVIDER_LIBRARIES = {
    CUDA: "libonnxruntime_providers_cuda.so",
    TENSORRT: "libonnxruntime_providers_tensorrt.so",
}


class _NotUp(Exception):
    """The plan's first execution provider did not come up (the message says why)."""


def create_session(
    ort: Any, path: Path, options: Any, plan: ProviderPlan, spec: ModelSpec, instance: int
) -> tuple[Any, ProviderPlan]:
    """The session and the plan it runs on (`plan`, or the fallback taken)."""
    if plan.on_gpu:
        _preload_cuda_libraries(ort)
    try:
        return _open(ort, path, options, plan), plan
    except _NotUp as exc:
        failed = exc
    where = f"model '{spec.name}' instance {instance}"
    if plan.names[0] == TENSORRT:
        plan = plan.without(TENSORRT)
        log.warning("%s: the TensorRT EP did not come up (%s), running on the CUDA EP", where,
                    failed)
        try:
            return _open(ort, path, options, plan), plan
        except _NotUp as exc:
            failed = exc
    if spec.instance_kind == "KIND_GPU":
        device = plan.providers[0][1].get("device_id", "0")
        raise ConfigError(
            f"model '{spec.name}': instance_group kind KIND_GPU, but ONNX Runtime's {CUDA} did "
            f"not come up on GPU {device}: {failed}"
        )
    log.warning("%s: the CUDA EP did not come up (%s), running on the CPU", where, failed)
    plan = plan.on_cpu()
    return _open(ort, path, options, plan), plan


def _open(ort: Any, path: Path, options: Any, plan: ProviderPlan) -> Any:
    """The session, or _NotUp when the plan's first (GPU) provider is not in it."""
    try:
        session = ort.InferenceSession(
            str(path), options, providers=plan.names,
            provider_options=[o for _, o in plan.providers], enable_fallback=0,
        )
    except Exception as exc:  # ONNX Runtime's Fail, EPFail, RuntimeError...
        if not plan.on_gpu:
            raise
        raise _NotUp(_reason(exc)) from None
    first = plan.names[0]
    if first not in session.get_providers():
        raise _NotUp(_library_error(ort, first))
    return session


# where the useful part of ONNX Runtime's message starts (after its source file, function
# signature and status code)
_REASON_STARTS = ("CUDA failure", "Please install", "Invalid TensorRT EP option", "[ERROR]",
                  "FAIL : ")


def _reason(exc: Exception) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    for marker in _REASON_STARTS:
        at = text.rfind(marker)
        if at >= 0:
            text = text[at:].removeprefix("FAIL : ")
            break
    return text.split(" ; GPU=")[0][:400]


def _library_error(ort: Any, provider: str) -> str:
    """Why ONNX Runtime dropped `provider` silently: its library's load error, if any."""
    library = Path(ort.__file__).parent / "capi" / _PROVIDER_LIBRARIES.get(provider, "")
    try:
        ctypes.CDLL(str(library))
    except OSError as exc:
        return f"{library.name} does not load: {exc}"
    return f"ONNX Runtime left {provider} out of the session (see its log)"


@functools.cache
def _preload_cuda_libraries(ort: Any) -> None:
    """Load CUDA and cuDNN from NVIDIA's pip wheels (onnxruntime-gpu[cuda,cudnn]) where the
    loader would not find them; ONNX Runtime's own helper (1.21+) prints, so it is logged."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        try:
            preload()
        except Exception as exc:  # a helper that cannot find its folders
            print(exc)
    if printed.getvalue().strip():
        log.info("onnxruntime.preload_dlls: %s", " ".join(printed.getvalue().split()))
