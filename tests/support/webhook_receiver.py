"""A real HTTP webhook receiver on loopback whose behaviour tests can change while it runs."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from relay.emulators.harness import BackgroundLoop, EmulatorServer


@dataclass
class Received:
    at: float  # time.monotonic()
    headers: dict[str, str]
    body: bytes
    status: int

    @property
    def webhook_id(self) -> str:
        return self.headers.get("webhook-id", "")

    @property
    def events(self) -> list[dict[str, Any]]:
        return list(json.loads(self.body)["events"])


@dataclass
class Behaviour:
    """How the receiver answers; tests change it while the relay runs."""

    fail_ratio: float = 0.0  # answer 503 this often
    status: int | None = None  # answer this for everything
    retry_after: tuple[int, str] | None = None  # (status, Retry-After) for the next answers
    retry_after_count: int = 0
    refuse_ids: set[str] = field(default_factory=set)  # 400 for batches holding these
    hang: bool = False
    decide: Callable[[Received], int | None] | None = None


class WebhookReceiver:
    def __init__(self, seed: int = 0) -> None:
        self.behaviour = Behaviour()
        self.received: list[Received] = []
        self.rng = random.Random(seed)
        self._lock = threading.Lock()
        self.server: EmulatorServer | None = None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        entry = Received(time.monotonic(), {k.lower(): v for k, v in request.headers.items()},
                         body, 0)
        b = self.behaviour
        while b.hang:  # noqa: ASYNC110 - a flag the test thread flips
            await asyncio.sleep(0.05)
        status = 200
        headers: dict[str, str] = {}
        if b.decide is not None and (decided := b.decide(entry)) is not None:
            status = decided
        elif b.status is not None:
            status = b.status
        elif b.retry_after is not None and b.retry_after_count > 0:
            b.retry_after_count -= 1
            status, headers["Retry-After"] = b.retry_after
        elif b.refuse_ids and any(e["id"] in b.refuse_ids for e in entry.events):
            status = 400
        elif b.fail_ratio and self.rng.random() < b.fail_ratio:
            status = 503
        entry.status = status
        with self._lock:
            self.received.append(entry)
        return web.Response(status=status, headers=headers, text="ok" if status < 300 else "no")

    def delivered_events(self) -> list[dict[str, Any]]:
        with self._lock:
            return [e for r in self.received if 200 <= r.status < 300 for e in r.events]

    def make_server(self, host: str = "127.0.0.1",
                    ports: list[int] | None = None) -> EmulatorServer:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.server = EmulatorServer(app, host, ports)
        return self.server


@contextmanager
def receiving(seed: int = 0) -> Iterator[tuple[WebhookReceiver, str, BackgroundLoop]]:
    receiver = WebhookReceiver(seed)
    loop = BackgroundLoop()
    loop.start()
    server = receiver.make_server()
    loop.run(server.start())
    try:
        yield receiver, f"{server.urls[0]}/hook", loop
    finally:
        receiver.behaviour.hang = False
        loop.run(server.stop())
        loop.stop()
