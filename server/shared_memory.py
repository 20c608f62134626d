"""System shared memory (Triton's extension): the server-wide registry of regions, and the
reads and writes of the tensors a request keeps in them.

A client creates a POSIX shared memory object (`shm_open("/key")`, which on Linux is the file
`/dev/shm/key`), registers a region of it (name, key, offset, byte_size) over gRPC or HTTP, and
then names the region in a tensor's parameters: `shared_memory_region`,
`shared_memory_byte_size` and, optionally, `shared_memory_offset` (into the region).

- Registering opens the object (no symbolic links, a regular file), checks the region lies in
  it and maps the region; the descriptor stays open so that every access first checks the
  object was not truncated since (touching a page past its end would raise SIGBUS). Names are
  unique (Triton's ALREADY_EXISTS); several regions may share a key.
- An input in a region is copied into the request's own array at admission (`admit`), so the
  batcher and the backend never see the mapping. An output asked for in a region is written
  there when the response is delivered (`RequestMemory.deliver`), and the response carries no
  data for it (an empty array: gRPC sends an empty raw_output_contents entry, as Triton does).
- A request holds a lease on each region it writes to, from admission to delivery.
  Unregistering a region removes its name at once; its mapping is closed when the last lease is
  released, so a request in flight never writes into unmapped memory.

Everything here runs on the event loop, except the copies of large tensors, which run on a
worker thread while their lease keeps the mapping alive.
"""

from __future__ import annotations

import asyncio
import errno
import mmap
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from server.errors import Code, ServingError, exhausted, internal, invalid, not_found
from server.tensors import Buffer, element_count, from_raw, raw_view
from server.types import (
    Array,
    DataType,
    InferInput,
    InferRequest,
    InferResponse,
    OutputTensor,
    SharedMemoryRef,
)

SHM_DIR = Path("/dev/shm")
"""Where Linux keeps POSIX shared memory objects (glibc's shm_open opens SHM_DIR / name)."""
MAX_KEY_BYTES = 255  # NAME_MAX
MAX_REGIONS = 1024
"""Registered regions at most: each keeps a descriptor open (the server's are for clients)."""
COPY_ON_LOOP_BYTES = 1 << 20
"""Tensors above this many bytes are copied to or from a region on a worker thread."""

REGION = "shared_memory_region"
BYTE_SIZE = "shared_memory_byte_size"
OFFSET = "shared_memory_offset"

_EMPTY = {dt: np.empty(0, dtype=dt.numpy) for dt in DataType}


@dataclass(frozen=True, slots=True)
class RegionStatus:
    name: str
    key: str
    offset: int
    byte_size: int


class _Region:
    """One registered region: its mapping, the object's descriptor (to check its size before
    each access) and the leases that keep both open."""

    __slots__ = (
        "_fd",
        "_map",
        "_retired",
        "_start",
        "_users",
        "byte_size",
        "key",
        "name",
        "offset"
    )

    def __init__(self, name: str, key: str, offset: int, byte_size: int, fd: int) -> None:
        self.name, self.key, self.offset, self.byte_size = name, key, offset, byte_size
        self._start = offset % mmap.ALLOCATIONGRANULARITY  # mmap offsets are page aligned
        self._map = mmap.mmap(
            fd, self._start + byte_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
            offset=offset - self._start,
        )
        self._fd = fd
        self._users = 0
        self._retired = False

    def status(self) -> RegionStatus:
        return RegionStatus(self.name, self.key, self.offset, self.byte_size)

    def acquire(self) -> None:
        self._users += 1

    def release(self) -> None:
        self._users -= 1
        if self._retired and self._users == 0:
            self._close()

    def retire(self) -> None:
        """Unregistered: the mapping closes now, or when the last lease is released."""
        self._retired = True
        if self._users == 0:
            self._close()

    def _close(self) -> None:
        self._map.close()
        os.close(self._fd)

    def view(self, offset: int, size: int) -> memoryview:
        """`size` bytes at `offset`. Touching pages past the end of the object would kill the
        process (SIGBUS), so a client that shrank the object since registering gets an error."""
        end = self.offset + offset + size
        if size and os.fstat(self._fd).st_size < end:
            raise invalid(
                f"shared memory object '{self.key}' of region '{self.name}' is now "
                f"{os.fstat(self._fd).st_size} bytes, expected at least {end}: it was truncated "
                "after the region was registered"
            )
        start = self._start + offset
        return memoryview(self._map)[start : start + size]


