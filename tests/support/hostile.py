"""Providers and destinations that misbehave on purpose, on real loopback sockets.

The emulators model the providers faithfully; these serve exactly the bytes a
test chooses (records nested 1,000 deep, invalid UTF-8, 5 MB records, odd
headers), so that a test can check what the relay does with each.

- :class:`ScriptedRongCloud`: each ``qrymsg`` answer is the next queued raw body
  (consume-on-read), then empty answers.
- :class:`ScriptedWuKongIM`: ``/message/sync`` answers the current raw batch until a
  ``syncack`` moves to the next one (``ignore_acks`` makes acks do nothing, as a
  real server does for a new conversation); ``/channel/messagesync`` answers the
  queued raw pages once each.
- :class:`ScriptedLeanCloud`: a history of raw records keyed by (timestamp, msg-id),
  served in order after the query's cursor.
- :class:`DripServer`: answers HTTP headers, then one body byte every ``interval``.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from aiohttp import web

from relay.emulators.harness import BackgroundLoop, EmulatorServer


@dataclass
class ScriptedRongCloud:
    answers: dict[str, deque[bytes]] = field(default_factory=lambda: {
        e: deque() for e in ("person", "group", "chatroom")})
    extra_headers: deque[tuple[int, dict[str, str]]] = field(default_factory=deque)
    requests: list[tuple[float, str]] = field(default_factory=list)
    arrived_wall: list[float] = field(default_factory=list)  # time.time() of each request
    close_connections: bool = False  # no keep-alive: every request needs a new connection
    lock: threading.Lock = field(default_factory=threading.Lock)

    def queue(self, endpoint: str, body: bytes) -> None:
        with self.lock:
            self.answers[endpoint].append(body)

    def pending(self) -> int:
        with self.lock:
            return sum(len(q) for q in self.answers.values())

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        endpoint = request.match_info["endpoint"]
        loop = asyncio.get_running_loop()
        with self.lock:
            self.requests.append((loop.time(), endpoint))
            self.arrived_wall.append(time.time())
            if self.extra_headers:
                status, headers = self.extra_headers.popleft()
                return web.Response(status=status, headers=headers,
                                    body=b'{"code":1008,"errorMessage":"throttled"}',
                                    content_type="application/json")
            queue = self.answers[endpoint]
            body = queue.popleft() if queue else b'{"code":200,"results":[],"size":0}'
        headers = {"Connection": "close"} if self.close_connections else {}
        return web.Response(body=body, content_type="application/json", headers=headers)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/rtmsg/{endpoint}/qrymsg.json", self.handle)
        return app


@dataclass
class ScriptedWuKongIM:
    batches: deque[bytes] = field(default_factory=deque)
    pages: deque[bytes] = field(default_factory=deque)
    ignore_acks: bool = False
    syncs: int = 0
    acks: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def sync(self, request: web.Request) -> web.Response:
        await request.read()
        with self.lock:
            self.syncs += 1
            body = self.batches[0] if self.batches else b"[]"
        return web.Response(body=body, content_type="application/json")

    async def syncack(self, request: web.Request) -> web.Response:
        await request.read()
        with self.lock:
            self.acks += 1
            if self.batches and not self.ignore_acks:
                self.batches.popleft()
        return web.json_response({"status": 200})

    async def channel(self, request: web.Request) -> web.Response:
        await request.read()
        with self.lock:
            body = self.pages.popleft() if self.pages else \
                b'{"start_message_seq":0,"end_message_seq":0,"more":0,"messages":[]}'
        return web.Response(body=body, content_type="application/json")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/message/sync", self.sync)
        app.router.add_post("/message/syncack", self.syncack)
        app.router.add_post("/channel/messagesync", self.channel)
        return app


@dataclass
class ScriptedLeanCloud:
    # (timestamp, msg-id, raw record bytes), kept sorted
    history: list[tuple[int, str, bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    pages_served: int = 0

    def add(self, timestamp: int, msg_id: str, raw: bytes) -> None:
        with self.lock:
            self.history.append((timestamp, msg_id, raw))
            self.history.sort(key=lambda r: (r[0], r[1]))

    async def messages(self, request: web.Request) -> web.Response:
        q = request.query
        after = (int(q.get("timestamp", "0")), q.get("msgid", ""))
        till = int(q.get("till_timestamp", str(2**62)))
        limit = int(q.get("limit", "100"))
        with self.lock:
            self.pages_served += 1
            chosen = [raw for t, m, raw in self.history
                      if (t, m) > after and (q.get("msgid") or t > after[0]) and t <= till]
        body = b"[" + b",".join(chosen[:limit]) + b"]"
        return web.Response(body=body, content_type="application/json")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/1.2/rtm/messages", self.messages)
        return app


@contextmanager
def serving_app(app: web.Application, ports: int = 1) -> Iterator[tuple[BackgroundLoop, list[str]]]:
    loop = BackgroundLoop()
    loop.start()
    server = EmulatorServer(app, "127.0.0.1", [0] * ports)
    loop.run(server.start())
    try:
        yield loop, server.urls
    finally:
        loop.run(server.stop())
        loop.stop()


class DripServer:
    """Sends a 200 status line and headers, then one body byte every ``interval`` seconds."""

    def __init__(self, interval: float = 2.0) -> None:
        self.interval = interval
        self.connections = 0
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._sock.getsockname()[1]}"

    def __enter__(self) -> DripServer:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._sock.close()
        self._thread.join(5)

    def _serve(self) -> None:
        self._sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                continue
            self.connections += 1
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(5)
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 1000000\r\n\r\n")
                while not self._stop.wait(self.interval):
                    conn.sendall(b" ")
            except OSError:
                return
