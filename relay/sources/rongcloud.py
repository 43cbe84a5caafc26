"""RongCloud high-assurance message routing: ``POST {base}/rtmsg/{endpoint}/qrymsg.json``.

Each endpoint (person, group, chatroom) is polled by its own loop, one request
in flight at a time, because a query is assumed to remove what it returns
(consume-on-read): every answer is journaled before the next request.

- Budget: 10 requests in any sliding second per (app key, endpoint), shared by
  every base URL and source on that key; over it the server answers an empty
  200, so the relay never exceeds it (:mod:`relay.sources.budget`). A non-empty
  answer means backlog: ask again as soon as the budget allows; an empty one:
  wait ``idle_interval``.
- Retention: 3 hours. Data age and the time since the last successful poll are
  exported and warned about well before the window closes.
- Failover: a connection error moves to the next base URL at once; repeated
  read timeouts / 5xx move too, after a possible-loss warning.
- Errors ``{"code", "errorMessage"}``: 1001/1004/1006/1007/1009 are
  configuration problems (ERROR, alert, slow back-off); 1008/429 throttling;
  1000/1050/5xx transient.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import time
from dataclasses import dataclass
from typing import Any, Literal

import anyio
from pydantic import Field, SecretStr, model_validator

from relay import metrics
from relay.checks import CheckResult
from relay.config_base import Duration, HttpUrl
from relay.journal import NewEvent, QuarantinedRecord
from relay.logs import get_logger
from relay.metrics import RequestOutcome
from relay.remote import display_url
from relay.sources import http
from relay.sources.base import (
    LoopErrors,
    SourceHealth,
    SourceRuntime,
    normalize_batch,
    now_ms,
    observe_batch,
    quarantine_record,
)
from relay.sources.http import HttpSourceConfig, ProviderClient
from relay.sources.rongcloud_records import BadRecord, normalize, parse_items
from relay.sources.salvage import salvage

log = get_logger("relay.source.rongcloud")

Endpoint = Literal["person", "group", "chatroom"]
ENDPOINTS: tuple[Endpoint, ...] = ("person", "group", "chatroom")
CONFIG_ERROR_CODES = frozenset({1001, 1004, 1006, 1007, 1009})
THROTTLE_CODES = frozenset({1008})
POLL_MARK_EVERY = 10.0  # seconds between writes of an endpoint's last-poll mark


class RongCloudSourceConfig(HttpSourceConfig):
    type: Literal["rongcloud"]
    app_key: str = Field(min_length=1)
    app_secret: SecretStr
    base_urls: list[HttpUrl] = Field(
        default_factory=lambda: ["https://api.rong-api.com", "https://api-b.rong-api.com"],
        min_length=1,
    )
    endpoints: list[Endpoint] = Field(default_factory=lambda: list(ENDPOINTS), min_length=1)
    timestamp_unit: Literal["ms", "s"] = "ms"
    requests_per_second: int = Field(default=10, ge=1, le=1000)
    budget_window: Duration = 1.0
    failover_after: int = Field(default=3, ge=1)
    retention: Duration = 3 * 3600.0
    warn_age: Duration = 3600.0



    @model_validator(mode="after")
    def _retry_after_within_retention(self) -> RongCloudSourceConfig:
        # A provider's Retry-After must never leave an endpoint unpolled near the retention.
        if self.max_retry_after > self.retention / 10:
            raise ValueError("max_retry_after: must be at most a tenth of retention")
        return self


Outcome = RequestOutcome


@dataclass
class _Answer:
    outcome: Outcome
    body: Any = None
    raw: bytes = b""
    detail: str = ""
    retry_after: float | None = None
    url_index: int = 0
    salvaged: bool = False  # did not parse as a whole: its records were recovered one by one
    partial: bool = False  # salvaged from an answer that ended early: the rest may be lost


@dataclass
class _LoopState:
    """What one endpoint's loop remembers between requests."""

    connect_failures: int = 0
    read_failures: int = 0
    last_nonempty: bool = False
    last_cursor_write: float = -math.inf  # monotonic time: near 0 shortly after boot
    last_age_warning: float = 0.0


