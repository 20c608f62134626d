"""The data `tachyon optimize` calibrates and validates with: files checked against the model's
inputs, or rows generated from its input specs.

File formats (`--calibration`, `--validation`):

* ``.npz`` (``numpy.savez``): one array per input, keyed by the input name, each shaped
  ``[N, *dims]`` (N rows; ``dims`` as in config.pbtxt, without the batch dimension) with the
  input's dtype (FP32 -> float32, INT64 -> int64, ...). A validation file may add the true class
  of each row under the key ``labels`` (``--labels-key``): integers shaped ``[N]`` or ``[N, 1]``;
  then accuracy is measured. Other keys are refused.
* ``.npy`` (``numpy.save``): one array, for a model with one input; no labels.

A model with ``max_batch_size: 0`` takes rows along its first dimension, which must be -1.
BYTES inputs are not supported (quantisation and float16 do not apply to text).
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from server.model_config import ModelSpec
from server.optimize.errors import OptimizeError
from server.types import Array, DataType

LABELS_KEY = "labels"
GENERATED_ROWS = 256
VARIABLE_DIM = 8  # the size a generated row gets for a variable (-1) dimension
SEED = 0


@dataclass(frozen=True, slots=True)
class InputLayout:
    """One input as data files hold it: ``[N, *sample_dims]``."""

    name: str
    datatype: DataType
    sample_dims: tuple[int, ...]  # -1: any size
    optional: bool = False

    def expected(self) -> str:
        dims = ", ".join(str(d) for d in self.sample_dims)
        return f"{self.datatype.numpy} [N{', ' if dims else ''}{dims}]"


@dataclass(frozen=True, slots=True)
class DataSet:
    """Rows of model inputs (all arrays share the first axis), with labels when known."""

    inputs: dict[str, Array]
    labels: Array | None  # int64 [rows]
    rows: int
    origin: str  # said in the report: where the rows come from

    def take(self, start: int, stop: int) -> dict[str, Array]:
        """Rows start..stop, wrapping around when the data has fewer rows."""
        index = np.arange(start, stop) % self.rows
        return {name: np.ascontiguousarray(array[index]) for name, array in self.inputs.items()}


def layouts(spec: ModelSpec) -> tuple[InputLayout, ...]:
    """How each input's rows look in a data file; refuses what optimize cannot feed."""
    found = []
    for tensor in spec.inputs:
        where = f"model '{spec.name}': input '{tensor.name}'"
        if tensor.datatype is DataType.BYTES:
            raise OptimizeError(
                f"{where} is BYTES, expected numeric inputs: optimize converts numeric models only"
            )
        dims = tensor.dims
        if spec.max_batch_size == 0:
            if not dims or dims[0] != -1:
                raise OptimizeError(
                    f"{where} has dims {list(dims)} with max_batch_size 0, expected a batch "
                    "axis: max_batch_size > 0, or -1 as the first dimension"
                )
            dims = dims[1:]
        found.append(InputLayout(tensor.name, tensor.datatype, dims, tensor.optional))
    return tuple(found)


def load(
    path: Path, inputs: tuple[InputLayout, ...], flag: str, labels_key: str | None
) -> DataSet:
    """Read and check a data file; `labels_key` None: labels are not read (calibration)."""
    where = f"{flag} {path}"
    arrays = _read(path, inputs, where)
    by_name = {layout.name: layout for layout in inputs}
    for key in arrays:
        if key not in by_name and key != labels_key:
            if key == LABELS_KEY and labels_key is None:
                continue  # a validation file reused for calibration
            extra = f" (and '{labels_key}' for labels)" if labels_key else ""
            raise OptimizeError(
                f"{where}: array '{key}' is not an input of the model, expected input names "
                f"{sorted(by_name)}{extra}"
            )
    checked: dict[str, Array] = {}
    rows = -1
    first = ""
    for layout in inputs:
        array = arrays.get(layout.name)
        if array is None:
            if layout.optional:
                continue
            raise OptimizeError(
                f"{where}: no array for input '{layout.name}', expected one keyed by the input "
                f"name, {layout.expected()}"
            )
        _check_array(array, layout, where)
        if rows >= 0 and array.shape[0] != rows:
            raise OptimizeError(
                f"{where}: input '{layout.name}' has {array.shape[0]} rows, expected {rows} like "
                f"input '{first}'"
            )
        rows, first = array.shape[0], first or layout.name
        checked[layout.name] = array
    if rows <= 0:
        raise OptimizeError(f"{where}: the arrays have 0 rows, expected at least 1")
    labels = None
    if labels_key is not None and labels_key in arrays:
        labels = _check_labels(arrays[labels_key], rows, labels_key, where)
    described = f"{path.name}: {rows:,} rows" + (", labelled" if labels is not None else "")
    return DataSet(checked, labels, rows, described)


