"""Webhook sink: POST ``{"events": [...]}`` batches, signed the Standard Webhooks way.

- Signing: ``webhook-id`` (derived from the batch's event ids: stable across
  retries and restarts), ``webhook-timestamp`` and ``webhook-signature:
  v1,<base64 HMAC-SHA256(key, id.timestamp.body)>`` fresh on every attempt,
  where key = the base64-decoded part of the ``whsec_`` secret.
- Answers: 2xx delivered; 408/425/429/5xx, timeouts and connection errors
  are retried (by the runner, the one retry layer: exponential backoff with
  jitter, honouring a clamped ``Retry-After``); 401/403/404/410 and 3xx
  (redirects are not followed) mean the endpoint is wrong, not the events:
  the sink pauses and alerts; 400/413/422 mean this batch was refused: it is
  split, and what is still refused alone goes to the dead letters; other 4xx
  likewise.
- Every request has a total deadline (``request_deadline``: connect, send and
  the whole answer), so a receiver that drips bytes cannot hold a lane.
- Concurrency: events are spread over ``concurrency`` lanes by conversation,
  each lane posting its batches in order and stopping at its first failure,
  so a conversation's events arrive in journal order while lanes run side by
  side; what a lane did not deliver goes back to the runner to retry.
- A circuit breaker: after ``breaker_failures`` attempts in a row that got no
  answer at all (refused, timed out) the endpoint is left alone for
  ``breaker_open`` before one probe; a dead endpoint costs one request per
  interval, not a storm. Opening and recovering are logged.
- The URL may carry a credential (``?token=...``): it appears only through
  :func:`relay.remote.display_url` in logs, errors and status.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
import zlib
from collections.abc import Sequence
from enum import StrEnum
from typing import Literal

import aiohttp
import anyio
from pydantic import Field, SecretStr, field_validator

from relay import metrics
from relay.checks import CheckResult
from relay.config_base import Duration, HttpUrl
from relay.journal import StoredEvent
from relay.logs import get_logger
from relay.remote import LOCAL, ExchangeFailed, client_session, display_url, fetch, retry_after
from relay.sinks.base import (
    Advance,
    DeliveryResult,
    RetryableError,
    SinkConfig,
    SinkPausedError,
    SinkPosition,
)

log = get_logger("relay.sink.webhook")

RETRY_STATUSES = frozenset({408, 425, 429})
PAUSE_STATUSES = frozenset({401, 403, 404, 410})
SPLIT_STATUSES = frozenset({400, 413, 422})
_ANSWER_BYTES = 64 * 1024  # of a receiver's answer only the status and an error excerpt matter


class WebhookSinkConfig(SinkConfig):
    type: Literal["webhook"]
    url: HttpUrl
    secret: SecretStr
    batch_size: int = Field(default=100, ge=1, le=10_000)
    concurrency: int = Field(default=4, ge=1, le=64)
    timeout: Duration = 10.0
    connect_timeout: Duration = 5.0
    request_deadline: Duration = Field(default=30.0, gt=0)
    breaker_failures: int = Field(default=5, ge=1)
    breaker_open: Duration = 30.0
    verify_tls: bool = True
    headers: dict[str, str] = Field(default_factory=dict)

    @field_validator("secret")
    @classmethod
    def _secret(cls, secret: SecretStr) -> SecretStr:
        signing_key(secret.get_secret_value())
        return secret


def signing_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_<base64>`` secret."""
    if not secret.startswith("whsec_"):
        raise ValueError("expected a Standard Webhooks secret: whsec_<base64>")
    try:
        key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except ValueError:
        raise ValueError("the part after whsec_ is not base64") from None
    if len(key) < 16:
        raise ValueError("the secret is shorter than 16 bytes")
    return key


def webhook_id(events: Sequence[StoredEvent]) -> str:
    """Stable for the same events in the same order: retries and restarts reuse it."""
    digest = hashlib.sha256("\n".join(e.id for e in events).encode()).hexdigest()
    return f"msg_{digest[:32]}"


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def body_of(events: Sequence[StoredEvent]) -> bytes:
    # The payloads are already event JSON: splice them instead of re-serializing.
    return b'{"events":[' + b",".join(e.payload for e in events) + b"]}"


