"""One HTTP exchange with a provider, reduced to what the pollers decide on.

Transport failures are classified here (connection refused / DNS / connect
timeout never reached the provider; a read timeout, a reset or the total
deadline may have, after the provider did its work; an answer past the size
cap was produced by the provider, so it too may have taken its batch; the
relay's own resource problems, such as running out of file descriptors, are
neither); status codes and bodies are left to each source, which knows its
provider's error format. Every request has a total deadline and every answer a
size cap (:func:`relay.remote.fetch`); ``Retry-After`` is clamped
(:func:`relay.remote.retry_after`). The provider's ``Date`` header is
compared with the local clock: signatures and data-age figures need both to
agree.
"""

from __future__ import annotations

import email.utils
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import aiohttp
import orjson
from pydantic import Field

from relay import metrics
from relay.config_base import ByteSize, ComponentConfig, Duration
from relay.logs import get_logger
from relay.remote import LOCAL as REMOTE_LOCAL
from relay.remote import (
    MAYBE_SENT,
    NOT_SENT,
    AnswerTooLarge,
    ExchangeFailed,
    Reply,
    client_session,
    fetch,
    retry_after,
)

log = get_logger("relay.source.http")

CONNECT = "connect_error"  # never reached the provider: safe to retry elsewhere at once
TIMEOUT = "timeout"  # sent, answer lost: the provider may have acted on it
TOO_LARGE = "too_large"  # the provider answered more than the cap: it may have acted on it
LOCAL = "local_error"  # the relay's own problem (no file descriptors): not the provider's
RESPONSE = "response"  # an HTTP answer arrived (any status)

_FAILURES = {NOT_SENT: CONNECT, MAYBE_SENT: TIMEOUT, REMOTE_LOCAL: LOCAL}


class HttpSourceConfig(ComponentConfig):
    """Settings every polling HTTP source shares."""

    idle_interval: Duration = 1.0
    connect_timeout: Duration = 5.0
    read_timeout: Duration = 30.0
    # Connect, send and the whole body: a peer that drips a byte at a time cannot hold a
    # request (and the endpoint's loop) for ever.
    request_deadline: Duration = Field(default=60.0, gt=0)
    max_answer_bytes: ByteSize = Field(default=64 * 1024 * 1024, gt=0)
    # One record's event past this is quarantined, not delivered (Kafka's default limit is 1 MB).
    max_record_bytes: ByteSize = Field(default=4 * 1024 * 1024, gt=0)
    # A provider's Retry-After is obeyed up to this; RongCloud keeps data only 3 hours.
    max_retry_after: Duration = 60.0
    config_error_backoff: Duration = 30.0
    config_error_backoff_max: Duration = 600.0
    transient_backoff: Duration = 0.5
    transient_backoff_max: Duration = 30.0
    verify_tls: bool = True
    max_clock_skew: Duration = 30.0

    def client(self, source: str) -> ProviderClient:
        return ProviderClient(source, connect_timeout=self.connect_timeout,
                              read_timeout=self.read_timeout, verify_tls=self.verify_tls,
                              max_clock_skew=self.max_clock_skew,
                              deadline=self.request_deadline, max_bytes=self.max_answer_bytes,
                              max_retry_after=self.max_retry_after)


@dataclass
class Answer:
    kind: str
    status: int = 0
    body: Any = None  # parsed JSON, or None when the body is empty or not JSON
    raw: bytes = b""
    detail: str = ""
    retry_after: float | None = None

    @property
    def json_ok(self) -> bool:
        return self.kind == RESPONSE and (self.body is not None or not self.raw)


class ProviderClient:
    def __init__(self, source: str, *, connect_timeout: float, read_timeout: float,
                 verify_tls: bool, max_clock_skew: float = 30.0, deadline: float = 60.0,
                 max_bytes: int = 64 * 1024 * 1024, max_retry_after: float = 60.0) -> None:
        self.source = source
        self.max_clock_skew = max_clock_skew
        self.deadline = deadline
        self.max_bytes = max_bytes
        self.max_retry_after = max_retry_after
        self._new_session = partial(client_session, connect_timeout=connect_timeout,
                                    read_timeout=read_timeout, verify_tls=verify_tls,
                                    connections=16)
        # Made on first use: an HTTP session belongs to the running event loop.
        self._session: aiohttp.ClientSession | None = None
        self._last_skew_warning = 0.0
        self._last_date: tuple[str, float] = ("", 0.0)  # the last Date header, parsed
        # With relay_journal_commit_seconds, the two waits of a consume-on-read round.
        self._request_seconds = metrics.SOURCE_REQUEST_SECONDS.labels(source)

    async def request(self, method: str, url: str, *, deadline: float | None = None,
                      **kwargs: Any) -> Answer:
        """One exchange within ``deadline`` (default: the configured request deadline)."""
        limit = self.deadline if deadline is None else deadline
        if self._session is None:
            self._session = self._new_session()
        started = time.perf_counter()
        try:
            response = await fetch(self._session, method, url, deadline=limit,
                                   max_bytes=self.max_bytes, **kwargs)
        except ExchangeFailed as exc:
            return Answer(_FAILURES[exc.kind], detail=exc.detail)
        except AnswerTooLarge as exc:
            return Answer(TOO_LARGE, detail=str(exc))
        finally:
            self._request_seconds.observe(time.perf_counter() - started)
        self._observe_clock(response)
        raw = response.content
        body: Any = None
        if raw:
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError:
                body = None
        return Answer(RESPONSE, status=response.status_code, body=body, raw=raw,
                      retry_after=retry_after(response, self.max_retry_after))

    def _observe_clock(self, response: Reply) -> None:
        date = response.headers.get("date")
        if not date:
            return
        if date == self._last_date[0]:
            # One-second resolution: a busy loop sees the same header a hundred times.
            server = self._last_date[1]
        else:
            try:
                server = email.utils.parsedate_to_datetime(date).timestamp()
            except (TypeError, ValueError, IndexError, OverflowError):
                return
            self._last_date = (date, server)
        skew = server - time.time()
        metrics.SOURCE_CLOCK_SKEW.labels(self.source).set(skew)
        # The Date header has one-second resolution: allow for it.
        if abs(skew) > self.max_clock_skew + 1:
            now = time.monotonic()
            if now - self._last_skew_warning > 300:
                self._last_skew_warning = now
                log.warning("provider clock differs from ours: signatures and data-age figures"
                            " need a synchronized clock",
                            source=self.source, skew_seconds=round(skew))

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
