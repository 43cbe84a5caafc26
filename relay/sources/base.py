"""What every source is given, what it must provide, and the helpers they share.

A source polls one provider and hands each fetched batch to
:meth:`SourceRuntime.commit`, which journals it (events, quarantined records
and the source's cursor in one transaction) before the source may acknowledge
the provider or ask for more. When the journal's disk is full the commit is
retried, with the batch held in memory, until space returns: polling stops,
nothing is acknowledged, nothing is dropped.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
import orjson

from relay import metrics
from relay.journal import (
    CommitResult,
    Journal,
    JournalFullError,
    NewEvent,
    QuarantinedRecord,
)
from relay.logs import get_logger
from relay.sources.budget import BudgetRegistry

log = get_logger("relay.source")


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class CheckResult:
    """One line of ``relay check``: what was reached and how it went."""

    component: str
    target: str
    ok: bool
    detail: str
    warning: bool = False


@dataclass
class SourceHealth:
    """What ``/readyz`` needs to know about a source."""

    polling: bool = False
    last_success: float = 0.0
    config_error: str | None = None


@dataclass
class SourceRuntime:
    """Shared services handed to a running source."""

    journal: Journal
    stopping: anyio.Event
    budgets: BudgetRegistry = field(default_factory=BudgetRegistry)
    disk_full_retry: float = 5.0
    health: dict[str, SourceHealth] = field(default_factory=dict)

    async def sleep(self, seconds: float) -> None:
        """Sleep, but wake at once when the relay starts shutting down."""
        if seconds <= 0 or self.stopping.is_set():
            return
        with anyio.move_on_after(seconds):
            await self.stopping.wait()

    async def wait_for_space(self, source: str) -> None:
        """Hold polling while the journal's file system is full."""
        if self.journal.has_space():
            return
        log.error(
            "journal disk full: polling paused, nothing is acknowledged until space returns",
            source=source,
        )
        metrics.JOURNAL_FULL.set(1)
        while not self.journal.has_space() and not self.stopping.is_set():
            await self.sleep(1.0)
        metrics.JOURNAL_FULL.set(0)
        log.info("journal has space again: polling resumes", source=source)

    async def commit(
        self,
        source: str,
        endpoint: str,
        events: Sequence[NewEvent],
        *,
        cursors: Mapping[str, str] | None = None,
        quarantine: Sequence[QuarantinedRecord] = (),
        grace_deadline: float | None = None,
    ) -> CommitResult | None:
        """Journal one batch; retries while the disk is full. None only if given up at shutdown."""
        started = time.perf_counter()
        warned = False
        while True:
            try:
                result = await self.journal.commit_batch(
                    events, cursors=cursors, quarantine=quarantine
                )
                break
            except JournalFullError as exc:
                metrics.JOURNAL_FULL.set(1)
                if not warned:
                    log.error(
                        "journal disk full: holding the fetched batch and retrying;"
                        " the provider is not acknowledged",
                        source=source,
                        endpoint=endpoint,
                        events=len(events),
                        error=str(exc),
                    )
                    warned = True
                if self.stopping.is_set() and (
                    grace_deadline is None or time.monotonic() > grace_deadline
                ):
                    log.error(
                        "shutting down with a fetched batch that could not be journaled",
                        source=source,
                        endpoint=endpoint,
                        events=len(events),
                    )
                    return None
                # Not interruptible by shutdown: the batch in hand is worth the wait.
                await anyio.sleep(self.disk_full_retry)
        if warned:
            metrics.JOURNAL_FULL.set(0)
            log.info("journal writable again: batch committed", source=source, endpoint=endpoint)
        metrics.JOURNAL_COMMIT_SECONDS.observe(time.perf_counter() - started)
        metrics.SOURCE_EVENTS.labels(source, endpoint, "new").inc(result.new)
        metrics.SOURCE_EVENTS.labels(source, endpoint, "duplicate").inc(result.duplicates)
        metrics.SOURCE_EVENTS.labels(source, endpoint, "quarantined").inc(result.quarantined)
        metrics.JOURNAL_LAST_SEQ.set(result.last_seq)
        return result


def quarantine_record(source: str, endpoint: str, raw: Any, error: str) -> QuarantinedRecord:
    """Keep a bad provider record as close to its original bytes as we have it."""
    if isinstance(raw, bytes):
        data = raw
    elif isinstance(raw, str):
        data = raw.encode("utf-8", "surrogatepass")
    else:
        try:
            data = orjson.dumps(raw)
        except TypeError:
            data = repr(raw).encode()
    return QuarantinedRecord(source=source, endpoint=endpoint, error=error[:500], raw=data)


class Source(Protocol):
    """A provider poller."""

    name: str
    provider: str

    async def run(self, runtime: SourceRuntime) -> None:
        """Poll until ``runtime.stopping`` is set; finish the batch in hand, then return."""

    async def check(self) -> list[CheckResult]:
        """Validate credentials and reachability without consuming anything."""
