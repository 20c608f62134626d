"""I/O binding for ONNX Runtime: a batch gathered once into the instance's own host buffers
(page-locked when the session runs on a GPU), bound as the session's inputs, outputs bound on
the session's device and copied back once per batch.

With the CUDA (or TensorRT) EP this is one host-to-device copy per input, from pinned
memory, and one device-to-host copy per output. With the CPU EP the same code runs and the
bound inputs are read in place. The buffers belong to one instance and are
touched only by its thread; a batch's input views are valid until its next batch is gathered.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from server.backends.buffers import HostBuffer, gather_into, staged
from server.types import Array


class IoBinding:
    """One instance's bound inputs and outputs."""

    def __init__(self, session: Any, device: str, device_id: int, pinned: bool) -> None:
        """`device`: where outputs are bound ("cpu" or "cuda"); `pinned`: page-locked input
        buffers (only worth it when the inputs are copied to a GPU)."""
        self._session = session
        self._device = device
        self._device_id = device_id
        self._pinned = pinned
        self._buffers: dict[str, HostBuffer] = {}
        self._binding = session.io_binding()

    def _buffer(self, name: str) -> HostBuffer:
        buffer = self._buffers.get(name)
        if buffer is None:
            buffer = self._buffers[name] = HostBuffer(self._pinned)
        return buffer

    def gather(self, parts: Sequence[Mapping[str, Array]]) -> dict[str, Array]:
        """The requests' inputs, each written once into this instance's buffers."""
        return gather_into(parts, self._buffer)

    def run(self, inputs: Mapping[str, Array], outputs: Sequence[str]) -> dict[str, Array]:
        """One run of the session on `inputs` (views from `gather`, or any arrays, which are
        copied into the buffers first); returns host copies of `outputs`."""
        binding = self._binding
        for name, array in inputs.items():
            array = staged(self._buffer(name), array)
            binding.bind_input(
                name, "cpu", 0, array.dtype, list(array.shape), int(array.ctypes.data)
            )
        for name in outputs:
            binding.bind_output(name, self._device, self._device_id)
        try:
            self._session.run_with_iobinding(binding)
            results = binding.copy_outputs_to_cpu()
        finally:
            binding.clear_binding_inputs()
            binding.clear_binding_outputs()
        return dict(zip(outputs, results, strict=True))

    def release(self) -> None:
        for buffer in self._buffers.values():
            buffer.release()
        self._buffers.clear()
