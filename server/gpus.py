"""What this host offers on the GPU side: how many GPUs a process sees, whether TensorRT's
libraries load, and per-process GPU memory (nvidia-ml-py). Nothing here needs a GPU to import.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# libnvinfer's sonames, newest first (TensorRT 10 is what ONNX Runtime 1.19+ links against)
NVINFER_SONAMES = ("libnvinfer.so.10", "libnvinfer.so.11", "libnvinfer.so")


def count_visible(cuda_visible_devices: str | None, physical: int) -> int:
    """GPUs a CUDA process sees: CUDA_VISIBLE_DEVICES when set (a list of indexes or UUIDs,
    cut at the first invalid entry as CUDA does), else every physical GPU."""
    if cuda_visible_devices is None:
        return physical
    seen = 0
    for entry in cuda_visible_devices.split(","):
        entry = entry.strip()
        if not entry or (entry.isdigit() and int(entry) >= physical) or entry.startswith("-"):
            break
        seen += 1
    return seen


def load_nvml() -> tuple[Any | None, str]:
    """(pynvml, initialised, and ''), or (None, why not: no nvidia-ml-py, no driver)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except ImportError:
        return None, "nvidia-ml-py is not installed"
    except Exception as exc:  # NVMLError: no driver, no library
        return None, f"NVML: {exc}"
    return pynvml, ""


def nvml() -> Any | None:
    """pynvml, initialised, or None without nvidia-ml-py or a driver."""
    return load_nvml()[0]


@functools.cache
def _gpu_count() -> tuple[int, str]:
    """(GPUs this process may use, why none when 0): NVML's count with CUDA_VISIBLE_DEVICES
    applied, else (no nvidia-ml-py, no NVML library) the CUDA runtime's."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    lib, nvml_says = load_nvml()
    if lib is not None:
        try:
            physical = int(lib.nvmlDeviceGetCount())
        except Exception as exc:  # NVMLError
            nvml_says = f"NVML: {exc}"
        else:
            visible = count_visible(listed, physical)
            return visible, f"NVML counts {physical} GPU(s), CUDA_VISIBLE_DEVICES={listed!r}"
    from server.backends import _cudart  # ctypes only: imports without CUDA

    try:
        count = _cudart.device_count()
    except _cudart.CudaError as exc:
        return 0, f"{nvml_says}; {exc}"
    return count, f"{nvml_says}; the CUDA runtime counts {count}"


def visible_gpus() -> int:
    """GPUs this process may use (0 without a driver); read once."""
    return _gpu_count()[0]


def no_gpu_reason() -> str:
    """Why `visible_gpus` is 0, in words (what NVML and the CUDA runtime said)."""
    return _gpu_count()[1]


def _pip_tensorrt_libs() -> list[Path]:
    """libnvinfer from the `tensorrt-cu12-libs` / `tensorrt-cu13-libs` wheels, if installed."""
    try:
        import tensorrt_libs  # the wheels' package that only holds the shared libraries
    except ImportError:
        return []
    folder = Path(next(iter(tensorrt_libs.__path__)))
    return sorted(folder.glob("libnvinfer.so.*"))


@functools.cache
def tensorrt_libraries() -> bool:
    """Whether libnvinfer loads. A pip-installed TensorRT is loaded globally here, so that
    ONNX Runtime's TensorRT EP (which dlopens it by soname) finds it."""
    for path in _pip_tensorrt_libs():
        try:
            ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        return True
    for soname in NVINFER_SONAMES:
        try:
            ctypes.CDLL(soname, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        return True
    return False


def process_gpu_memory(pid: int) -> int:
    """Bytes of GPU memory that process `pid` holds, over every GPU (NVML's per-process
    accounting); 0 when NVML is absent or the process holds none."""
    lib = nvml()
    if lib is None:
        return 0
    total = 0
    for index in range(lib.nvmlDeviceGetCount()):
        handle = lib.nvmlDeviceGetHandleByIndex(index)
        for process in lib.nvmlDeviceGetComputeRunningProcesses(handle):
            if process.pid == pid and process.usedGpuMemory is not None:
                total += int(process.usedGpuMemory)
    return total


def device_memory_used() -> int:
    """Bytes of GPU memory in use on every GPU, by anyone (NVML); 0 without NVML."""
    lib = nvml()
    if lib is None:
        return 0
    return sum(
        int(lib.nvmlDeviceGetMemoryInfo(lib.nvmlDeviceGetHandleByIndex(i)).used)
        for i in range(lib.nvmlDeviceGetCount())
    )
