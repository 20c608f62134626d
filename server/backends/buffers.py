"""Buffers for the GPU backends: growable host buffers, page-locked (pinned) when a CUDA
runtime is there so that host<->device copies run at full speed and asynchronously, and
growable device buffers. Each belongs to one instance and is used by its thread only."""

from __future__ import annotations

import ctypes
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from server.backends import _cudart
from server.types import Array

log = logging.getLogger(__name__)


class HostBuffer:
    """A growable host buffer; page-locked (cudaHostAlloc) when `pinned`."""

    def __init__(self, pinned: bool) -> None:
        self.pinned = pinned
        self._pointer = 0
        self._bytes: Array = np.empty(0, np.uint8)

    @property
    def capacity(self) -> int:
        return int(self._bytes.size)

    def view(self, dtype: np.dtype[Any], shape: tuple[int, ...]) -> Array:
        """A writable array of `shape` at the start of the buffer (grown when too small:
        earlier views are then invalid)."""
        size = math.prod(shape) * dtype.itemsize
        if size > self.capacity:
            self._grow(max(size, 2 * self.capacity))
        return self._bytes[:size].view(dtype).reshape(shape)

    def holds(self, array: Array) -> bool:
        """Whether `array` is a view of this buffer."""
        start = int(self._bytes.ctypes.data)
        return bool(self.capacity) and start <= int(array.ctypes.data) < start + self.capacity

    def _grow(self, size: int) -> None:
        self.release()
        if self.pinned:
            self._pointer = _cudart.host_alloc(size)
            self._bytes = np.ctypeslib.as_array((ctypes.c_uint8 * size).from_address(self._pointer))
        else:
            self._bytes = np.empty(size, np.uint8)

    def release(self) -> None:
        self._bytes = np.empty(0, np.uint8)
        if self._pointer:
            pointer, self._pointer = self._pointer, 0
            _cudart.free_host(pointer)


def pinned_memory_works(device: int) -> bool:
    """Whether page-locked host memory can be had (a CUDA runtime that loads and allocates)."""
    try:
        _cudart.set_device(device)
        _cudart.free_host(_cudart.host_alloc(4096))
    except _cudart.CudaError as exc:
        log.info("pinned host memory is not available (%s): I/O binding uses pageable memory",
                 exc)
        return False
    return True


class DeviceBuffer:
    """Growable device memory (cudaMalloc) on the current device; its contents do not
    survive a growth."""

    def __init__(self) -> None:
        self.pointer = 0
        self.capacity = 0

    def reserve(self, size: int) -> int:
        """The buffer's address, with room for at least `size` bytes."""
        if size > self.capacity:
            grown = max(size, 2 * self.capacity, 256)
            self.release()
            self.pointer = _cudart.malloc(grown)
            self.capacity = grown
        return self.pointer

    def release(self) -> None:
        if self.pointer:
            pointer, self.pointer, self.capacity = self.pointer, 0, 0
            _cudart.free(pointer)


def gather_into(
    parts: Sequence[Mapping[str, Array]], buffer_of: Callable[[str], HostBuffer]
) -> dict[str, Array]:
    """One batch's inputs, the requests' rows in order, each input written once into its
    buffer (`buffer_of(name)`)."""
    gathered = {}
    for name, first in parts[0].items():
        rows = sum(int(p[name].shape[0]) for p in parts) if first.ndim else 0
        shape = (rows, *first.shape[1:]) if first.ndim else ()
        out = buffer_of(name).view(first.dtype, shape)
        if len(parts) == 1 or not first.ndim:
            np.copyto(out, first)
        else:
            np.concatenate([p[name] for p in parts], out=out)
        gathered[name] = out
    return gathered


def staged(buffer: HostBuffer, array: Array) -> Array:
    """`array` if it is a contiguous view of `buffer` (from `gather_into`), else its copy
    there."""
    if buffer.holds(array) and array.flags.c_contiguous:
        return array
    view = buffer.view(array.dtype, array.shape)
    np.copyto(view, array)
    return view
