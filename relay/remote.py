"""Talking to parties the relay does not control: providers and destinations.

Shared by sources and sinks (neither imports the other), so that one rule
holds everywhere a remote party can hurt the relay:

- Every duration a remote party names (``Retry-After``, back-off hints) goes
  through :func:`clamp_remote_duration`: non-finite, negative or unparsable
  values are ignored, the rest is cut to a configured maximum. A header that
  says ``86400`` or ``inf`` must not park a loop for a day or for ever, and
  ``nan`` must not become a zero-second retry storm.
- Every request has a total deadline (connect, send and the whole body), not
  only per-read timeouts, and every answer a size cap, counted on the decoded
  bytes (a compressed bomb is caught too): :func:`fetch`.
- URLs can carry credentials (``https://user:pass@host/?token=...``):
  :func:`display_url` is how a URL appears in logs, errors, check output and
  status pages, and :func:`url_secrets` feeds the log redaction.
- A failure that is the relay's own (out of file descriptors, out of memory)
  is told apart from a provider's (:func:`local_failure`): failing over or
  blaming the provider would hide it.
"""

from __future__ import annotations

import email.utils
import errno
import math
import os
import socket
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aiohttp
import anyio

REDACTED = "***"

# errno values that mean the relay itself ran out of something.
_LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


