"""A Tachyon server whose gRPC transport is the native front end (server/grpc/native_frontend.py).

Stands in for `tachyon serve --grpc-frontend native` until the CLI has that flag: server/app.py's
TachyonServer with its grpc.aio front end switched off (the models, the HTTP server for the
readiness probe), plus the native gRPC front end on the gRPC port. Stops on SIGTERM / SIGINT.

    python -m tests.native_frontend_server --model-repository DIR --grpc-port N --http-port M
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from server.app import TachyonServer
from server.config import ServerSettings
from server.grpc import native_frontend


async def serve(settings: ServerSettings) -> None:
    app = TachyonServer(settings)
    await app.start()
    grpc = await native_frontend.start(
        app.dataplane, settings.host, settings.grpc_port, settings.max_request_bytes
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await grpc.stop(5.0)
    await app.stop(5.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--max-request-bytes", type=int, default=64 * 1024 * 1024)
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    settings = ServerSettings(
        model_repository=args.model_repository,
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        max_request_bytes=args.max_request_bytes,
        allow_grpc=False,  # the native front end takes the gRPC port instead
        allow_metrics=False,
    )
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(serve(settings))
    else:
        uvloop.run(serve(settings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
