"""LeanCloud REST calls beside the history tail: conversation lists, per-conversation history.

Used by ``relay evacuate`` (metadata export and the completeness check). Every
call goes through the source's request budget (the quota is shared with the
application's own calls and with the tail) and honours the source's 429
back-off, so the evacuation as a whole stays under one budget.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio

from relay.logs import get_logger
from relay.remote import clamp_remote_duration
from relay.sources import http
from relay.sources.budget import RequestBudget
from relay.sources.http import Answer, ProviderClient

log = get_logger("relay.source.leancloud")

CONVERSATIONS = "/1.2/rtm/conversations"
CHATROOMS = "/1.2/rtm/chatrooms"
LIST_LIMIT = 1000  # the storage API's largest page (its default is 100)
HISTORY_LIMIT = 1000


def clamp_remote_delay(value: float | None, default: float, maximum: float) -> float:
    """A wait named by the remote side (Retry-After), within reason: the shared clamp,
    with ``default`` where the value is missing or unusable."""
    clamped = clamp_remote_duration(value, maximum)
    return min(default, maximum) if clamped is None else clamped


class Throttle:
    """The app's quota was exceeded: every caller of the app waits until the penalty ends."""

    def __init__(self) -> None:
        self.until = 0.0  # time.monotonic()

    def penalize(self, seconds: float) -> None:
        self.until = max(self.until, time.monotonic() + seconds)

    async def wait(self, stopping: anyio.Event | None = None) -> None:
        delay = self.until - time.monotonic()
        if delay > 0:
            with anyio.move_on_after(delay):
                if stopping is not None:
                    await stopping.wait()
                else:
                    await anyio.sleep(delay)


class ApiError(Exception):
    """A call that cannot succeed as configured (rejected credentials, bad request)."""


class LeanCloudApi:
    """Budgeted, throttled GETs on one LeanCloud app."""

    def __init__(self, base_url: str, headers: Callable[[], dict[str, str]],
                 client: ProviderClient, budget: RequestBudget, throttle: Throttle, *,
                 throttle_backoff: float, retry_after_max: float,
                 on_request: Callable[[str, str], None] | None = None,
                 attempts: int = 8) -> None:
        self.base_url = base_url
        self._headers = headers
        self._client = client
        self._budget = budget
        self._throttle = throttle
        self._throttle_backoff = throttle_backoff
        self._retry_after_max = retry_after_max
        self._on_request = on_request
        self._attempts = attempts

    async def get(self, path: str, params: dict[str, str], purpose: str) -> Any:
        """The parsed JSON answer; retries throttling and transient failures, then gives up."""
        delay = 0.5
        for attempt in range(1, self._attempts + 1):
            await self._throttle.wait()
            async with self._budget.slot():
                answer = await self._client.request("GET", f"{self.base_url}{path}",
                                                    params=params, headers=self._headers())
            outcome = _outcome(answer)
            if self._on_request is not None:
                self._on_request(purpose, outcome)
            if outcome == "ok":
                return answer.body
            if outcome == "throttled":
                wait = clamp_remote_delay(answer.retry_after, self._throttle_backoff,
                                          self._retry_after_max)
                self._throttle.penalize(wait)
                log.warning("LeanCloud quota exceeded (shared with the application's own"
                            " calls): backing off", purpose=purpose, wait_seconds=round(wait, 1))
                continue  # a 429 is not a failed attempt: the app's quota will come back
            if outcome == "config_error":
                raise ApiError(f"{path}: HTTP {answer.status} {_error_text(answer.body)}")
            log.warning("LeanCloud request failed; retrying", purpose=purpose, detail=outcome,
                        attempt=attempt)
            await anyio.sleep(delay)
            delay = min(delay * 2, 30.0)
        raise ApiError(f"{path}: still failing after {self._attempts} attempts")

    async def list_rows(self, path: str, *, limit: int = LIST_LIMIT) -> AsyncIterator[
            list[dict[str, Any]]]:
        """``_Conversation`` rows of 查询对话 / 查询聊天室, a page at a time (skip/limit)."""
        skip = 0
        while True:
            body = await self.get(path, {"skip": str(skip), "limit": str(limit)},
                                  "conversations" if path == CONVERSATIONS else "chatrooms")
            rows = body.get("results") if isinstance(body, dict) else None
            if not isinstance(rows, list):
                raise ApiError(f"{path}: answer without a results list")
            page = [r for r in rows if isinstance(r, dict)]
            if page:
                yield page
            if len(rows) < limit:
                return
            skip += len(rows)

    async def conversation_history(self, conv_id: str, *, room: bool, before_ms: int,
                                   limit: int = HISTORY_LIMIT) -> AsyncIterator[list[Any]]:
        """One conversation's messages older than ``before_ms``, oldest first, page by page."""
        path = f"{CHATROOMS if room else CONVERSATIONS}/{conv_id}/messages"
        params = {"reversed": "true", "till_timestamp": str(before_ms), "limit": str(limit)}
        after: tuple[int, str] | None = None
        while True:
            body = await self.get(path, params, "verify")
            if not isinstance(body, list):
                raise ApiError(f"{path}: answer is not a JSON array")
            if body:
                yield body
            if len(body) < limit:
                return
            last = body[-1]
            if not isinstance(last, dict) or not isinstance(last.get("timestamp"), int) \
                    or not isinstance(last.get("msg-id"), str):
                raise ApiError(f"{path}: page without a usable (timestamp, msg-id) at its end")
            position = (last["timestamp"], last["msg-id"])
            if after is not None and position <= after:
                raise ApiError(f"{path}: the history went backwards; cannot page on")
            after = position
            params = {**params, "timestamp": str(position[0]), "msgid": position[1]}


def sampled(conv_id: str, ratio: float) -> bool:
    """Whether a conversation is in a ``ratio`` sample: fixed per id, so a restart agrees."""
    if ratio >= 1:
        return True
    digest = hashlib.sha256(conv_id.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") < ratio * 2**64


def _outcome(answer: Answer) -> str:
    if answer.kind != http.RESPONSE:
        return answer.kind
    if answer.status == 429:
        return "throttled"
    if 400 <= answer.status < 500:
        return "config_error"
    if answer.status >= 300:
        return "transient_error"
    if answer.body is None:
        return "malformed"
    return "ok"


def _error_text(body: Any) -> str:
    if isinstance(body, dict) and "error" in body:
        return f"code {body.get('code')}: {body.get('error')}"
    return ""