def clamp_remote_duration(seconds: float | None, maximum: float) -> float | None:
    """A remote party's duration, made safe: None if unusable, else within [0, maximum]."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return None
    return min(seconds, maximum)


def parse_retry_after(value: str | None, maximum: float, *,
                      now: float | None = None) -> float | None:
    """``Retry-After`` (delta-seconds or an HTTP date) in seconds, clamped; None if unusable."""
    if value is None:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text).timestamp()
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        seconds = when - (time.time() if now is None else now)
        # A date in the past means "now".
        seconds = max(0.0, seconds)
    return clamp_remote_duration(seconds, maximum)


def retry_after(response: Reply, maximum: float) -> float | None:
    return parse_retry_after(response.headers.get("retry-after"), maximum)


# -- URLs --------------------------------------------------------------------


def display_url(url: str) -> str:
    """The URL without user-info and with every query value replaced: safe to show."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return REDACTED
    netloc = parts.netloc.rpartition("@")[2]
    query = parts.query
    if query:
        query = urlencode([(k, REDACTED) for k, _ in parse_qsl(query, keep_blank_values=True)],
                          safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def url_secrets(url: str) -> list[str]:
    """The parts of a URL that may be credentials: user-info and query values."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return [url]
    found: list[str] = []
    if parts.username:
        found.append(parts.username)
    if parts.password:
        found.append(parts.password)
    found += [v for _, v in parse_qsl(parts.query, keep_blank_values=False)]
    if parts.fragment:
        found.append(parts.fragment)
    return found


# -- one bounded exchange ------------------------------------------------------

# Why an exchange got no whole answer; what a caller may conclude differs.
NOT_SENT = "not_sent"  # never reached the peer (refused, DNS, connect timeout): safe to retry
MAYBE_SENT = "maybe_sent"  # sent, answer lost or late: the peer may have acted on it
LOCAL = "local"  # the relay's own resources (file descriptors, memory): not the peer's fault


class ExchangeFailed(Exception):
    """No whole answer: ``kind`` is NOT_SENT, MAYBE_SENT or LOCAL; ``detail`` is one line."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


class AnswerTooLarge(Exception):
    """The answer passed the size cap; it was not read further."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"answer larger than {limit} bytes (the configured cap)")
        self.limit = limit


@dataclass(frozen=True, slots=True)
class Reply:
    """A whole answer, read within the deadline and the size cap."""

    status_code: int
    headers: Mapping[str, str]  # case-insensitive
    content: bytes

    def text(self, limit: int = 300) -> str:
        return self.content[:limit].decode("utf-8", "replace")


def client_session(*, connect_timeout: float, read_timeout: float, verify_tls: bool,
                   connections: int, headers: Mapping[str, str] | None = None,
                   ) -> aiohttp.ClientSession:
    """An HTTP client for one remote party. Call on the event loop.

    aiohttp rather than httpx: about a sixth of the CPU per exchange (0.17 ms
    against 1.0 ms for a 28 kB answer on loopback), which at a hundred records
    per answer is a third of the relay's whole cost per event. No cookies (a
    provider's cookie must not change the next request), no proxies from the
    environment; redirects are refused per request (:func:`fetch`).
    """
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections, ssl=verify_tls),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout,
                                      sock_read=read_timeout),
        headers={"User-Agent": "im-relay", **(headers or {})},
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
    )


async def fetch(session: aiohttp.ClientSession, method: str, url: str, *, deadline: float,
                max_bytes: int, truncate: bool = False, **kwargs: Any) -> Reply:
    """One request, all of it (connect, send, every byte of the body) within ``deadline``.

    Raises :class:`ExchangeFailed` when no whole answer came (past the deadline
    too), :class:`AnswerTooLarge` past ``max_bytes`` (or, with ``truncate``,
    keeps only the first ``max_bytes``: for answers whose status is what
    matters). Redirects are not followed: the 3xx is the answer.
    """
    try:
        with anyio.fail_after(deadline):
            return await _exchange(session, method, url, max_bytes, truncate, kwargs)
    except aiohttp.ConnectionTimeoutError as exc:
        raise ExchangeFailed(NOT_SENT, "connect timeout") from exc
    except aiohttp.ClientConnectorError as exc:
        local = local_failure(exc)
        if local is not None:
            raise ExchangeFailed(LOCAL, local) from exc
        raise ExchangeFailed(NOT_SENT, f"cannot connect to {exc.host}:{exc.port}:"
                             f" {_connect_reason(exc.os_error)}") from exc
    except aiohttp.ServerTimeoutError as exc:
        raise ExchangeFailed(MAYBE_SENT, "read timeout") from exc
    except TimeoutError as exc:
        raise ExchangeFailed(MAYBE_SENT, f"no whole answer within {deadline:g}s") from exc
    except (aiohttp.ClientError, OSError) as exc:
        # Reset, or a protocol error after the request left.
        local = local_failure(exc)
        raise ExchangeFailed(LOCAL if local else MAYBE_SENT, local or _client_error(exc)
                             ) from exc


def _client_error(exc: BaseException) -> str:
    """One line, and never the URL: aiohttp's texts quote it whole (query tokens too)."""
    if isinstance(exc, aiohttp.ClientResponseError):
        first = str(exc.message).strip().splitlines()
        return f"{type(exc).__name__}: {first[0].rstrip(' :') if first else exc.status}"
    if isinstance(exc, aiohttp.InvalidURL | aiohttp.NonHttpUrlClientError):
        return "invalid URL"
    return describe(exc).splitlines()[0]


def _connect_reason(error: OSError) -> str:
    """Why a connection failed, in the words that name it best."""
    if isinstance(error, ssl.SSLError):
        # "certificate verify failed: self-signed certificate", not errno 1's "not permitted".
        return f"TLS: {getattr(error, 'verify_message', None) or error.reason or error}"
    if isinstance(error, socket.gaierror):
        return f"name not resolved ({error.strerror or error})"
    if error.errno and error.errno > 0:
        return os.strerror(error.errno)  # "Connection refused", not asyncio's "Connect call failed"
    return str(error) or type(error).__name__


async def _exchange(session: aiohttp.ClientSession, method: str, url: str, max_bytes: int,
                    truncate: bool, kwargs: dict[str, Any]) -> Reply:
    async with session.request(method, url, allow_redirects=False, **kwargs) as response:
        declared = response.content_length
        if not truncate and declared is not None and declared > max_bytes \
                and "content-encoding" not in response.headers:
            raise AnswerTooLarge(max_bytes)
        # Counted on the decoded bytes: a compressed bomb is caught too.
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_any():
            size += len(chunk)
            if size > max_bytes:
                if not truncate:
                    raise AnswerTooLarge(max_bytes)
                chunks.append(chunk[:len(chunk) - (size - max_bytes)])
                break
            chunks.append(chunk)
        content = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        return Reply(response.status, response.headers, content)


def local_failure(exc: BaseException) -> str | None:
    """A description if ``exc`` is the relay's own resource problem (e.g. no file descriptors)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _LOCAL_ERRNOS:
            return f"the relay is out of a local resource: {current.strerror}" + (
                " (raise the open-files limit, e.g. LimitNOFILE)"
                if current.errno in (errno.EMFILE, errno.ENFILE) else "")
        if isinstance(current, MemoryError):
            return "the relay is out of memory"
        current = current.__cause__ or current.__context__
    return None


def describe(exc: BaseException) -> str:
    """An exception as one line, with the relay's own resource problems named as such."""
    local = local_failure(exc)
    if local is not None:
        return local
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