class Lease:
    """One tensor's use of `byte_size` bytes at `offset` in a region; the region's mapping
    stays open until `release()`."""

    __slots__ = ("_released", "byte_size", "offset", "region")

    def __init__(self, region: _Region, offset: int, byte_size: int) -> None:
        self.region, self.offset, self.byte_size = region, offset, byte_size
        region.acquire()
        self._released = False

    def read(self) -> bytes:
        with self.region.view(self.offset, self.byte_size) as view:
            return view.tobytes()

    def write(self, data: Buffer) -> None:
        source = memoryview(data).cast("B")
        with self.region.view(self.offset, len(source)) as view:
            view[:] = source

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.region.release()


class SharedMemoryRegistry:
    """The registered system shared memory regions, by name (one registry per server, shared
    by its HTTP and gRPC front ends)."""

    def __init__(self, shm_dir: Path = SHM_DIR) -> None:
        self._dir = shm_dir
        self._regions: dict[str, _Region] = {}

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        if not name:
            raise invalid("'name' is empty, expected the name to register the region under")
        if name in self._regions:
            raise ServingError(
                Code.ALREADY_EXISTS,
                f"shared memory region '{name}' already in manager: unregister it first, or "
                "register the region under another name",
            )
        if len(self._regions) >= MAX_REGIONS:
            raise exhausted(
                f"cannot register shared memory region '{name}': {MAX_REGIONS} regions are "
                "registered already, the most a server keeps; unregister some first"
            )
        path = self._dir / object_name(key)
        _check_integer("offset", offset)
        _check_integer("byte_size", byte_size, minimum=1)
        fd = _open(path, key)
        try:
            size = _object_size(fd, key)
            if offset + byte_size > size:
                raise invalid(
                    f"failed to register shared memory region '{name}': offset {offset} + "
                    f"byte_size {byte_size} = {offset + byte_size} bytes, expected at most the "
                    f"{size} bytes of shared memory object '{key}'"
                )
            try:
                self._regions[name] = _Region(name, key, offset, byte_size, fd)
            except (OSError, ValueError, OverflowError) as exc:
                raise internal(f"failed to register shared memory region '{name}': {exc}") from None
        except BaseException:
            os.close(fd)
            raise

    def unregister(self, name: str = "") -> None:
        """Unregisters `name`, or every region when `name` is empty. An unknown name is not an
        error (as in Triton)."""
        names = [name] if name else list(self._regions)
        for each in names:
            region = self._regions.pop(each, None)
            if region is not None:
                region.retire()

    def status(self, name: str = "") -> list[RegionStatus]:
        """The status of `name` (NOT_FOUND when unknown), or of every region."""
        if not name:
            return [r.status() for r in self._regions.values()]
        region = self._regions.get(name)
        if region is None:
            raise not_found(f"Unable to find system shared memory region: '{name}'")
        return [region.status()]

    def lease(self, where: str, ref: SharedMemoryRef) -> Lease:
        """A lease on the bytes `ref` names; `where` says whose they are ("input 'X'")."""
        region = self._regions.get(ref.region)
        if region is None:
            raise not_found(
                f"{where}: Unable to find shared memory region: '{ref.region}', expected a "
                "region registered with SystemSharedMemoryRegister (or POST "
                f"/v2/systemsharedmemory/region/{ref.region}/register)"
            )
        end = ref.offset + ref.byte_size
        if end > region.byte_size:
            raise invalid(
                f"{where}: {OFFSET} {ref.offset} + {BYTE_SIZE} {ref.byte_size} = {end} bytes, "
                f"expected at most the {region.byte_size} bytes of shared memory region "
                f"'{ref.region}'"
            )
        return Lease(region, ref.offset, ref.byte_size)

    def close(self) -> None:
        self.unregister()