class RongCloudSource:
    provider = "rongcloud"

    def __init__(self, name: str, config: RongCloudSourceConfig) -> None:
        self.name = name
        self.config = config
        self._url_index = 0
        self._client: ProviderClient | None = None

    # -- signing -----------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        nonce = secrets.token_hex(8)
        stamp = time.time()
        timestamp = str(int(stamp * 1000) if self.config.timestamp_unit == "ms" else int(stamp))
        secret = self.config.app_secret.get_secret_value()
        signature = hashlib.sha1(  # noqa: S324 - the provider's signature scheme
            (secret + nonce + timestamp).encode("utf-8")
        ).hexdigest()
        return {
            "App-Key": self.config.app_key,
            "Nonce": nonce,
            "Timestamp": timestamp,
            "Signature": signature,
            "Content-Type": "application/x-www-form-urlencoded",
        }

    def _new_client(self) -> ProviderClient:
        return self.config.client(self.name)

    @property
    def base_url(self) -> str:
        return self.config.base_urls[self._url_index]

    def _failover(self, reason: str, failed_index: int) -> None:
        # Several endpoint loops share the current URL: only the first to see it
        # fail moves on, the others must not move back.
        if len(self.config.base_urls) < 2 or failed_index != self._url_index:
            return
        old = self.base_url
        self._url_index = (self._url_index + 1) % len(self.config.base_urls)
        metrics.SOURCE_FAILOVERS.labels(self.name).inc()
        log.warning("failing over to the next base URL", source=self.name, reason=reason,
                    previous=display_url(old), current=display_url(self.base_url))

    # -- one request -------------------------------------------------------

    async def _post(self, path: str, data: dict[str, str] | None = None, *,
                    deadline: float | None = None) -> _Answer:
        index = self._url_index
        answer = await self._post_to(f"{self.config.base_urls[index]}{path}", data, deadline)
        answer.url_index = index
        return answer

    async def _post_to(self, url: str, data: dict[str, str] | None,
                       deadline: float | None = None) -> _Answer:
        assert self._client is not None
        answer = await self._client.request("POST", url, headers=self._headers(), data=data,
                                            deadline=deadline)
        if answer.kind != http.RESPONSE:
            return _Answer(_TRANSPORT_OUTCOMES[answer.kind], detail=answer.detail)
        body, raw, status = answer.body, answer.raw, answer.status
        code = body.get("code") if isinstance(body, dict) else None
        message = body.get("errorMessage", "") if isinstance(body, dict) else ""
        if status == 429 or code in THROTTLE_CODES:
            return _Answer(Outcome.THROTTLED, detail=f"HTTP {status} code {code}",
                           retry_after=answer.retry_after)
        if code in CONFIG_ERROR_CODES or status in (401, 403):
            return _Answer(Outcome.CONFIG, detail=f"HTTP {status} code {code}: {message}")
        if status >= 500:
            return _Answer(Outcome.TRANSIENT, raw=raw, detail=f"HTTP {status} code {code}")
        if status >= 300:
            # Redirects are not followed (a signed request must not go elsewhere): the base
            # URL is wrong, which an operator must fix.
            return _Answer(Outcome.CONFIG, detail=f"HTTP {status} code {code}: {message}")
        if body is None and raw:
            # One hostile record can make the whole answer unparseable: keep the others.
            salvaged = salvage(raw, "results")
            if salvaged is not None:
                return _Answer(Outcome.OK, body={"results": salvaged.records}, raw=raw,
                               salvaged=True, partial=not salvaged.complete,
                               detail="" if salvaged.complete else "answer ended early")
        if not isinstance(body, dict):
            return _Answer(Outcome.MALFORMED, raw=raw, detail="answer is not a JSON object")
        if code is not None and code != 200 and "results" not in body:
            return _Answer(Outcome.TRANSIENT, detail=f"code {code}: {message}")
        return _Answer(Outcome.OK, body=body, raw=raw)

    # -- the polling loops -------------------------------------------------

    def units(self) -> list[str]:
        """One unit: the whole source (its budget is one app key's)."""
        return [""]

    async def run(self, runtime: SourceRuntime) -> None:
        await self._report_gap(runtime)
        self._client = self._new_client()
        try:
            async with anyio.create_task_group() as tg:
                for endpoint in self.config.endpoints:
                    runtime.health[f"{self.name}/{endpoint}"] = SourceHealth(endpoint=endpoint)
                    tg.start_soon(self._poll_endpoint, runtime, endpoint)
        finally:
            await self._client.aclose()
            self._client = None

    def _cursor_key(self, endpoint: str) -> str:
        return f"{self.name}:{endpoint}:last_poll_ms"

    async def _report_gap(self, runtime: SourceRuntime) -> None:
        """Say loudly at start-up when the time since the last poll may have cost data."""
        cursors = await runtime.journal.get_cursors(f"{self.name}:")
        now = now_ms()
        metrics.init_source(self.name, self.config.endpoints, self.config.retention)
        for endpoint in self.config.endpoints:
            last = cursors.get(self._cursor_key(endpoint))
            if last is not None:
                # Alerts on "time since the last successful poll" hold across restarts.
                metrics.SOURCE_LAST_SUCCESS.labels(self.name, endpoint).set(int(last) / 1000)
            if last is None:
                log.info("first start of this endpoint: no earlier poll recorded",
                         source=self.name, endpoint=endpoint)
                continue
            gap = (now - int(last)) / 1000
            if gap > self.config.retention:
                log.error(
                    "DATA MAY HAVE BEEN LOST: this endpoint was last polled longer ago than the"
                    " provider keeps messages",
                    source=self.name, endpoint=endpoint, gap_seconds=round(gap),
                    retention_seconds=self.config.retention,
                )
            elif gap > self.config.warn_age:
                log.warning(
                    "long gap since the last poll: close to the provider's retention",
                    source=self.name, endpoint=endpoint, gap_seconds=round(gap),
                    retention_seconds=self.config.retention,
                )

    async def _poll_endpoint(self, runtime: SourceRuntime, endpoint: str) -> None:
        c = self.config
        budget = runtime.budgets.get(
            ("rongcloud", c.app_key, endpoint), c.requests_per_second, c.budget_window,
            holdoff=runtime.holdoff(c.budget_window))
        health = runtime.health[f"{self.name}/{endpoint}"]
        health.polling = True
        health.budget = budget
        errors = LoopErrors(self.name, endpoint, endpoint, health,
                            transient=(c.transient_backoff, c.transient_backoff_max),
                            config=(c.config_error_backoff, c.config_error_backoff_max))
        path = f"/rtmsg/{endpoint}/qrymsg.json"
        state = _LoopState()
        labels = (self.name, endpoint)
        while not runtime.stopping.is_set():
            await runtime.wait_for_space(self.name)
            if runtime.stopping.is_set():
                break
            async with budget.slot() as waited:
                if waited:
                    metrics.SOURCE_BUDGET_WAITS.labels(*labels).inc()
                # Consume-on-read: only while the lease outlasts the request (SPEC §9).
                deadline = await runtime.lease_time(c.request_deadline)
                if deadline is None or runtime.stopping.is_set():
                    break
                answer = await self._post(path, deadline=deadline)
            fetched_at = now_ms()
            metrics.SOURCE_REQUESTS.labels(*labels, _outcome_label(answer)).inc()
            if answer.outcome == Outcome.OK:
                delay = await self._take(runtime, endpoint, answer, fetched_at, state, errors)
                if delay is None:
                    break  # shutting down with a batch that could not be journaled
            else:
                state.last_nonempty = False
                delay = await self._failed(runtime, endpoint, answer, state, errors)
            await runtime.sleep(delay)
        health.polling = False

    async def _take(self, runtime: SourceRuntime, endpoint: str, answer: _Answer,
                    fetched_at: int, state: _LoopState, errors: LoopErrors) -> float | None:
        """Journal an answer; returns how long to wait before the next request."""
        c = self.config
        labels = (self.name, endpoint)
        state.connect_failures = state.read_failures = 0
        if answer.partial:
            self._possible_loss(endpoint, answer)
        elif answer.salvaged:
            log.warning("answer did not parse as a whole: its records were recovered one by one",
                        source=self.name, endpoint=endpoint, bytes=len(answer.raw))
        events, quarantine = self._normalize(answer.body, endpoint, fetched_at)
        cursors = None
        mono = time.monotonic()
        # The last-poll mark only feeds the gap report at start (is the gap near the
        # retention, hours?): once in ten seconds is precise enough, and a batch's commit
        # without it is usually one statement (relay.journal.sqlite_commit.GroupWriter).
        if mono - state.last_cursor_write > POLL_MARK_EVERY:
            cursors = {self._cursor_key(endpoint): str(fetched_at)}
            state.last_cursor_write = mono
        if events or quarantine or cursors:
            try:
                await runtime.commit(self.name, endpoint, events, cursors=cursors,
                                     quarantine=quarantine)
            except anyio.get_cancelled_exc_class():
                metrics.SOURCE_POSSIBLE_LOSS.labels(*labels).inc()  # consumed, not journaled
                raise
        errors.ok()
        if events:
            age = observe_batch(self.name, endpoint, events, fetched_at)
            if age > c.warn_age and mono - state.last_age_warning > 60:
                state.last_age_warning = mono
                log.warning("fetched data is old: the provider drops it after its retention",
                            source=self.name, endpoint=endpoint, age_seconds=round(age),
                            retention_seconds=c.retention)
        elif not quarantine:
            if state.last_nonempty:
                metrics.SOURCE_SUSPECTED_THROTTLED.labels(*labels).inc()
            metrics.SOURCE_DATA_AGE.labels(*labels).set(0)
        state.last_nonempty = bool(events or quarantine)
        # A non-empty answer means backlog: ask again as soon as the budget allows.
        return 0.0 if state.last_nonempty else c.idle_interval

    async def _failed(self, runtime: SourceRuntime, endpoint: str, answer: _Answer,
                      state: _LoopState, errors: LoopErrors) -> float:
        """React to a failed request; returns how long to wait before the next one."""
        c = self.config
        if answer.outcome == Outcome.CONNECT:
            state.connect_failures += 1
            log.warning("cannot connect to the provider", source=self.name, endpoint=endpoint,
                        base_url=display_url(self.base_url), error=answer.detail)
            self._failover("connection error", answer.url_index)
            # Every base URL tried in turn: only then back off.
            delay = errors.transient_delay(answer.detail)
            return delay if state.connect_failures >= len(c.base_urls) else 0.0
        if answer.outcome == Outcome.LOCAL:
            # Not the provider's fault: failing over would not help and hide the cause.
            return errors.transient(answer.detail, level="error")
        if answer.outcome in _MAY_HAVE_CONSUMED:
            state.read_failures += 1
            self._possible_loss(endpoint, answer)
            if answer.outcome == Outcome.MALFORMED:
                # Keep the raw answer: whatever it held is recoverable from there.
                await runtime.commit(self.name, endpoint, [], quarantine=[
                    quarantine_record(self.name, endpoint, answer.raw, answer.detail)])
            if state.read_failures >= c.failover_after:
                state.read_failures = 0
                self._failover(f"{c.failover_after} failed answers in a row", answer.url_index)
            return errors.transient_delay(f"{answer.outcome}: {answer.detail}")
        if answer.outcome == Outcome.THROTTLED:
            delay = answer.retry_after if answer.retry_after is not None else \
                max(c.budget_window, errors.transient_delay(f"throttled: {answer.detail}"))
            log.warning("provider reports throttling", source=self.name, endpoint=endpoint,
                        detail=answer.detail, wait_seconds=round(delay, 2))
            return delay
        # Configuration problem: alert and back off slowly, never spin.
        return errors.config_error(answer.detail)

    def _possible_loss(self, endpoint: str, answer: _Answer) -> None:
        metrics.SOURCE_POSSIBLE_LOSS.labels(self.name, endpoint).inc()
        log.error(
            "answer not fully received from a consume-on-read endpoint: its messages may be lost",
            source=self.name, endpoint=endpoint, outcome=str(answer.outcome),
            detail=answer.detail, base_url=display_url(self.base_url),
        )

    def _normalize(
        self, body: Any, endpoint: str, fetched_at: int
    ) -> tuple[list[NewEvent], list[QuarantinedRecord]]:
        try:
            records, bad = parse_items(body)
        except BadRecord as exc:
            return [], [quarantine_record(self.name, endpoint, body, str(exc))]
        name = self.name
        events, quarantine = normalize_batch(
            name, endpoint, records,
            lambda record: normalize(record, source=name, endpoint=endpoint,
                                     fetched_at=fetched_at),
            max_record_bytes=self.config.max_record_bytes)
        quarantine += [quarantine_record(self.name, endpoint, raw, error) for raw, error in bad]
        return events, quarantine

    # -- relay check -------------------------------------------------------

    async def check(self) -> list[CheckResult]:
        """Signed call to ``/user/info.json`` on every base URL: consumes nothing."""
        results = []
        self._client = self._new_client()
        try:
            for index, url in enumerate(self.config.base_urls):
                self._url_index = index
                answer = await self._post("/user/info.json", {"userId": "im-relay-check"})
                target = f"{display_url(url)} (signed /user/info.json)"
                ok = answer.outcome == Outcome.OK
                if answer.outcome == Outcome.CONFIG:
                    detail = f"credentials rejected: {answer.detail}"
                elif answer.outcome == Outcome.CONNECT:
                    detail = f"unreachable: {answer.detail}"
                elif answer.outcome == Outcome.OK:
                    detail = "reachable, signature accepted"
                else:
                    detail = f"{answer.outcome}: {answer.detail}"
                results.append(CheckResult(f"source {self.name}", target, ok, detail))
        finally:
            await self._client.aclose()
            self._client = None
            self._url_index = 0
        return results


_TRANSPORT_OUTCOMES = {http.CONNECT: Outcome.CONNECT, http.TIMEOUT: Outcome.TIMEOUT,
                       http.TOO_LARGE: Outcome.TOO_LARGE, http.LOCAL: Outcome.LOCAL}
# Failures after the request reached the provider: a consume-on-read query may have taken
# its batch with it.
_MAY_HAVE_CONSUMED = frozenset({Outcome.TIMEOUT, Outcome.TRANSIENT, Outcome.MALFORMED,
                                Outcome.TOO_LARGE})


def _outcome_label(answer: _Answer) -> Outcome:
    if answer.salvaged:
        return Outcome.MALFORMED  # used, but an operator must see that the answer was broken
    return Outcome.EMPTY if _is_empty(answer) else answer.outcome


def _is_empty(answer: _Answer) -> bool:
    return (
        answer.outcome == Outcome.OK
        and isinstance(answer.body, dict)
        and answer.body.get("results") == []
    )

