"""HTTP bodies: reading within --max-request-bytes, Content-Encoding both ways, and how large a
body must be before its work leaves the event loop.

Compression is Triton's: requests may carry `Content-Encoding: gzip | deflate | identity`
(deflate is the zlib format; anything else is refused with 415); inflating stops one byte past
the limit, so a small "zip bomb" allocates no more than the limit. Inference responses are
compressed with the best of gzip, deflate and identity in `Accept-Encoding` by q-value, the
first listed winning ties (Triton's `GetResponseCompressionType`).
"""

from __future__ import annotations

import asyncio
import zlib

import numpy as np
from starlette.requests import Request

from server.errors import ServingError, invalid

# Bodies above this many bytes are joined, inflated and compressed on a worker thread (zlib
# drops the GIL); below it the thread hop (~50 us) costs more than the work it would move.
# Decoding has its own, lower bound for JSON: see _codec.decode_offloaded.
OFFLOAD_BYTES = 1 << 20

# zlib window bits: 15 for the zlib format ("deflate" on the wire), 31 for gzip
_WBITS = {"gzip": 31, "deflate": 15}
_STEP = 1 << 16  # compressed bytes handed to zlib at a time


class HttpError(Exception):
    """An answer with an HTTP status the core's error codes do not have (413, 415)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def too_large(limit: int, what: str) -> HttpError:
    return HttpError(413, f"{what} exceeds the limit of {limit} bytes (--max-request-bytes)")


async def read_body(request: Request, limit: int) -> bytes | memoryview:
    """The request body, decompressed, refused with 413 past `limit` bytes (compressed or not).
    A large body with a Content-Length is copied chunk by chunk into one buffer as it arrives,
    so that no step holds the event loop for the whole body."""
    encoding = _request_encoding(request.headers.get("content-encoding"))
    declared = request.headers.get("content-length")
    # isascii: isdigit alone takes "²" (headers are latin-1), which int() refuses
    size = int(declared) if declared and declared.isascii() and declared.isdigit() else None
    if size is not None and size > limit:
        raise too_large(limit, f"request body of {size} bytes")
    if size is not None and size > OFFLOAD_BYTES:
        body: bytes | memoryview = await _read_into(request, size)
    else:
        body = await _read_chunks(request, limit)
    if encoding is None:
        return body
    inflater = Inflater(encoding, body, limit)
    if not inflater.run(OFFLOAD_BYTES):  # a small input can inflate to a large body
        await asyncio.to_thread(inflater.run)
    return inflater.result()


async def _read_chunks(request: Request, limit: int) -> bytes:
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit, "request body")
        chunks.append(chunk)
    if size > OFFLOAD_BYTES:  # chunked transfer of a large body: join it on a thread
        return await asyncio.to_thread(b"".join, chunks)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _read_into(request: Request, size: int) -> memoryview:
    buffer = np.empty(size, np.uint8).data  # no zero-filling pass over the pages
    offset = 0
    async for chunk in request.stream():
        end = offset + len(chunk)
        if end > size:
            raise invalid(f"request body is longer than its Content-Length of {size} bytes")
        buffer[offset:end] = chunk
        offset = end
    if offset != size:
        raise invalid(f"request body has {offset} bytes, its Content-Length says {size}")
    return buffer


def _request_encoding(header: str | None) -> str | None:
    """The decoder a Content-Encoding header asks for: "gzip", "deflate", or None."""
    if header is None:
        return None
    encoding = header.strip().lower()
    if encoding in ("", "identity"):
        return None
    if encoding == "x-gzip":
        return "gzip"
    if encoding not in _WBITS:
        raise HttpError(
            415,
            f"unsupported Content-Encoding '{header.strip()}', expected gzip, deflate or "
            "identity",
        )
    return encoding


class Inflater:
    """Inflates one body in steps of bounded output, so that the first step can run inline and
    the rest on a thread (zlib releases the GIL). Raises 413 past `limit` bytes, 400 on corrupt
    or truncated data."""

    def __init__(self, encoding: str, data: bytes | memoryview, limit: int) -> None:
        self._encoding = encoding
        self._zlib = zlib.decompressobj(_WBITS[encoding])
        self._data = memoryview(data).cast("B")
        self._offset = 0  # of the next input handed to zlib
        self._tail: bytes | memoryview = b""  # input zlib left for later
        self._limit = limit
        self._parts: list[bytes] = []
        self._size = 0
        self._done = False

    def run(self, budget: int | None = None) -> bool:
        """Inflate up to `budget` more bytes (None: to the end); True once the body is done."""
        left = self._limit + 1 if budget is None else budget
        while not self._done and left > 0:
            if not self._tail:
                self._tail = self._data[self._offset : self._offset + _STEP]
                self._offset += len(self._tail)
            want = min(left, self._limit + 1 - self._size)
            try:
                part = self._zlib.decompress(self._tail, want)
            except zlib.error as exc:
                raise self._corrupt(str(exc)) from None
            self._tail = self._zlib.unconsumed_tail
            self._size += len(part)
            left -= len(part)
            if self._size > self._limit:
                raise too_large(self._limit, f"request body, once {self._encoding} inflated,")
            if part:
                self._parts.append(part)
            if self._zlib.eof:
                if self._zlib.unused_data or self._offset < len(self._data):
                    raise self._corrupt("data follows the end of the compressed stream")
                self._done = True
            elif not part and not self._tail and self._offset >= len(self._data):
                raise self._corrupt("the compressed stream ends early")
        return self._done

    def result(self) -> bytes:
        assert self._done
        return self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)

    def _corrupt(self, why: str) -> ServingError:
        return invalid(f"request body is not valid {self._encoding} data: {why}")


def response_encoding(header: str | None) -> str | None:
    """The encoding to answer an Accept-Encoding header with: "gzip", "deflate" or None."""
    if not header:
        return None
    best: str | None = None
    best_q = 0.0
    for item in header.split(","):
        name, _, params = item.partition(";")
        name = name.strip().lower()
        if name not in ("gzip", "deflate", "identity"):
            continue
        q = _quality(params)
        if q > best_q:
            best, best_q = name, q
    return None if best == "identity" else best


def _quality(params: str) -> float:
    for param in params.split(";"):
        key, _, value = param.partition("=")
        if key.strip().lower() == "q":
            try:
                return max(0.0, min(float(value), 1.0))
            except ValueError:
                return 0.0
    return 1.0


async def compress(encoding: str, body: bytes) -> bytes:
    if len(body) > OFFLOAD_BYTES:
        return await asyncio.to_thread(_compress, encoding, body)
    return _compress(encoding, body)


def _compress(encoding: str, body: bytes) -> bytes:
    return zlib.compress(body, zlib.Z_DEFAULT_COMPRESSION, _WBITS[encoding])