# -- CUDA shared memory: none can be registered here ------------------------------------------

CUDA_UNSUPPORTED = (
    "CUDA shared memory is not supported by this server, expected system shared memory "
    "(SystemSharedMemoryRegister, or POST /v2/systemsharedmemory/region/<name>/register)"
)


def cuda_status(name: str = "") -> list[RegionStatus]:
    """CUDA regions never exist here: none to list, and a named one is NOT_FOUND (Triton's
    answers when it has none). Unregistering them is a no-op, as in Triton; registering one is
    UNIMPLEMENTED (CUDA_UNSUPPORTED)."""
    if name:
        raise not_found(
            f"Unable to find cuda shared memory region: '{name}' ({CUDA_UNSUPPORTED})"
        )
    return []


def object_name(key: object) -> str:
    """The file name under SHM_DIR of a POSIX shared memory key ("/name" or "name"), refusing
    anything that could name another file."""
    expected = (
        "expected the key of a POSIX shared memory object: '/name', with no other '/', no "
        f"'..', no NUL, at most {MAX_KEY_BYTES} bytes"
    )
    if not isinstance(key, str):
        raise invalid(f"'key' is {key!r}, {expected}")
    name = key[1:] if key.startswith("/") else key
    if (
        not name or "/" in name or ".." in name or "\0" in name or name == "."
        or len(name.encode("utf-8", "surrogateescape")) > MAX_KEY_BYTES
    ):
        raise invalid(f"'key' is {key!r}, {expected}")
    return name


def _check_integer(field: str, value: object, minimum: int = 0) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise invalid(f"'{field}' is {value!r}, expected an integer of at least {minimum}")


def _open(path: Path, key: str) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise invalid(
            f"Unable to open shared memory region: '{key}': no POSIX shared memory object of "
            "that key, expected one the client created (shm_open) before registering it"
        ) from None
    except OSError as exc:
        why = "it is a symbolic link" if exc.errno == errno.ELOOP else exc.strerror
        raise invalid(
            f"Unable to open shared memory region: '{key}' for reading and writing: {why}"
        ) from None


def _object_size(fd: int, key: str) -> int:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise invalid(f"'key' {key!r} is not a shared memory object, expected a regular object")
    return info.st_size


# -- tensor parameters ----------------------------------------------------------------------


