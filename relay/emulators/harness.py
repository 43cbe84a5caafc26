"""Serving an emulator: aiohttp on loopback ports, fault injection, a background thread.

Shared by the emulators only (never by the sources: an emulator is the
provider's side, written from the provider's documents).

Faults, switchable at any time:

- ``error_ratio``: answer 5xx;
- ``malformed_ratio``: answer 200 with a truncated JSON body;
- ``slow_ratio`` / ``slow_seconds``: wait before answering;
- ``refuse(index, seconds)``: close a listening port so connections are refused.

``consume_on_fault`` says whether a 5xx / malformed answer takes its batch
with it (as a consume-on-read provider would if it failed after dequeuing);
the emulator then records the batch as lost so tests can account for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
import weakref
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from aiohttp import web
from aiohttp.typedefs import Handler

_T = TypeVar("_T")


@dataclass
class Faults:
    error_ratio: float = 0.0
    error_status: int = 500
    malformed_ratio: float = 0.0
    slow_ratio: float = 0.0
    slow_seconds: float = 0.0
    consume_on_fault: bool = False

    def update(self, values: dict[str, Any]) -> None:
        for key, value in values.items():
            if not hasattr(self, key):
                raise ValueError(f"unknown fault {key!r}")
            current = getattr(self, key)
            setattr(self, key, type(current)(value))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class FaultPlan:
    """Draws which fault, if any, hits one answer."""

    def __init__(self, faults: Faults, rng: random.Random) -> None:
        self.faults = faults
        self.rng = rng

    def error(self) -> bool:
        return self.faults.error_ratio > 0 and self.rng.random() < self.faults.error_ratio

    def malformed(self) -> bool:
        return self.faults.malformed_ratio > 0 and self.rng.random() < self.faults.malformed_ratio

    async def maybe_slow(self) -> None:
        if self.faults.slow_ratio > 0 and self.rng.random() < self.faults.slow_ratio:
            await asyncio.sleep(self.faults.slow_seconds)


def truncated_json(body: bytes) -> bytes:
    """A JSON answer cut in the middle: what a broken proxy or reset would leave."""
    return body[: max(1, len(body) // 2)]


class EmulatorServer:
    """An aiohttp application on one or more loopback ports (primary, backup, ...)."""

    def __init__(self, app: web.Application, host: str = "127.0.0.1",
                 ports: list[int] | None = None) -> None:
        self.app = app
        self.host = host
        self._requested_ports = ports or [0]
        self.ports: list[int] = []
        self._runner: web.AppRunner | None = None
        self._sites: list[web.TCPSite | None] = []
        # Open connections per local port, so that "refuse" also drops keep-alive ones.
        self._connections: dict[int, weakref.WeakSet[asyncio.Transport]] = {}
        app.middlewares.append(self._track_connection)

    @web.middleware
    async def _track_connection(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        transport = request.transport
        if transport is not None:
            sockname = transport.get_extra_info("sockname")
            if sockname:
                port = int(sockname[1])
                if port in self.ports and self._sites[self.ports.index(port)] is None:
                    # Arrived on a kept-alive connection to a port that is down.
                    transport.abort()
                    raise web.HTTPServiceUnavailable()
                self._connections.setdefault(port, weakref.WeakSet()).add(transport)
        return await handler(request)

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self._runner.setup()
        for port in self._requested_ports:
            site = web.TCPSite(self._runner, self.host, port, reuse_address=True)
            await site.start()
            server = site._server  # the bound port, when 0 was asked for
            assert server is not None
            sockets = getattr(server, "sockets", None) or []
            bound = sockets[0].getsockname()[1] if sockets else port
            self.ports.append(bound)
            self._sites.append(site)

    @property
    def urls(self) -> list[str]:
        return [f"http://{self.host}:{port}" for port in self.ports]

    async def refuse(self, index: int, seconds: float | None = None) -> None:
        """Stop listening on one port (connections are refused); back after ``seconds``."""
        site = self._sites[index]
        if site is not None:
            await site.stop()
            self._sites[index] = None
        for transport in list(self._connections.pop(self.ports[index], ())):
            transport.abort()
        if seconds is not None:
            asyncio.get_running_loop().call_later(
                seconds, lambda: asyncio.ensure_future(self.resume(index))
            )

    async def resume(self, index: int) -> None:
        if self._sites[index] is not None or self._runner is None:
            return
        site = web.TCPSite(self._runner, self.host, self.ports[index], reuse_address=True)
        await site.start()
        self._sites[index] = site

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


class BackgroundLoop:
    """An asyncio loop in a daemon thread, for running an emulator beside a test or demo."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="emulator", daemon=True)
        self._started = threading.Event()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._started.set)
        self.loop.run_forever()
        # Let cancelled tasks finish, then close cleanly (no ResourceWarning).
        pending = asyncio.all_tasks(self.loop)
        for task in pending:
            task.cancel()
        if pending:
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()

    def start(self) -> None:
        self._thread.start()
        self._started.wait(10)

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float = 30) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], _T], timeout: float = 30) -> _T:
        async def wrapper() -> _T:
            return fn()

        return self.run(wrapper(), timeout)

    def stop(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)


