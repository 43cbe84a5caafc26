"""The operations endpoint: ``/metrics`` (Prometheus text), ``/healthz``, ``/readyz``, ``/stats``.

``/stats`` is the relay's live figures as JSON (:mod:`relay.status`), what
``relay top`` reads; like ``/metrics`` it holds no secrets and no chat content.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from relay.metrics import REGISTRY


class OpsServer:
    def __init__(self, listen: str, readiness: Callable[[], tuple[bool, dict[str, str]]],
                 stats: Callable[[], dict[str, Any]] | None = None) -> None:
        host, _, port = listen.rpartition(":")
        self.host = host.strip("[]")
        self.port = int(port)
        self._readiness = readiness
        self._stats = stats
        self._runner: web.AppRunner | None = None

    async def _metrics(self, _request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(REGISTRY),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, _request: web.Request) -> web.Response:
        # Answering at all proves the event loop is alive.
        return web.json_response({"status": "ok"})

    async def _readyz(self, _request: web.Request) -> web.Response:
        ready, details = self._readiness()
        return web.json_response({"ready": ready, "checks": details}, status=200 if ready else 503)

    async def _stats_route(self, _request: web.Request) -> web.Response:
        if self._stats is None:
            return web.json_response({"error": "no figures"}, status=404)
        return web.Response(body=orjson.dumps(self._stats()), content_type="application/json")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/stats", self._stats_route)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            self.port = sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
