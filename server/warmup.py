"""Model warmup (`model_warmup` in config.pbtxt): runs before a version is READY."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from server.backends.base import Backend
from server.model_config import ConfigError, enum_name
from server.types import Array, DataType

log = logging.getLogger(__name__)


def warmup_inputs(warmup: Any, model_dir: Path, batching: bool) -> dict[str, Array]:
    """The inputs of one warmup sample: zeros, random values or a file's raw bytes
    (`<model>/warmup/<file>`), with the warmup's batch size in front when the model batches."""
    rng = np.random.default_rng(0)
    batch = max(int(warmup.batch_size), 1)
    inputs = {}
    for name, spec in warmup.inputs.items():
        datatype = DataType.from_config(enum_name(spec, "data_type"))
        dims = tuple(int(d) for d in spec.dims)
        shape = (batch, *dims) if batching else dims
        count = int(np.prod(shape))
        kind = spec.WhichOneof("input_data_type")
        if datatype is DataType.BYTES:
            values = np.array([b"" if kind == "zero_data" else b"warmup"] * count, dtype=object)
            inputs[name] = values.reshape(shape)
            continue
        if kind == "input_data_file":
            path = (model_dir / "warmup" / spec.input_data_file).resolve()
            if model_dir.resolve() not in path.parents:
                raise ConfigError(f"warmup file '{spec.input_data_file}' is outside the model")
            raw = np.fromfile(path, dtype=datatype.numpy)
            if raw.size < count // batch:
                raise ConfigError(
                    f"warmup '{warmup.name}': file {path} holds {raw.size} {datatype.value} "
                    f"values, expected {count // batch}"
                )
            one = raw[: count // batch]
            inputs[name] = np.tile(one, batch).reshape(shape)
        elif kind == "random_data":
            if datatype is DataType.BOOL:
                inputs[name] = rng.integers(0, 2, shape).astype(np.bool_)
            elif datatype.numpy.kind == "f":
                inputs[name] = rng.random(shape).astype(datatype.numpy)
            else:
                inputs[name] = rng.integers(0, 100, shape).astype(datatype.numpy)
        else:
            inputs[name] = np.zeros(shape, dtype=datatype.numpy)
    return inputs


def warm_up(backend: Backend, config: Any, model_dir: Path) -> None:
    """Run every `model_warmup` entry `count` times on one loaded instance."""
    batching = config.max_batch_size > 0
    outputs = [o.name for o in config.output]
    for warmup in config.model_warmup:
        inputs = warmup_inputs(warmup, model_dir, batching)
        for _ in range(max(int(warmup.count), 1)):
            try:
                backend.execute(inputs, outputs)
            except Exception as exc:
                raise ConfigError(
                    f"model '{config.name}': warmup '{warmup.name}' failed: {exc}"
                ) from None
        log.info("model '%s': warmup '%s' done", config.name, warmup.name)
