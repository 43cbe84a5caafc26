"""The delivery loop of one sink: journal → filter → sink → cursor.

Each sink runs independently with its own cursor, so a dead webhook never
slows Kafka and no sink ever slows polling. The cursor moves only after the
sink returned, so a crash repeats at most the batch in flight.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

import anyio

from relay import metrics
from relay.backoff import Backoff
from relay.journal import Journal, StoredEvent
from relay.logs import get_logger
from relay.sinks.base import (
    DeliveryResult,
    RetryableError,
    Sink,
    SinkConfig,
    SinkError,
    SinkPausedError,
)

log = get_logger("relay.sink")

REQUEST_POLL_INTERVAL = 1.0  # how often a running sink looks for CLI requests


@dataclass
class SinkHealth:
    connected: bool = False
    paused: str | None = None
    cursor: int = 0


class SinkRunner:
    def __init__(self, sink: Sink, config: SinkConfig, journal: Journal) -> None:
        self.sink = sink
        self.config = config
        self.journal = journal
        self.health = SinkHealth()
        self._backoff = Backoff(config.retry_backoff, config.retry_backoff_max)

    @property
    def name(self) -> str:
        return self.sink.name

    async def run(self, stopping: anyio.Event) -> None:
        metrics.init_sink(self.name)
        if not await self._start(stopping):
            return
        try:
            await self._loop(stopping)
        finally:
            with anyio.CancelScope(shield=True):
                await self.sink.close()

    async def _sleep(self, seconds: float, stopping: anyio.Event) -> None:
        with anyio.move_on_after(seconds):
            await stopping.wait()

    async def _start(self, stopping: anyio.Event) -> bool:
        while not stopping.is_set():
            try:
                await self.sink.start()
            except SinkError as exc:
                delay = self._backoff.next()
                log.error("sink cannot start; retrying", sink=self.name, error=str(exc),
                          retry_in_seconds=round(delay, 1))
                metrics.SINK_UP.labels(self.name).set(0)
                await self._sleep(delay, stopping)
                continue
            self._backoff.reset()
            self.health.connected = True
            metrics.SINK_UP.labels(self.name).set(1)
            return True
        return False

    async def _loop(self, stopping: anyio.Event) -> None:
        cursor = await self.journal.sink_cursor(self.name)
        self.health.cursor = cursor
        sink_filter = self.config.filter
        filtering = not sink_filter.is_empty()
        last_requests = 0.0
        while not stopping.is_set():
            if time.monotonic() - last_requests >= REQUEST_POLL_INTERVAL:
                last_requests = time.monotonic()
                cursor = await self._serve_requests(cursor, stopping)
            rows = await self.journal.read(cursor, self.config.batch_size)
            if not rows:
                metrics.SINK_PENDING.labels(self.name).set(0)
                metrics.SINK_OLDEST_PENDING_AGE.labels(self.name).set(0)
                # Short, so that shutdown and requests are noticed promptly while idle.
                await self.journal.wait_for_events(cursor, 0.5)
                continue
            metrics.SINK_PENDING.labels(self.name).set(max(0, self.journal.last_seq - cursor))
            metrics.SINK_OLDEST_PENDING_AGE.labels(self.name).set(
                max(0.0, time.time() - rows[0].fetched_at / 1000)
            )
            selected = [r for r in rows if sink_filter.matches(r)] if filtering else rows
            if len(selected) != len(rows):
                metrics.SINK_FILTERED.labels(self.name).inc(len(rows) - len(selected))
            if selected:
                result = await self._deliver(selected, stopping)
                if result is None:
                    return
                await self._dead_letter(result)
                self._observe(selected, result)
            cursor = rows[-1].seq
            # Shielded: a delivered batch must have its cursor recorded, or it repeats.
            with anyio.CancelScope(shield=True):
                await self.journal.advance_sink(self.name, cursor)
            self.health.cursor = cursor

    async def _serve_requests(self, cursor: int, stopping: anyio.Event) -> int:
        """Apply replay requests left by the CLI and re-deliver dead letters marked for it."""
        for action, arg in await self.journal.take_control(self.name):
            if action == "replay":
                cursor = await self.journal.rewind_sink(self.name, int(arg))
                self.health.cursor = cursor
                log.info("replaying from the journal", sink=self.name, since_ms=int(arg),
                         from_seq=cursor + 1)
        while not stopping.is_set():
            marked = await self.journal.dead_letters_to_replay(self.name, self.config.batch_size)
            if not marked:
                break
            events = [event for _, event in marked]
            result = await self._deliver(events, stopping)
            if result is None:
                break
            refused = {event.seq: error for event, error in result.rejected}
            await self.journal.settle_dead_letters(
                [dlid for dlid, e in marked if e.seq not in refused],
                [(dlid, refused[e.seq]) for dlid, e in marked if e.seq in refused],
            )
            self._observe(events, result)
            log.info("dead letters replayed", sink=self.name, delivered=len(marked) - len(refused),
                     still_refused=len(refused))
        return cursor

    async def _deliver(self, batch: list[StoredEvent],
                       stopping: anyio.Event) -> DeliveryResult | None:
        """Deliver one batch, retrying as the sink says; None if stopped before success."""
        while True:
            try:
                result = await self.sink.deliver(batch)
            except RetryableError as exc:
                self._note_failure("retry")
                delay = exc.retry_after if exc.retry_after is not None else self._backoff.next()
                log.warning("delivery failed; retrying", sink=self.name, events=len(batch),
                            error=str(exc), retry_in_seconds=round(delay, 2))
            except SinkPausedError as exc:
                self._note_failure("paused")
                self.health.paused = str(exc)
                delay = self.config.paused_retry
                log.error("sink paused: the destination rejects the sink itself; an operator"
                          " must act", sink=self.name, error=str(exc),
                          retry_in_seconds=round(delay))
            except SinkError as exc:
                self._note_failure("retry")
                delay = self._backoff.next()
                log.error("delivery failed; retrying", sink=self.name, error=str(exc),
                          retry_in_seconds=round(delay, 2))
            else:
                self._succeeded()
                return result
            # The lag keeps growing while the batch waits: let the gauges show it.
            metrics.SINK_OLDEST_PENDING_AGE.labels(self.name).set(
                max(0.0, time.time() - batch[0].fetched_at / 1000))
            metrics.SINK_PENDING.labels(self.name).set(
                max(0, self.journal.last_seq - batch[0].seq + 1))
            if stopping.is_set():
                return None
            await self._sleep(delay, stopping)
            if stopping.is_set():
                return None

    def _note_failure(self, outcome: str) -> None:
        metrics.SINK_ATTEMPTS.labels(self.name, outcome).inc()
        metrics.SINK_UP.labels(self.name).set(0)
        self.health.connected = False

    def _succeeded(self) -> None:
        if self.health.paused or not self.health.connected:
            log.info("sink delivering", sink=self.name)
        self.health.paused = None
        self.health.connected = True
        self._backoff.reset()
        metrics.SINK_UP.labels(self.name).set(1)
        metrics.SINK_ATTEMPTS.labels(self.name, "ok").inc()

    async def _dead_letter(self, result: DeliveryResult) -> None:
        if not result.rejected:
            return
        by_error: dict[str, list[StoredEvent]] = {}
        for event, error in result.rejected:
            by_error.setdefault(error, []).append(event)
        for error, events in by_error.items():
            with anyio.CancelScope(shield=True):
                await self.journal.add_dead_letters(self.name, events, error, attempts=1)
            log.error("events refused by the destination: moved to dead letters",
                      sink=self.name, events=len(events), error=error)
        metrics.SINK_DEAD_LETTERS.labels(self.name).inc(len(result.rejected))
        metrics.SINK_ATTEMPTS.labels(self.name, "dead_letter").inc()

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
