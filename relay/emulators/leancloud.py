"""LeanCloud emulator: the IM REST API's history and conversations as the provider documents them.

Written from ``leancloud-rtm-rest-api.md``:

- ``GET /1.2/rtm/messages`` (查询应用内所有历史消息) and the per-conversation history
  ``GET /1.2/rtm/{conversations,chatrooms}/{conv_id}/messages`` (查询历史消息), with the
  same parameters: ``msgid``/``timestamp`` (start), ``till_msgid``/``till_timestamp``
  (stop), ``include_start``, ``include_stop``, ``reversed``, ``limit`` (default 100, at
  most 1000). Messages are ordered by (timestamp, msg-id). By default newest → oldest
  from ``timestamp`` (default now) down to ``till_timestamp`` (default 0);
  ``reversed=true`` oldest → newest from ``timestamp`` (default 0) up to
  ``till_timestamp`` (default now). Start and stop are exclusive unless
  ``include_start`` / ``include_stop``. A bound given as a timestamp without its
  message id stands for every message at that timestamp (so an exclusive one
  leaves them all out); ``msgid`` without ``timestamp`` is refused (400), as the
  document says it "must" come with it. An unknown conversation has an empty history.
- ``GET /1.2/rtm/conversations`` (查询对话) and ``GET /1.2/rtm/chatrooms`` (查询聊天室):
  ``_Conversation`` rows ``{"results": [...]}`` paged by ``skip`` and ``limit``
  (default 100, at most 1000, in creation order), filtered by ``where`` (equality and
  ``$in`` on top-level fields). Chatrooms are the rows with ``tr: true``.
- Records as the document's example: ``timestamp`` (ms), ``conv-id``, ``data``,
  ``from``, ``msg-id``, ``is-conv``, ``is-room``, ``to``, ``bin``, ``from-ip``;
  ``bin: true`` means ``data`` is base64.
- Sends are asynchronous: a message can become visible after later ones
  (:meth:`LeanCloudEmulator.generate` with ``delay``, :meth:`generate_late`, and
  :meth:`hide_until_passed` for history messages that turn up only after a reader
  went past them).
- ``POST /1.2/rtm/{conversations,chatrooms}/{conv_id}/messages`` (发消息,
  ``from_client``, ``message``, ``transient``): the customer's own sends, which
  spend the same request quota; transient messages are not kept in history.
- Auth: ``X-LC-Id`` plus ``X-LC-Key: <master key>,master`` or
  ``X-LC-Sign: md5(timestamp_ms + master_key),timestamp_ms,master``; otherwise 401
  ``{"code": 401, "error": "Unauthorized."}``. Errors are ``{"code", "error"}``.
- Rate limit (接口请求频率限制): past ``rate_limit_per_minute`` requests in a
  minute, every request (所有接口共享额度) gets 429 ``{"code": 429, "error":
  "Too many requests."}`` for a minute (``penalty_seconds``), then the quota
  starts afresh. Every 429 is counted.

A large application (:meth:`LeanCloudEmulator.load_history`: years of history over
thousands of conversations and chatrooms) is held in columnar arrays and encoded
page by page (:mod:`relay.emulators.leancloud_store`).

Admin API (no auth, loopback): ``GET /_emulator/stats``, ``GET /_emulator/served``,
``POST /_emulator/generate {"count", "kind"?, "age"?, "delay"?}``,
``POST /_emulator/poison {"kind"?, "timestamp"?}``,
``POST /_emulator/faults {...}``, ``POST /_emulator/refuse {"index", "seconds"}``,
``POST /_emulator/traffic {"rate"}``, ``POST /_emulator/rate_limit
{"per_minute"?, "penalty_seconds"?}``, ``POST /_emulator/spend {"count"}``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import math
import random
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from relay.emulators.harness import EmulatorBase, FaultPlan, Faults, paced, truncated_json
from relay.emulators.leancloud_store import Bound, Conversation, History

MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
KINDS = ("text", "rich", "binary", "room")
POISONS = ("nested", "invalid")
_ID_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_UNAUTHORIZED = {"code": 401, "error": "Unauthorized."}
_TOO_MANY = {"code": 429, "error": "Too many requests."}
DAY_MS = 86_400_000


class _BadQuery(ValueError):
    pass


@dataclass
class ServedPage:
    """One history answer: when, what it asked and which msg-ids it carried."""

    at: float  # time.monotonic()
    query: dict[str, str]
    msg_ids: list[str]
    faulty: bool = False
    conversation: str | None = None  # set for the per-conversation history


@dataclass
class LeanCloudStats:
    requests: int = 0
    history_requests: int = 0
    conversation_history_requests: int = 0
    list_requests: int = 0
    send_requests: int = 0
    bad_auth: int = 0
    bad_requests: int = 0
    rate_limited: int = 0  # 429 answers
    rate_limit_trips: int = 0  # times the quota was exceeded (a penalty began)
    spent_by_others: int = 0  # quota spent through spend_quota()
    served_messages: int = 0
    faulted_pages: int = 0
    generated: int = 0


class LeanCloudEmulator(EmulatorBase):
    def __init__(
        self,
        app_id: str = "demo-app-id",
        master_key: str = "demo-master-key",
        *,
        rate_limit_per_minute: int | None = None,
        penalty_seconds: float = 60.0,
        rate_window: float = 60.0,
        retry_after: bool = False,
        send_delay: float = 0.0,
        seed: int | None = None,
        faults: Faults | None = None,
        keep_served: bool = True,
    ) -> None:
        self.app_id = app_id
        self.master_key = master_key
        self.rate_limit_per_minute = rate_limit_per_minute
        self.penalty_seconds = penalty_seconds
        self.rate_window = rate_window
        # The document does not mention Retry-After; off by default, on for testing clients.
        self.retry_after = retry_after
        self.send_delay = send_delay
        self.rng = random.Random(seed)
        self.faults = faults or Faults()
        self._plan = FaultPlan(self.faults, self.rng)
        self.stats = LeanCloudStats()
        self.history = History(random.Random(self.rng.getrandbits(64)))
        self.generated: list[dict[str, Any]] = []  # messages added one by one (not the bulk)
        self.keep_served = keep_served  # a large history's pages would fill memory with ids
        self.served: list[ServedPage] = []
        self._arrivals: deque[float] = deque()
        self._penalty_until = 0.0
        self._counter = itertools.count(1)
        now = int(time.time() * 1000)
        self._convs: list[str] = []
        self._rooms: list[str] = []
        for n in range(8):
            self._add_conversation(Conversation(
                object_id=f"{self.rng.getrandbits(96):024x}", name=f"conversation {n}",
                members=() if n >= 6 else (f"client{n}", f"client{n + 1}"),
                creator=f"client{n}", attr={}, created_at=now - DAY_MS, updated_at=now - DAY_MS,
                room=n >= 6, unique=n < 6))
        self._lock = threading.Lock()

    def _add_conversation(self, conv: Conversation) -> None:
        self.history.add_conversation(conv)
        (self._rooms if conv.room else self._convs).append(conv.object_id)

    # -- a large application ---------------------------------------------------

    def load_history(self, count: int, *, conversations: int = 2000, chatrooms: int = 100,
                     days: float = 3 * 365, end_age: float = 3600.0, tie_ratio: float = 0.05,
                     clients: int | None = None) -> None:
        """Years of history: ``count`` messages over that many conversations and chatrooms,
        ending ``end_age`` seconds ago; ``tie_ratio`` of them share the timestamp before."""
        last = int((time.time() - end_age) * 1000)
        first = last - int(days * DAY_MS)
        with self._lock:
            before = len(self.history.conversations)
            self.history.make_conversations(conversations, chatrooms, first_ms=first,
                                            last_ms=last, clients=clients or 10 * conversations)
            for conv in self.history.conversations[before:]:
                (self._rooms if conv.room else self._convs).append(conv.object_id)
            self.history.load(count, first_ms=first, last_ms=last, tie_ratio=tie_ratio)
            self.stats.generated += count

    def hide_until_passed(self, count: int, seconds: float = 0.5) -> list[str]:
        """``count`` history messages that turn up only ``seconds`` after an application-wide
        read went past them (their asynchronous send finished late); returns their msg-ids."""
        with self._lock:
            total = self.history.bulk_count()
            positions = self.rng.sample(range(total), min(count, total))
            self.history.hide_until_passed(positions, seconds)
            return [self.history.bulk_key(p)[1] for p in positions]

    def all_msg_ids(self) -> set[str]:
        """Every msg-id in the history (bulk and added one by one)."""
        with self._lock:
            return set(self.history.all_msg_ids())

    def conversation_ids(self) -> list[str]:
        return [c.object_id for c in self.history.conversations]

    # -- traffic -----------------------------------------------------------

    def _msg_id(self) -> str:
        return "".join(self.rng.choice(_ID_ALPHABET) for _ in range(22))

    def make_record(self, kind: str, n: int, timestamp_ms: int) -> dict[str, Any]:
        room = kind == "room"
        conv = self.rng.choice(self._rooms if room else self._convs)
        if kind == "rich" and self.rng.random() < 0.7:
            data = json.dumps({"_lctype": -1, "_lctext": f"hi {n} ✓", "_lcattrs": {"n": n}},
                              ensure_ascii=False)
        elif kind == "rich":  # an image message: the file rides along as _lcfile
            data = json.dumps({"_lctype": -2, "_lctext": "", "_lcfile": {
                "url": f"https://files.example/{n}.png", "objId": f"{n:024x}",
                "metaData": {"name": f"{n}.png", "format": "png", "width": 1, "height": 1,
                             "size": 68}}})
        elif kind == "binary":
            data = base64.b64encode(b"\xff" + bytes(self.rng.randrange(256)
                                                     for _ in range(11))).decode("ascii")
        else:
            data = f"今天天气不错! {n}"
        return {
            "timestamp": timestamp_ms,
            "conv-id": conv,
            "data": data,
            "from": f"client{self.rng.randrange(100)}",
            "msg-id": self._msg_id(),
            "is-conv": True,
            "is-room": room,
            "to": conv,
            "bin": kind == "binary",
            "from-ip": f"203.0.113.{self.rng.randrange(1, 255)}",
        }

    def _store(self, record: dict[str, Any], visible_at: float) -> None:
        """Insert in (timestamp, msg-id) order; a late arrival lands in the middle."""
        self.history.add(record, visible_at, _encode(record))
        self.generated.append(record)
        self.stats.generated += 1

    def generate(self, count: int, kind: str | None = None, *, age: float = 0.0,
                 delay: float = 0.0, timestamp_ms: int | None = None) -> list[str]:
        """Store ``count`` messages sent ``age`` seconds ago; returns their msg-ids.

        ``kind``: text, rich (``_lctype`` JSON), binary (``bin: true``), room
        (``is-room: true``); a mix when None. ``delay``: they become visible to
        queries only that many seconds from now (asynchronous sends).
        """
        now = time.time()
        stamp = timestamp_ms if timestamp_ms is not None else int((now - age) * 1000)
        ids: list[str] = []
        with self._lock:
            for _ in range(count):
                chosen = kind or self.rng.choices(KINDS, weights=(5, 3, 1, 1))[0]
                record = self.make_record(chosen, next(self._counter), stamp)
                self._store(record, now + delay)
                ids.append(record["msg-id"])
        return ids

    def generate_late(self, count: int, age: float, kind: str | None = None) -> list[str]:
        """Messages that show up now although sent ``age`` seconds ago, behind later ones."""
        return self.generate(count, kind, age=age)

    def generate_same_timestamps(self, count: int, distinct: int = 3, *,
                                 kind: str | None = None) -> list[str]:
        """``count`` messages over only ``distinct`` timestamps (consecutive ms, now)."""
        base = int(time.time() * 1000) - distinct
        ids: list[str] = []
        for i in range(count):
            ids += self.generate(1, kind, timestamp_ms=base + i % distinct)
        return ids

    def add_message(self, msg_id: str, timestamp_ms: int, data: str = "", *,
                    conv_id: str | None = None, is_room: bool = False, binary: bool = False,
                    sender: str = "client0") -> dict[str, Any]:
        """Store one message exactly as given (for tests that need chosen ids/times)."""
        conv = conv_id or self._convs[0]
        record = {"timestamp": timestamp_ms, "conv-id": conv, "data": data, "from": sender,
                  "msg-id": msg_id, "is-conv": True, "is-room": is_room, "to": conv,
                  "bin": binary, "from-ip": "203.0.113.1"}
        with self._lock:
            self._store(record, time.time())
        return record

    def inject_poison(self, kind: str = "nested", *, timestamp_ms: int | None = None,
                      conv_id: str | None = None) -> dict[str, Any]:
        """A record among the valid ones that no client should choke on.

        ``nested``: a rich message whose content is JSON nested 1,000 deep;
        ``invalid``: a record whose ``data`` is an object and ``from`` a number.
        """
        if kind not in POISONS:
            raise ValueError(f"kind must be one of {POISONS}")
        stamp = timestamp_ms if timestamp_ms is not None else int(time.time() * 1000)
        conv = conv_id or self.rng.choice(self._convs)
        data: Any = '{"_lctype":-1,"_lcattrs":' + '{"a":' * 1000 + "1" + "}" * 1000 + "}" \
            if kind == "nested" else {"not": "a string"}
        record = {"timestamp": stamp, "conv-id": conv, "data": data,
                  "from": "client0" if kind == "nested" else 12345, "msg-id": self._msg_id(),
                  "is-conv": True, "is-room": False, "to": conv, "bin": False,
                  "from-ip": "203.0.113.66"}
        with self._lock:
            self._store(record, time.time())
        return record

    def set_traffic(self, rate: float) -> None:
        """Generate ``rate`` messages per second until changed (0 stops). Call on the loop."""
        self._replace_traffic(paced(rate, self.generate) if rate > 0 else None)

    def spend_quota(self, count: int) -> None:
        """The customer's own API calls: they spend the quota the relay shares."""
        with self._lock:
            now = time.monotonic()
            for _ in range(count):
                self.stats.spent_by_others += 1
                self._admit(now)

    # -- the provider's side -------------------------------------------------

    def _auth_ok(self, request: web.Request) -> bool:
        headers = request.headers
        if not hmac.compare_digest(headers.get("X-LC-Id", "").encode(), self.app_id.encode()):
            return False
        sign = headers.get("X-LC-Sign")
        if sign is not None:
            parts = sign.split(",")
            if len(parts) != 3 or parts[2] != "master" or not parts[1].isdigit():
                return False
            expected = hashlib.md5(  # noqa: S324 - the provider's scheme
                (parts[1] + self.master_key).encode()).hexdigest()
            return hmac.compare_digest(expected.encode(), parts[0].encode())
        key = headers.get("X-LC-Key", "")
        return hmac.compare_digest(key.encode(), f"{self.master_key},master".encode())

    def _admit(self, now: float) -> bool:
        """Count one request against the shared quota; False = answer 429."""
        if now < self._penalty_until:
            return False
        if self.rate_limit_per_minute is None:
            return True
        window = self._arrivals
        while window and window[0] <= now - self.rate_window:
            window.popleft()
        if len(window) >= self.rate_limit_per_minute:
            # Refused for a minute, then served again with a fresh quota.
            self._penalty_until = now + self.penalty_seconds
            self.stats.rate_limit_trips += 1
            window.clear()
            return False
        window.append(now)
        return True

    def _gate(self, request: web.Request) -> web.Response | None:
        """Auth and quota, under the lock; an answer to give, or None to go on."""
        self.stats.requests += 1
        if not self._auth_ok(request):
            self.stats.bad_auth += 1
            return web.json_response(_UNAUTHORIZED, status=401)
        now = time.monotonic()
        if not self._admit(now):
            self.stats.rate_limited += 1
            headers = {}
            if self.retry_after:
                headers["Retry-After"] = str(max(1, math.ceil(self._penalty_until - now)))
            return web.json_response(_TOO_MANY, status=429, headers=headers)
        return None

    def _bad_request(self, error: str) -> web.Response:
        with self._lock:
            self.stats.bad_requests += 1
        return web.json_response({"code": 1, "error": error}, status=400)

    async def handle_history(self, request: web.Request) -> web.Response:
        """The application's history, or one conversation's (``conv_id`` in the path)."""
        conv = request.match_info.get("conv_id")
        with self._lock:
            refusal = self._gate(request)
            if refusal is not None:
                return refusal
            if conv is None:
                self.stats.history_requests += 1
            else:
                self.stats.conversation_history_requests += 1
        try:
            query = _parse_query(dict(request.query), int(time.time() * 1000))
        except _BadQuery as exc:
            return self._bad_request(str(exc))
        at = time.monotonic()
        with self._lock:
            error = self._plan.error()
            malformed = not error and self._plan.malformed()
            taken = self.history.select(query.lower, query.upper, query.ascending, query.limit,
                                        time.time(), conv)
            if self.keep_served:
                self.served.append(ServedPage(at, dict(request.query), [k[1] for k, _ in taken],
                                              error or malformed, conv))
            if error or malformed:
                self.stats.faulted_pages += 1
            else:
                self.stats.served_messages += len(taken)
            encoded = [encode() for _, encode in taken]
        await self._plan.maybe_slow()
        if error:
            return web.json_response({"code": 1, "error": "Internal server error."},
                                     status=self.faults.error_status)
        body = ("[" + ",".join(encoded) + "]").encode()
        if malformed:
            body = truncated_json(body)
        return web.Response(body=body, content_type="application/json")

    async def handle_list(self, request: web.Request) -> web.Response:
        """查询对话 / 查询聊天室: ``_Conversation`` rows paged by skip and limit."""
        rooms = request.match_info["kind"] == "chatrooms"
        with self._lock:
            refusal = self._gate(request)
            if refusal is not None:
                return refusal
            self.stats.list_requests += 1
        try:
            skip = _parse_int(dict(request.query), "skip") or 0
            limit = _parse_int(dict(request.query), "limit")
            where = _parse_where(request.query.get("where"))
        except _BadQuery as exc:
            return self._bad_request(str(exc))
        if skip < 0:
            return self._bad_request("skip must not be negative.")
        limit = DEFAULT_LIMIT if limit is None else limit
        if limit < 1:
            return self._bad_request("limit must be positive.")
        limit = min(limit, MAX_LIMIT)
        with self._lock:
            error = self._plan.error()
            rows = [c.row() for c in self.history.conversations if c.room == rooms]
        await self._plan.maybe_slow()
        if error:
            return web.json_response({"code": 1, "error": "Internal server error."},
                                     status=self.faults.error_status)
        matching = [r for r in rows if _matches(r, where)]
        return web.json_response({"results": matching[skip:skip + limit]},
                                 dumps=lambda v: orjson.dumps(v).decode())

    async def handle_send(self, request: web.Request) -> web.Response:
        with self._lock:
            refusal = self._gate(request)
            if refusal is not None:
                return refusal
            self.stats.send_requests += 1
        try:
            body = json.loads(await request.read() or b"null")
        except ValueError:
            return self._bad_request("Malformed json object.")
        if not isinstance(body, dict):
            return self._bad_request("Malformed json object.")
        sender, message = body.get("from_client"), body.get("message")
        if not isinstance(sender, str) or not sender or not isinstance(message, str):
            return self._bad_request("from_client and message are required.")
        if len(message.encode()) > 5 * 1024:
            return self._bad_request("Message is too large.")
        now = time.time()
        conv = request.match_info["conv_id"]
        record = {"timestamp": int(now * 1000), "conv-id": conv, "data": message,
                  "from": sender, "msg-id": self._msg_id(), "is-conv": True,
                  "is-room": request.match_info["kind"] == "chatrooms", "to": conv,
                  "bin": False, "from-ip": request.remote or "127.0.0.1"}
        if body.get("transient") is not True:
            with self._lock:
                self._store(record, now + self.send_delay)
        return web.json_response({"msg-id": record["msg-id"], "timestamp": record["timestamp"]})

    # -- admin -------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            stats: dict[str, Any] = dict(vars(self.stats))
            stats["stored"] = self.history.bulk_count() + self.history.overlay_count()
            stats["conversations"] = sum(1 for c in self.history.conversations if not c.room)
            stats["chatrooms"] = sum(1 for c in self.history.conversations if c.room)
            stats["history_bytes"] = self.history.memory_bytes()
            stats["penalized"] = time.monotonic() < self._penalty_until
            stats["rate_limit_per_minute"] = self.rate_limit_per_minute
            stats["penalty_seconds"] = self.penalty_seconds
            stats["faults"] = self.faults.as_dict()
            return stats

    async def _admin_served(self, request: web.Request) -> web.Response:
        start = int(request.query.get("from", "0"))
        with self._lock:
            pages = [{"at": p.at, "query": p.query, "msg_ids": p.msg_ids, "faulty": p.faulty,
                      "conversation": p.conversation} for p in self.served[start:]]
        return web.json_response({"from": start, "pages": pages})

    async def _admin_generate(self, request: web.Request) -> web.Response:
        body = await request.json()
        kind = body.get("kind")
        if kind is not None and kind not in KINDS:
            return web.json_response({"error": f"kind must be one of {KINDS}"}, status=400)
        ids = self.generate(int(body.get("count", 1)), kind, age=float(body.get("age", 0)),
                            delay=float(body.get("delay", 0)))
        return web.json_response({"generated": len(ids), "msg_ids": ids})

    async def _admin_poison(self, request: web.Request) -> web.Response:
        body = await request.json()
        try:
            record = self.inject_poison(str(body.get("kind", "nested")),
                                        timestamp_ms=body.get("timestamp"))
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"msg-id": record["msg-id"], "timestamp": record["timestamp"]})

    async def _admin_rate_limit(self, request: web.Request) -> web.Response:
        body = await request.json()
        with self._lock:
            if "per_minute" in body:
                per_minute = body["per_minute"]
                self.rate_limit_per_minute = None if per_minute is None else int(per_minute)
            if "penalty_seconds" in body:
                self.penalty_seconds = float(body["penalty_seconds"])
        return web.json_response({"per_minute": self.rate_limit_per_minute,
                                  "penalty_seconds": self.penalty_seconds})

    async def _admin_spend(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.spend_quota(int(body.get("count", 1)))
        return web.json_response({"spent": int(body.get("count", 1))})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/1.2/rtm/messages", self.handle_history)
        app.router.add_get("/1.2/rtm/{kind:conversations|chatrooms}", self.handle_list)
        app.router.add_get("/1.2/rtm/{kind:conversations|chatrooms}/{conv_id}/messages",
                           self.handle_history)
        app.router.add_post("/1.2/rtm/{kind:conversations|chatrooms}/{conv_id}/messages",
                            self.handle_send)
        app.router.add_get("/_emulator/served", self._admin_served)
        app.router.add_post("/_emulator/generate", self._admin_generate)
        app.router.add_post("/_emulator/poison", self._admin_poison)
        self.add_common_admin_routes(app)
        app.router.add_post("/_emulator/rate_limit", self._admin_rate_limit)
        app.router.add_post("/_emulator/spend", self._admin_spend)
        return app


# -- the history query ------------------------------------------------------

@dataclass(frozen=True)
class _Query:
    lower: Bound
    upper: Bound
    ascending: bool
    limit: int


def _parse_bool(query: dict[str, str], name: str) -> bool:
    value = query.get(name)
    if value is None or value == "":
        return False
    lowered = value.lower()
    if lowered in ("true", "1"):
        return True
    if lowered in ("false", "0"):
        return False
    raise _BadQuery(f"{name} must be a boolean.")


def _parse_int(query: dict[str, str], name: str) -> int | None:
    value = query.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise _BadQuery(f"{name} must be an integer.") from None


def _parse_query(query: dict[str, str], now_ms: int) -> _Query:
    timestamp = _parse_int(query, "timestamp")
    till_timestamp = _parse_int(query, "till_timestamp")
    msgid = query.get("msgid") or None
    till_msgid = query.get("till_msgid") or None
    if msgid is not None and timestamp is None:
        raise _BadQuery("msgid must come with timestamp.")
    if till_msgid is not None and till_timestamp is None:
        raise _BadQuery("till_msgid must come with till_timestamp.")
    include_start = _parse_bool(query, "include_start")
    include_stop = _parse_bool(query, "include_stop")
    ascending = _parse_bool(query, "reversed")
    limit = _parse_int(query, "limit")
    if limit is None:
        limit = DEFAULT_LIMIT
    if limit < 1:
        raise _BadQuery("limit must be positive.")
    limit = min(limit, MAX_LIMIT)
    # A bound left to its default (0 or now) leaves nothing out: it is inclusive.
    if ascending:
        start = Bound(timestamp, msgid, include_start) if timestamp is not None \
            else Bound(0, None, True)
        stop = Bound(till_timestamp, till_msgid, include_stop) if till_timestamp is not None \
            else Bound(now_ms, None, True)
        return _Query(lower=start, upper=stop, ascending=True, limit=limit)
    start = Bound(timestamp, msgid, include_start) if timestamp is not None \
        else Bound(now_ms, None, True)
    stop = Bound(till_timestamp, till_msgid, include_stop) if till_timestamp is not None \
        else Bound(0, None, True)
    return _Query(lower=stop, upper=start, ascending=False, limit=limit)


def _parse_where(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        where = json.loads(text)
    except ValueError:
        raise _BadQuery("where is not valid JSON.") from None
    if not isinstance(where, dict):
        raise _BadQuery("where must be a JSON object.")
    for value in where.values():
        if isinstance(value, dict) and set(value) - {"$in"}:
            raise _BadQuery("only equality and $in are supported in where.")
    return where


def _matches(row: dict[str, Any], where: dict[str, Any]) -> bool:
    for key, wanted in where.items():
        value = row.get(key)
        if isinstance(wanted, dict):
            if value not in wanted.get("$in", []):
                return False
        elif value != wanted:
            return False
    return True


def _encode(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))
