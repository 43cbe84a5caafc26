"""The delivery loop of one sink: journal → filter → sink → cursor.

Each sink runs independently with its own cursor, so a dead webhook never
slows Kafka and no sink ever slows polling. The cursor moves only after the
sink returned, so a crash repeats at most the batch in flight — unless the
destination records its own position with the data (``commits_position``):
then, at start, its position wins over the journal's cursor when it is ahead,
and a crash repeats nothing.

A ``relay replay`` is a deliberate repeat, also for such a sink. Between the
rewind and the next delivery the destination's position is still the old,
later one, so the runner keeps a replay mark in the journal (written before
the rewind, cleared after the next delivery): while it is set, a restart
trusts the journal's (rewound) cursor instead.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial

import anyio
import anyio.abc

from relay import metrics
from relay.backoff import Backoff
from relay.journal import Fence, JournalError, LeaseLostError, SinkJournal, StoredEvent
from relay.logs import get_logger
from relay.sinks.base import (
    Advance,
    DeliveryResult,
    RetryableError,
    Sink,
    SinkConfig,
    SinkError,
    SinkFencedError,
    SinkPausedError,
    SinkPosition,
)
from relay.sinks.requests import OperatorRequests

log = get_logger("relay.sink")

REQUEST_POLL_INTERVAL = 1.0  # how often a running sink looks for CLI requests
PENDING_COUNT_INTERVAL = 1.0  # how often the exact backlog is counted for the gauge


def replay_mark_key(sink: str) -> str:
    """The journal cursor holding a sink's replay mark ('@': no source name starts so)."""
    return f"@sink:{sink}:replay"


@dataclass
class SinkHealth:
    connected: bool = False  # started, and the last delivery attempt (if any) succeeded
    paused: str | None = None
    cursor: int = 0
    last_error: str = ""
    # starting → idle (nothing delivered yet) → delivering; retrying, breaker_open, paused;
    # fenced (another writer took the destination over: this relay delivers no more)
    state: str = "starting"
    delivered: bool = False


