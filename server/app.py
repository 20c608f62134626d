"""Wires the core to its front ends and runs them on one event loop.

Start order: load the models, then open the ports. Stop order (SIGTERM, SIGINT): readiness
turns false at once (HTTP ready, ServerReady, the gRPC health service), every transport stops
taking new calls at the same time (the native gRPC front end with GOAWAY) while the calls already
admitted finish, for up to `--exit-timeout-secs`; then the batchers drain and the models unload.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import grpc
import uvicorn
from prometheus_client import make_asgi_app

from server import security
from server.config import ServerSettings
from server.dataplane import DataPlane
from server.grpc import native_frontend
from server.grpc import server as grpc_server
from server.grpc.health import HealthService
from server.http import server as http_server
from server.manager import ModelManager, ModelState, StartupError
from server.metrics import DEFAULT_LATENCY_BUCKETS, CacheCollector, Metrics, StateCollector

log = logging.getLogger(__name__)


class TachyonServer:
    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.metrics: Metrics | None = None
        if settings.allow_metrics:
            self.metrics = Metrics(settings.metrics_latency_buckets or DEFAULT_LATENCY_BUCKETS)
        self.manager = ModelManager(settings, self.metrics)
        if self.metrics is not None:
            states = [s.value for s in ModelState]
            self.metrics.add_state_collector(StateCollector(self.manager.entries, states))
            if self.manager.cache is not None:
                self.metrics.add_state_collector(CacheCollector(self.manager.cache.totals))
        self.dataplane = DataPlane(settings, self.manager)
        self.health = HealthService(self.dataplane)
        self._grpc: grpc.aio.Server | native_frontend.NativeGrpcServer | None = None
        self._http_task: asyncio.Task[None] | None = None
        self._http: object | None = None
        self._metrics_server: uvicorn.Server | None = None
        self._metrics_task: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()
        self._stop_requested = asyncio.Event()
        self._failure: str | None = None  # a transport died: stop, then exit non-zero

    async def start(self) -> None:
        security.check(self.settings)  # refuses settings a transport cannot honour
        failures = await self.manager.start()
        if failures and self.settings.exit_on_error:
            await self.manager.shutdown()
            raise StartupError(failures)
        self.dataplane.started = True
        s = self.settings
        if s.allow_grpc and s.grpc_frontend == "native":
            native = await native_frontend.start(
                self.dataplane, s.host, s.grpc_port, s.max_request_bytes, self.health,
                tls_settings=s.grpc_tls, restrictions=s.grpc_restricted,
                connections=s.grpc_connections, on_failure=self._transport_failed,
            )
            self.dataplane.add_liveness_check(lambda: native.failure() is None)
            self._grpc = native
        elif s.allow_grpc:
            self._grpc = await grpc_server.start(
                self.dataplane, s.host, s.grpc_port, s.max_request_bytes, self.health,
                tls_settings=s.grpc_tls, restrictions=s.grpc_restricted,
                connections=s.grpc_connections,
            )
        if s.allow_http:
            http = http_server.make_server(self.dataplane, s.host, s.http_port, s.max_request_bytes)
            security.secure_http(http.config, s.http_tls, s.http_restricted)
            http.config.timeout_graceful_shutdown = max(1, round(s.exit_timeout_secs))
            self._http = http
            self._http_task = asyncio.get_running_loop().create_task(http.serve())
            while not http.started:
                if self._http_task.done():
                    self._http_task.result()
                    raise OSError(f"HTTP server on {s.host}:{s.http_port} did not start")
                await asyncio.sleep(0.01)
            log.info("HTTP listening on %s:%d", s.host, s.http_port)
        if self.metrics is not None:
            await self._start_metrics()
        log.info("Tachyon is ready: %d model versions", len(self.manager.entries()))

    async def _start_metrics(self) -> None:
        assert self.metrics is not None
        app = make_asgi_app(self.metrics.registry)
        config = uvicorn.Config(
            app, host=self.settings.host, port=self.settings.metrics_port, loop="none",
            lifespan="off", log_level="warning", access_log=False, ws="none",
        )
        self._metrics_server = uvicorn.Server(config)
        self._metrics_task = asyncio.get_running_loop().create_task(self._metrics_server.serve())
        while not self._metrics_server.started:
            if self._metrics_task.done():
                self._metrics_task.result()
                raise OSError(f"metrics server on port {self.settings.metrics_port} did not start")
            await asyncio.sleep(0.01)
        log.info("metrics on %s:%d/metrics", self.settings.host, self.settings.metrics_port)

    async def stop(self, grace: float | None = None) -> None:
        """Not ready at once; every transport stops taking calls together and answers the
        admitted ones within `grace` (default --exit-timeout-secs); then the models unload."""
        grace = self.settings.exit_timeout_secs if grace is None else grace
        self.dataplane.started = False
        self.health.enter_shutdown()
        closing: list[Awaitable[None]] = []
        if self._grpc is not None:
            closing.append(self._grpc.stop(grace))
        if self._http is not None and self._http_task is not None:
            self._http.should_exit = True  # type: ignore[attr-defined]
            closing.append(self._http_task)
        for result in await asyncio.gather(*closing, return_exceptions=True):
            if isinstance(result, BaseException) and not isinstance(
                result, asyncio.CancelledError
            ):
                log.error("a transport failed while stopping: %r", result)
        await self.manager.shutdown()
        if self.dataplane.tracer is not None:  # export the spans still queued
            await asyncio.to_thread(self.dataplane.tracer.shutdown)
        if self._metrics_server is not None and self._metrics_task is not None:
            self._metrics_server.should_exit = True
            with contextlib.suppress(asyncio.CancelledError):
                await self._metrics_task
        self._stopped.set()

    @property
    def grpc(self) -> grpc.aio.Server | native_frontend.NativeGrpcServer | None:
        """The gRPC transport once started (None before, or with --allow-grpc false)."""
        return self._grpc

    def _transport_failed(self, why: str) -> None:
        """A transport cannot serve any more (the native gRPC I/O thread died): not live,
        and the server stops as on SIGTERM, then exits non-zero."""
        self._failure = why
        self._stop_requested.set()

    async def run_until_signal(self) -> None:
        """Serves until SIGINT or SIGTERM; raises TransportFailed once stopped if a transport
        died meanwhile."""
        # Handlers first: a SIGTERM that arrives while the ports open (they answer before
        # start() returns) stops the server once started instead of killing it outright.
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stop_requested.set)
        await self.start()
        await self._stop_requested.wait()
        log.info(
            "shutting down: not ready, refusing new calls, finishing admitted requests "
            "(up to %gs)", self.settings.exit_timeout_secs
        )
        await self.stop()
        log.info("stopped")
        if self._failure is not None:
            raise TransportFailed(self._failure)


class TransportFailed(Exception):
    """A transport stopped serving on its own; the server stopped and exits non-zero."""


def run(settings: ServerSettings) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        runner: Callable[[Coroutine[Any, Any, None]], None] = asyncio.run
    else:
        runner = uvloop.run
    try:
        runner(TachyonServer(settings).run_until_signal())
    except StartupError as exc:  # --exit-on-error: the reasons, then a non-zero exit
        log.critical("%s", exc)
        raise SystemExit(1) from None
    except TransportFailed as exc:
        log.critical("exiting: a transport failed: %s", exc)
        raise SystemExit(1) from None
