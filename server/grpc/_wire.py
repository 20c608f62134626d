"""Just enough of the protobuf wire format to keep large tensors out of copies.

upb copies a message's bytes into its arena when it parses, and again into a new `bytes` when a
`bytes` field is read; for a 64 MB ModelInferRequest that is two copies of 64 MB with the GIL
held, on the event loop. `split_bytes_field` walks the top-level fields instead (a handful of
them), hands back the message without one repeated `bytes` field, small enough to parse as
usual, and that field's values as zero-copy views of the original buffer. `bytes_field` writes
such a field back, so an answer can be assembled with a single join.
"""

from __future__ import annotations

from server.errors import invalid

_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5


def _varint(data: memoryview, pos: int, what: str) -> tuple[int, int]:
    result = shift = 0
    end = len(data)
    while pos < end and shift < 64:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
    raise invalid(f"{what} does not parse: truncated or overlong varint at byte {pos}")


def split_bytes_field(data: bytes, field: int, what: str) -> tuple[bytes, list[memoryview]]:
    """`data` without the top-level length-delimited `field`, and that field's values (in
    order) as views of `data`. Raises INVALID_ARGUMENT naming `what` on malformed input."""
    view = memoryview(data)
    size = len(view)
    kept: list[memoryview] = []
    values: list[memoryview] = []
    pos = 0
    while pos < size:
        start = pos
        key, pos = _varint(view, pos, what)
        wire = key & 7
        if wire == _LENGTH:
            length, pos = _varint(view, pos, what)
            if length > size - pos:
                raise invalid(
                    f"{what} does not parse: field {key >> 3} declares {length} bytes, "
                    f"{size - pos} remain"
                )
            if key >> 3 == field:
                values.append(view[pos : pos + length])
                pos += length
                continue
            pos += length
        elif wire == _VARINT:
            _, pos = _varint(view, pos, what)
        elif wire in (_FIXED64, _FIXED32):
            pos += 8 if wire == _FIXED64 else 4
            if pos > size:
                raise invalid(f"{what} does not parse: truncated fixed-size field")
        else:
            raise invalid(f"{what} does not parse: wire type {wire} at byte {start}")
        kept.append(view[start:pos])
    return b"".join(kept), values


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def bytes_field(field: int, value: memoryview | bytes) -> list[memoryview | bytes]:
    """The parts of one length-delimited field, to be joined with the rest of a message."""
    return [_encode_varint(field << 3 | _LENGTH) + _encode_varint(len(value)), value]
