"""Request metadata in the native gRPC front end: the headers named by `metadata_prefixes` reach
take() with a call's first item only (unary, stream message or a bare half-close), bounded in
count and bytes (a call over the bounds is refused natively). The restriction check built on
them runs end to end in test_restricted.py."""

from __future__ import annotations

import select
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from server import _native
from server.restricted import GRPC_HEADER_PREFIX

pytestmark = pytest.mark.skipif(
    not getattr(_native, "HAVE_GRPC_FRONTEND", False), reason="built without the front end"
)

SERVICE = "test.Echo"
KEY = GRPC_HEADER_PREFIX + "admin-key"
Item = tuple[int, str, bytes, int, tuple[tuple[str, str], ...] | None]


@pytest.fixture
def frontend() -> Iterator[Any]:
    fe = _native.GrpcFrontend("127.0.0.1", 0, 1 << 20, service=SERVICE,
                              streaming_methods=["Chat"], metadata_prefixes=[GRPC_HEADER_PREFIX])
    fe.start()
    yield fe
    fe.stop(1.0)


@pytest.fixture
def channel(frontend: Any) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{frontend.port}") as ch:
        yield ch


def wait_items(fe: Any, count: int, timeout: float = 10.0) -> list[Item]:
    items: list[Item] = []
    deadline = time.monotonic() + timeout
    while len(items) < count:
        left = deadline - time.monotonic()
        assert left > 0, f"got {len(items)} of {count} items: {items}"
        if select.select([fe.fileno()], [], [], left)[0]:
            items.extend(fe.take())
    return items


def say(channel: grpc.Channel, metadata: list[tuple[str, str]]) -> Any:
    return channel.unary_unary(f"/{SERVICE}/Say").future(b"m", timeout=10, metadata=metadata)


def test_a_unary_call_carries_the_prefixed_headers_in_order(frontend: Any,
                                                             channel: grpc.Channel) -> None:
    future = say(channel, [(KEY, "s3cret"), ("other-key", "x"), (GRPC_HEADER_PREFIX + "b", "2")])
    [(call_id, method, message, kind, metadata)] = wait_items(frontend, 1)
    assert (method, message, kind) == ("Say", b"m", 0)
    assert metadata == ((KEY, "s3cret"), (GRPC_HEADER_PREFIX + "b", "2"))
    frontend.respond([(call_id, b"", 0, "")])
    future.result()


def test_a_call_without_them_carries_an_empty_tuple(frontend: Any,
                                                    channel: grpc.Channel) -> None:
    future = say(channel, [("other-key", "x")])
    [(call_id, _, _, _, metadata)] = wait_items(frontend, 1)
    assert metadata == ()
    frontend.respond([(call_id, b"", 0, "")])
    future.result()


def test_without_prefixes_no_header_is_kept() -> None:
    fe = _native.GrpcFrontend("127.0.0.1", 0, 1 << 20, service=SERVICE)
    fe.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{fe.port}") as ch:
            future = say(ch, [(KEY, "s3cret")])
            [(call_id, _, _, _, metadata)] = wait_items(fe, 1)
            assert metadata == ()
            fe.respond([(call_id, b"", 0, "")])
            future.result()
    finally:
        fe.stop(1.0)


def test_a_stream_carries_them_on_its_first_item_only(frontend: Any,
                                                      channel: grpc.Channel) -> None:
    chat = channel.stream_stream(f"/{SERVICE}/Chat")
    call = chat(iter([b"a", b"b"]), timeout=10, metadata=[(KEY, "v")])
    items = wait_items(frontend, 3)
    assert [(m, kind, md) for _, _, m, kind, md in items] == [
        (b"a", 1, ((KEY, "v"),)), (b"b", 1, None), (b"", 2, None),
    ]
    frontend.respond([(items[0][0], None, 0, "")])
    assert list(call) == []
    # a stream without messages: its half-close is its first item
    call = chat(iter([]), timeout=10, metadata=[(KEY, "w")])
    [(call_id, _, _, kind, metadata)] = wait_items(frontend, 1)
    assert (kind, metadata) == (2, ((KEY, "w"),))
    frontend.respond([(call_id, None, 0, "")])
    assert list(call) == []


def test_64_headers_or_8_kib_are_the_most_a_call_may_carry(frontend: Any,
                                                            channel: grpc.Channel) -> None:
    many = [(f"{GRPC_HEADER_PREFIX}k{i}", "v") for i in range(64)]
    future = say(channel, many)
    [(call_id, _, _, _, metadata)] = wait_items(frontend, 1)
    assert metadata is not None and len(metadata) == 64
    frontend.respond([(call_id, b"", 0, "")])
    future.result()
    for metadata in ([*many, (KEY, "v")], [(KEY, "x" * 8192)]):
        with pytest.raises(grpc.RpcError) as info:
            say(channel, metadata).result()
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        assert "too much request metadata" in info.value.details()  # type: ignore[attr-defined]
    assert frontend.take() == []  # refused natively: nothing reached the application
