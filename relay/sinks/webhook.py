"""Webhook sink (httpx): POST ``{"events": [...]}`` batches, signed the Standard Webhooks way.

- Signing: ``webhook-id`` (derived from the batch's event ids: stable across
  retries and restarts), ``webhook-timestamp`` and ``webhook-signature:
  v1,<base64 HMAC-SHA256(key, id.timestamp.body)>`` fresh on every attempt,
  where key = the base64-decoded part of the ``whsec_`` secret.
- Answers: 2xx delivered; 408/429/5xx, timeouts and connection errors are
  retried with exponential backoff and jitter, honouring ``Retry-After``;
  401/403/404/410 mean the endpoint is wrong, not the events: the sink pauses
  and alerts; 400/413/422 mean this batch was refused: it is split, and what
  is still refused alone goes to the dead letters; other 4xx likewise.
- Concurrency: events are spread over ``concurrency`` lanes by conversation,
  each lane posting its batches in order, so a conversation's events arrive
  in journal order while lanes run side by side.
- A circuit breaker: after ``breaker_failures`` attempts in a row that got no
  answer at all (refused, timed out) the endpoint is left alone for
  ``breaker_open`` before one probe; a dead endpoint costs one request per
  interval, not a storm.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
import zlib
from collections.abc import Sequence
from typing import Literal

import anyio
import httpx
from pydantic import Field, SecretStr, field_validator

from relay import metrics
from relay.backoff import Backoff
from relay.config_base import Duration, HttpUrl
from relay.journal import StoredEvent
from relay.logs import get_logger
from relay.sinks.base import DeliveryResult, SinkConfig, SinkPausedError
from relay.sources.base import CheckResult
from relay.sources.http import retry_after

log = get_logger("relay.sink.webhook")

RETRY_STATUSES = frozenset({408, 425, 429})
PAUSE_STATUSES = frozenset({401, 403, 404, 410})
SPLIT_STATUSES = frozenset({400, 413, 422})


class WebhookSinkConfig(SinkConfig):
    type: Literal["webhook"]
    url: HttpUrl
    secret: SecretStr
    batch_size: int = Field(default=100, ge=1, le=10_000)
    concurrency: int = Field(default=4, ge=1, le=64)
    timeout: Duration = 10.0
    connect_timeout: Duration = 5.0
    retry_backoff: Duration = 0.5
    retry_backoff_max: Duration = 60.0
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
    """Consecutive-failure circuit breaker shared by the lanes of one sink."""

    def __init__(self, failures: int, open_for: float) -> None:
        self.failures = failures
        self.open_for = open_for
        self._count = 0
        self._opened_at: float | None = None

    def success(self) -> None:
        self._count = 0
        self._opened_at = None

    def failure(self) -> None:
        self._count += 1
        if self._count >= self.failures and self._opened_at is None:
            self._opened_at = time.monotonic()

    async def wait(self) -> None:
        """Hold a request while the breaker is open; when it expires, one caller probes."""
        while self._opened_at is not None:
            remaining = self._opened_at + self.open_for - time.monotonic()
            if remaining <= 0:
                # Re-armed: this caller is the probe, the others wait another period
                # unless the probe succeeds (checked every half second).
                self._opened_at = time.monotonic()
                return
            await anyio.sleep(min(remaining, 0.5))


def _first(group: BaseExceptionGroup[SinkPausedError]) -> SinkPausedError:
    inner = group.exceptions[0]
    return _first(inner) if isinstance(inner, BaseExceptionGroup) else inner


class _Outcome:
    DELIVERED = "delivered"
    RETRY = "retry"
    PAUSE = "pause"
    REFUSED = "refused"


class WebhookSink:
    def __init__(self, name: str, config: WebhookSinkConfig) -> None:
        self.name = name
        self.config = config
        self._key = signing_key(config.secret.get_secret_value())
        self._client: httpx.AsyncClient | None = None
        self._breaker = _Breaker(config.breaker_failures, config.breaker_open)

    async def start(self) -> None:
        if self._client is None:
            c = self.config
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(c.timeout, connect=c.connect_timeout),
                verify=c.verify_tls,
                limits=httpx.Limits(max_connections=c.concurrency,
                                    max_keepalive_connections=c.concurrency),
                headers={"User-Agent": "im-relay", **c.headers},
                trust_env=False,
            )

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def deliver(self, events: Sequence[StoredEvent]) -> DeliveryResult:
        await self.start()
        lanes: list[list[StoredEvent]] = [[] for _ in range(self.config.concurrency)]
        for event in events:
            # By conversation: one lane per conversation keeps its order.
            if len(lanes) > 1:
                r = event.routing()
                lane = zlib.crc32(f"{r.source}:{r.conversation}".encode()) % len(lanes)
            else:
                lane = 0
            lanes[lane].append(event)
        result = DeliveryResult()
        try:
            async with anyio.create_task_group() as tg:
                for lane_events in lanes:
                    if lane_events:
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
            await self._deliver_batch(events[start:start + size], result)

    async def _deliver_batch(self, batch: list[StoredEvent], result: DeliveryResult) -> None:
        """Deliver (or dead-letter) one batch, splitting it if the receiver refuses it."""
        outcome, detail = await self._post_until_settled(batch)
        if outcome == _Outcome.DELIVERED:
            return
        # Refused as a batch: halves until the refused events stand alone.
        if len(batch) > 1:
            middle = len(batch) // 2
            await self._deliver_batch(batch[:middle], result)
            await self._deliver_batch(batch[middle:], result)
            return
        result.rejected.append((batch[0], detail))

    async def _post_until_settled(self, batch: list[StoredEvent]) -> tuple[str, str]:
        """POST with retries until delivered or refused; raises SinkPausedError."""
        assert self._client is not None
        msg_id = webhook_id(batch)
        body = body_of(batch)
        backoff = Backoff(self.config.retry_backoff, self.config.retry_backoff_max)
        attempts = 0
        while True:
            await self._breaker.wait()
            attempts += 1
            stamp = int(time.time())
            headers = {
                "content-type": "application/json",
                "webhook-id": msg_id,
                "webhook-timestamp": str(stamp),
                "webhook-signature": sign(self._key, msg_id, stamp, body),
            }
            wait: float | None = None
            try:
                response = await self._client.post(self.config.url, content=body,
                                                   headers=headers)
            except httpx.TransportError as exc:
                detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                outcome = _Outcome.RETRY
            else:
                status = response.status_code
                detail = f"HTTP {status}"
                if 200 <= status < 300:
                    outcome = _Outcome.DELIVERED
                elif status in RETRY_STATUSES or status >= 500:
                    outcome = _Outcome.RETRY
                    wait = retry_after(response)
                elif status in PAUSE_STATUSES:
                    outcome = _Outcome.PAUSE
                else:
                    outcome = _Outcome.REFUSED
                    detail += f": {response.text[:300]}"
            if outcome == _Outcome.DELIVERED:
                self._breaker.success()
                return outcome, detail
            if outcome == _Outcome.REFUSED:
                # The receiver answered sensibly: the endpoint is fine, the batch is not.
                self._breaker.success()
                metrics.SINK_ATTEMPTS.labels(self.name, "refused").inc()
                return outcome, f"{detail} (after {attempts} attempt(s))"
            if outcome == _Outcome.PAUSE:
                raise SinkPausedError(f"{self.config.url} answers {detail}: check the URL and"
                                      " the receiver's authentication")
            if not detail.startswith("HTTP "):
                # Only an endpoint that does not answer at all (refused, timed out) trips
                # the breaker; one that answers 5xx is alive and gets plain backoff.
                self._breaker.failure()
            metrics.SINK_ATTEMPTS.labels(self.name, "retry").inc()
            metrics.SINK_UP.labels(self.name).set(0)
            delay = wait if wait is not None else backoff.next()
            log.warning("webhook delivery failed; retrying", sink=self.name, webhook_id=msg_id,
                        events=len(batch), attempt=attempts, error=detail,
                        retry_in_seconds=round(delay, 2))
            await anyio.sleep(delay)

    async def check(self) -> list[CheckResult]:
        """An empty, signed batch: a receiver that verifies signatures can tell."""
        await self.start()
        assert self._client is not None
        stamp = int(time.time())
        body = b'{"events":[]}'
        msg_id = "msg_relay_check"
        try:
            response = await self._client.post(self.config.url, content=body, headers={
                "content-type": "application/json", "webhook-id": msg_id,
                "webhook-timestamp": str(stamp),
                "webhook-signature": sign(self._key, msg_id, stamp, body)})
        except httpx.TransportError as exc:
            return [CheckResult(f"sink {self.name}", self.config.url, False,
                                f"unreachable: {type(exc).__name__}")]
        finally:
            await self.close()
        ok = response.status_code < 300
        return [CheckResult(f"sink {self.name}", self.config.url, ok,
                            f"HTTP {response.status_code}")]