class _Breaker:
    """Consecutive-failure circuit breaker shared by the lanes of one sink.

    Closed: requests go. After ``failures`` attempts in a row with no answer it
    opens: attempts are refused (the runner waits out ``open_for``). Then one
    probe goes; its success closes the breaker, its failure opens it again.
    """

    def __init__(self, sink: str, failures: int, open_for: float) -> None:
        self.sink = sink
        self.failures = failures
        self.open_for = open_for
        self._count = 0
        self._opened_at: float | None = None

    def success(self) -> None:
        if self._opened_at is not None:
            log.info("webhook circuit breaker closed: the endpoint answers again", sink=self.sink)
        self._count = 0
        self._opened_at = None

    def failure(self) -> None:
        self._count += 1
        if self._count >= self.failures:
            if self._opened_at is None:
                log.error("webhook circuit breaker open: the endpoint does not answer; one probe"
                          " per interval", sink=self.sink, failures=self._count,
                          open_seconds=self.open_for)
            self._opened_at = time.monotonic()

    def remaining(self) -> float:
        """Seconds the breaker stays open (0 when requests may go, or one probe may)."""
        if self._opened_at is None:
            return 0.0
        return max(0.0, self._opened_at + self.open_for - time.monotonic())

    @property
    def probing(self) -> bool:
        return self._opened_at is not None and self.remaining() == 0.0


def _first(group: BaseExceptionGroup[SinkPausedError]) -> SinkPausedError:
    inner = group.exceptions[0]
    return _first(inner) if isinstance(inner, BaseExceptionGroup) else inner


class _Outcome(StrEnum):
    DELIVERED = "delivered"
    RETRY = "retry"
    PAUSE = "pause"
    REFUSED = "refused"