class SinkRunner:
    def __init__(self, sink: Sink, config: SinkConfig, journal: SinkJournal) -> None:
        self.sink = sink
        self.config = config
        self.journal = journal
        self.health = SinkHealth()
        self._backoff = Backoff(config.retry_backoff, config.retry_backoff_max)
        self._requests = OperatorRequests(sink.name, journal, config.batch_size)
        self._pending_counted_at = -float("inf")
        self._position: SinkPosition | None = None
        self._journal_id = 0
        self._replay_marked = False
        self._settled: set[int] = set()  # seqs of the batch in flight already dead-lettered
        self._stopping = anyio.Event()
        self._fence: Fence | None = None

    @property
    def name(self) -> str:
        return self.sink.name

    async def run(self, stopping: anyio.Event, *, fence: Fence | None = None) -> None:
        """Deliver until ``stopping``; cursor moves under ``fence`` (the sink's lease)."""
        self._fence = fence
        metrics.init_sink(self.name)
        self._stopping = stopping
        try:
            try:
                if await self._start(stopping):
                    await self._loop(stopping)
            finally:
                with anyio.CancelScope(shield=True):
                    await self.sink.close()
            if self.health.state == "fenced":
                # Stays stopped, and says so, until the relay stops (or, with replicas, the
                # sink's lease is found to have moved): started again it would fence back.
                await stopping.wait()
        finally:
            # Handed over (or stopping): its lag and up gauges would go stale here while
            # another relay delivers, and fire alerts for this one.
            metrics.forget_sink(self.name)

    async def _sleep(self, seconds: float, stopping: anyio.Event) -> None:
        with anyio.move_on_after(seconds):
            await stopping.wait()

    async def _start(self, stopping: anyio.Event) -> bool:
        while not stopping.is_set():
            try:
                await self.sink.start()
                if self.sink.commits_position:
                    self._position = await self.sink.position()
            except SinkFencedError as exc:
                self._fenced(exc)
                return False
            except SinkError as exc:
                delay = self._backoff.next()
                log.error("sink cannot start; retrying", sink=self.name, error=str(exc),
                          retry_in_seconds=round(delay, 1))
                metrics.SINK_UP.labels(self.name).set(0)
                await self._sleep(delay, stopping)
                continue
            self._backoff.reset()
            self.health.connected = True
            self.health.state = "delivering" if self.health.delivered else "idle"
            metrics.SINK_UP.labels(self.name).set(1)
            return True
        return False

    async def _loop(self, stopping: anyio.Event) -> None:
        try:
            async with anyio.create_task_group() as tg:
                await self._deliver_all(stopping,
                                        _ReadAhead(self.journal, self.config.batch_size, tg))
                tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # Early reads never raise: the one exception is the loop's own, passed on as is
            # (callers tell a fenced sink or a lost journal by its type).
            if len(group.exceptions) != 1:
                raise
            error = group.exceptions[0]
            raise error.with_traceback(error.__traceback__) from error.__cause__

    async def _deliver_all(self, stopping: anyio.Event, ahead: _ReadAhead) -> None:
        self._journal_id = await self.journal.journal_id()
        cursor = await self._resume(await self.journal.sink_cursor(self.name))
        self.health.cursor = cursor
        sink_filter = self.config.filter
        filtering = not sink_filter.is_empty()
        last_requests = 0.0
        while not stopping.is_set():
            if time.monotonic() - last_requests >= REQUEST_POLL_INTERVAL:
                last_requests = time.monotonic()
                cursor = await self._serve_requests(cursor, stopping)
            rows = await ahead.take(cursor)
            if not rows:
                metrics.SINK_PENDING.labels(self.name).set(0)
                metrics.SINK_OLDEST_PENDING_AGE.labels(self.name).set(0)
                # Short, so that shutdown and requests are noticed promptly while idle.
                await self.journal.wait_for_events(cursor, 0.5)
                continue
            if len(rows) < self.config.batch_size and await self._wait_for_more(
                    cursor, rows[0], stopping):
                # Read again, fuller: what was read may have been erased meanwhile.
                rows = await self.journal.read(cursor, self.config.batch_size)
                if not rows:
                    continue
            await self._report_lag(rows[0])
            selected = [r for r in rows if sink_filter.matches(r)] if filtering else rows
            if len(selected) != len(rows):
                metrics.SINK_FILTERED.labels(self.name).inc(len(rows) - len(selected))
            if selected:
                # The next batch is read while this one is delivered: the destination's
                # round trips hide the journal's read.
                ahead.start(rows[-1].seq)
                advance = Advance(rows[-1].seq, self._journal_id, self._settle)
                result = await self._deliver(selected, stopping, advance)
                if result is None:
                    return
                if not await self._dead_letter(result, stopping):
                    return
                self._settled.clear()
                self._observe(selected, result)
            cursor = rows[-1].seq
            if not await self._journal_write(
                    "cursor", partial(self.journal.advance_sink, self.name, cursor,
                                      fence=self._fence), stopping):
                return
            self.health.cursor = cursor
            if self._replay_marked and selected:
                # The destination's own position now records the replay: trust it again.
                await self._journal_write("replay mark", partial(
                    self.journal.set_cursors, {replay_mark_key(self.name): ""}), stopping)
                self._replay_marked = False

    async def _wait_for_more(self, cursor: int, first: StoredEvent,
                             stopping: anyio.Event) -> bool:
        """Wait (``batch_wait``) for a batch after ``cursor`` to fill, until ``batch_size``
        events are there or its oldest event has waited that long since its fetch; whether
        it waited and should be read again. A backlog's events are older than that and go
        at once; so does a batch when the relay is stopping."""
        wait = self.config.batch_wait
        if wait <= 0:
            return False
        # fetched_at is a wall clock (another replica's, with PostgreSQL): a clock ahead of
        # ours makes the age negative, and the wait is bounded by batch_wait all the same.
        left = min(wait, wait - (time.time() - first.fetched_at / 1000))
        if left <= 0:
            return False
        deadline = time.monotonic() + left
        while not stopping.is_set():
            last = await self.journal.max_seq()
            remaining = deadline - time.monotonic()
            if last - cursor >= self.config.batch_size or remaining <= 0:
                return True
            # Woken by each commit; at most a moment, so that stopping is noticed.
            await self.journal.wait_for_events(last, min(remaining, 0.1))
        return False

    async def _resume(self, cursor: int) -> int:
        """Where to start: the journal's cursor, or the destination's position when ahead."""
        position = self._position
        if position is None:
            return cursor
        key = replay_mark_key(self.name)
        if (await self.journal.get_cursors(key)).get(key):
            self._replay_marked = True
            log.warning("a replay was requested and not delivered yet: resuming from the"
                        " journal's cursor, not the destination's position (a deliberate"
                        " repeat)", sink=self.name, cursor=cursor, destination=position.where)
            return cursor
        seq = await self._locate(position)
        if seq is None or seq <= cursor:
            return cursor
        high = await self.journal.max_seq()
        if seq > high:
            log.error("the destination records a position this journal never reached;"
                      " ignoring it (was the journal restored from an older copy?)",
                      sink=self.name, destination=position.where, position=seq,
                      journal_max_seq=high)
            return cursor
        log.info("the destination already holds events past the journal's cursor (the"
                 " relay stopped between the two): resuming after them, nothing repeats",
                 sink=self.name, destination=position.where, journal_cursor=cursor,
                 position=seq, skipped=seq - cursor)
        if not await self._journal_write(
                "cursor", partial(self.journal.advance_sink, self.name, seq, fence=self._fence),
                self._stopping):
            return cursor
        return seq

    async def _locate(self, position: SinkPosition) -> int | None:
        """The journal seq a destination's position stands for, or None if unknown here."""
        if position.seq is not None:
            if position.journal is not None and position.journal != self._journal_id:
                log.warning("the destination's position was recorded by another journal;"
                            " resuming from this journal's cursor", sink=self.name,
                            destination=position.where)
                return None
            return position.seq
        if position.event_id is None:
            return None
        seq = await self.journal.event_seq(position.event_id, position.fetched_at)
        if seq is None:
            log.info("the destination's last event is no longer in the journal (compacted or"
                     " erased); resuming from the journal's cursor", sink=self.name,
                     destination=position.where, event_id=position.event_id)
        return seq

    async def _settle(self, refused: Sequence[tuple[StoredEvent, str]]) -> bool:
        """Dead letters kept before the destination commits its position (see :class:`Advance`)."""
        fresh = [(e, error) for e, error in refused if e.seq not in self._settled]
        if not fresh:
            return True
        if not await self._dead_letter(DeliveryResult(rejected=fresh), self._stopping):
            return False
        self._settled.update(e.seq for e, _ in fresh)
        return True

    async def _mark_replay(self) -> None:
        if self.sink.commits_position and not self._replay_marked:
            await self.journal.set_cursors({replay_mark_key(self.name): "1"})
            self._replay_marked = True

    async def _serve_requests(self, cursor: int, stopping: anyio.Event) -> int:
        """Operators' requests (``relay replay``, ``relay dlq replay``): see :mod:`.requests`."""
        cursor = await self._requests.apply_rewinds(
            cursor, self._mark_replay, repeats=self.sink.commits_position)
        self.health.cursor = cursor
        await self._requests.replay_dead_letters(self._deliver, self._observe, stopping)
        return cursor

    async def _deliver(self, batch: list[StoredEvent], stopping: anyio.Event,
                       advance: Advance | None = None) -> DeliveryResult | None:
        """Deliver one batch, retrying what the sink says to retry; None if stopped first.

        The only place a sink's delivery is retried: the sink classifies each
        attempt, this loop waits (backoff, or the destination's clamped
        Retry-After), keeps the lag gauges moving and reports.
        """
        pending = batch
        rejected: list[tuple[StoredEvent, str]] = []
        # Re-delivered dead letters move no position; their refusals are settled by the caller.
        advance = advance or Advance(None, self._journal_id)
        while True:
            try:
                result = await self.sink.deliver(pending, advance)
            except SinkFencedError as exc:
                self._fenced(exc)
                return None
            except RetryableError as exc:
                self._note_failure("retry", str(exc), exc.state)
                delay = self._retry_delay(exc.retry_after)
                log.warning("delivery failed; retrying", sink=self.name, events=len(pending),
                            error=str(exc), retry_in_seconds=round(delay, 2))
            except SinkPausedError as exc:
                self._note_failure("paused", str(exc))
                if not self.health.paused:
                    log.error("sink paused: the destination rejects the sink itself; an operator"
                              " must act", sink=self.name, error=str(exc),
                              retry_in_seconds=round(self.config.paused_retry))
                self.health.paused = str(exc)
                self.health.state = "paused"
                delay = self.config.paused_retry
            except SinkError as exc:
                self._note_failure("retry", str(exc))
                delay = self._backoff.next()
                log.error("delivery failed; retrying", sink=self.name, error=str(exc),
                          retry_in_seconds=round(delay, 2))
            else:
                rejected += result.rejected
                if not result.retry:
                    self._succeeded()
                    return DeliveryResult(rejected=rejected)
                self._note_failure("retry", result.error)
                delay = self._retry_delay(result.retry_after)
                log.warning("delivery partly failed; retrying the rest", sink=self.name,
                            delivered=len(pending) - len(result.retry) - len(result.rejected),
                            retrying=len(result.retry), error=result.error,
                            retry_in_seconds=round(delay, 2))
                pending = sorted(result.retry, key=lambda e: e.seq)
            # The lag keeps growing while the batch waits: the gauges show it every second,
            # however long the wait (a backoff, an open breaker, a paused sink).
            until = time.monotonic() + delay
            while not stopping.is_set():
                await self._report_lag(pending[0])
                left = until - time.monotonic()
                if left <= 0:
                    break
                await self._sleep(min(left, PENDING_COUNT_INTERVAL), stopping)
            if stopping.is_set():
                return None

    def _retry_delay(self, hint: float | None) -> float:
        if hint is not None:
            self._backoff.next()  # a hint still counts as a failed attempt
            return min(hint, self.config.max_retry_after)
        return self._backoff.next()

    async def _report_lag(self, oldest: StoredEvent) -> None:
        """The lag gauges, from the oldest event not delivered yet.

        Pending is counted exactly (seqs have gaps where duplicates were dropped, so
        a difference of seqs would overstate it), at most once per second.
        """
        metrics.SINK_OLDEST_PENDING_AGE.labels(self.name).set(
            max(0.0, time.time() - oldest.fetched_at / 1000))
        now = time.monotonic()
        if now - self._pending_counted_at >= PENDING_COUNT_INTERVAL:
            self._pending_counted_at = now
            with contextlib.suppress(JournalError):  # a gauge, not worth failing over
                metrics.SINK_PENDING.labels(self.name).set(
                    await self.journal.count_after(oldest.seq - 1))

    async def _journal_write(self, what: str, write: Callable[[], Awaitable[None]],
                             stopping: anyio.Event) -> bool:
        """A journal write the runner must not lose (cursor, dead letters): kept trying.

        A full disk must not crash the runner (which would re-send the delivered
        batch for ever); the write is retried until the journal takes it. False
        only when the relay stops first (the batch then repeats after the restart).
        """
        backoff = Backoff(0.5, 5.0)
        warned = False
        while True:
            try:
                # Shielded: a delivered batch must have its cursor recorded, or it repeats.
                with anyio.CancelScope(shield=True):
                    await write()
            except JournalError as exc:
                if exc.fatal or isinstance(exc, LeaseLostError):
                    raise  # the journal is gone, or the sink moved to another relay
                if not warned:
                    log.error("journal write failed after a delivery; holding the sink and"
                              " retrying", sink=self.name, what=what, error=str(exc))
                    warned = True
                if stopping.is_set():
                    return False
                await self._sleep(backoff.next(), stopping)
                continue
            if warned:
                log.info("journal writable again", sink=self.name, what=what)
            return True

    def _fenced(self, exc: SinkFencedError) -> None:
        """Retrying cannot help and must not happen: the other writer is the sink now."""
        self._note_failure("fenced", str(exc), "fenced")
        log.error("sink fenced: another writer took the destination over (a second relay"
                  " with this sink, or its lease moved); this relay delivers nothing more to"
                  " it until restarted", sink=self.name, error=str(exc))

    def _note_failure(self, outcome: str, error: str, state: str = "retrying") -> None:
        metrics.SINK_ATTEMPTS.labels(self.name, outcome).inc()
        metrics.SINK_UP.labels(self.name).set(0)
        self.health.connected = False
        self.health.last_error = error
        self.health.state = state

    def state(self) -> tuple[str, str]:
        """What ``/stats`` and ``relay top`` show: the state and the last error."""
        return self.health.state, self.health.last_error

    def _succeeded(self) -> None:
        if self.health.paused or not self.health.connected:
            log.info("sink delivering", sink=self.name)
        self.health.paused = None
        self.health.connected = True
        self.health.delivered = True
        self.health.state = "delivering"
        self._backoff.reset()
        metrics.SINK_UP.labels(self.name).set(1)
        metrics.SINK_ATTEMPTS.labels(self.name, "ok").inc()

    async def _dead_letter(self, result: DeliveryResult, stopping: anyio.Event) -> bool:
        rejected = [(e, error) for e, error in result.rejected if e.seq not in self._settled]
        if not rejected:
            return True
        by_error: dict[str, list[StoredEvent]] = {}
        for event, error in rejected:
            by_error.setdefault(error, []).append(event)
        for error, events in by_error.items():
            if not await self._journal_write("dead letters", partial(
                    self.journal.add_dead_letters, self.name, events, error, attempts=1),
                    stopping):
                return False
            log.error("events refused by the destination: moved to dead letters",
                      sink=self.name, events=len(events), error=error)
        metrics.SINK_DEAD_LETTERS.labels(self.name).inc(len(rejected))
        metrics.SINK_ATTEMPTS.labels(self.name, "dead_letter").inc()
        return True

    def _observe(self, batch: list[StoredEvent], result: DeliveryResult) -> None:
        if result.rejected:
            rejected = {event.seq for event, _ in result.rejected}
            batch = [e for e in batch if e.seq not in rejected]
        now_ms = time.time() * 1000
        # Events fetched together share a fetch time: count them instead of walking each.
        by_fetch = Counter(e.fetched_at for e in batch)
        metrics.SINK_LATENCY.observe_counted(
            (self.name,), ((max(0.0, (now_ms - fetched) / 1000), n)
                           for fetched, n in by_fetch.items()))
        metrics.SINK_DELIVERED.labels(self.name).inc(len(batch))


