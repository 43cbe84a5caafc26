"""WuKongIM emulator: the server API's message endpoints as the provider documents them.

Written from ``wukongim-message-api.md`` plus what the WuKongIM v2 server source
does where the document is silent:

- ``POST /message/sync {"uid", "limit"}`` → a bare JSON array of offline command
  messages (写扩散, ``header.sync_once = 1``), oldest first, ``limit`` at most.
  The server remembers, per uid and in memory only, every message any sync
  returned since the last ack; without an ack the next sync returns the same
  messages again.
- ``POST /message/syncack {"uid", "last_message_seq"}`` acknowledges exactly that
  remembered set (whatever ``last_message_seq`` says, as long as it is not 0).
  A server restart (:meth:`WuKongIMEmulator.restart`) forgets the remembered
  sets, so everything not yet acknowledged is delivered again.
- ``POST /channel/messagesync`` (读扩散 channel history): ``start_message_seq``
  inclusive, ``end_message_seq`` exclusive (0 = no end), ``limit``, ``pull_mode``
  1 = upward (seq ≥ start), 0 = downward (seq ≤ start); start = end = 0 → the
  latest ``limit``. Answer ``{"start_message_seq", "end_message_seq", "more",
  "messages"}``, messages in ascending ``message_seq``.
- Records: ``header{no_persist, red_dot, sync_once}``, ``setting``,
  ``message_id`` (int, globally unique), ``client_msg_no``, ``message_seq``
  (per uid for commands, per channel for history, from 1), ``from_uid``,
  ``channel_id`` (command messages keep the ``____cmd`` suffix),
  ``channel_type``, ``timestamp`` (seconds), ``payload`` (standard base64 of
  JSON, UTF-8 text or non-UTF-8 bytes).
- Auth: with a token configured, every request carries header ``token``;
  otherwise 401 with an empty body. Bad input → 400 ``{"msg", "status": 400}``.
- ``GET /health`` → ``{"status": "ok"}``: a harmless call that consumes nothing.

Admin API (no auth, loopback): ``GET /_emulator/stats``, ``GET /_emulator/served``,
``GET /_emulator/acked``, ``POST /_emulator/generate {"count", "kind"?, "uid"?,
"channel_id"?, "channel_type"?}``, ``POST /_emulator/gap {"channel_id",
"channel_type"?, "skip"?}``, ``POST /_emulator/faults {...}``,
``POST /_emulator/refuse {"index", "seconds"}``, ``POST /_emulator/traffic
{"rate", "channel_rate"?}``, ``POST /_emulator/restart``.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import hmac
import itertools
import json
import random
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeGuard

from aiohttp import web

from relay.emulators.harness import EmulatorBase, FaultPlan, Faults, paced, truncated_json

CMD_SUFFIX = "____cmd"


@dataclass
class _Stored:
    """One message as the server keeps it, with its JSON encoded once."""

    message_id: int
    seq: int
    record: dict[str, Any]
    encoded: str


@dataclass
class _Inbox:
    """One uid's offline command messages."""

    next_seq: int = 1
    queue: deque[_Stored] = field(default_factory=deque)  # not yet acknowledged, by seq
    # What syncs returned since the last ack: held in memory only (lost on restart).
    in_progress: set[int] = field(default_factory=set)
    ever_served: set[int] = field(default_factory=set)


@dataclass
class _Channel:
    next_seq: int = 1
    seqs: list[int] = field(default_factory=list)
    messages: list[_Stored] = field(default_factory=list)
    gaps: list[tuple[int, int]] = field(default_factory=list)  # (first skipped, last skipped)


@dataclass
class SyncBatch:
    """One ``/message/sync`` answer that carried messages."""

    uid: str
    at: float  # time.monotonic() when the answer was produced
    message_ids: list[int]
    seqs: list[int]
    faulty: bool = False  # answered with a 5xx or a truncated body


@dataclass
class AckRecord:
    """One ``/message/syncack`` that was applied."""

    uid: str
    at: float
    last_message_seq: int
    message_ids: list[int]