def monotonic() -> float:
    return time.monotonic()


async def run_forever(server: EmulatorServer, on_start: Callable[[], None] | None = None) -> None:
    """Serve until cancelled (``relay emulate ...``)."""
    await server.start()
    if on_start:
        on_start()
    try:
        await asyncio.Event().wait()
    finally:
        with contextlib.suppress(Exception):
            await server.stop()


async def paced(rate: float, emit: Callable[[int], object], interval: float = 0.05) -> None:
    """Call ``emit(n)`` so that ``rate`` units per second are produced, until cancelled."""
    carry = 0.0
    while True:
        carry += rate * interval
        whole = int(carry)
        if whole:
            carry -= whole
            emit(whole)
        await asyncio.sleep(interval)


class EmulatorBase:
    """What every emulator shares: its server, its traffic task, the common admin routes."""

    faults: Faults
    server: EmulatorServer | None = None
    _traffic: asyncio.Task[None] | None = None

    def app(self) -> web.Application:
        raise NotImplementedError

    def make_server(self, host: str = "127.0.0.1",
                    ports: list[int] | None = None) -> EmulatorServer:
        self.server = EmulatorServer(self.app(), host, ports)
        return self.server

    def _replace_traffic(self, loop: Coroutine[Any, Any, None] | None) -> None:
        """Stop the running traffic generator and start ``loop`` instead. Call on the loop."""
        if self._traffic is not None:
            self._traffic.cancel()
            self._traffic = None
        if loop is not None:
            self._traffic = asyncio.get_running_loop().create_task(loop)

    def snapshot(self) -> dict[str, Any]:
        raise NotImplementedError

    def set_traffic(self, rate: float) -> None:
        raise NotImplementedError

    async def _admin_stats(self, _request: web.Request) -> web.Response:
        return web.json_response(self.snapshot())

    async def _admin_traffic(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.set_traffic(float(body.get("rate", 0)))
        return web.json_response({"rate": body.get("rate", 0)})

    async def _admin_faults(self, request: web.Request) -> web.Response:
        try:
            self.faults.update(await request.json())
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(self.faults.as_dict())

    async def _admin_refuse(self, request: web.Request) -> web.Response:
        body = await request.json()
        assert self.server is not None
        await self.server.refuse(int(body.get("index", 0)), body.get("seconds"))
        return web.json_response({"refusing": body.get("index", 0)})

    def add_common_admin_routes(self, app: web.Application) -> None:
        app.router.add_get("/_emulator/stats", self._admin_stats)
        app.router.add_post("/_emulator/traffic", self._admin_traffic)
        app.router.add_post("/_emulator/faults", self._admin_faults)
        app.router.add_post("/_emulator/refuse", self._admin_refuse)
