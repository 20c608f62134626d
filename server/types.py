"""Transport-neutral types: data types, tensor specs, inference requests and responses."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from server.tracing import RequestTrace

Array = npt.NDArray[Any]


class DataType(enum.Enum):
    """KServe v2 tensor data types; the value is the wire name ("FP32")."""

    BOOL = "BOOL"
    UINT8 = "UINT8"
    UINT16 = "UINT16"
    UINT32 = "UINT32"
    UINT64 = "UINT64"
    INT8 = "INT8"
    INT16 = "INT16"
    INT32 = "INT32"
    INT64 = "INT64"
    FP16 = "FP16"
    FP32 = "FP32"
    FP64 = "FP64"
    BYTES = "BYTES"

    @property
    def numpy(self) -> np.dtype[Any]:
        return _NUMPY[self]

    @property
    def itemsize(self) -> int:
        """Bytes per element; 0 for BYTES, whose elements have their own lengths."""
        return 0 if self is DataType.BYTES else _NUMPY[self].itemsize

    @property
    def config_name(self) -> str:
        """The name in config.pbtxt: TYPE_FP32, TYPE_STRING for BYTES."""
        return "TYPE_STRING" if self is DataType.BYTES else f"TYPE_{self.value}"

    @classmethod
    def from_wire(cls, name: str) -> DataType:
        try:
            return cls(name)
        except ValueError:
            raise ValueError(
                f"unknown datatype '{name}', expected one of {', '.join(d.value for d in cls)}"
            ) from None

    @classmethod
    def from_config(cls, name: str) -> DataType:
        if name == "TYPE_STRING":
            return cls.BYTES
        if name.startswith("TYPE_") and name[5:] in cls.__members__:
            return cls(name[5:])
        raise ValueError(f"unsupported data_type {name}")

    @classmethod
    def from_numpy(cls, dtype: np.dtype[Any]) -> DataType:
        if dtype.kind in "OSU":
            return cls.BYTES
        for dt, np_dtype in _NUMPY.items():
            if np_dtype == dtype:
                return dt
        raise ValueError(f"no KServe datatype for numpy dtype {dtype}")


_NUMPY: dict[DataType, np.dtype[Any]] = {
    DataType.BOOL: np.dtype(np.bool_),
    DataType.UINT8: np.dtype(np.uint8),
    DataType.UINT16: np.dtype(np.uint16),
    DataType.UINT32: np.dtype(np.uint32),
    DataType.UINT64: np.dtype(np.uint64),
    DataType.INT8: np.dtype(np.int8),
    DataType.INT16: np.dtype(np.int16),
    DataType.INT32: np.dtype(np.int32),
    DataType.INT64: np.dtype(np.int64),
    DataType.FP16: np.dtype(np.float16),
    DataType.FP32: np.dtype(np.float32),
    DataType.FP64: np.dtype(np.float64),
    DataType.BYTES: np.dtype(object),
}


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One input or output of a model. `dims` exclude the batch dimension; -1 is variable."""

    name: str
    datatype: DataType
    dims: tuple[int, ...]
    optional: bool = False

    def full_shape(self, max_batch_size: int) -> tuple[int, ...]:
        return (-1, *self.dims) if max_batch_size > 0 else self.dims


@dataclass(frozen=True, slots=True)
class SharedMemoryRef:
    """Where a tensor lives in system shared memory: `byte_size` bytes at `offset` in the
    registered region `region` (Triton's shared_memory_* tensor parameters)."""

    region: str
    byte_size: int
    offset: int = 0


@dataclass(slots=True)
class InferInput:
    """A decoded input tensor: `data` has `shape` and the numpy dtype of `datatype`
    (an object array of bytes for BYTES). An input in shared memory has an empty `data`
    until the data plane reads it from its region (server/shared_memory.py)."""

    name: str
    datatype: DataType
    shape: tuple[int, ...]
    data: Array
    shared_memory: SharedMemoryRef | None = None


@dataclass(slots=True)
class RequestedOutput:
    name: str
    binary: bool | None = None  # HTTP only: binary_data; None means the server default
    class_count: int = 0
    shared_memory: SharedMemoryRef | None = None  # written there; the response has no data


Parameters = dict[str, "bool | int | float | str"]


@dataclass(slots=True)
class InferRequest:
    model_name: str
    model_version: str
    inputs: list[InferInput]
    outputs: list[RequestedOutput] = field(default_factory=list)
    id: str = ""
    parameters: Parameters = field(default_factory=dict)
    trace: RequestTrace | None = None
    """Set by the transport when this request is traced (server/tracing.py)."""

    @property
    def batch_rows(self) -> int:
        """Rows along the batch dimension (the first input's first dimension)."""
        return self.inputs[0].shape[0] if self.inputs and self.inputs[0].shape else 1


@dataclass(slots=True)
class OutputTensor:
    name: str
    datatype: DataType
    shape: tuple[int, ...]
    data: Array
    shared_memory: SharedMemoryRef | None = None
    """Set once the output was written to this region; `data` is then empty."""


@dataclass(slots=True)
class InferResponse:
    model_name: str
    model_version: str
    outputs: list[OutputTensor]
    id: str = ""
    parameters: Parameters = field(default_factory=dict)
