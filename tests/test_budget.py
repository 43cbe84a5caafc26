"""The strict request budget, against a fake clock (pure logic)."""

from __future__ import annotations

import itertools
from collections import deque

import anyio
import pytest

from relay.sources.budget import BudgetRegistry, RequestBudget

pytestmark = pytest.mark.anyio


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def max_in_any_window(times: list[float], window: float) -> int:
    best = 0
    q: deque[float] = deque()
    for t in sorted(times):
        q.append(t)
        while q[0] <= t - window:
            q.popleft()
        best = max(best, len(q))
    return best


async def test_never_more_than_limit_in_any_sliding_window() -> None:
    sends: list[float] = []
    budget = RequestBudget(10, 1.0, holdoff=0)
    start = anyio.current_time()
    with anyio.move_on_after(2.5):
        while True:
            async with budget.slot():
                sends.append(anyio.current_time() - start)
                await anyio.sleep(0.003)  # the round trip
    assert max_in_any_window(sends, 1.0) <= 10
    assert len(sends) >= 22  # ~10 per second is actually used, evenly spaced


async def test_holdoff_makes_a_new_budget_wait_one_window() -> None:
    budget = RequestBudget(10, 0.3, holdoff=None)
    start = anyio.current_time()
    async with budget.slot() as waited:
        pass
    assert waited
    assert anyio.current_time() - start >= 0.29


async def test_completion_times_count_not_send_times() -> None:
    clock = FakeClock()
    budget = RequestBudget(2, 1.0, holdoff=0, clock=clock)
    async with budget.slot():
        clock.now += 0.9  # a slow request: it completes 0.9 s after it was sent
    async with budget.slot():
        clock.now += 0.2
    assert budget.in_window() == 2
    clock.now += 0.3  # 1.4 s after the first send, but only 0.5 s after it completed
    assert budget.in_window() == 2
    clock.now += 0.5  # 1.0 s after the first completed
    assert budget.in_window() == 1


def test_registry_shares_budgets_and_rejects_conflicts() -> None:
    registry = BudgetRegistry()
    a = registry.get(("rongcloud", "key", "person"), 10)
    assert registry.get(("rongcloud", "key", "person"), 10) is a
    assert registry.get(("rongcloud", "key", "group"), 10) is not a
    with pytest.raises(ValueError, match="conflicting"):
        registry.get(("rongcloud", "key", "person"), 5)


async def test_requests_are_spread_over_the_window() -> None:
    budget = RequestBudget(10, 1.0, holdoff=0)
    sends: list[float] = []
    for _ in range(5):
        async with budget.slot():
            sends.append(anyio.current_time())
    gaps = [b - a for a, b in itertools.pairwise(sends)]
    assert min(gaps) >= 0.099


@pytest.mark.anyio
async def test_consume_on_read_waits_for_a_lease_that_outlasts_the_request() -> None:
    """A request is sent only with its deadline plus a margin left on the lease."""
    import anyio

    from relay.cluster import LEASE_MARGIN, LeaseClock
    from relay.sources.base import MIN_REQUEST_TIME, SourceRuntime

    now = [100.0]
    lease = LeaseClock(ttl=10.0, clock=lambda: now[0])
    lease.renewed(sent_at=100.0)
    runtime = SourceRuntime(journal=None, stopping=anyio.Event(), lease=lease)  # type: ignore[arg-type]
    # 10 s left: a 30 s deadline is cut to what the lease allows, minus the margin.
    assert await runtime.lease_time(30.0) == 10.0 - LEASE_MARGIN
    assert await runtime.lease_time(2.0) == 2.0
    now[0] = 100.0 + 10.0 - LEASE_MARGIN - MIN_REQUEST_TIME / 2  # almost nothing left
    async with anyio.create_task_group() as tg:
        got: list[float | None] = []

        async def ask() -> None:
            got.append(await runtime.lease_time(30.0))

        tg.start_soon(ask)
        await anyio.sleep(0.05)
        assert not got, "no request while the lease is about to run out"
        lease.renewed(sent_at=now[0])  # a renewal arrives
        with anyio.fail_after(5):
            while not got:  # noqa: ASYNC110 - waiting for the task above
                await anyio.sleep(0.05)
    assert got == [10.0 - LEASE_MARGIN]
    runtime.stopping.set()
    lease.lost()
    assert await runtime.lease_time(30.0) is None
