"""What a TensorRT engine's IO tensors and optimization profiles mean for serving, as pure
functions over plain descriptions (`IoTensor`), so the config and batching logic is tested
without TensorRT; `describe` reads those descriptions from a real engine.

* auto-complete: inputs, outputs and `max_batch_size` from the engine, as Triton's TensorRT
  backend completes a config (a leading -1 on every tensor is the batch dimension; the largest
  batch every input's profiles accept is `max_batch_size`);
* profiles: each profile accepts a range of batch sizes; a batch runs on the tightest profile
  that holds it, and at load every batch size 1..max_batch_size must be covered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from server.model_config import ConfigError, ModelSpec, complete_batching, set_tensor
from server.types import DataType, TensorSpec

# tensorrt.DataType member name -> DataType (BF16, FP8, INT4 and FP4 have no numpy type here)
TRT_TYPES = {
    "FLOAT": DataType.FP32,
    "HALF": DataType.FP16,
    "INT8": DataType.INT8,
    "INT32": DataType.INT32,
    "INT64": DataType.INT64,
    "BOOL": DataType.BOOL,
    "UINT8": DataType.UINT8,
}

Shape = tuple[int, ...]


@dataclass(frozen=True, slots=True)
class IoTensor:
    """One IO tensor of an engine: `shape` with -1 for dynamic dimensions; for an input, the
    (min, opt, max) shapes of each optimization profile."""

    name: str
    is_input: bool
    datatype: DataType
    shape: Shape
    profiles: tuple[tuple[Shape, Shape, Shape], ...] = ()


def datatype_of(model: str, name: str, trt_type: str) -> DataType:
    datatype = TRT_TYPES.get(trt_type)
    if datatype is None:
        raise ConfigError(
            f"model '{model}': engine tensor '{name}' has type {trt_type}, which Tachyon cannot "
            f"serve, expected one of {', '.join(TRT_TYPES)}"
        )
    return datatype


def describe(engine: Any, trt: Any, model: str) -> list[IoTensor]:
    """The IO tensors of a deserialized `tensorrt.ICudaEngine`."""
    tensors = []
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        if engine.is_shape_inference_io(name):  # read on the host: no device address fits
            raise ConfigError(
                f"model '{model}': engine tensor '{name}' is a shape tensor (its values set "
                "shapes), which Tachyon's TensorRT backend does not serve, expected data tensors"
            )
        profiles: list[tuple[Shape, Shape, Shape]] = []
        for profile in range(engine.num_optimization_profiles if is_input else 0):
            low, opt, high = engine.get_tensor_profile_shape(name, profile)
            profiles.append((_shape(low), _shape(opt), _shape(high)))
        tensors.append(IoTensor(
            name, is_input, datatype_of(model, name, engine.get_tensor_dtype(name).name),
            _shape(engine.get_tensor_shape(name)), tuple(profiles),
        ))
    return tensors


def _shape(dims: Any) -> Shape:
    return tuple(int(d) for d in dims)


def batch_ranges(tensors: list[IoTensor]) -> list[tuple[int, int]]:
    """Per profile, the batch sizes (first dimension) every input accepts: (low, high);
    (0, -1) for a profile that accepts none."""
    inputs = [t for t in tensors if t.is_input]
    count = min((len(t.profiles) for t in inputs), default=0)
    ranges = []
    for profile in range(count):
        low = max(t.profiles[profile][0][0] for t in inputs)
        high = min(t.profiles[profile][2][0] for t in inputs)
        ranges.append((low, high) if low <= high else (0, -1))
    return ranges


def is_batched(tensors: list[IoTensor]) -> bool:
    """Whether every tensor's first dimension is dynamic (the batch)."""
    return bool(tensors) and all(t.shape and t.shape[0] == -1 for t in tensors)


def engine_max_batch(tensors: list[IoTensor]) -> int:
    """The largest batch some profile accepts (0 when none)."""
    return max((high for _, high in batch_ranges(tensors)), default=0)


def complete_from_engine(config: Any, tensors: list[IoTensor]) -> None:
    """Fill a config's missing inputs, outputs and max_batch_size from the engine, in place."""
    batched = is_batched(tensors)
    engine_max = engine_max_batch(tensors) if batched else 0
    # the engine fixes the largest batch (Triton completes TensorRT models the same way); the
    # server's --default-max-batch-size is for models that have no such limit
    complete_batching(config, engine_max, batched and engine_max > 0)
    skip = 1 if config.max_batch_size > 0 else 0
    for kind, is_input in (("input", True), ("output", False)):
        listed = {t.name for t in getattr(config, kind)}
        for tensor in tensors:
            if tensor.is_input == is_input and tensor.name not in listed:
                spec = TensorSpec(tensor.name, tensor.datatype, tensor.shape[skip:])
                set_tensor(getattr(config, kind).add(), spec)


def check_against_engine(spec: ModelSpec, tensors: list[IoTensor]) -> None:
    """Config and engine agree: every tensor exists with its type and rank, and every batch
    size 1..max_batch_size has a profile."""
    batch = 1 if spec.max_batch_size > 0 else 0
    by_name = {t.name: t for t in tensors}
    for kind, specs, is_input in (("input", spec.inputs, True), ("output", spec.outputs, False)):
        for tensor in specs:
            where = f"model '{spec.name}': {kind} '{tensor.name}'"
            found = by_name.get(tensor.name)
            if found is None or found.is_input != is_input:
                names = sorted(t.name for t in tensors if t.is_input == is_input)
                raise ConfigError(f"{where} is not an engine {kind}, expected one of {names}")
            if found.datatype is not tensor.datatype:
                raise ConfigError(
                    f"{where}: data_type {tensor.datatype.config_name} does not match the "
                    f"engine's {found.datatype.config_name}"
                )
            if len(found.shape) != len(tensor.dims) + batch:
                raise ConfigError(
                    f"{where}: dims {list(tensor.dims)} with max_batch_size "
                    f"{spec.max_batch_size} give rank {len(tensor.dims) + batch}, but the "
                    f"engine's shape is {list(found.shape)}"
                )
            fixed = zip(found.shape[batch:], tensor.dims, strict=True)
            if any(ours != -1 and theirs not in (-1, ours) for theirs, ours in fixed):
                raise ConfigError(
                    f"{where}: dims {list(tensor.dims)} do not match the engine's shape "
                    f"{list(found.shape)}" + (" after its batch dimension" if batch else "")
                )
    if batch:
        check_profiles(spec.name, batch_ranges(tensors), spec.max_batch_size)


def check_profiles(model: str, ranges: list[tuple[int, int]], max_batch_size: int) -> None:
    """Every batch size 1..max_batch_size must fit some profile."""
    for rows in range(1, max_batch_size + 1):
        if choose_profile(ranges, rows) is None:
            accepted = ", ".join(f"{low}..{high}" for low, high in ranges if low <= high)
            raise ConfigError(
                f"model '{model}': max_batch_size {max_batch_size} needs a batch of {rows}, but "
                f"the engine's optimization profiles accept batch sizes {accepted or 'none'}, "
                f"expected profiles covering 1..{max_batch_size} (rebuild the plan, or lower "
                "max_batch_size)"
            )


def choose_profile(ranges: list[tuple[int, int]], rows: int) -> int | None:
    """The profile for a batch of `rows`: the one with the smallest upper bound that holds it
    (TensorRT tunes kernels for a profile's range: the tightest fits best)."""
    fitting = [(high, index) for index, (low, high) in enumerate(ranges) if low <= rows <= high]
    return min(fitting)[1] if fitting else None