class WebhookSink:
    #: A receiver keeps no position the relay could read back: at-least-once, and
    #: receivers dedup on ``webhook-id`` / the event ids.
    commits_position = False

    def __init__(self, name: str, config: WebhookSinkConfig) -> None:
        self.name = name
        self.config = config
        self._key = signing_key(config.secret.get_secret_value())
        self._client: aiohttp.ClientSession | None = None
        self._breaker = _Breaker(name, config.breaker_failures, config.breaker_open)
        self._shown_url = display_url(config.url)

    async def start(self) -> None:
        if self._client is None:
            c = self.config
            self._client = client_session(
                connect_timeout=c.connect_timeout, read_timeout=c.timeout,
                verify_tls=c.verify_tls, connections=c.concurrency, headers=c.headers)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def position(self) -> SinkPosition | None:
        return None

    async def deliver(self, events: Sequence[StoredEvent],
                      advance: Advance | None = None) -> DeliveryResult:
        await self.start()
        wait = self._breaker.remaining()
        if wait > 0:
            raise RetryableError(f"circuit breaker open: {self._shown_url} did not answer",
                                 retry_after=wait, state="breaker_open")
        lanes: list[list[StoredEvent]] = [[] for _ in range(self.config.concurrency)]
        for event in events:
            # By conversation: one lane per conversation keeps its order.
            if len(lanes) > 1:
                r = event.routing()
                lane = zlib.crc32(f"{r.source}:{r.conversation}".encode()) % len(lanes)
            else:
                lane = 0
            lanes[lane].append(event)
        busy = [lane for lane in lanes if lane]
        result = DeliveryResult()
        if self._breaker.probing:
            # One probe while the breaker is half open; the rest waits for its answer.
            probe, rest = busy[0][:self.config.batch_size], busy[0][self.config.batch_size:]
            result.retry += rest + [e for lane in busy[1:] for e in lane]
            busy = [probe]
        try:
            async with anyio.create_task_group() as tg:
                for lane_events in busy:
                    tg.start_soon(self._deliver_lane, lane_events, result)
        except BaseExceptionGroup as group:
            # Lanes fail together (a paused endpoint answers every lane alike): one is enough.
            paused = group.subgroup(SinkPausedError)
            if paused is not None:
                raise _first(paused) from None
            raise
        return result

    async def _deliver_lane(self, events: list[StoredEvent], result: DeliveryResult) -> None:
        size = self.config.batch_size
        for start in range(0, len(events), size):
            if not await self._deliver_batch(events[start:start + size], result):
                # Stop at the first failure: later events of the lane must not overtake it.
                result.retry += events[start + size:]
                return

    async def _deliver_batch(self, batch: list[StoredEvent], result: DeliveryResult) -> bool:
        """Deliver (or dead-letter) one batch, splitting it if the receiver refuses it.

        False when the batch was not delivered and must be retried (it is in
        ``result.retry``); the lane stops there.
        """
        outcome, detail, wait = await self._post(batch)
        if outcome == _Outcome.DELIVERED:
            return True
        if outcome == _Outcome.RETRY:
            result.retry += batch
            result.error = detail
            if wait is not None:
                result.retry_after = max(wait, result.retry_after or 0.0)
            return False
        if outcome == _Outcome.PAUSE:
            raise SinkPausedError(f"{self._shown_url} answers {detail}: check the URL and the"
                                  " receiver's authentication")
        # Refused as a batch: halves until the refused events stand alone.
        if len(batch) > 1:
            middle = len(batch) // 2
            if not await self._deliver_batch(batch[:middle], result):
                result.retry += batch[middle:]
                return False
            return await self._deliver_batch(batch[middle:], result)
        result.rejected.append((batch[0], detail))
        return True

    async def _post(self, batch: list[StoredEvent]) -> tuple[_Outcome, str, float | None]:
        """One signed POST, classified: (outcome, detail, the receiver's clamped Retry-After)."""
        assert self._client is not None
        msg_id = webhook_id(batch)
        body = body_of(batch)
        stamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "webhook-id": msg_id,
            "webhook-timestamp": str(stamp),
            "webhook-signature": sign(self._key, msg_id, stamp, body),
        }
        try:
            response = await fetch(self._client, "POST", self.config.url, data=body,
                                   headers=headers, deadline=self.config.request_deadline,
                                   max_bytes=_ANSWER_BYTES, truncate=True)
        except ExchangeFailed as exc:
            if exc.kind != LOCAL:
                # Only an endpoint that does not answer at all (refused, timed out) trips
                # the breaker; one that answers 5xx is alive and gets plain backoff.
                self._breaker.failure()
            return _Outcome.RETRY, exc.detail, None
        status = response.status_code
        detail = f"HTTP {status}"
        self._breaker.success()
        if 200 <= status < 300:
            return _Outcome.DELIVERED, detail, None
        if status in RETRY_STATUSES or status >= 500:
            return _Outcome.RETRY, detail, retry_after(response, self.config.max_retry_after)
        if status in PAUSE_STATUSES or 300 <= status < 400:
            if 300 <= status < 400:
                detail += " (a redirect; redirects are not followed)"
            return _Outcome.PAUSE, detail, None
        # The receiver answered sensibly: the endpoint is fine, the batch is not.
        metrics.SINK_ATTEMPTS.labels(self.name, "refused").inc()
        return _Outcome.REFUSED, f"{detail}: {response.text()}", None

    async def check(self) -> list[CheckResult]:
        """An empty, signed batch: a receiver that verifies signatures can tell."""
        await self.start()
        assert self._client is not None
        stamp = int(time.time())
        body = b'{"events":[]}'
        msg_id = "msg_relay_check"
        try:
            response = await fetch(self._client, "POST", self.config.url, data=body, headers={
                "content-type": "application/json", "webhook-id": msg_id,
                "webhook-timestamp": str(stamp),
                "webhook-signature": sign(self._key, msg_id, stamp, body)},
                deadline=self.config.request_deadline, max_bytes=_ANSWER_BYTES, truncate=True)
        except ExchangeFailed as exc:
            return [CheckResult(f"sink {self.name}", self._shown_url, False,
                                f"unreachable: {exc.detail}")]
        finally:
            await self.close()
        ok = 200 <= response.status_code < 300
        return [CheckResult(f"sink {self.name}", self._shown_url, ok,
                            f"HTTP {response.status_code}")]