def _read(path: Path, inputs: tuple[InputLayout, ...], where: str) -> dict[str, Array]:
    if not path.is_file():
        raise OptimizeError(f"{where}: the file does not exist, expected a .npz or .npy file")
    suffix = path.suffix.lower()
    if suffix not in (".npz", ".npy"):
        raise OptimizeError(f"{where}: suffix '{suffix}' is not supported, expected .npz or .npy")
    try:
        if suffix == ".npy":
            return _read_npy(path, inputs, where)
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except ValueError as exc:  # object arrays (pickles), malformed headers
        raise OptimizeError(
            f"{where}: cannot read it as numeric numpy arrays ({exc}), expected arrays saved by "
            "numpy.save / numpy.savez without Python objects"
        ) from None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise OptimizeError(f"{where}: cannot read it ({exc}), expected a {suffix} file") from None


def _read_npy(path: Path, inputs: tuple[InputLayout, ...], where: str) -> dict[str, Array]:
    required = [layout.name for layout in inputs if not layout.optional]
    if len(inputs) != 1:
        raise OptimizeError(
            f"{where}: a .npy file holds one array, but the model has inputs {required}; "
            "expected a .npz file with one array per input name"
        )
    array: Array = np.load(path, allow_pickle=False)
    return {inputs[0].name: array}


def _check_array(array: Array, layout: InputLayout, where: str) -> None:
    name = f"{where}: input '{layout.name}'"
    if array.dtype != layout.datatype.numpy:
        raise OptimizeError(
            f"{name} has dtype {array.dtype}, expected {layout.datatype.numpy} "
            f"({layout.datatype.value})"
        )
    shape = array.shape
    dims = layout.sample_dims
    fits = len(shape) == len(dims) + 1 and all(
        want in (-1, got) for want, got in zip(dims, shape[1:], strict=True)
    )
    if not fits:
        raise OptimizeError(
            f"{name} has shape {list(shape)}, expected {layout.expected()} "
            "(N rows; -1: any size)"
        )


def _check_labels(array: Array, rows: int, key: str, where: str) -> Array:
    shaped = array.shape in ((rows,), (rows, 1))
    if not shaped or array.dtype.kind not in "iub":
        raise OptimizeError(
            f"{where}: '{key}' has dtype {array.dtype} and shape {list(array.shape)}, expected "
            f"integer class indices shaped [{rows}] or [{rows}, 1] (one per row)"
        )
    return array.reshape(rows).astype(np.int64)


def generate(inputs: tuple[InputLayout, ...], rows: int = GENERATED_ROWS) -> DataSet:
    """Rows made from the input specs: standard-normal floats, integers 0..9, random booleans;
    a variable dimension gets size VARIABLE_DIM. Optional inputs are left out."""
    rng = np.random.default_rng(SEED)
    arrays: dict[str, Array] = {}
    for layout in inputs:
        if layout.optional:
            continue
        shape = (rows, *(VARIABLE_DIM if d == -1 else d for d in layout.sample_dims))
        dtype = layout.datatype.numpy
        if dtype.kind == "f":
            arrays[layout.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            arrays[layout.name] = rng.integers(0, 2, shape).astype(dtype)
        else:
            arrays[layout.name] = rng.integers(0, 10, shape).astype(dtype)
    origin = (
        f"{rows} rows generated from the input specs (seed {SEED}; floats standard normal, "
        f"integers 0-9, variable dimensions {VARIABLE_DIM})"
    )
    return DataSet(arrays, None, rows, origin)
