"""The large-message path of ModelInfer (server/grpc/_wire.py): the same requests and answers as
upb's full parse and serialization, zero-copy views, and INVALID_ARGUMENT for malformed bytes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server import proto
from server.errors import Code, ServingError
from server.grpc import server as grpc_server
from server.grpc._wire import split_bytes_field
from server.grpc.server import (
    RAW_INPUT_CONTENTS,
    decode_infer_bytes,
    decode_infer_request,
    encode_infer_response,
    parse_infer_request,
    serialize_infer_response,
)
from server.types import DataType, InferResponse, OutputTensor

names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    message = proto.ModelInferRequest(
        model_name=draw(names), model_version=draw(st.sampled_from(["", "1", "7"])),
        id=draw(names),
    )
    for key in draw(st.lists(names, max_size=3, unique=True)):
        message.parameters[key].int64_param = draw(st.integers(-(2**40), 2**40))
    for index in range(draw(st.integers(0, 4))):
        rows = draw(st.integers(0, 6))
        tensor = message.inputs.add(name=f"IN{index}", datatype="FP32", shape=[rows, 3])
        tensor.parameters["binary_data_size"].int64_param = rows * 12
        data = draw(st.binary(min_size=rows * 12, max_size=rows * 12))
        message.raw_input_contents.append(data)
    for name in draw(st.lists(names, max_size=2, unique=True)):
        message.outputs.add(name=name)
    return bytes(message.SerializeToString())


@given(requests())
@settings(max_examples=200, deadline=None)
def test_split_matches_upb(data: bytes) -> None:
    rest, raw = split_bytes_field(data, RAW_INPUT_CONTENTS, "ModelInferRequest")
    full = parse_infer_request(data)
    assert [bytes(v) for v in raw] == list(full.raw_input_contents)
    without = parse_infer_request(rest)
    assert not without.raw_input_contents
    full.ClearField("raw_input_contents")
    assert without == full


@given(requests())
@settings(max_examples=100, deadline=None)
def test_large_path_decodes_like_the_small_one(data: bytes) -> None:
    try:
        small = decode_infer_request(parse_infer_request(data))
    except ServingError as exc:
        with pytest.raises(ServingError) as caught:
            _large(data)
        assert caught.value.code is exc.code
        return
    large = _large(data)
    assert (large.model_name, large.model_version, large.id) == (
        small.model_name, small.model_version, small.id)
    assert large.parameters == small.parameters and large.outputs == small.outputs
    for a, b in zip(large.inputs, small.inputs, strict=True):
        assert (a.name, a.datatype, a.shape) == (b.name, b.datatype, b.shape)
        assert np.array_equal(a.data, b.data, equal_nan=True)


def _large(data: bytes) -> object:
    old = grpc_server.LARGE_MESSAGE_BYTES
    grpc_server.LARGE_MESSAGE_BYTES = 0
    try:
        return decode_infer_bytes(data)
    finally:
        grpc_server.LARGE_MESSAGE_BYTES = old


@given(requests(), st.data())
@settings(max_examples=200, deadline=None)
def test_malformed_bytes_are_invalid_argument(data: bytes, draw: st.DataObject) -> None:
    cut = draw.draw(st.integers(0, len(data)))
    junk = draw.draw(st.binary(max_size=8))
    try:
        _large(data[:cut] + junk)
    except ServingError as exc:
        assert exc.code is Code.INVALID_ARGUMENT
        assert "ModelInferRequest" in exc.message or "input" in exc.message


def test_large_inputs_are_views_of_the_request() -> None:
    message = proto.ModelInferRequest(model_name="m")
    message.inputs.add(name="IN", datatype="FP32", shape=[1, 1 << 19])
    payload = np.arange(1 << 19, dtype=np.float32)
    message.raw_input_contents.append(payload.tobytes())
    data = message.SerializeToString()
    request = decode_infer_bytes(data)
    array = request.inputs[0].data
    assert np.array_equal(array.ravel(), payload)
    assert not array.flags.owndata and not array.flags.writeable  # a view, no copy


@pytest.mark.parametrize("datatype", [DataType.FP32, DataType.INT64, DataType.BYTES])
def test_large_answers_serialize_like_upb(datatype: DataType) -> None:
    rows = 1 << 18
    if datatype is DataType.BYTES:
        data = np.array([b"x" * 7] * rows, dtype=object).reshape(rows, 1)
    else:
        data = np.arange(rows * 2, dtype=datatype.numpy).reshape(rows, 2)[:, ::-1]  # strided
    small = InferResponse("m", "1", [OutputTensor("OUT", datatype, data.shape, data)], id="r")
    expected = proto.ModelInferResponse.FromString(
        encode_infer_response(small).SerializeToString())
    assert proto.ModelInferResponse.FromString(serialize_infer_response(small)) == expected