@dataclass
class WuKongIMStats:
    requests: int = 0
    bad_token: int = 0
    bad_requests: int = 0
    syncs: int = 0
    empty_syncs: int = 0
    concurrent_syncs: int = 0
    acks: int = 0
    empty_acks: int = 0
    acked_messages: int = 0
    served_messages: int = 0
    redelivered: int = 0
    faulted_syncs: int = 0
    channel_syncs: int = 0
    channel_served: int = 0
    generated: int = 0
    generated_channel: int = 0
    restarts: int = 0


class WuKongIMEmulator(EmulatorBase):
    def __init__(
        self,
        token: str | None = None,
        *,
        uids: Sequence[str] = ("u1",),
        channels: Sequence[tuple[str, int]] = (("g1", 2),),
        seed: int | None = None,
        faults: Faults | None = None,
    ) -> None:
        self.token = token
        self.uids = list(uids)
        self.channel_keys = [(str(c), int(t)) for c, t in channels]
        self.rng = random.Random(seed)
        self.faults = faults or Faults()
        self._plan = FaultPlan(self.faults, self.rng)
        self.stats = WuKongIMStats()
        self.inboxes: dict[str, _Inbox] = {}
        self.channels: dict[tuple[str, int], _Channel] = {}
        # Everything generated, served and acknowledged, for exactly-once accounting
        # (ids only: a benchmark's millions of records would otherwise stay in memory).
        self.generated: dict[str, list[int]] = {}
        self.served: list[SyncBatch] = []
        self.acked: list[AckRecord] = []
        self._in_flight: dict[str, int] = {}
        self.ack_delay = 0.0  # seconds each syncack is held before it takes effect
        self.acks_waiting = 0
        # message_id: globally unique and increasing, large like the server's snowflake ids
        # but below 2**53 so that any JSON reader keeps it exact.
        self._ids = itertools.count((int(time.time() * 1000) - 1_600_000_000_000) << 12)
        self._counter = itertools.count(1)
        self._lock = threading.Lock()

    # -- traffic -----------------------------------------------------------

    def _payload(self, n: int, command: bool) -> bytes:
        roll = self.rng.random()
        if roll < 0.6:
            if command and self.rng.random() < 0.5:
                body: dict[str, Any] = {"type": 99, "cmd": "clearUnread",
                                        "param": {"channel_id": f"g{n % 7}", "channel_type": 2}}
            else:
                body = {"type": 1, "content": f"hi {n} ✓"}
            return json.dumps(body, ensure_ascii=False).encode()
        if roll < 0.85:
            return f"plain text {n} ✓".encode()
        # 0xff never occurs in UTF-8: these bytes are certainly not text.
        return b"\xff\xfe" + bytes(self.rng.randrange(256) for _ in range(8))

    def _record(self, *, message_id: int, seq: int, channel_id: str, channel_type: int,
                command: bool, n: int, at: float) -> dict[str, Any]:
        return {
            "header": {"no_persist": 0, "red_dot": 0 if command else 1,
                       "sync_once": 1 if command else 0},
            "setting": 0,
            "message_id": message_id,
            "client_msg_no": f"{self.rng.getrandbits(128):032x}",
            "message_seq": seq,
            "from_uid": f"u{self.rng.randrange(1000)}",
            "channel_id": channel_id,
            "channel_type": channel_type,
            "timestamp": int(at),
            "payload": base64.b64encode(self._payload(n, command)).decode("ascii"),
        }

    def generate(self, count: int, uid: str | None = None, *, payload: bytes | None = None
                 ) -> list[int]:
        """Queue ``count`` command messages for ``uid`` (round-robin over the uids if None).

        Returns their ``message_id``s. ``payload`` fixes the payload bytes.
        """
        ids: list[int] = []
        now = time.time()
        with self._lock:
            for i in range(count):
                target = uid or self.uids[i % len(self.uids)]
                inbox = self.inboxes.setdefault(target, _Inbox())
                n = next(self._counter)
                group = self.rng.random() < 0.7
                channel_id = (f"g{n % 7}" if group else f"u{self.rng.randrange(1000)}") + CMD_SUFFIX
                message_id = next(self._ids)
                record = self._record(message_id=message_id, seq=inbox.next_seq,
                                      channel_id=channel_id, channel_type=2 if group else 1,
                                      command=True, n=n, at=now)
                if payload is not None:
                    record["payload"] = base64.b64encode(payload).decode("ascii")
                inbox.next_seq += 1
                inbox.queue.append(_Stored(message_id, record["message_seq"], record,
                                           _encode(record)))
                self.generated.setdefault(target, []).append(message_id)
                ids.append(message_id)
            self.stats.generated += count
        return ids

    def generate_channel(self, count: int, channel_id: str | None = None,
                         channel_type: int = 2) -> list[int]:
        """Append ``count`` messages to a channel's history; returns their ``message_seq``s.

        Without ``channel_id``, round-robin over the configured channels.
        """
        seqs: list[int] = []
        now = time.time()
        with self._lock:
            for i in range(count):
                key = (channel_id, channel_type) if channel_id else \
                    self.channel_keys[i % len(self.channel_keys)]
                channel = self.channels.setdefault(key, _Channel())
                n = next(self._counter)
                message_id = next(self._ids)
                record = self._record(message_id=message_id, seq=channel.next_seq,
                                      channel_id=key[0], channel_type=key[1], command=False,
                                      n=n, at=now)
                channel.next_seq += 1
                channel.seqs.append(record["message_seq"])
                channel.messages.append(_Stored(message_id, record["message_seq"], record,
                                                _encode(record)))
                seqs.append(record["message_seq"])
            self.stats.generated_channel += count
        return seqs

    def skip_seq(self, channel_id: str, channel_type: int = 2, count: int = 1) -> list[int]:
        """Make a gap: the next ``count`` ``message_seq`` numbers of a channel never exist."""
        with self._lock:
            channel = self.channels.setdefault((channel_id, channel_type), _Channel())
            skipped = list(range(channel.next_seq, channel.next_seq + count))
            if skipped:
                channel.gaps.append((skipped[0], skipped[-1]))
            channel.next_seq += count
        return skipped

    async def _traffic_loop(self, rate: float, channel_rate: float) -> None:
        async with asyncio.TaskGroup() as tg:
            for uid in self.uids:
                if rate > 0:
                    tg.create_task(paced(rate, partial(self.generate, uid=uid)))
            for channel_id, channel_type in self.channel_keys:
                if channel_rate > 0:
                    tg.create_task(paced(channel_rate, partial(
                        self.generate_channel, channel_id=channel_id,
                        channel_type=channel_type)))

    def set_traffic(self, rate: float, channel_rate: float | None = None) -> None:
        """Per second: ``rate`` command messages per uid, ``channel_rate`` (default ``rate``)
        history messages per channel, until changed (0 stops). Call on the loop."""
        per_channel = rate if channel_rate is None else channel_rate
        active = rate > 0 or per_channel > 0
        self._replace_traffic(
            self._traffic_loop(max(rate, 0.0), max(per_channel, 0.0)) if active else None)

    def restart(self) -> None:
        """What a server restart does to the sync protocol: acks in progress are forgotten."""
        with self._lock:
            for inbox in self.inboxes.values():
                inbox.in_progress.clear()
            self.stats.restarts += 1

    def unacked(self, uid: str) -> list[int]:
        """``message_id``s of ``uid`` not acknowledged yet, oldest first."""
        with self._lock:
            inbox = self.inboxes.get(uid)
            return [s.message_id for s in inbox.queue] if inbox else []

    def acked_ids(self, uid: str | None = None) -> list[int]:
        """Every acknowledged ``message_id`` (of ``uid``, or all), in ack order."""
        with self._lock:
            return [i for a in self.acked if uid is None or a.uid == uid for i in a.message_ids]

    def channel_gaps(self, channel_id: str, channel_type: int = 2) -> list[tuple[int, int]]:
        with self._lock:
            channel = self.channels.get((channel_id, channel_type))
            return list(channel.gaps) if channel else []

    # -- the provider's side -------------------------------------------------

    def _token_ok(self, request: web.Request) -> bool:
        if self.token is None:
            return True
        return hmac.compare_digest(request.headers.get("token", "").encode(),
                                   self.token.encode())

    async def _read_body(self, request: web.Request) -> dict[str, Any] | web.Response:
        """The request's JSON object, or the answer to give: 401 (empty body) or 400."""
        raw = await request.read()
        with self._lock:
            self.stats.requests += 1
            if not self._token_ok(request):
                self.stats.bad_token += 1
                return web.Response(status=401)
        try:
            body = json.loads(raw or b"null")
        except ValueError:
            return self._bad_request("数据格式有误!")
        if not isinstance(body, dict):
            return self._bad_request("数据格式有误!")
        return body

    def _bad_request(self, msg: str) -> web.Response:
        with self._lock:
            self.stats.bad_requests += 1
        return web.json_response({"msg": msg, "status": 400}, status=400)

    def _error_response(self) -> web.Response:
        return web.json_response({"msg": "服务器内部错误", "status": self.faults.error_status},
                                 status=self.faults.error_status)

    async def handle_sync(self, request: web.Request) -> web.Response:
        body = await self._read_body(request)
        if isinstance(body, web.Response):
            return body
        uid, limit = body.get("uid"), body.get("limit")
        if not isinstance(uid, str) or not uid:
            return self._bad_request("uid不能为空!")
        if not _is_int(limit) or limit <= 0:
            return self._bad_request("limit必须大于0!")
        at = time.monotonic()
        self._in_flight[uid] = self._in_flight.get(uid, 0) + 1
        try:
            with self._lock:
                self.stats.syncs += 1
                if self._in_flight[uid] > 1:
                    self.stats.concurrent_syncs += 1
                error = self._plan.error()
                malformed = not error and self._plan.malformed()
                faulty = error or malformed
                inbox = self.inboxes.setdefault(uid, _Inbox())
                taken = list(itertools.islice(inbox.queue, limit))
                # A fault that "consumes" is one that struck after the server noted the sync.
                if taken and (not faulty or self.faults.consume_on_fault):
                    inbox.in_progress.update(s.message_id for s in taken)
                if taken:
                    self.served.append(SyncBatch(uid, at, [s.message_id for s in taken],
                                                 [s.seq for s in taken], faulty))
                if faulty:
                    self.stats.faulted_syncs += 1
                elif taken:
                    self.stats.served_messages += len(taken)
                    self.stats.redelivered += sum(
                        1 for s in taken if s.message_id in inbox.ever_served)
                    inbox.ever_served.update(s.message_id for s in taken)
                else:
                    self.stats.empty_syncs += 1
                encoded = [s.encoded for s in taken]
            await self._plan.maybe_slow()
        finally:
            self._in_flight[uid] -= 1
        if error:
            return self._error_response()
        payload = ("[" + ",".join(encoded) + "]").encode()
        if malformed:
            payload = truncated_json(payload)
        return web.Response(body=payload, content_type="application/json")

    async def handle_syncack(self, request: web.Request) -> web.Response:
        body = await self._read_body(request)
        if isinstance(body, web.Response):
            return body
        uid, last = body.get("uid"), body.get("last_message_seq")
        if not isinstance(uid, str) or not uid:
            return self._bad_request("uid不能为空!")
        if not _is_int(last) or last == 0:
            return self._bad_request("last_message_seq不能为0!")
        if self.ack_delay > 0:
            # Hold the ack (a slow server): a client that dies meanwhile never acked.
            self.acks_waiting += 1
            held_since = time.monotonic()
            try:
                # Polled, so that lowering ack_delay releases acks already held.
                while time.monotonic() - held_since < self.ack_delay:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
            finally:
                self.acks_waiting -= 1
            if request.transport is None or request.transport.is_closing():
                return web.Response(status=499)
        with self._lock:
            error = self._plan.error()
            malformed = not error and self._plan.malformed()
            if not (error or malformed) or self.faults.consume_on_fault:
                self._apply_ack(uid, last)
        await self._plan.maybe_slow()
        if error:
            return self._error_response()
        answer = json.dumps({"status": 200}).encode()
        return web.Response(body=truncated_json(answer) if malformed else answer,
                            content_type="application/json")

    def _apply_ack(self, uid: str, last_message_seq: int) -> None:
        self.stats.acks += 1
        inbox = self.inboxes.get(uid)
        if inbox is None or not inbox.in_progress:
            self.stats.empty_acks += 1
            return
        done = inbox.in_progress
        acked: list[int] = []
        # Syncs always answer from the head of the queue, so what they returned is a prefix.
        while inbox.queue and inbox.queue[0].message_id in done:
            acked.append(inbox.queue.popleft().message_id)
        if len(acked) < len(done):
            rest = [s for s in inbox.queue if s.message_id not in done]
            acked += [s.message_id for s in inbox.queue if s.message_id in done]
            inbox.queue = deque(rest)
        inbox.in_progress = set()
        self.acked.append(AckRecord(uid, time.monotonic(), last_message_seq, acked))
        self.stats.acked_messages += len(acked)

    async def handle_channel_sync(self, request: web.Request) -> web.Response:
        body = await self._read_body(request)
        if isinstance(body, web.Response):
            return body
        channel_id, channel_type = body.get("channel_id"), body.get("channel_type")
        login_uid = body.get("login_uid", "")
        start, end = body.get("start_message_seq", 0), body.get("end_message_seq", 0)
        limit, pull_mode = body.get("limit"), body.get("pull_mode", 0)
        if not isinstance(channel_id, str) or not channel_id:
            return self._bad_request("频道ID不能为空!")
        if not _is_int(channel_type) or channel_type <= 0:
            return self._bad_request("频道类型不能为0!")
        if not isinstance(login_uid, str) or (channel_type == 1 and not login_uid):
            return self._bad_request("login_uid不能为空!")
        if not (_is_int(start) and _is_int(end) and start >= 0 and end >= 0):
            return self._bad_request("消息序号必须是非负整数!")
        if not _is_int(limit) or limit <= 0:
            return self._bad_request("limit必须大于0!")
        if pull_mode not in (0, 1) or isinstance(pull_mode, bool):
            return self._bad_request("pull_mode只能是0或1!")
        with self._lock:
            self.stats.channel_syncs += 1
            error = self._plan.error()
            malformed = not error and self._plan.malformed()
            channel = self.channels.get((channel_id, channel_type), _Channel())
            taken, more = _select(channel, start, end, limit, pull_mode)
            if not (error or malformed):
                self.stats.channel_served += len(taken)
            encoded = [s.encoded for s in taken]
        await self._plan.maybe_slow()
        if error:
            return self._error_response()
        payload = (
            '{"start_message_seq":' + str(start) + ',"end_message_seq":' + str(end)
            + ',"more":' + str(more) + ',"messages":[' + ",".join(encoded) + "]}"
        ).encode()
        if malformed:
            payload = truncated_json(payload)
        return web.Response(body=payload, content_type="application/json")

    async def handle_health(self, request: web.Request) -> web.Response:
        if not self._token_ok(request):
            with self._lock:
                self.stats.bad_token += 1
            return web.Response(status=401)
        return web.json_response({"status": "ok"})

    # -- admin -------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            stats = {k: v for k, v in vars(self.stats).items()}
            stats["unacked"] = {uid: len(i.queue) for uid, i in self.inboxes.items()}
            stats["in_progress"] = {uid: len(i.in_progress) for uid, i in self.inboxes.items()}
            stats["channels"] = {
                f"{cid}/{ctype}": {"messages": len(c.messages), "last_seq": c.next_seq - 1,
                                   "gaps": [list(g) for g in c.gaps]}
                for (cid, ctype), c in self.channels.items()
            }
            stats["faults"] = self.faults.as_dict()
            return stats

    async def _admin_served(self, request: web.Request) -> web.Response:
        start = int(request.query.get("from", "0"))
        with self._lock:
            batches = [{"uid": b.uid, "at": b.at, "message_ids": b.message_ids, "seqs": b.seqs,
                        "faulty": b.faulty} for b in self.served[start:]]
        return web.json_response({"from": start, "batches": batches})

    async def _admin_acked(self, request: web.Request) -> web.Response:
        start = int(request.query.get("from", "0"))
        with self._lock:
            acks = [{"uid": a.uid, "at": a.at, "last_message_seq": a.last_message_seq,
                     "message_ids": a.message_ids} for a in self.acked[start:]]
        return web.json_response({"from": start, "acks": acks})

    async def _admin_generate(self, request: web.Request) -> web.Response:
        body = await request.json()
        count = int(body.get("count", 1))
        if body.get("kind", "command") == "channel":
            seqs = self.generate_channel(count, body.get("channel_id"),
                                         int(body.get("channel_type", 2)))
            return web.json_response({"generated": len(seqs), "seqs": seqs})
        ids = self.generate(count, body.get("uid"))
        return web.json_response({"generated": len(ids), "message_ids": ids})

    async def _admin_gap(self, request: web.Request) -> web.Response:
        body = await request.json()
        skipped = self.skip_seq(str(body["channel_id"]), int(body.get("channel_type", 2)),
                                int(body.get("skip", 1)))
        return web.json_response({"skipped": skipped})



    async def _admin_traffic(self, request: web.Request) -> web.Response:
        body = await request.json()
        channel_rate = body.get("channel_rate")
        self.set_traffic(float(body.get("rate", 0)),
                         None if channel_rate is None else float(channel_rate))
        return web.json_response({"rate": body.get("rate", 0), "channel_rate": channel_rate})

    async def _admin_restart(self, _request: web.Request) -> web.Response:
        self.restart()
        return web.json_response({"restarts": self.stats.restarts})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/message/sync", self.handle_sync)
        app.router.add_post("/message/syncack", self.handle_syncack)
        app.router.add_post("/channel/messagesync", self.handle_channel_sync)
        app.router.add_get("/health", self.handle_health)
        app.router.add_get("/_emulator/served", self._admin_served)
        app.router.add_get("/_emulator/acked", self._admin_acked)
        app.router.add_post("/_emulator/generate", self._admin_generate)
        app.router.add_post("/_emulator/gap", self._admin_gap)
        self.add_common_admin_routes(app)
        app.router.add_post("/_emulator/restart", self._admin_restart)
        return app