class _ReadAhead:
    """At most one journal read started early, taken only by the cursor it was read after.

    Anything else (an operator's rewind, a retry from a different place) reads
    afresh and the early read is dropped: what a sink delivers always starts at
    its cursor.
    """

    def __init__(self, journal: SinkJournal, size: int, tg: anyio.abc.TaskGroup) -> None:
        self._journal = journal
        self._size = size
        self._tg = tg
        self._after: int | None = None
        self._done = anyio.Event()
        self._rows: list[StoredEvent] = []
        self._error: Exception | None = None

    def start(self, after: int) -> None:
        if self._after == after:
            return
        self._after, self._done, self._rows, self._error = after, anyio.Event(), [], None
        self._tg.start_soon(self._read, after, self._done)

    async def _read(self, after: int, done: anyio.Event) -> None:
        try:
            rows = await self._journal.read(after, self._size)
            error = None
        except Exception as exc:  # handed to take(), which raises it where a read would
            rows, error = [], exc
        if self._after == after and self._done is done:
            self._rows, self._error = rows, error
        done.set()

    async def take(self, after: int) -> list[StoredEvent]:
        if self._after != after:
            return await self._journal.read(after, self._size)
        await self._done.wait()
        self._after = None
        if self._error is not None:
            raise self._error
        return self._rows
