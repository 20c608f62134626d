"""The few CUDA runtime calls the GPU backends make, through ctypes on libcudart.

Why not a binding package: cuda-python's major version must match the CUDA major, and
the backends need ten functions (pinned host memory, device memory, copies and a stream).
The runtime library is already in the process (ONNX Runtime GPU and TensorRT load it) or
comes with the `nvidia-cuda-runtime-cu12/13` wheels they depend on.

Every call raises CudaError naming the call and CUDA's message. The current device is per
thread in CUDA: call `set_device` on each thread that allocates, copies or launches.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

SONAMES = ("libcudart.so.13", "libcudart.so.12", "libcudart.so")
HOST_TO_DEVICE, DEVICE_TO_HOST = 1, 2
_HOST_ALLOC_PORTABLE = 1
_STREAM_NON_BLOCKING = 1


class CudaError(RuntimeError):
    pass


def _pip_runtime() -> list[Path]:
    """libcudart from NVIDIA's runtime wheels, if installed: nvidia-cuda-runtime (CUDA 13)
    puts it in nvidia/cu13/lib, nvidia-cuda-runtime-cu12 in nvidia/cuda_runtime/lib."""
    try:
        import nvidia  # the wheels' namespace package
    except ImportError:
        return []
    found: list[Path] = []
    for folder in nvidia.__path__:
        for wheel in ("cu13", "cuda_runtime"):
            found += sorted(Path(folder, wheel, "lib").glob("libcudart.so.*"))
    return found


@functools.cache
def library() -> ctypes.CDLL:
    """libcudart, or CudaError saying none loads."""
    for name in [*SONAMES, *map(str, _pip_runtime())]:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise CudaError(f"the CUDA runtime (one of {', '.join(SONAMES)}) does not load")


def available() -> bool:
    try:
        library()
    except CudaError:
        return False
    return True


def _check(call: str, status: int) -> None:
    if status != 0:
        lib = library()
        lib.cudaGetErrorString.restype = ctypes.c_char_p
        message = lib.cudaGetErrorString(ctypes.c_int(status)) or b"unknown error"
        raise CudaError(f"{call} failed: {message.decode()} (cudaError {status})")


def device_count() -> int:
    """The CUDA devices this process sees (CUDA_VISIBLE_DEVICES applied); CudaError without
    a driver or a device."""
    count = ctypes.c_int()
    _check("cudaGetDeviceCount", library().cudaGetDeviceCount(ctypes.byref(count)))
    return int(count.value)


def set_device(device: int) -> None:
    _check("cudaSetDevice", library().cudaSetDevice(ctypes.c_int(device)))


def host_alloc(size: int) -> int:
    """Page-locked host memory (portable across devices); free with `free_host`."""
    pointer = ctypes.c_void_p()
    status = library().cudaHostAlloc(
        ctypes.byref(pointer), ctypes.c_size_t(size), ctypes.c_uint(_HOST_ALLOC_PORTABLE)
    )
    _check(f"cudaHostAlloc({size})", status)
    return int(pointer.value or 0)


def free_host(pointer: int) -> None:
    _check("cudaFreeHost", library().cudaFreeHost(ctypes.c_void_p(pointer)))


def malloc(size: int) -> int:
    pointer = ctypes.c_void_p()
    status = library().cudaMalloc(ctypes.byref(pointer), ctypes.c_size_t(size))
    _check(f"cudaMalloc({size})", status)
    return int(pointer.value or 0)


def free(pointer: int) -> None:
    _check("cudaFree", library().cudaFree(ctypes.c_void_p(pointer)))


def memcpy_async(dst: int, src: int, size: int, kind: int, stream: int) -> None:
    status = library().cudaMemcpyAsync(
        ctypes.c_void_p(dst), ctypes.c_void_p(src), ctypes.c_size_t(size), ctypes.c_int(kind),
        ctypes.c_void_p(stream),
    )
    _check("cudaMemcpyAsync", status)


def stream_create() -> int:
    stream = ctypes.c_void_p()
    status = library().cudaStreamCreateWithFlags(
        ctypes.byref(stream), ctypes.c_uint(_STREAM_NON_BLOCKING)
    )
    _check("cudaStreamCreateWithFlags", status)
    return int(stream.value or 0)


def stream_synchronize(stream: int) -> None:
    _check("cudaStreamSynchronize", library().cudaStreamSynchronize(ctypes.c_void_p(stream)))


def stream_destroy(stream: int) -> None:
    _check("cudaStreamDestroy", library().cudaStreamDestroy(ctypes.c_void_p(stream)))


def mem_get_info() -> tuple[int, int]:
    """(free, total) bytes of the current device."""
    free_bytes, total = ctypes.c_size_t(), ctypes.c_size_t()
    status = library().cudaMemGetInfo(ctypes.byref(free_bytes), ctypes.byref(total))
    _check("cudaMemGetInfo", status)
    return int(free_bytes.value), int(total.value)
