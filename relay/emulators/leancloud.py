"""LeanCloud emulator: the IM REST API's application-wide history as the provider documents it.

Written from ``leancloud-rtm-rest-api.md``:

- ``GET /1.2/rtm/messages`` (查询应用内所有历史消息, parameters of 查询历史消息):
  ``msgid``/``timestamp`` (start), ``till_msgid``/``till_timestamp`` (stop),
  ``include_start``, ``include_stop``, ``reversed``, ``limit`` (default 100, at most
  1000). Messages are ordered by (timestamp, msg-id). By default newest → oldest
  from ``timestamp`` (default now) down to ``till_timestamp`` (default 0);
  ``reversed=true`` oldest → newest from ``timestamp`` (default 0) up to
  ``till_timestamp`` (default now). Start and stop are exclusive unless
  ``include_start`` / ``include_stop``. A bound given as a timestamp without its
  message id stands for every message at that timestamp (so an exclusive one
  leaves them all out); ``msgid`` without ``timestamp`` is refused (400), as the
  document says it "must" come with it.
- Records as the document's example: ``timestamp`` (ms), ``conv-id``, ``data``,
  ``from``, ``msg-id``, ``is-conv``, ``is-room``, ``to``, ``bin``, ``from-ip``;
  ``bin: true`` means ``data`` is base64.
- Sends are asynchronous: a message can become visible after later ones
  (:meth:`LeanCloudEmulator.generate` with ``delay``, or :meth:`generate_late`).
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

Admin API (no auth, loopback): ``GET /_emulator/stats``, ``GET /_emulator/served``,
``POST /_emulator/generate {"count", "kind"?, "age"?, "delay"?}``,
``POST /_emulator/faults {...}``, ``POST /_emulator/refuse {"index", "seconds"}``,
``POST /_emulator/traffic {"rate"}``, ``POST /_emulator/rate_limit
{"per_minute"?, "penalty_seconds"?}``, ``POST /_emulator/spend {"count"}``.
"""

from __future__ import annotations

import base64
import bisect
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

from aiohttp import web

from relay.emulators.harness import EmulatorBase, FaultPlan, Faults, paced, truncated_json

MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
KINDS = ("text", "rich", "binary", "room")
_ID_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_UNAUTHORIZED = {"code": 401, "error": "Unauthorized."}
_TOO_MANY = {"code": 429, "error": "Too many requests."}


class _BadQuery(ValueError):
    pass


@dataclass
class _Stored:
    key: tuple[int, str]  # (timestamp ms, msg-id): the history's order
    record: dict[str, Any]
    visible_at: float  # time.time() from which queries see it
    encoded: str


@dataclass
class ServedPage:
    """One history answer: when, what it asked and which msg-ids it carried."""

    at: float  # time.monotonic()
    query: dict[str, str]
    msg_ids: list[str]
    faulty: bool = False