def tensor_ref(where: str, params: Mapping[str, object]) -> SharedMemoryRef | None:
    """The region a tensor's parameters name, None when they name none. `where` names the
    tensor in errors ("input 'INPUT0'")."""
    if REGION not in params and BYTE_SIZE not in params and OFFSET not in params:
        return None
    region = params.get(REGION)
    size = params.get(BYTE_SIZE)
    if region is None or size is None:
        missing = REGION if region is None else BYTE_SIZE
        raise invalid(
            f"{where}: parameter '{missing}' is missing, expected both '{REGION}' and "
            f"'{BYTE_SIZE}' for a tensor in shared memory"
        )
    if not isinstance(region, str) or not region:
        raise invalid(f"{where}: parameter '{REGION}' is {region!r}, expected a region name")
    offset = params.get(OFFSET, 0)
    for field, value in ((BYTE_SIZE, size), (OFFSET, offset)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise invalid(
                f"{where}: parameter '{field}' is {value!r}, expected a non-negative integer "
                "(int64)"
            )
    assert isinstance(size, int) and isinstance(offset, int)
    return SharedMemoryRef(region, size, offset)


def shared_input(
    name: str, datatype: DataType, shape: tuple[int, ...], ref: SharedMemoryRef
) -> InferInput:
    """An input whose data is read from its region at admission (`admit`)."""
    return InferInput(name, datatype, shape, _EMPTY[datatype], ref)


def uses_shared_memory(request: InferRequest) -> bool:
    return any(i.shared_memory is not None for i in request.inputs) or any(
        o.shared_memory is not None for o in request.outputs
    )


# -- a request's regions --------------------------------------------------------------------


class RequestMemory:
    """The leases of one request's outputs, from admission until `close()`."""

    def __init__(self, leases: dict[str, Lease]) -> None:
        self._leases = leases

    async def deliver(self, response: InferResponse) -> None:
        """Writes each output asked for in a region there; its data in `response` becomes an
        empty array. Every size is checked before anything is written."""
        writes = []
        for index, output in enumerate(response.outputs):
            lease = self._leases.get(output.name)
            if lease is None:
                continue
            # an empty array has no byte view to cast (numpy shapes with a 0)
            data = raw_view(output.datatype, output.data) if output.data.size else b""
            if len(data) > lease.byte_size:
                raise invalid(
                    f"output '{output.name}': {BYTE_SIZE} is {lease.byte_size}, expected at "
                    f"least {len(data)} bytes to hold the output ({output.datatype.value} "
                    f"with shape {list(output.shape)}) in shared memory region "
                    f"'{lease.region.name}'"
                )
            writes.append((lease, data))
            response.outputs[index] = OutputTensor(
                output.name, output.datatype, output.shape, _EMPTY[output.datatype],
                SharedMemoryRef(lease.region.name, lease.byte_size, lease.offset),
            )
        if sum(len(d) for _, d in writes) > COPY_ON_LOOP_BYTES:
            await asyncio.to_thread(_write_all, writes)
        else:
            _write_all(writes)

    def close(self) -> None:
        for lease in self._leases.values():
            lease.release()
        self._leases = {}


def _write_all(writes: Sequence[tuple[Lease, Buffer]]) -> None:
    for lease, data in writes:
        lease.write(data)


async def admit(
    registry: SharedMemoryRegistry, request: InferRequest, max_bytes: int
) -> RequestMemory:
    """Reads every input that lives in a region into its own array (`max_bytes` at most in
    all, as for a request's tensors on the wire), and leases the regions of the outputs asked
    for in shared memory (released by the result's `close()`)."""
    read = 0
    for tensor in request.inputs:
        if tensor.shared_memory is not None:
            read += tensor.shared_memory.byte_size
            if read > max_bytes:
                raise exhausted(
                    f"input '{tensor.name}': the request's inputs in shared memory add up to "
                    f"{read} bytes, more than the {max_bytes} bytes a request may carry "
                    "(--max-request-bytes)"
                )
            tensor.data = await _read_input(registry, tensor, tensor.shared_memory)
    leases: dict[str, Lease] = {}
    try:
        for output in request.outputs:
            if output.shared_memory is not None:
                where = f"output '{output.name}'"
                leases[output.name] = registry.lease(where, output.shared_memory)
    except BaseException:
        RequestMemory(leases).close()
        raise
    return RequestMemory(leases)


async def _read_input(
    registry: SharedMemoryRegistry, tensor: InferInput, ref: SharedMemoryRef
) -> Array:
    where = f"input '{tensor.name}'"
    if tensor.datatype is not DataType.BYTES:
        expected = element_count(tensor.shape) * tensor.datatype.itemsize
        if ref.byte_size != expected:
            raise invalid(
                f"{where}: {BYTE_SIZE} is {ref.byte_size}, expected {expected} bytes "
                f"({tensor.datatype.value} with shape {list(tensor.shape)})"
            )
    lease = registry.lease(where, ref)
    try:
        if ref.byte_size > COPY_ON_LOOP_BYTES:
            data = await asyncio.to_thread(lease.read)
        else:
            data = lease.read()
    finally:
        lease.release()
    try:
        return from_raw(tensor.name, tensor.datatype, tensor.shape, data)
    except ServingError as exc:
        raise invalid(f"{exc.message} (read from shared memory region '{ref.region}')") from None
