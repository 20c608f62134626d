"""TensorRT backend: a serialized engine (`model.plan`, platform `tensorrt_plan`) run through
the `tensorrt` package (the [tensorrt] extra).

Each instance deserializes the engine on its GPU and owns one execution context, one CUDA
stream, pinned host buffers and device buffers. A batch is gathered once into the pinned
input buffers (`gather`), copied to the device once, run with `execute_async_v3` on the
tightest optimization profile that holds its batch size (`set_input_shape` /
`set_tensor_address`), and its outputs are copied back once. A config without inputs and
outputs is completed from the engine's IO tensors.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from server import gpus
from server.backends import _cudart
from server.backends.base import Backend, Options
from server.backends.buffers import DeviceBuffer, HostBuffer, gather_into, staged
from server.backends.ort_providers import device_of
from server.backends.tensorrt_api import RECORDER, create, import_tensorrt, use_device
from server.backends.tensorrt_engine import (
    IoTensor,
    batch_ranges,
    check_against_engine,
    choose_profile,
    complete_from_engine,
    describe,
)
from server.model_config import ConfigError
from server.types import Array

log = logging.getLogger(__name__)


def needing_tensorrt(model: str) -> str:
    return f"model '{model}' (platform tensorrt_plan)"


def deserialize(trt: Any, model: str, path: Path, device: int) -> Any:
    """The engine in `path`, deserialized on `device` (made current on this thread)."""
    where = f"model '{model}'"
    if not path.is_file():
        raise ConfigError(f"{where}: engine file {path} does not exist")
    use_device(where, device)
    runtime = create(trt, "Runtime", where)
    try:
        engine = runtime.deserialize_cuda_engine(path.read_bytes())  # keeps its runtime alive
    except RuntimeError as exc:  # TensorRT documents None; some failures raise instead
        engine, error = None, str(exc)
    else:
        error = "TensorRT gave no reason"
    if engine is None:
        said = RECORDER.reason(error)
        raise ConfigError(
            f"{where}: {path} is not a TensorRT engine this TensorRT ({trt.__version__}) and "
            f"GPU can run ({said}), expected a plan built by this version on this GPU model "
            "(tachyon trt build)"
        )
    return engine


class TensorRtBackend(Backend):
    platform = "tensorrt_plan"

    @classmethod
    def complete_config(cls, config: Any, version_dir: Path, default_max_batch_size: int) -> None:
        trt = import_tensorrt(needing_tensorrt(config.name))
        path = version_dir / (config.default_model_filename or "model.plan")
        engine = deserialize(trt, config.name, path, 0)
        config.platform = config.platform or cls.platform
        complete_from_engine(config, describe(engine, trt, config.name))

    def load(self) -> None:
        spec = self.spec
        visible = gpus.visible_gpus()
        if spec.instance_kind == "KIND_CPU" or visible == 0:
            found = "KIND_CPU" if spec.instance_kind == "KIND_CPU" else "no visible GPU"
            raise ConfigError(
                f"model '{spec.name}': platform tensorrt_plan runs on a GPU, but the model has "
                f"{found}, expected a GPU instance (KIND_GPU or KIND_AUTO) on a GPU host"
            )
        trt = import_tensorrt(needing_tensorrt(spec.name))
        self.device = device_of(spec, self.instance, visible)
        self._engine = deserialize(
            trt, spec.name, self.version_dir / spec.model_filename, self.device
        )
        self._tensors = describe(self._engine, trt, spec.name)
        check_against_engine(spec, self._tensors)
        self._ranges = batch_ranges(self._tensors)
        self._batched = spec.max_batch_size > 0
        where = f"model '{spec.name}' instance {self.instance}"
        RECORDER.take()
        self._context = self._engine.create_execution_context()
        if self._context is None:  # e.g. not enough device memory for its activations
            said = RECORDER.reason("TensorRT gave no reason")
            raise ConfigError(f"{where}: TensorRT could not create an execution context: {said}")
        try:
            self._stream = _cudart.stream_create()
        except _cudart.CudaError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        self._profile = 0
        self._host_in: dict[str, HostBuffer] = {}
        self._host_out: dict[str, HostBuffer] = {}
        self._device_buffers: dict[str, DeviceBuffer] = {}
        self._thread = threading.local()
        log.info(
            "model '%s' instance %d: TensorRT engine on GPU %d, %d profile(s) %s",
            spec.name, self.instance, self.device, len(self._ranges), self._ranges,
        )

    def _host(self, table: dict[str, HostBuffer], name: str) -> HostBuffer:
        buffer = table.get(name)
        if buffer is None:
            buffer = table[name] = HostBuffer(pinned=True)
        return buffer

    def _on_device(self) -> None:
        """Make the instance's GPU current on this thread (CUDA's current device is per
        thread; pinned allocations on a thread without one would start a context on GPU 0)."""
        if not getattr(self._thread, "device_set", False):
            _cudart.set_device(self.device)
            self._thread.device_set = True

    def gather(self, parts: Sequence[dict[str, Array]]) -> dict[str, Array] | None:
        self._on_device()
        return gather_into(parts, lambda name: self._host(self._host_in, name))

    def _select_profile(self, inputs: dict[str, Array]) -> None:
        if not self._batched or len(self._ranges) < 2:
            return
        rows = int(next(iter(inputs.values())).shape[0])
        profile = choose_profile(self._ranges, rows)
        if profile is None:
            raise ValueError(
                f"model '{self.spec.name}': a batch of {rows} fits no optimization profile "
                f"{self._ranges}"
            )
        if profile != self._profile:
            if not self._context.set_optimization_profile_async(profile, self._stream):
                raise RuntimeError(
                    f"model '{self.spec.name}': TensorRT refused optimization profile "
                    f"{profile}: {RECORDER.reason('no reason given')}"
                )
            self._profile = profile

    def execute(
        self, inputs: dict[str, Array], outputs: list[str], options: Options = ()
    ) -> dict[str, Array]:
        self._on_device()
        self._select_profile(inputs)
        for name, array in inputs.items():
            self._bind_input(name, array)
        hosts = {}
        for tensor in self._tensors:
            if not tensor.is_input:
                hosts[tensor.name] = self._bind_output(tensor)
        if not self._context.execute_async_v3(self._stream):
            raise RuntimeError(
                f"model '{self.spec.name}': TensorRT execute_async_v3 failed: "
                f"{RECORDER.reason('no reason given')}"
            )
        for name in outputs:
            host = hosts[name]
            _cudart.memcpy_async(
                int(host.ctypes.data), self._device_buffers[name].pointer, host.nbytes,
                _cudart.DEVICE_TO_HOST, self._stream,
            )
        _cudart.stream_synchronize(self._stream)
        # copies: the pinned buffers are refilled by the next batch while this one's
        # responses are still being written
        return {name: hosts[name].copy() for name in outputs}

    def _bind_input(self, name: str, array: Array) -> None:
        array = staged(self._host(self._host_in, name), array)
        if not self._context.set_input_shape(name, tuple(array.shape)):
            raise ValueError(
                f"model '{self.spec.name}': input '{name}' shape {list(array.shape)} is outside "
                f"the engine's optimization profile {self._profile}"
            )
        device = self._device_buffers.setdefault(name, DeviceBuffer())
        pointer = device.reserve(array.nbytes)
        _cudart.memcpy_async(
            pointer, int(array.ctypes.data), array.nbytes, _cudart.HOST_TO_DEVICE, self._stream
        )
        self._set_address(name, pointer)

    def _bind_output(self, tensor: IoTensor) -> Array:
        shape = tuple(int(d) for d in self._context.get_tensor_shape(tensor.name))
        if any(d < 0 for d in shape):  # known only after the run: needs an IOutputAllocator
            raise RuntimeError(
                f"model '{self.spec.name}': output '{tensor.name}' has shape {list(shape)} "
                "after its inputs' shapes are set (data-dependent), which the TensorRT "
                "backend does not serve, expected output shapes that follow from the inputs'"
            )
        dtype = tensor.datatype.numpy
        size = math.prod(shape) * dtype.itemsize
        device = self._device_buffers.setdefault(tensor.name, DeviceBuffer())
        self._set_address(tensor.name, device.reserve(size))
        return self._host(self._host_out, tensor.name).view(dtype, shape)

    def _set_address(self, name: str, pointer: int) -> None:
        if not self._context.set_tensor_address(name, pointer):
            raise RuntimeError(
                f"model '{self.spec.name}': TensorRT refused the address of tensor '{name}': "
                f"{RECORDER.reason('no reason given')}"
            )

    def unload(self) -> None:
        stream = self.__dict__.pop("_stream", None)
        buffers = [buffer for table in ("_host_in", "_host_out", "_device_buffers")
                   for buffer in self.__dict__.pop(table, {}).values()]
        if stream is not None or buffers:
            _cudart.set_device(self.device)  # unload runs on a loader thread
        if stream is not None:
            _cudart.stream_synchronize(stream)
            _cudart.stream_destroy(stream)
        self.__dict__.pop("_context", None)  # before its engine
        self.__dict__.pop("_engine", None)
        for buffer in buffers:
            buffer.release()
