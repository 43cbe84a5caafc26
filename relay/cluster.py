"""Who runs what: leases on units of work among the relays sharing one journal (SPEC §9).

A *unit* is what one relay runs at a time: a RongCloud source (its app key's
endpoints), a WuKongIM uid or channel, a LeanCloud app, a sink. Each is a lease
in the journal with a TTL and a fencing epoch. Every relay on the same journal
is a member of one cluster; each tick it

1. heartbeats, and counts the live members;
2. renews what it holds (a lease that moved: its unit is cancelled at once,
   whatever it would write is refused by the journal anyway);
3. gives up what it holds beyond its fair share, ``ceil(units / members)``
   (its unit is stopped first, finishing the batch in hand, then released);
4. takes free or expired units up to its share, in an order of its own (a hash
   of member and unit), so that members spread over the units.

With the embedded single-writer journal every lease is this relay's: one code path.

A unit knows how long its lease is safe (:class:`LeaseClock`, measured from
when a renewal was *sent*, so never longer than the journal's own view): a source
sends a consume-on-read request or a ``syncack`` only when the lease outlasts the
request's deadline plus a margin.
"""

from __future__ import annotations

import hashlib
import math
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import anyio
from anyio.abc import TaskGroup

from relay import metrics
from relay.journal import Fence, Grant, JournalError, Leases
from relay.logs import get_logger

log = get_logger("relay.cluster")

# A request must end this long before the lease could expire: a new holder may start
# the moment it does, and a RongCloud budget window must lie between the two.
LEASE_MARGIN = 2.0


class LeaseClock:
    """How long the lease on one unit is safe, by this relay's monotonic clock."""

    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self._clock = clock
        self._until = -math.inf
        self._renewed = anyio.Event()

    def renewed(self, sent_at: float) -> None:
        """A renewal sent at ``sent_at`` succeeded: safe until ``sent_at + ttl``."""
        self._until = max(self._until, sent_at + self.ttl)
        self._renewed.set()
        self._renewed = anyio.Event()

    def lost(self) -> None:
        self._until = -math.inf

    def remaining(self) -> float:
        return self._until - self._clock()

    async def wait_renewed(self, timeout: float) -> None:
        with anyio.move_on_after(timeout):
            await self._renewed.wait()


@dataclass
class UnitContext:
    """What a unit's runner is given while it holds its lease."""

    fence: Fence
    lease: LeaseClock
    stopping: anyio.Event  # set when the unit must finish its batch in hand and return
    previous_end_ago: float | None  # see :class:`relay.journal.Grant`


@dataclass
class Unit:
    name: str  # "source:rc", "source:wk:uid:u1", "sink:archive"
    run: Callable[[UnitContext], Awaitable[None]]


@dataclass
class _Held:
    unit: Unit
    context: UnitContext
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    done: anyio.Event = field(default_factory=anyio.Event)


