"""Lookup backend: ids -> stored texts, served as a model (`texts.json` in the version folder).

`texts.json` is a JSON list of strings; an id is a position in it. The model takes one integer
input (`IDS`, INT64 or INT32, any shape: typically the [-1, k] ids a FAISS model answers) and
returns one BYTES output (`TEXTS`) of the same shape, the UTF-8 text of each id. Id -1, FAISS's
"no result", gives an empty text; any other id outside the list is a request error.

The table is built once at load (one bytes object per text); `execute` is one numpy gather.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from server.backends.base import Backend, Options
from server.model_config import ConfigError, ModelSpec, complete_batching, set_tensor
from server.types import Array, DataType, TensorSpec

log = logging.getLogger(__name__)

IDS, TEXTS = "IDS", "TEXTS"
_ID_TYPES = (DataType.INT64, DataType.INT32)


def read_texts(model: str, path: Path) -> list[str]:
    """The texts of `path`, a JSON list of strings; ConfigError says what is wrong."""
    if not path.is_file():
        raise ConfigError(f"model '{model}': texts file {path} does not exist")
    try:
        texts = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise ConfigError(f"model '{model}': cannot read {path} as JSON: {exc}") from None
    if not isinstance(texts, list):
        raise ConfigError(
            f"model '{model}': {path} holds a {type(texts).__name__}, expected a JSON list of "
            "strings"
        )
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise ConfigError(
                f"model '{model}': {path} item {index} is {text!r}, expected a string"
            )
    return texts


def check_config(spec: ModelSpec) -> None:
    """One integer input and one BYTES output of the same dims (-1 matches any size)."""
    if len(spec.inputs) != 1 or len(spec.outputs) != 1:
        raise ConfigError(
            f"model '{spec.name}': inputs {[t.name for t in spec.inputs]} and outputs "
            f"{[t.name for t in spec.outputs]} are not served by a lookup, expected one integer "
            f"input ('{IDS}') and one BYTES output ('{TEXTS}')"
        )
    ids, texts = spec.inputs[0], spec.outputs[0]
    if ids.datatype not in _ID_TYPES:
        raise ConfigError(
            f"model '{spec.name}': input '{ids.name}': data_type {ids.datatype.config_name}, "
            "expected TYPE_INT64 or TYPE_INT32"
        )
    if texts.datatype is not DataType.BYTES:
        raise ConfigError(
            f"model '{spec.name}': output '{texts.name}': data_type "
            f"{texts.datatype.config_name}, expected TYPE_STRING"
        )
    same = len(ids.dims) == len(texts.dims) and all(
        a == b or -1 in (a, b) for a, b in zip(ids.dims, texts.dims, strict=True)
    )
    if not same:
        raise ConfigError(
            f"model '{spec.name}': output '{texts.name}' dims {list(texts.dims)} do not match "
            f"input '{ids.name}' dims {list(ids.dims)}, expected one text per id"
        )


class LookupBackend(Backend):
    platform = "lookup"

    @classmethod
    def complete_config(cls, config: Any, version_dir: Path, default_max_batch_size: int) -> None:
        complete_batching(config, default_max_batch_size)
        dims = (-1,) if config.max_batch_size > 0 else (-1, -1)
        if not len(config.input):
            set_tensor(config.input.add(), TensorSpec(IDS, DataType.INT64, dims))
        if not len(config.output):
            set_tensor(config.output.add(), TensorSpec(TEXTS, DataType.BYTES, dims))

    def load(self) -> None:
        spec = self.spec
        check_config(spec)
        texts = read_texts(spec.name, self.version_dir / spec.model_filename)
        # the last slot answers id -1 (no result) through numpy's negative indexing
        table = np.empty(len(texts) + 1, dtype=object)
        table[:-1] = [text.encode("utf-8") for text in texts]
        table[-1] = b""
        self.table = table
        self.count = len(texts)
        self._ids, self._texts = spec.inputs[0].name, spec.outputs[0].name
        log.info("model '%s' instance %d: %d texts", spec.name, self.instance, self.count)

    def check_request(self, inputs: dict[str, Array]) -> None:
        ids = inputs[self._ids]
        bad = (ids < -1) | (ids >= self.count)
        if bad.any():
            position = tuple(int(i[0]) for i in np.nonzero(bad))
            raise ValueError(
                f"model '{self.spec.name}': input '{self._ids}' holds id {ids[position]} at "
                f"{list(position)}, expected -1 (no result) or 0..{self.count - 1}"
            )

    def execute(
        self, inputs: dict[str, Array], outputs: list[str], options: Options = ()
    ) -> dict[str, Array]:
        ids = np.asarray(inputs[self._ids], dtype=np.int64)
        self.check_request({self._ids: ids})  # requests were checked one by one; this is cheap
        texts = self.table[ids]
        return {name: texts for name in outputs}

    def unload(self) -> None:
        self.__dict__.pop("table", None)