def _encode(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


def _is_int(value: object) -> TypeGuard[int]:
    # JSON true/false would decode as Python bools; the server's Go structs refuse them.
    return isinstance(value, int) and not isinstance(value, bool)


def _select(channel: _Channel, start: int, end: int, limit: int,
            pull_mode: int) -> tuple[list[_Stored], int]:
    """The documented ``/channel/messagesync`` window: (messages ascending, more)."""
    seqs, messages = channel.seqs, channel.messages
    if start == 0 and end == 0:
        lo = max(0, len(seqs) - limit)
        return messages[lo:], int(lo > 0)
    if pull_mode == 1:
        # Upward: start ≤ seq < end (no end when 0), the first ``limit``.
        lo = bisect.bisect_left(seqs, start)
        hi = bisect.bisect_left(seqs, end) if end else len(seqs)
        hi = max(lo, hi)
        return messages[lo:min(hi, lo + limit)], int(hi - lo > limit)
    # Downward: end < seq ≤ start (start 0 = from the newest), the last ``limit``.
    hi = bisect.bisect_right(seqs, start) if start else len(seqs)
    lo = bisect.bisect_right(seqs, end) if end else 0
    lo = min(lo, hi)
    return messages[max(lo, hi - limit):hi], int(hi - lo > limit)