def member_id() -> str:
    """This relay's name in the cluster: host, pid and a random part (pids get reused)."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Cluster:
    def __init__(self, journal: Leases, units: list[Unit], *, ttl: float, tick: float,
                 member: str | None = None) -> None:
        self.journal = journal
        self.units = {u.name: u for u in units}
        self.ttl = ttl
        self.tick = tick
        self.member = member or member_id()
        self.description = f"{socket.gethostname()} pid {os.getpid()}"
        self.held: dict[str, _Held] = {}
        # Being handed over: stopping, still renewed until their runner has finished (a
        # batch in hand committed), then released.
        self.leaving: dict[str, _Held] = {}
        self.live_members = 1
        # After the journal was unreachable, every member's heartbeat looks stale at once:
        # take nobody's lease until the others had a TTL to renew their own.
        self._take_over_after = 0.0
        self._preference = sorted(self.units, key=self._rank)

    def _rank(self, unit: str) -> str:
        return hashlib.sha256(f"{self.member}/{unit}".encode()).hexdigest()

    def running(self) -> set[str]:
        """The units running here: held, or handed over and finishing their batch."""
        return {*self.held, *self.leaving}

    def share(self) -> int:
        return math.ceil(len(self.units) / max(1, self.live_members))

    async def run(self, workers: TaskGroup, stopping: anyio.Event,
                  supervise: Callable[[str, Callable[[], Awaitable[None]]], Awaitable[None]]
                  ) -> None:
        """Balance leases until ``stopping``; runners go in ``workers`` under ``supervise``."""
        metrics.init_cluster()
        try:
            while not stopping.is_set():
                try:
                    await self._round(workers, supervise)
                except JournalError as exc:
                    if exc.fatal:
                        raise
                    self._take_over_after = time.monotonic() + self.ttl
                    # The journal unreachable: nothing can be renewed. Units keep what they
                    # hold (their writes wait for the journal); their lease clocks run down,
                    # so no consume-on-read request goes out meanwhile.
                    log.warning("cluster round failed; retrying", error=str(exc))
                with anyio.move_on_after(self.tick):
                    await stopping.wait()
        finally:
            with anyio.CancelScope(shield=True):
                await self._leave()

    async def _round(self, workers: TaskGroup,
                     supervise: Callable[[str, Callable[[], Awaitable[None]]], Awaitable[None]]
                     ) -> None:
        await self.journal.heartbeat(self.member, self.description)
        self.live_members = max(1, len(await self.journal.members(self.ttl)))
        for table in (self.held, self.leaving):
            for name, held in list(table.items()):
                if held.done.is_set():
                    # The runner ended: handed over, or by itself (a lease lost on a write).
                    await self.journal.release(held.context.fence)
                    del table[name]
                    if table is self.leaving:
                        metrics.CLUSTER_LEASE_MOVES.labels("released").inc()
                        log.info("lease released for another relay", unit=name,
                                 members=self.live_members)
                    continue
                sent = time.monotonic()
                if await self.journal.renew(held.context.fence, self.ttl):
                    held.context.lease.renewed(sent)
                else:
                    log.warning("lease lost to another relay: stopping the unit", unit=name,
                                epoch=held.context.fence.epoch)
                    held.context.lease.lost()
                    held.scope.cancel()
                    del table[name]
                    metrics.CLUSTER_LEASE_MOVES.labels("lost").inc()
        share = self.share()
        for name in [n for n in reversed(self._preference) if n in self.held][
                :max(0, len(self.held) - share)]:
            # Stopped now, released once its runner has finished (see above).
            held = self.leaving[name] = self.held.pop(name)
            held.context.stopping.set()
        for name in self._preference:
            if len(self.held) >= share or time.monotonic() < self._take_over_after:
                break
            if name in self.held:
                continue
            sent = time.monotonic()
            grant = await self.journal.acquire(name, self.member, self.ttl)
            if grant is not None:
                self._start(self.units[name], grant, sent, workers, supervise)
        metrics.CLUSTER_MEMBERS.set(self.live_members)
        metrics.CLUSTER_LEASES_HELD.set(len(self.held))

    def _start(self, unit: Unit, grant: Grant, sent: float, workers: TaskGroup,
               supervise: Callable[[str, Callable[[], Awaitable[None]]], Awaitable[None]]
               ) -> None:
        lease = LeaseClock(self.ttl)
        lease.renewed(sent)
        held = _Held(unit, UnitContext(grant.fence, lease, anyio.Event(),
                                       grant.previous_end_ago))
        self.held[unit.name] = held
        metrics.CLUSTER_LEASE_MOVES.labels("acquired").inc()
        log.info("lease acquired: running the unit", unit=unit.name, epoch=grant.fence.epoch,
                 members=self.live_members)

        async def run() -> None:
            try:
                with held.scope:
                    await supervise(unit.name, lambda: unit.run(held.context))
            finally:
                held.done.set()

        workers.start_soon(run)

    async def _leave(self) -> None:
        """At shutdown: every unit finishes its batch in hand (within the relay's shutdown
        grace, which cancels what is left), then the member and its leases go."""
        everything = [*self.held.values(), *self.leaving.values()]
        for held in everything:
            held.context.stopping.set()
        for held in everything:
            await held.done.wait()
        try:
            await self.journal.leave(self.member)
        except JournalError as exc:
            log.warning("could not leave the cluster cleanly; leases expire by themselves",
                        error=str(exc))