@dataclass
class LeanCloudStats:
    requests: int = 0
    history_requests: int = 0
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
        self._keys: list[tuple[int, str]] = []
        self._messages: list[_Stored] = []
        self.generated: list[dict[str, Any]] = []
        self.served: list[ServedPage] = []
        self._arrivals: deque[float] = deque()
        self._penalty_until = 0.0
        self._counter = itertools.count(1)
        self._convs = [f"{self.rng.getrandbits(96):024x}" for _ in range(6)]
        self._rooms = [f"{self.rng.getrandbits(96):024x}" for _ in range(2)]
        self._lock = threading.Lock()

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
        key = (int(record["timestamp"]), str(record["msg-id"]))
        index = bisect.bisect_left(self._keys, key)
        self._keys.insert(index, key)
        self._messages.insert(index, _Stored(key, record, visible_at, _encode(record)))
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
        with self._lock:
            refusal = self._gate(request)
            if refusal is not None:
                return refusal
            self.stats.history_requests += 1
        try:
            query = _parse_query(dict(request.query), int(time.time() * 1000))
        except _BadQuery as exc:
            return self._bad_request(str(exc))
        at = time.monotonic()
        with self._lock:
            error = self._plan.error()
            malformed = not error and self._plan.malformed()
            taken = self._select(query, time.time())
            self.served.append(ServedPage(at, dict(request.query),
                                          [s.key[1] for s in taken], error or malformed))
            if error or malformed:
                self.stats.faulted_pages += 1
            else:
                self.stats.served_messages += len(taken)
            encoded = [s.encoded for s in taken]
        await self._plan.maybe_slow()
        if error:
            return web.json_response({"code": 1, "error": "Internal server error."},
                                     status=self.faults.error_status)
        body = ("[" + ",".join(encoded) + "]").encode()
        if malformed:
            body = truncated_json(body)
        return web.Response(body=body, content_type="application/json")

    def _select(self, query: _Query, now: float) -> list[_Stored]:
        keys = self._keys
        lo = _lower_index(keys, query.lower)
        hi = _upper_index(keys, query.upper)
        if query.ascending:
            candidates = (self._messages[i] for i in range(lo, hi))
        else:
            candidates = (self._messages[i] for i in range(hi - 1, lo - 1, -1))
        visible = (s for s in candidates if s.visible_at <= now)
        return list(itertools.islice(visible, query.limit))

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
            stats["stored"] = len(self._messages)
            stats["penalized"] = time.monotonic() < self._penalty_until
            stats["rate_limit_per_minute"] = self.rate_limit_per_minute
            stats["penalty_seconds"] = self.penalty_seconds
            stats["faults"] = self.faults.as_dict()
            return stats

    async def _admin_served(self, request: web.Request) -> web.Response:
        start = int(request.query.get("from", "0"))
        with self._lock:
            pages = [{"at": p.at, "query": p.query, "msg_ids": p.msg_ids, "faulty": p.faulty}
                     for p in self.served[start:]]
        return web.json_response({"from": start, "pages": pages})

    async def _admin_generate(self, request: web.Request) -> web.Response:
        body = await request.json()
        kind = body.get("kind")
        if kind is not None and kind not in KINDS:
            return web.json_response({"error": f"kind must be one of {KINDS}"}, status=400)
        ids = self.generate(int(body.get("count", 1)), kind, age=float(body.get("age", 0)),
                            delay=float(body.get("delay", 0)))
        return web.json_response({"generated": len(ids), "msg_ids": ids})



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
        app.router.add_post("/1.2/rtm/{kind:conversations|chatrooms}/{conv_id}/messages",
                            self.handle_send)
        app.router.add_get("/_emulator/served", self._admin_served)
        app.router.add_post("/_emulator/generate", self._admin_generate)
        self.add_common_admin_routes(app)
        app.router.add_post("/_emulator/rate_limit", self._admin_rate_limit)
        app.router.add_post("/_emulator/spend", self._admin_spend)
        return app



# -- the history query ------------------------------------------------------

@dataclass(frozen=True)
class _Bound:
    timestamp: int
    msg_id: str | None  # None: the bound is the timestamp alone (every message at it)
    inclusive: bool


@dataclass(frozen=True)
class _Query:
    lower: _Bound
    upper: _Bound
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
        start = _Bound(timestamp, msgid, include_start) if timestamp is not None \
            else _Bound(0, None, True)
        stop = _Bound(till_timestamp, till_msgid, include_stop) if till_timestamp is not None \
            else _Bound(now_ms, None, True)
        return _Query(lower=start, upper=stop, ascending=True, limit=limit)
    start = _Bound(timestamp, msgid, include_start) if timestamp is not None \
        else _Bound(now_ms, None, True)
    stop = _Bound(till_timestamp, till_msgid, include_stop) if till_timestamp is not None \
        else _Bound(0, None, True)
    return _Query(lower=stop, upper=start, ascending=False, limit=limit)


def _lower_index(keys: list[tuple[int, str]], bound: _Bound) -> int:
    """First index at or above a lower bound. msg-ids are never empty, so (t, "")
    sorts before every message at t."""
    if bound.msg_id is None:
        return bisect.bisect_left(keys, (bound.timestamp if bound.inclusive
                                         else bound.timestamp + 1, ""))
    key = (bound.timestamp, bound.msg_id)
    return bisect.bisect_left(keys, key) if bound.inclusive else bisect.bisect_right(keys, key)


def _upper_index(keys: list[tuple[int, str]], bound: _Bound) -> int:
    """One past the last index at or below an upper bound."""
    if bound.msg_id is None:
        return bisect.bisect_left(keys, (bound.timestamp + 1 if bound.inclusive
                                         else bound.timestamp, ""))
    key = (bound.timestamp, bound.msg_id)
    return bisect.bisect_right(keys, key) if bound.inclusive else bisect.bisect_left(keys, key)


def _encode(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))
