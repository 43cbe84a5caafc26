"""A strict request budget: at most ``limit`` requests in any sliding window.

RongCloud answers an over-budget request with an empty 200, indistinguishable
from "no messages", so a best-effort limiter is not enough. A token bucket
(aiolimiter, pyrate-limiter's leaky buckets) allows ``limit + 1`` requests in
some window after a burst, and any limiter keyed on *send* times can be
defeated by network jitter between send and arrival. This one keys on
*completion* times: request *k* is sent only when fewer than ``limit`` other
requests are in flight or completed within the last window. Since a request
arrives at the server no later than its response returns, any two requests
``limit`` apart arrive at least one window apart, whatever the jitter.

Whoever polled the same key before (a predecessor process, or another replica
whose lease this one took over) may have sent requests within the last window:
a budget starts as if ``limit`` requests had completed ``window - holdoff``
seconds ago, so that the first request waits ``holdoff``. The caller knows how
long ago the predecessor stopped (the journal's leases say) and asks for no
more than the rest of a window; a full window when nothing is known.

Requests are also spaced ``window / limit`` apart (``smooth``): spending the
whole budget in a burst and then waiting out the rest of the window would
leave messages that arrive meanwhile waiting up to a second.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio


class RequestBudget:
    def __init__(
        self,
        limit: int,
        window: float = 1.0,
        *,
        holdoff: float | None = None,
        smooth: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self.window = window
        self._clock = clock
        self._done: deque[float] = deque(maxlen=limit)
        self.hold_off(window if holdoff is None else holdoff)
        self._in_flight = 0
        self._spacing = window / limit if smooth else 0.0
        self._last_send = -float("inf")
        # No turn of the loop when free: the request it guards is on a drain's path.
        self._lock = anyio.Lock(fast_acquire=True)
        self._released: anyio.Event | None = None

    def hold_off(self, seconds: float) -> None:
        """Send nothing for ``seconds`` (at most a window): another party may have used it."""
        seconds = min(self.window, max(0.0, seconds))
        if seconds <= 0:
            return
        # As if ``limit`` requests had completed so that they leave the window then.
        until = self._clock() - self.window + seconds
        kept = [max(t, until) for t in self._done]
        self._done.clear()
        self._done.extend(sorted([*kept, *[until] * (self.limit - len(kept))])[-self.limit:])

    def _expire(self, now: float) -> None:
        while self._done and self._done[0] <= now - self.window:
            self._done.popleft()

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[bool]:
        """Hold one request's place; yields whether the budget made the caller wait."""
        waited = False
        async with self._lock:
            while True:
                now = self._clock()
                self._expire(now)
                gap = self._last_send + self._spacing - now
                if gap > 0:
                    waited = True
                    await anyio.sleep(gap)
                    continue
                if len(self._done) + self._in_flight < self.limit:
                    break
                waited = True
                if self._done:
                    await anyio.sleep(self._done[0] + self.window - now)
                else:
                    # Every place is held by a request in flight: wait for one to finish.
                    if self._released is None:
                        self._released = anyio.Event()
                    await self._released.wait()
            self._in_flight += 1
            self._last_send = now
        try:
            yield waited
        finally:
            self._in_flight -= 1
            self._done.append(self._clock())
            if self._released is not None:
                self._released.set()
                self._released = None

    def in_window(self) -> int:
        """Requests in flight or completed within the last window."""
        self._expire(self._clock())
        return len(self._done) + self._in_flight


class BudgetRegistry:
    """Budgets shared by every source (and base URL) that uses the same key."""

    def __init__(self) -> None:
        self._budgets: dict[tuple[str, ...], RequestBudget] = {}

    def get(self, key: tuple[str, ...], limit: int, window: float = 1.0, *,
            holdoff: float | None = None, smooth: bool = True) -> RequestBudget:
        """The budget of ``key``; ``holdoff`` (seconds, None: a window) applies also to one
        that already exists (a unit taken back after another replica held it)."""
        budget = self._budgets.get(key)
        if budget is None:
            budget = RequestBudget(limit, window, holdoff=holdoff, smooth=smooth)
            self._budgets[key] = budget
        elif budget.limit != limit or budget.window != window:
            # Two sources on one app key must not each believe they own the budget.
            raise ValueError(f"conflicting request budgets configured for {key[0]!r}")
        else:
            budget.hold_off(window if holdoff is None else holdoff)
        return budget
