"""LeanCloud: tailing the application's message history, ``GET /1.2/rtm/messages``.

``reversed=true&timestamp=T&msgid=M&till_timestamp=NOW-SETTLE&limit=1000``:
oldest → newest, starting after the ``(timestamp, msg-id)`` cursor, which is
kept in the journal and moved in the same transaction as the events. Sends
are asynchronous, so a message can become visible after later ones: the
relay reads only up to ``settle_delay`` behind now. On first start (no
cursor) it begins ``start`` back (default 24 h; ``earliest`` = all history).

The request quota is shared with the application's own API calls, so the
relay keeps under ``requests_per_minute`` instead of discovering the quota by
hitting it; a 429 still backs off (``Retry-After``, clamped to ``max_retry_after``, or
about a minute), and every other call on the same app (``relay evacuate``'s lists and
per-conversation reads) waits out the same penalty.
Auth: ``X-LC-Id`` and ``X-LC-Sign: md5(timestamp_ms + master_key),timestamp_ms,master``
(or ``X-LC-Key: <master_key>,master`` with ``auth = "key"``).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, Literal, Protocol

import orjson
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from relay import metrics
from relay.checks import CheckResult
from relay.config_base import ByteSize, Duration, HttpUrl, parse_point_in_time
from relay.journal import LedgerBatch, LedgerEntry, NewEvent, QuarantinedRecord
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
from relay.sources.budget import RequestBudget
from relay.sources.http import Answer, HttpSourceConfig, ProviderClient
from relay.sources.leancloud_api import LeanCloudApi, Throttle, clamp_remote_delay
from relay.sources.leancloud_records import BadRecord, cursor_of, normalize, parse_answer
from relay.sources.salvage import salvage, without_cut_off_tail

log = get_logger("relay.source.leancloud")

PATH = "/1.2/rtm/messages"
ENDPOINT = "messages"


class EvacuationSettings(BaseModel):
    """``[sources.NAME.evacuation]``: how ``relay evacuate`` exports this app's history."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # The evacuation's share of the app's quota, which the app's own clients also spend
    # (commercial apps default to 1,800 a minute, development apps have 120).
    requests_per_minute: int = Field(default=900, ge=1, le=9000)
    # The completeness check: every conversation ("full"), or a fixed sample of them.
    verify: Literal["full", "sample"] = "full"
    sample_ratio: float = Field(default=0.05, gt=0, le=1)
    verify_concurrency: int = Field(default=4, ge=1, le=32)  # conversations checked at once
    # Where the conversations file and the report go (and the archive when the
    # configuration has no sink); default: "evacuation/<source>" beside the journal.
    directory: str | None = None
    progress_interval: Duration = 30.0  # plain progress lines when not on a terminal
    archive_rotate_bytes: ByteSize = 1024**3  # the default archive's file size


class LeanCloudSourceConfig(HttpSourceConfig):
    type: Literal["leancloud"]
    base_url: HttpUrl
    app_id: str = Field(min_length=1)
    master_key: SecretStr
    auth: Literal["sign", "key"] = "sign"
    settle_delay: Duration = 5.0
    start: str = "24h"
    limit: int = Field(default=1000, ge=1, le=1000)
    requests_per_minute: int = Field(default=120, ge=1, le=9000)
    throttle_backoff: Duration = 60.0
    evacuation: EvacuationSettings = Field(default_factory=EvacuationSettings)

    @field_validator("start")
    @classmethod
    def _start(cls, value: str) -> str:
        start_ms(value, 0)  # raises ValueError with a clear message
        return value


def start_ms(value: str, now: int) -> int:
    """Where a first start begins: ``earliest``, a duration back, or an RFC 3339 time."""
    if value == "earliest":
        return 0
    try:
        return parse_point_in_time(value, now)
    except ValueError:
        raise ValueError("expected 'earliest', a duration such as 24h, or an RFC 3339 time")\
            from None


