"""WuKongIM: offline command messages and channel history.

- ``POST /message/sync {"uid", "limit"}`` per configured uid, then — only after
  the batch is committed to the journal — ``POST /message/syncack {"uid",
  "last_message_seq"}`` with the largest seq returned. The server acknowledges
  everything any sync of that uid returned since the last ack, so one sync is in
  flight per uid and nothing else may sync it. An unacknowledged batch comes back
  (after a crash between commit and ack, or a server restart): the journal drops
  it by ``message_id``. An empty sync is not acknowledged.
- ``POST /channel/messagesync`` per configured channel, upward from the last
  committed ``message_seq`` + 1; that cursor moves in the same journal transaction
  as the events, and gaps in ``message_seq`` are reported.
- Auth: the manager token as header ``token``; a 401 has an empty body. Errors:
  HTTP 400 ``{"msg", "status"}``.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any, Literal

import anyio
import orjson
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from relay import metrics
from relay.checks import CheckResult
from relay.config_base import HttpUrl
from relay.logs import get_logger
from relay.remote import display_url
from relay.sources import http
from relay.sources.base import (
    LoopErrors,
    SourceHealth,
    SourceRuntime,
    malformed_answer,
    normalize_batch,
    now_ms,
    observe_batch,
    request_outcome,
)
from relay.sources.http import Answer, HttpSourceConfig, ProviderClient
from relay.sources.salvage import salvage, without_cut_off_tail
from relay.sources.wukongim_records import (
    BadRecord,
    ChannelSeqs,
    ack_seq,
    encode_error,
    message_seq,
    normalize,
    parse_channel_answer,
    parse_sync_answer,
)

log = get_logger("relay.source.wukongim")

# How often an idle channel loop checks that the server still holds the cursor's message.
HISTORY_CHECK_INTERVAL = 60.0


def parse_channel_cursor(value: str) -> tuple[int, str | None]:
    """``"<seq>"`` or ``"<seq>:<message_id of that seq>"``."""
    seq, _, message_id = value.partition(":")
    return (int(seq) if seq.isdigit() else 0), (message_id or None)


class ChannelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1)
    type: int = Field(ge=1, le=255)


class WuKongIMSourceConfig(HttpSourceConfig):
    type: Literal["wukongim"]
    base_url: HttpUrl
    token: SecretStr | None = None
    uids: list[str] = Field(default_factory=list)
    channels: list[ChannelSpec] = Field(default_factory=list)
    login_uid: str = "relay"
    # Large on purpose: a real server that returns fewer conversations than it holds
    # loses the ones past the limit for good (WUKONGIM-SERVER.md, "the limit bug").
    sync_limit: int = Field(default=10_000, ge=1, le=10_000)
    channel_limit: int = Field(default=500, ge=1, le=10_000)


    @model_validator(mode="after")
    def _something_to_poll(self) -> WuKongIMSourceConfig:
        if not self.uids and not self.channels:
            raise ValueError("uids: give at least one uid or channel to poll")
        if len(set(self.uids)) != len(self.uids):
            raise ValueError("uids: a uid is listed twice (one sync in flight per uid)")
        return self


class WuKongIMSource:
    provider = "wukongim"

    def __init__(self, name: str, config: WuKongIMSourceConfig) -> None:
        self.name = name
        self.config = config
        self._client: ProviderClient | None = None
        self._users = 0  # units running: they share one client

    def _headers(self) -> dict[str, str]:
        token = self.config.token
        return {"token": token.get_secret_value()} if token is not None else {}

    async def _call(self, path: str, body: dict[str, Any], *,
                    deadline: float | None = None) -> Answer:
        assert self._client is not None
        return await self._client.request(
            "POST", f"{self.config.base_url}{path}", json=body, headers=self._headers(),
            deadline=deadline)

    def _classify(self, answer: Answer, errors: LoopErrors, endpoint: str) -> float | None:
        """None when the answer is a usable 200; else (counted) how long to wait to retry."""
        delay = self._failure_delay(answer, errors)
        if delay is not None:
            metrics.SOURCE_REQUESTS.labels(self.name, endpoint, _outcome(answer)).inc()
        return delay

    def _failure_delay(self, answer: Answer, errors: LoopErrors) -> float | None:
        if answer.kind == http.LOCAL:
            return errors.transient(answer.detail, level="error")
        if answer.kind != http.RESPONSE:
            return errors.transient(f"{answer.kind}: {answer.detail}")
        if answer.status in (401, 403):
            return errors.config_error(f"HTTP {answer.status}: token rejected")
        if answer.status == 400:
            return errors.config_error(f"HTTP 400 {encode_error(answer.body)}")
        if answer.status == 429:
            return answer.retry_after if answer.retry_after is not None \
                else errors.transient("HTTP 429")
        if 300 <= answer.status < 400:
            return errors.config_error(f"HTTP {answer.status}: redirected (redirects are not"
                                       " followed): check base_url")
        if answer.status >= 300:
            return errors.transient(f"HTTP {answer.status} {encode_error(answer.body)}")
        return None

    # -- running -----------------------------------------------------------

    def units(self) -> list[str]:
        """Each uid and each channel is a unit of its own: replicas share them out."""
        return [f"uid:{uid}" for uid in self.config.uids] + [
            f"channel:{c.type}:{c.id}" for c in self.config.channels]

    async def run(self, runtime: SourceRuntime) -> None:
        metrics.init_source(self.name, ["sync", "syncack", "channel"])
        if self._client is None:
            self._client = self.config.client(self.name)
        self._users += 1
        try:
            async with anyio.create_task_group() as tg:
                for uid in self.config.uids:
                    if runtime.unit in ("", f"uid:{uid}"):
                        tg.start_soon(self._sync_loop, runtime, uid)
                for channel in self.config.channels:
                    if runtime.unit in ("", f"channel:{channel.type}:{channel.id}"):
                        tg.start_soon(self._channel_loop, runtime, channel)
        finally:
            self._users -= 1
            if not self._users and self._client is not None:
                client, self._client = self._client, None
                await client.aclose()

    def _errors(self, runtime: SourceRuntime, endpoint: str, what: str) -> LoopErrors:
        health = runtime.health.setdefault(f"{self.name}/{what}", SourceHealth(endpoint=endpoint))
        health.polling = True
        c = self.config
        return LoopErrors(self.name, endpoint, what, health,
                          transient=(c.transient_backoff, c.transient_backoff_max),
                          config=(c.config_error_backoff, c.config_error_backoff_max))

    async def _sync_loop(self, runtime: SourceRuntime, uid: str) -> None:
        endpoint = "sync"
        errors = self._errors(runtime, endpoint, f"sync:{uid}")
        labels = (self.name, endpoint)
        limit = self.config.sync_limit
        seqs_key = f"{self.name}:sync:{uid}:seqs"
        stored = (await runtime.journal.get_cursors(seqs_key)).get(seqs_key)
        channel_seqs = ChannelSeqs(self.name, uid, orjson.loads(stored) if stored else None)
        while not runtime.stopping.is_set():
            await runtime.wait_for_space(self.name)
            if runtime.stopping.is_set():
                break
            answer = await self._call("/message/sync", {"uid": uid, "limit": limit})
            fetched_at = now_ms()
            delay = self._classify(answer, errors, endpoint)
            if delay is not None:
                await runtime.sleep(delay)
                continue
            records = self._sync_records(answer)
            if records is None:
                # Nothing is acknowledged: the server will send the same batch again.
                await malformed_answer(runtime, self.name, endpoint, answer.raw,
                                       "sync answer is not a (whole) JSON array", errors)
                continue
            metrics.SOURCE_REQUESTS.labels(*labels, request_outcome(*labels, answer, records)).inc()
            errors.ok()
            if not records:
                await runtime.sleep(self.config.idle_interval)
                continue
            if len(records) >= limit:
                log.warning("sync came back full: the server may skip conversations past the"
                            " limit for good; keep sync_limit large", source=self.name, uid=uid,
                            limit=limit)
            events, quarantine = normalize_batch(
                self.name, endpoint, records,
                partial(normalize, source=self.name, kind="command", fetched_at=fetched_at,
                        uid=uid), max_record_bytes=self.config.max_record_bytes)
            moved = channel_seqs.observe(records)
            cursors = {f"{self.name}:sync:{uid}:last_ms": str(fetched_at)}
            if moved:
                cursors[seqs_key] = channel_seqs.encode()
            result = await runtime.commit(self.name, endpoint, events, quarantine=quarantine,
                                          cursors=cursors)
            observe_batch(self.name, endpoint, events, fetched_at)
            await self._ack(runtime, uid, ack_seq(records, answer.raw), errors)
            if result.new == 0:
                # Nothing new: the server sent back what was already journaled (its acks do
                # nothing for the first minute of a new conversation). Re-syncing at once
                # would get the same batch again and again.
                await runtime.sleep(self.config.idle_interval)

    @staticmethod
    def _sync_records(answer: Answer) -> list[Any] | None:
        """The sync answer's records; None when it is not a whole array (never acknowledged)."""
        if answer.body is None and answer.raw:
            salvaged = salvage(answer.raw)
            return salvaged.records if salvaged is not None and salvaged.complete else None
        try:
            return parse_sync_answer(answer.body)
        except BadRecord:
            return None

    async def _ack(self, runtime: SourceRuntime, uid: str, seq: int, errors: LoopErrors) -> None:
        """Acknowledge a committed batch; retried, since acking twice is harmless."""
        while True:
            # The ack consumes: only while the lease outlasts the request (SPEC §9).
            deadline = await runtime.lease_time(self.config.request_deadline)
            if deadline is None:
                return  # unacknowledged: whoever holds the uid next gets the batch again
            answer = await self._call("/message/syncack", {"uid": uid, "last_message_seq": seq},
                                      deadline=deadline)
            delay = self._classify(answer, errors, "syncack")
            if delay is None:
                metrics.SOURCE_REQUESTS.labels(self.name, "syncack", "ok").inc()
                errors.ok("syncack")
                return
            if runtime.stopping.is_set():
                # Unacknowledged: the batch comes back after the restart and is deduplicated.
                return
            await runtime.sleep(delay)

    async def _channel_loop(self, runtime: SourceRuntime, channel: Any) -> None:
        endpoint = "channel"
        what = f"channel:{channel.type}:{channel.id}"
        errors = self._errors(runtime, endpoint, what)
        labels = (self.name, endpoint)
        cursor_key = f"{self.name}:{what}:seq"
        stored = (await runtime.journal.get_cursors(cursor_key)).get(cursor_key, "0")
        last, last_id = parse_channel_cursor(stored)
        limit = self.config.channel_limit
        next_check = 0.0  # at start: is the server's history still the one the cursor is in?
        while not runtime.stopping.is_set():
            await runtime.wait_for_space(self.name)
            if runtime.stopping.is_set():
                break
            if last and time.monotonic() >= next_check:
                next_check = time.monotonic() + HISTORY_CHECK_INTERVAL
                if await self._history_restarted(channel, last, last_id):
                    log.warning("the server's channel history no longer holds the relay's"
                                " cursor (it was reset or replaced): reading it from the start;"
                                " what was already journaled is deduplicated",
                                source=self.name, channel=what, cursor=last)
                    last, last_id = 0, None
                    await runtime.commit(self.name, endpoint, [], cursors={cursor_key: "0"})
                    continue
            answer = await self._call("/channel/messagesync", {
                "login_uid": self.config.login_uid, "channel_id": channel.id,
                "channel_type": channel.type, "start_message_seq": last + 1,
                "end_message_seq": 0, "limit": limit, "pull_mode": 1,
            })
            fetched_at = now_ms()
            if answer.kind == http.TOO_LARGE and limit > 1:
                # History is not consumed by reading: ask for fewer at a time.
                limit = max(1, limit // 2)
                log.warning("channel page larger than max_answer_bytes: asking for fewer",
                            source=self.name, channel=what, limit=limit)
                metrics.SOURCE_REQUESTS.labels(*labels, "too_large").inc()
                continue
            delay = self._classify(answer, errors, endpoint)
            if delay is not None:
                await runtime.sleep(delay)
                continue
            page = self._channel_records(answer)
            if page is None:
                await malformed_answer(runtime, self.name, endpoint, answer.raw,
                                       "messagesync answer has no messages list", errors)
                continue
            records, more = page
            metrics.SOURCE_REQUESTS.labels(*labels, request_outcome(*labels, answer, records)).inc()
            errors.ok()
            limit = min(self.config.channel_limit, limit * 2)
            # Only records past the cursor count; a server ignoring start_message_seq must
            # not move the cursor backwards or re-report gaps. Records without a usable
            # seq cannot be placed: they are quarantined, never dropped.
            fresh = [r for r in records if (message_seq(r) or last + 1) > last]
            if not fresh:
                await runtime.sleep(self.config.idle_interval)
                continue
            fresh.sort(key=lambda r: message_seq(r) or 0)
            last = self._report_gaps(what, last, fresh)
            last_id = next((str(r.get("message_id")) for r in reversed(fresh)
                            if message_seq(r) == last), None)
            events, quarantine = normalize_batch(
                self.name, endpoint, fresh,
                partial(normalize, source=self.name, kind="message", fetched_at=fetched_at),
                max_record_bytes=self.config.max_record_bytes)
            cursor = f"{last}:{last_id}" if last_id else str(last)
            await runtime.commit(self.name, endpoint, events, quarantine=quarantine,
                                 cursors={cursor_key: cursor})
            observe_batch(self.name, endpoint, events, fetched_at)
            if not more and len(records) < limit:
                await runtime.sleep(self.config.idle_interval)

    async def _history_restarted(self, channel: Any, last: int, last_id: str | None) -> bool:
        """Whether the message the cursor stands on is gone or another one (a reset server).

        A server whose history restarted answers nothing past the cursor for ever
        (or hands out old seqs with new messages): without this check the relay
        would wait in silence.
        """
        answer = await self._call("/channel/messagesync", {
            "login_uid": self.config.login_uid, "channel_id": channel.id,
            "channel_type": channel.type, "start_message_seq": last,
            "end_message_seq": last + 1, "limit": 1, "pull_mode": 1,
        })
        page = self._channel_records(answer) if answer.kind == http.RESPONSE \
            and answer.status == 200 else None
        if page is None:
            return False  # could not tell: keep the cursor
        at_cursor = [r for r in page[0] if message_seq(r) == last]
        if not at_cursor:
            return True
        return last_id is not None and str(at_cursor[0].get("message_id")) != last_id

    @staticmethod
    def _channel_records(answer: Answer) -> tuple[list[Any], bool] | None:
        if answer.body is None and answer.raw:
            salvaged = salvage(answer.raw, "messages")
            # Reading history consumes nothing: a cut-off page's leading records are safe
            # to take, the rest comes with the next page.
            return (without_cut_off_tail(salvaged), True) if salvaged is not None else None
        try:
            return parse_channel_answer(answer.body)
        except BadRecord:
            return None

    def _report_gaps(self, what: str, last: int, records: list[Any]) -> int:
        expected = last + 1
        unplaced = 0
        for record in records:
            seq = message_seq(record)
            if seq is None:
                unplaced += 1
                continue
            if seq > expected:
                missing = seq - expected
                metrics.SOURCE_SEQ_GAPS.labels(self.name).inc(missing)
                log.warning("gap in message_seq: messages missing from the channel history",
                            source=self.name, channel=what, first_missing=expected,
                            missing=missing)
            expected = max(expected, seq + 1)
        if unplaced:
            log.warning("records without a usable message_seq: quarantined", source=self.name,
                        channel=what, records=unplaced)
        return expected - 1

    # -- relay check -------------------------------------------------------

    async def check(self) -> list[CheckResult]:
        """Read-only: a one-message channel read; never /message/sync (it would steal acks)."""
        self._client = self.config.client(self.name)
        try:
            channel = self.config.channels[0] if self.config.channels else None
            answer = await self._call("/channel/messagesync", {
                "login_uid": self.config.login_uid,
                "channel_id": channel.id if channel else self.config.login_uid,
                "channel_type": channel.type if channel else 1,
                "start_message_seq": 0, "end_message_seq": 0, "limit": 1, "pull_mode": 1,
            })
        finally:
            await self._client.aclose()
            self._client = None
        target = f"{display_url(self.config.base_url)} (/channel/messagesync, read-only)"
        if answer.kind != http.RESPONSE:
            return [CheckResult(f"source {self.name}", target, False,
                                f"unreachable: {answer.detail}")]
        if answer.status in (401, 403):
            return [CheckResult(f"source {self.name}", target, False, "token rejected")]
        ok = answer.status < 300
        detail = "reachable, token accepted" if ok else \
            f"HTTP {answer.status} {encode_error(answer.body)}"
        return [CheckResult(f"source {self.name}", target, ok, detail)]


def _outcome(answer: Answer) -> str:
    if answer.kind != http.RESPONSE:
        return answer.kind
    if answer.status in (400, 401, 403):
        return "config_error"
    if answer.status == 429:
        return "throttled"
    return "transient_error"

