"""One HTTP exchange with a provider, reduced to what the pollers decide on.

Transport failures are classified here (connection refused / DNS / connect
timeout never reached the provider; a read timeout or reset may have, after
the provider did its work); status codes and bodies are left to each source,
which knows its provider's error format. The provider's ``Date`` header is
compared with the local clock: signatures and data-age figures need both to
agree.
"""

from __future__ import annotations

import email.utils
import time
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from relay import metrics
from relay.config_base import ComponentConfig, Duration
from relay.logs import get_logger

log = get_logger("relay.source.http")

CONNECT = "connect_error"  # never reached the provider: safe to retry elsewhere at once
TIMEOUT = "timeout"  # sent, answer lost: the provider may have acted on it
RESPONSE = "response"  # an HTTP answer arrived (any status)


class HttpSourceConfig(ComponentConfig):
    """Settings every polling HTTP source shares."""

    idle_interval: Duration = 1.0
    connect_timeout: Duration = 5.0
    read_timeout: Duration = 30.0
    config_error_backoff: Duration = 30.0
    config_error_backoff_max: Duration = 600.0
    transient_backoff: Duration = 0.5
    transient_backoff_max: Duration = 30.0
    verify_tls: bool = True
    max_clock_skew: Duration = 30.0

    def client(self, source: str) -> ProviderClient:
        return ProviderClient(source, connect_timeout=self.connect_timeout,
                              read_timeout=self.read_timeout, verify_tls=self.verify_tls,
                              max_clock_skew=self.max_clock_skew)


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
                 verify_tls: bool, max_clock_skew: float = 30.0) -> None:
        self.source = source
        self.max_clock_skew = max_clock_skew
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
            verify=verify_tls,
            limits=httpx.Limits(max_connections=16, max_keepalive_connections=16),
            headers={"User-Agent": "im-relay"},
            trust_env=False,
        )
        self._last_skew_warning = 0.0

    async def request(self, method: str, url: str, **kwargs: Any) -> Answer:
        try:
            response = await self._client.request(method, url, **kwargs)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            return Answer(CONNECT, detail=f"{type(exc).__name__}: {exc}")
        except httpx.TimeoutException as exc:
            return Answer(TIMEOUT, detail=type(exc).__name__)
        except httpx.TransportError as exc:
            # Reset or protocol error after the request left.
            return Answer(TIMEOUT, detail=f"{type(exc).__name__}: {exc}")
        self._observe_clock(response)
        raw = response.content
        body: Any = None
        if raw:
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError:
                body = None
        return Answer(RESPONSE, status=response.status_code, body=body, raw=raw,
                      retry_after=retry_after(response))

    def _observe_clock(self, response: httpx.Response) -> None:
        date = response.headers.get("date")
        if not date:
            return
        try:
            server = email.utils.parsedate_to_datetime(date).timestamp()
        except (TypeError, ValueError):
            return
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
        await self._client.aclose()


def retry_after(response: httpx.Response) -> float | None:
    """``Retry-After`` in seconds (delta or HTTP date), if present and sane."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value).timestamp()
        except (TypeError, ValueError):
            return None
        return max(0.0, when - time.time())