class HistoryTracker(Protocol):
    """Follows the tail through the whole history (``relay evacuate``).

    With a tracker the source also writes the ledger (every record's id, in its
    batch's transaction) and commits the tracker's own cursors with each batch.
    """

    def requested(self, outcome: str) -> None:
        """One history request was answered (``ok``, ``empty``, ``throttled``, ...)."""

    def batch_cursors(self, entries: Sequence[LedgerEntry],
                      cursor: tuple[int, str]) -> dict[str, str]:
        """Cursors to commit with this batch (before the commit)."""

    def committed(self, entries: Sequence[LedgerEntry], cursor: tuple[int, str]) -> None:
        """The batch is journaled."""

    def read_up_to(self, till: int) -> None:
        """Everything visible up to ``till`` (ms) has been read: a page came back short."""


class LeanCloudSource:
    provider = "leancloud"

    def __init__(self, name: str, config: LeanCloudSourceConfig,
                 tracker: HistoryTracker | None = None) -> None:
        self.name = name
        self.config = config
        self.tracker = tracker
        self.throttle = Throttle()  # shared by every call on this app from this process
        self._client: ProviderClient | None = None

    def budget(self, runtime: SourceRuntime) -> RequestBudget:
        """The app's request budget (per minute, shared): soft, no start-up hold-off."""
        return runtime.budgets.get(("leancloud", self.config.app_id),
                                   self.config.requests_per_minute, 60.0, holdoff=0)

    @asynccontextmanager
    async def api(self, runtime: SourceRuntime,
                  on_request: Callable[[str, str], None] | None = None,
                  ) -> AsyncIterator[LeanCloudApi]:
        """Other calls on this app, under the same budget and 429 back-off as the tail."""
        c = self.config
        client = c.client(self.name)
        try:
            yield LeanCloudApi(c.base_url, self._headers, client, self.budget(runtime),
                               self.throttle, throttle_backoff=c.throttle_backoff,
                               retry_after_max=c.max_retry_after, on_request=on_request)
        finally:
            await client.aclose()

    @property
    def cursor_key(self) -> str:
        return f"{self.name}:messages:cursor"

    def _headers(self) -> dict[str, str]:
        c = self.config
        key = c.master_key.get_secret_value()
        headers = {"X-LC-Id": c.app_id}
        if c.auth == "key":
            headers["X-LC-Key"] = f"{key},master"
        else:
            stamp = str(int(time.time() * 1000))
            sign = hashlib.md5((stamp + key).encode("utf-8")).hexdigest()  # noqa: S324 - the provider's scheme
            headers["X-LC-Sign"] = f"{sign},{stamp},master"
        return headers

    async def _get(self, params: dict[str, str]) -> Answer:
        assert self._client is not None
        return await self._client.request(
            "GET", f"{self.config.base_url}{PATH}", params=params, headers=self._headers()
        )

    def units(self) -> list[str]:
        """One unit: the whole source (its budget is one app key's)."""
        return [""]

    async def run(self, runtime: SourceRuntime) -> None:
        c = self.config
        metrics.init_source(self.name, [ENDPOINT])
        health = runtime.health.setdefault(f"{self.name}/{ENDPOINT}",
                                           SourceHealth(endpoint=ENDPOINT))
        health.polling = True
        errors = LoopErrors(self.name, ENDPOINT, ENDPOINT, health,
                            transient=(c.transient_backoff, c.transient_backoff_max),
                            config=(c.config_error_backoff, c.config_error_backoff_max))
        budget = self.budget(runtime)
        health.budget = budget
        tracker = self.tracker
        stored = (await runtime.journal.get_cursors(self.cursor_key)).get(self.cursor_key)
        cursor: tuple[int, str | None]
        if stored:
            stamp, msg_id = orjson.loads(stored)
            cursor = (int(stamp), msg_id)
        else:
            cursor = (start_ms(c.start, now_ms()), None)
            log.info("first start: reading history", source=self.name, start=c.start)
        labels = (self.name, ENDPOINT)
        limit = c.limit
        self._client = c.client(self.name)
        try:
            while not runtime.stopping.is_set():
                await runtime.wait_for_space(self.name)
                till = now_ms() - int(c.settle_delay * 1000)
                if cursor[0] >= till:
                    if tracker is not None:
                        tracker.read_up_to(till)
                    await runtime.sleep(c.idle_interval)
                    continue
                params = {"reversed": "true", "timestamp": str(cursor[0]),
                          "till_timestamp": str(till), "limit": str(limit)}
                if cursor[1] is not None:
                    params["msgid"] = cursor[1]
                await self.throttle.wait(runtime.stopping)
                async with budget.slot() as waited:
                    if waited:
                        metrics.SOURCE_BUDGET_WAITS.labels(*labels).inc()
                    if runtime.stopping.is_set():
                        break
                    answer = await self._get(params)
                fetched_at = now_ms()
                if answer.kind == http.TOO_LARGE and limit > 1:
                    # History is not consumed by reading: ask for fewer at a time.
                    limit = max(1, limit // 2)
                    metrics.SOURCE_REQUESTS.labels(*labels, "too_large").inc()
                    log.warning("history page larger than max_answer_bytes: asking for fewer",
                                source=self.name, limit=limit)
                    continue
                delay = self._classify(answer, errors)
                if tracker is not None:
                    tracker.requested("ok" if delay is None else
                                      "throttled" if answer.status == 429 else "error")
                if delay is not None:
                    await runtime.sleep(delay)
                    continue
                records = self._records(answer)
                if records is None:
                    await malformed_answer(runtime, self.name, ENDPOINT, answer.raw,
                                           "answer is not a JSON array", errors)
                    continue
                outcome = request_outcome(*labels, answer, records)
                metrics.SOURCE_REQUESTS.labels(*labels, outcome).inc()
                errors.ok()
                limit = min(c.limit, limit * 2)
                # The server's order decides what "after" means: continue from its last
                # record, but never backwards (a loop) nor past what was asked for (a record
                # claiming a time beyond `till` must not skip the messages before it).
                after = (cursor[0], cursor[1] or "")
                positions = [p for p in (cursor_of(r) for r in records)
                             if p is not None and after < p and p[0] <= till]
                if not positions:
                    if records:
                        log.error("history page without a usable (timestamp, msg-id):"
                                  " cannot move past it", source=self.name, records=len(records))
                        await runtime.sleep(errors.transient("no cursor in page"))
                    else:
                        if tracker is not None:
                            tracker.read_up_to(till)
                        await runtime.sleep(c.idle_interval)
                    continue
                new_cursor = positions[-1]
                events, quarantine = normalize_batch(
                    self.name, ENDPOINT, records,
                    partial(normalize, source=self.name, fetched_at=fetched_at),
                    max_record_bytes=c.max_record_bytes)
                cursors = {self.cursor_key: orjson.dumps(new_cursor).decode()}
                ledger: LedgerBatch | None = None
                if tracker is not None:
                    ledger = LedgerBatch(self.name, ledger_entries(self.name, records, events,
                                                                   quarantine))
                    cursors.update(tracker.batch_cursors(ledger.entries, new_cursor))
                await runtime.commit(self.name, ENDPOINT, events, quarantine=quarantine,
                                     cursors=cursors, ledger=ledger)
                cursor = new_cursor
                observe_batch(self.name, ENDPOINT, events, fetched_at)
                if tracker is not None and ledger is not None:
                    tracker.committed(ledger.entries, new_cursor)
                if len(records) < limit:
                    if tracker is not None:
                        tracker.read_up_to(till)
                    await runtime.sleep(c.idle_interval)
        finally:
            health.polling = False
            await self._client.aclose()
            self._client = None

    @staticmethod
    def _records(answer: Answer) -> list[Any] | None:
        if answer.body is None and answer.raw:
            # One hostile record must not cost the page: salvage the others. A cut-off
            # page is safe to take in part (the cursor moves only past what arrived).
            salvaged = salvage(answer.raw)
            return without_cut_off_tail(salvaged) if salvaged is not None else None
        try:
            return parse_answer(answer.body)
        except BadRecord:
            return None

    def _classify(self, answer: Answer, errors: LoopErrors) -> float | None:
        labels = (self.name, ENDPOINT)
        if answer.kind == http.LOCAL:
            metrics.SOURCE_REQUESTS.labels(*labels, answer.kind).inc()
            return errors.transient(answer.detail, level="error")
        if answer.kind != http.RESPONSE:
            metrics.SOURCE_REQUESTS.labels(*labels, answer.kind).inc()
            return errors.transient(f"{answer.kind}: {answer.detail}")
        if answer.status == 429:
            metrics.SOURCE_REQUESTS.labels(*labels, "throttled").inc()
            delay = clamp_remote_delay(answer.retry_after, self.config.throttle_backoff,
                                       self.config.max_retry_after)
            self.throttle.penalize(delay)
            log.warning("LeanCloud quota exceeded (shared with the application's own calls):"
                        " backing off", source=self.name, wait_seconds=round(delay, 1))
            return delay
        if answer.status in (401, 403):
            metrics.SOURCE_REQUESTS.labels(*labels, "config_error").inc()
            return errors.config_error(f"HTTP {answer.status} {_error_text(answer.body)}")
        if 300 <= answer.status < 500:
            metrics.SOURCE_REQUESTS.labels(*labels, "config_error").inc()
            return errors.config_error(f"HTTP {answer.status} {_error_text(answer.body)}")
        if answer.status >= 300:
            metrics.SOURCE_REQUESTS.labels(*labels, "transient_error").inc()
            return errors.transient(f"HTTP {answer.status} {_error_text(answer.body)}")
        return None

    async def check(self) -> list[CheckResult]:
        """One read of a single history record: consumes nothing (one request of quota)."""
        self._client = self.config.client(self.name)
        try:
            answer = await self._get({"limit": "1"})
        finally:
            await self._client.aclose()
            self._client = None
        target = f"{display_url(self.config.base_url)}{PATH}"
        if answer.kind != http.RESPONSE:
            return [CheckResult(f"source {self.name}", target, False,
                                f"unreachable: {answer.detail}")]
        if answer.status in (401, 403):
            return [CheckResult(f"source {self.name}", target, False,
                                f"credentials rejected: {_error_text(answer.body)}")]
        ok = answer.status < 300
        return [CheckResult(f"source {self.name}", target, ok,
                            "reachable, credentials accepted" if ok
                            else f"HTTP {answer.status} {_error_text(answer.body)}")]


def ledger_entries(source: str, records: Sequence[Any], events: Sequence[NewEvent],
                   quarantine: Sequence[QuarantinedRecord]) -> list[LedgerEntry]:
    """Every record of a page that has a (timestamp, msg-id), with why it was quarantined."""
    journaled = {e.id for e in events}
    errors = {q.raw: q.error for q in quarantine}
    entries = []
    for record in records:
        position = cursor_of(record)
        if position is None:
            continue  # no id to prove anything with: the quarantine holds it raw
        error = None
        if f"{source}:{position[1]}" not in journaled:
            try:
                raw = orjson.dumps(record)
            except TypeError:
                raw = b""
            error = errors.get(raw, "quarantined")
        entries.append(LedgerEntry(str(record.get("conv-id")), position[0], position[1], error))
    return entries


def _error_text(body: Any) -> str:
    if isinstance(body, dict) and "error" in body:
        return f"code {body.get('code')}: {body.get('error')}"
    return ""
