"""RongCloud emulator: high-assurance message routing as the provider documents it.

Written from ``rongcloud-rtmsg-routing.md`` / ``rongcloud-server-api-basics.md``:

- ``POST /rtmsg/{person,group,chatroom}/qrymsg.json`` → ``{"results": [...], "size": n}``;
  a query removes what it returns (consume-on-read), ``batch_size`` at most.
- Signed with ``App-Key``, ``Nonce`` (≤ 18 chars), ``Timestamp``,
  ``Signature = sha1(secret + nonce + timestamp)``; a bad one gets 401 with code 1004.
- At most ``budget`` requests per second per (app key, endpoint); over it the
  answer is an empty 200 — and :attr:`over_budget` counts it, so tests can assert 0.
- Messages older than ``retention`` (3 h) are dropped unserved.
- ``redelivery_ratio``: that share of served records is served once more later.
- ``results`` items are objects or JSON strings (``string_items_ratio``), contents
  objects, JSON strings or plain text, as the documents allow.
- ``POST /user/info.json``: a harmless signed call (what ``relay check`` uses).

Admin API (no auth, loopback): ``GET /_emulator/stats``, ``GET /_emulator/served``,
``POST /_emulator/generate {"count", "endpoint"?}``, ``POST /_emulator/faults {...}``,
``POST /_emulator/refuse {"index", "seconds"}``, ``POST /_emulator/traffic {"rate"}``.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from relay.emulators.harness import EmulatorBase, FaultPlan, Faults, paced, truncated_json

ENDPOINTS = ("person", "group", "chatroom")
_UID_ALPHABET = "0123456789ABCDEFGHJKLMNPQRSTUVWXYZ"
_TEXT_TYPES = ("RC:TxtMsg", "RC:ImgMsg", "RC:VcMsg", "RC:LBSMsg", "RC:InfoNtf", "RC:CmdNtf")


@dataclass
class ServedBatch:
    """One answer that carried messages: when, on which endpoint, which ids."""

    endpoint: str
    at: float  # time.monotonic() when the answer was produced
    keys: list[str]
    lost: bool = False  # answered with a fault that took the batch with it


@dataclass
class _Queued:
    key: str
    record: dict[str, Any]
    created: float  # time.time()
    redelivery: bool = False
    # The record's JSON in UTF-8, encoded once: serving then costs a join of bytes, not a
    # dump and an encode per message, so the emulator stays a small share of the machine
    # in benchmarks (it shares the relay's cores there).
    encoded: bytes = b""

    def as_item(self, as_string: bool) -> bytes:
        if not self.encoded:
            self.encoded = encode_record(self.record)
        if not as_string:
            return self.encoded
        # The same JSON as a JSON string. The encoded text holds no raw control characters
        # (json.dumps escapes them), so quoting it needs only '\\' and '"' escaped: two
        # replaces instead of a json.dumps, which builds an encoder per call.
        return b'"' + self.encoded.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def encode_record(record: dict[str, Any]) -> bytes:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode()


@dataclass
class RongCloudStats:
    requests: int = 0
    over_budget: int = 0
    bad_signature: int = 0
    served_messages: int = 0
    redelivered: int = 0
    expired: int = 0
    lost_to_faults: int = 0
    generated: int = 0
    expired_keys: list[str] = field(default_factory=list)


def message_key(record: dict[str, Any]) -> str:
    """How the emulator (and tests) name a message: msgUID, or its chatroom fields."""
    uid = record.get("msgUID")
    if uid:
        return str(uid)
    return "|".join(
        str(record.get(k, "")) for k in ("objectName", "fromUserId", "toUserId", "msgTimestamp")
    )


class RongCloudEmulator(EmulatorBase):
    def __init__(
        self,
        app_key: str = "demo-app-key",
        app_secret: str = "demo-app-secret",  # noqa: S107 - the emulator's own demo secret
        *,
        batch_size: int = 100,
        budget: int | None = 10,
        budget_window: float = 1.0,
        retention: float = 3 * 3600.0,
        redelivery_ratio: float = 0.0,
        string_items_ratio: float = 0.3,
        seed: int | None = None,
        faults: Faults | None = None,
    ) -> None:
        self.app_key = app_key
        self.app_secret = app_secret
        self.batch_size = batch_size
        self.budget = budget
        self.budget_window = budget_window
        self.retention = retention
        self.redelivery_ratio = redelivery_ratio
        self.string_items_ratio = string_items_ratio
        self.rng = random.Random(seed)
        self.faults = faults or Faults()
        self._plan = FaultPlan(self.faults, self.rng)
        self.queues: dict[str, deque[_Queued]] = {e: deque() for e in ENDPOINTS}
        self._arrivals: dict[tuple[str, str], deque[float]] = {}
        self.stats = RongCloudStats()
        self.served: list[ServedBatch] = []
        self.arrivals: dict[str, list[tuple[float, bool]]] = {e: [] for e in ENDPOINTS}
        self._counter = itertools.count(1)
        self._run_id = "".join(self.rng.choice(_UID_ALPHABET) for _ in range(4))
        self._lock = threading.Lock()

    # -- traffic -----------------------------------------------------------

    def _uid(self, n: int) -> str:
        digits = []
        for _ in range(12):
            n, r = divmod(n, len(_UID_ALPHABET))
            digits.append(_UID_ALPHABET[r])
        body = "".join(reversed(digits))
        return f"{self._run_id}-{body[:4]}-{body[4:8]}-{body[8:]}"

    def _content(self, n: int, object_name: str) -> Any:
        roll = self.rng.random()
        payload = {"content": f"message {n} ✓", "extra": ""}
        if object_name == "RC:ImgMsg":
            payload = {"content": "aGVsbG8=", "imageUri": f"https://img.example/{n}.jpg"}
        if roll < 0.6:
            return payload
        if roll < 0.85:
            return json.dumps(payload, ensure_ascii=False)
        if roll < 0.97:
            return f"plain text {n}"
        return None  # no content at all

    def make_record(self, endpoint: str, n: int, now_ms: int) -> dict[str, Any]:
        if endpoint == "chatroom":
            return {
                "fromUserId": f"cu{n}",
                "toUserId": f"room{n % 7}",
                "msgTimestamp": str(now_ms),
                "objectName": self.rng.choice(
                    ("func:joinchatroommsgcontent", "func:leavechatroommsgcontent")
                ),
            }
        object_name = self.rng.choice(_TEXT_TYPES)
        if endpoint == "person":
            channel_type = self.rng.choice(("PERSON",) * 8 + ("CUSTOMERSERVICE", "NOTIFY"))
            target = f"u{self.rng.randrange(1000)}"
        else:
            channel_type = "GROUP"
            target = f"g{self.rng.randrange(50)}"
        record: dict[str, Any] = {
            "fromUserId": f"u{self.rng.randrange(1000)}",
            "toUserId": target,
            "msgTimestamp": str(now_ms),
            "timestamp": str(now_ms),
            "objectName": object_name,
            "msgUID": self._uid(n),
            "channelType": channel_type,
            "sensitiveType": 0,
            "source": self.rng.choice(("iOS", "Android", "Websocket")),
        }
        content = self._content(n, object_name)
        if content is not None:
            record["content"] = content
        return record

    def generate(self, count: int, endpoint: str | None = None, *, age: float = 0.0) -> list[str]:
        """Queue ``count`` messages sent ``age`` seconds ago (over all endpoints unless named)."""
        keys = []
        now = time.time() - age
        with self._lock:
            for i in range(count):
                ep = endpoint or ENDPOINTS[i % len(ENDPOINTS)]
                n = next(self._counter)
                record = self.make_record(ep, n, int(now * 1000))
                key = message_key(record)
                self.queues[ep].append(
                    _Queued(key, record, now, encoded=encode_record(record))
                )
                keys.append(key)
            self.stats.generated += count
        return keys

    def set_traffic(self, rate: float) -> None:
        """Generate ``rate`` messages per second until changed (0 stops). Call on the loop."""
        self._replace_traffic(paced(rate, self.generate) if rate > 0 else None)

    # -- the provider's side -------------------------------------------------

    def _signature_ok(self, request: web.Request) -> bool:
        headers = request.headers
        app_key = headers.get("App-Key", "")
        nonce = headers.get("Nonce", "")
        stamp = headers.get("Timestamp", "")
        signature = headers.get("Signature", "")
        if app_key != self.app_key or not nonce or len(nonce) > 18 or not stamp.isdigit():
            return False
        expected = hashlib.sha1(  # noqa: S324 - the provider's scheme
            f"{self.app_secret}{nonce}{stamp}".encode()
        ).hexdigest()
        return hmac.compare_digest(expected, signature.lower())

    def _over_budget(self, endpoint: str, app_key: str, at: float) -> bool:
        if self.budget is None:
            return False
        window = self._arrivals.setdefault((app_key, endpoint), deque())
        while window and window[0] <= at - self.budget_window:
            window.popleft()
        window.append(at)
        return len(window) > self.budget

    def _expire(self, endpoint: str, now: float) -> None:
        queue = self.queues[endpoint]
        horizon = now - self.retention
        while queue and queue[0].created < horizon:
            dropped = queue.popleft()
            if not dropped.redelivery:
                self.stats.expired += 1
                self.stats.expired_keys.append(dropped.key)

    def _take(self, endpoint: str) -> list[_Queued]:
        queue = self.queues[endpoint]
        taken: list[_Queued] = []
        while queue and len(taken) < self.batch_size:
            taken.append(queue.popleft())
        for item in taken:
            if not item.redelivery and self.redelivery_ratio and \
                    self.rng.random() < self.redelivery_ratio:
                queue.append(_Queued(item.key, item.record, item.created, redelivery=True,
                                     encoded=item.encoded))
        return taken

    async def handle_qrymsg(self, request: web.Request) -> web.Response:
        endpoint = request.match_info["endpoint"]
        if endpoint not in ENDPOINTS:
            raise web.HTTPNotFound()
        at = time.monotonic()
        await request.read()
        with self._lock:
            self.stats.requests += 1
            if not self._signature_ok(request):
                self.stats.bad_signature += 1
                return web.json_response(
                    {"code": 1004, "errorMessage": "signature error"}, status=401
                )
            if self._over_budget(endpoint, self.app_key, at):
                self.stats.over_budget += 1
                self.arrivals[endpoint].append((at, False))
                return web.json_response({"results": [], "size": 0})
            error = self._plan.error()
            malformed = not error and self._plan.malformed()
            faulty = error or malformed
            taken: list[_Queued] = []
            if not faulty or self.faults.consume_on_fault:
                self._expire(endpoint, time.time())
                taken = self._take(endpoint)
            self.arrivals[endpoint].append((at, bool(taken)))
            if taken:
                self.served.append(ServedBatch(endpoint, at, [t.key for t in taken], faulty))
                if faulty:
                    self.stats.lost_to_faults += len(taken)
                else:
                    self.stats.served_messages += len(taken)
                    self.stats.redelivered += sum(1 for t in taken if t.redelivery)
            ratio = self.string_items_ratio
            items = [t.as_item(ratio > 0 and self.rng.random() < ratio) for t in taken]
        await self._plan.maybe_slow()
        if error:
            return web.json_response(
                {"code": 1000, "errorMessage": "internal error"}, status=self.faults.error_status
            )
        body = b'{"results":[' + b",".join(items) + b'],"size":' + str(len(items)).encode() + b"}"
        if malformed:
            body = truncated_json(body)
        return web.Response(body=body, content_type="application/json")

    async def handle_user_info(self, request: web.Request) -> web.Response:
        await request.read()
        if not self._signature_ok(request):
            return web.json_response({"code": 1004, "errorMessage": "signature error"}, status=401)
        return web.json_response(
            {"code": 200, "userName": "", "userPortrait": "", "createTime": ""}
        )

    # -- admin -------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": self.stats.requests,
                "over_budget": self.stats.over_budget,
                "bad_signature": self.stats.bad_signature,
                "served_messages": self.stats.served_messages,
                "redelivered": self.stats.redelivered,
                "expired": self.stats.expired,
                "lost_to_faults": self.stats.lost_to_faults,
                "generated": self.stats.generated,
                "queued": {e: len(q) for e, q in self.queues.items()},
                "faults": self.faults.as_dict(),
            }

    async def _admin_served(self, request: web.Request) -> web.Response:
        start = int(request.query.get("from", "0"))
        with self._lock:
            batches = [
                {"endpoint": b.endpoint, "at": b.at, "keys": b.keys, "lost": b.lost}
                for b in self.served[start:]
            ]
        return web.json_response({"from": start, "batches": batches})

    async def _admin_generate(self, request: web.Request) -> web.Response:
        body = await request.json()
        keys = self.generate(int(body.get("count", 1)), body.get("endpoint"))
        return web.json_response({"generated": len(keys)})



    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/rtmsg/{endpoint}/qrymsg.json", self.handle_qrymsg)
        app.router.add_post("/user/info.json", self.handle_user_info)
        app.router.add_get("/_emulator/served", self._admin_served)
        app.router.add_post("/_emulator/generate", self._admin_generate)
        self.add_common_admin_routes(app)
        return app

