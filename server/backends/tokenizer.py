"""Tokenizer backend: a Hugging Face `tokenizer.json` served as a model (text -> token ids).

The model takes one BYTES input (`TEXT`: one UTF-8 text per row, dims [1] when the model
batches, [-1] when it does not) and answers what a BERT-style ONNX graph takes: `input_ids`,
`attention_mask` and `token_type_ids`, INT64 (or INT32) [rows, L], padded to the longest text
of the batch and truncated to `parameters.max_length` tokens (default 128). Padding and
truncation settings stored in the file are replaced by these, so every batch is as short as it
can be; the batcher splits the rows back to the requests.

Each instance owns its `tokenizers.Tokenizer`; `encode_batch_fast` runs in Rust without the GIL.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from server import extras
from server.backends.base import Backend, Options
from server.model_config import ConfigError, ModelSpec, complete_batching, set_tensor
from server.types import Array, DataType, TensorSpec

log = logging.getLogger(__name__)

TEXT = "TEXT"
INPUT_IDS, ATTENTION_MASK, TOKEN_TYPE_IDS = "input_ids", "attention_mask", "token_type_ids"
OUTPUTS = (INPUT_IDS, ATTENTION_MASK, TOKEN_TYPE_IDS)
DEFAULT_MAX_LENGTH = 128
_ID_TYPES = (DataType.INT64, DataType.INT32)


def load_tokenizer(path: Path, max_length: int = DEFAULT_MAX_LENGTH) -> Any:
    """A `tokenizers.Tokenizer` from `path` that truncates to `max_length` tokens and pads to
    the longest text of each batch (with the file's pad token, else `[PAD]` or id 0)."""
    try:
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise ConfigError(extras.missing("the tokenizer backend", "text", exc)) from None
    if not path.is_file():
        raise ConfigError(f"tokenizer file {path} does not exist")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for a malformed file
        raise ConfigError(f"cannot read {path} as a tokenizer.json: {exc}") from None
    padding = tokenizer.padding or {}
    pad_token = padding.get("pad_token") or "[PAD]"
    pad_id = padding.get("pad_id")
    if pad_id is None:
        pad_id = tokenizer.token_to_id(pad_token) or 0
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(
        direction=padding.get("direction", "right"),
        pad_id=pad_id,
        pad_type_id=padding.get("pad_type_id", 0),
        pad_token=pad_token,
        length=None,  # the longest text of the batch
    )
    return tokenizer


def encode(tokenizer: Any, texts: list[str], dtype: Any = np.int64) -> dict[str, Array]:
    """The three id tensors [len(texts), L] of a batch of texts (L >= 1 for an empty batch)."""
    if not texts:
        return {name: np.zeros((0, 1), dtype=dtype) for name in OUTPUTS}
    encodings = tokenizer.encode_batch_fast(texts)
    return {
        INPUT_IDS: np.array([e.ids for e in encodings], dtype=dtype),
        ATTENTION_MASK: np.array([e.attention_mask for e in encodings], dtype=dtype),
        TOKEN_TYPE_IDS: np.array([e.type_ids for e in encodings], dtype=dtype),
    }


def decode_texts(model: str, name: str, array: Array) -> list[str]:
    """The UTF-8 texts of a BYTES tensor, in row order; ValueError names the first bad one."""
    texts = []
    for index, item in enumerate(array.ravel().tolist()):
        if isinstance(item, str):
            texts.append(item)
            continue
        try:
            texts.append(bytes(item).decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise ValueError(
                f"model '{model}': input '{name}' element {index} is not UTF-8 ({exc.reason} at "
                f"byte {exc.start}), expected UTF-8 text"
            ) from None
    return texts


def max_length(spec: ModelSpec) -> int:
    value = spec.parameters.get("max_length", "") or str(DEFAULT_MAX_LENGTH)
    number = int(value) if value.isdigit() else 0
    if number < 1:
        raise ConfigError(
            f"model '{spec.name}': parameters.max_length '{value}' is invalid, expected a "
            "positive integer"
        )
    return number


def check_config(spec: ModelSpec) -> None:
    """One BYTES input with one text per row; outputs among the three id tensors, integer,
    with a variable token dimension. Raises ConfigError naming the field."""
    batching = spec.max_batch_size > 0
    if len(spec.inputs) != 1:
        raise ConfigError(
            f"model '{spec.name}': inputs {[t.name for t in spec.inputs]} are not served by a "
            f"tokenizer, expected one BYTES input ('{TEXT}')"
        )
    text = spec.inputs[0]
    where = f"model '{spec.name}': input '{text.name}'"
    if text.datatype is not DataType.BYTES:
        raise ConfigError(f"{where}: data_type {text.datatype.config_name}, expected TYPE_STRING")
    if (batching and text.dims != (1,)) or (not batching and len(text.dims) != 1):
        raise ConfigError(
            f"{where}: dims {list(text.dims)} are not one text per row, expected "
            f"{[1] if batching else [-1]}"
        )
    expected_dims = (-1,) if batching else (-1, -1)
    for tensor in spec.outputs:
        where = f"model '{spec.name}': output '{tensor.name}'"
        if tensor.name not in OUTPUTS:
            raise ConfigError(
                f"{where} is not produced by a tokenizer, expected one of {', '.join(OUTPUTS)}"
            )
        if tensor.datatype not in _ID_TYPES:
            raise ConfigError(
                f"{where}: data_type {tensor.datatype.config_name}, expected TYPE_INT64 or "
                "TYPE_INT32"
            )
        if tensor.dims != expected_dims:
            raise ConfigError(
                f"{where}: dims {list(tensor.dims)}, expected {list(expected_dims)} (padded to "
                "the longest text of each batch)"
            )


class TokenizerBackend(Backend):
    platform = "tokenizer"

    @classmethod
    def complete_config(cls, config: Any, version_dir: Path, default_max_batch_size: int) -> None:
        complete_batching(config, default_max_batch_size)
        batching = config.max_batch_size > 0
        if not len(config.input):
            set_tensor(
                config.input.add(), TensorSpec(TEXT, DataType.BYTES, (1,) if batching else (-1,))
            )
        if not len(config.output):
            dims = (-1,) if batching else (-1, -1)
            for name in OUTPUTS:
                set_tensor(config.output.add(), TensorSpec(name, DataType.INT64, dims))

    def load(self) -> None:
        spec = self.spec
        check_config(spec)
        length = max_length(spec)
        try:
            self.tokenizer = load_tokenizer(self.version_dir / spec.model_filename, length)
        except ConfigError as exc:
            raise ConfigError(f"model '{spec.name}': {exc}") from None
        self._text = spec.inputs[0].name
        self._dtypes = {t.name: t.datatype.numpy for t in spec.outputs}
        log.info(
            "model '%s' instance %d: tokenizer with %d tokens, max_length %d",
            spec.name,
            self.instance,
            self.tokenizer.get_vocab_size(),
            length,
        )

    def check_request(self, inputs: dict[str, Array]) -> None:
        decode_texts(self.spec.name, self._text, inputs[self._text])

    def execute(
        self, inputs: dict[str, Array], outputs: list[str], options: Options = ()
    ) -> dict[str, Array]:
        texts = decode_texts(self.spec.name, self._text, inputs[self._text])
        encoded = encode(self.tokenizer, texts)
        return {name: encoded[name].astype(self._dtypes[name], copy=False) for name in outputs}

    def unload(self) -> None:
        self.__dict__.pop("tokenizer", None)
