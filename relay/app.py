"""Wiring: the journal, the sources, the sink runners and the operations endpoint.

Shutdown (SIGTERM/SIGINT): sources stop asking providers for more, finish the
request in flight and commit it; sinks finish the batch in flight and record
their cursor; then the journal closes and the process exits 0. Whatever is
still running after ``shutdown_grace`` seconds is cancelled (every commit is
one transaction, so nothing half-written remains). A second signal exits at
once: SQLite's WAL makes that safe for the journal.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import anyio
from anyio.abc import TaskGroup

from relay import metrics, status
from relay.cluster import Cluster, Unit, UnitContext
from relay.config import RelayConfig
from relay.http_server import OpsServer
from relay.journal import Journal, JournalError, LeaseLostError, Leases, open_journal
from relay.logs import get_logger
from relay.sdnotify import Notifier
from relay.sinks import build_sink
from relay.sinks.runner import SinkRunner
from relay.sources import Source, SourceRuntime, build_source
from relay.sources.base import UnitHealth
from relay.sources.budget import BudgetRegistry

log = get_logger("relay")


class StartupError(Exception):
    """The environment refuses what the configuration asks (a port in use): exit 2.

    The message names the setting; systemd's ``RestartPreventExitStatus=2`` then
    stops restarting a relay that cannot start as configured.
    """

HOUSEKEEPING_INTERVAL = 5.0


class Relay:
    def __init__(self, config: RelayConfig, *, notifier: Notifier | None = None,
                 source_factory: Callable[[str, Any], Source] = build_source) -> None:
        self.config = config
        self.notifier = notifier or Notifier()
        self._build_source = source_factory  # relay evacuate gives one source a tracker
        self.stopping: anyio.Event | None = None
        self.journal: Journal | None = None
        self.sources: list[Source] = []
        self.runners: list[SinkRunner] = []
        self.runtime: SourceRuntime | None = None
        self.metrics_port: int | None = None
        self._last_limit_warning = 0.0
        self.fatal: JournalError | None = None
        self.cluster: Cluster | None = None
        # Source health key -> the unit whose loop wrote it (see :class:`UnitHealth`).
        self._health_owners: dict[str, str] = {}
        # Source name -> how many of its units run here now.
        self._units_running: Counter[str] = Counter()

    # -- readiness ---------------------------------------------------------

    def readiness(self) -> tuple[bool, dict[str, str]]:
        """``/readyz``: ready while the journal is open, sources poll and sinks deliver.

        A sink that has delivered nothing yet is ``idle`` (ready: a quiet relay is
        healthy); one whose last attempt failed is not, whatever it did before.
        """
        checks: dict[str, str] = {}
        checks["journal"] = "open" if self.journal is not None else "closed"
        # Units that run on another relay sharing the journal (or on none yet) are a
        # standby's business here, not a failure: what they last did here is history.
        running = self.cluster.running() if self.cluster is not None else None
        if self.runtime is not None:
            for key, health in self.runtime.health.items():
                if running is not None and self._health_owners.get(key) not in running:
                    checks[f"source {key}"] = "standby"
                elif health.config_error:
                    checks[f"source {key}"] = f"config error: {health.config_error}"
                elif health.last_error:
                    checks[f"source {key}"] = f"failing: {health.last_error}"
                else:
                    checks[f"source {key}"] = "polling" if health.polling else "stopped"
        for runner in self.runners:
            if running is not None and f"sink:{runner.name}" not in running:
                checks[f"sink {runner.name}"] = "standby"
                continue
            state, error = runner.state()
            checks[f"sink {runner.name}"] = f"{state}: {error}" if error and state not in (
                "idle", "delivering") else state
        ready = self.journal is not None and all(
            v in ("open", "polling", "idle", "delivering", "standby") for v in checks.values()
        )
        return ready, checks

    def stats(self) -> dict[str, Any]:
        """``/stats``: the live figures ``relay top`` shows."""
        health = self.runtime.health if self.runtime is not None else {}
        return status.snapshot(health, self.runners)

    # -- running -----------------------------------------------------------

    async def run(self, on_ready: Callable[[Relay], Awaitable[None] | None] | None = None) -> None:
        c = self.config
        journal = await open_journal(c.journal)
        self.journal = journal
        metrics.JOURNAL_LIMIT_BYTES.set(c.journal.max_bytes or 0)
        self.stopping = anyio.Event()
        try:
            await journal.register_sinks(list(c.sinks), prune=True)
            self.runtime = SourceRuntime(journal, self.stopping, BudgetRegistry())
            self.sources = [self._build_source(name, cfg) for name, cfg in c.sources.items()]
            self.runners = [
                SinkRunner(build_sink(name, cfg), cfg, journal) for name, cfg in c.sinks.items()
            ]
            ops = OpsServer(c.metrics.listen, self.readiness, self.stats) \
                if c.metrics.enabled else None
            if ops is not None:
                try:
                    await ops.start()
                except OSError as exc:
                    raise StartupError(f"metrics.listen: cannot listen on {c.metrics.listen}:"
                                       f" {exc.strerror or exc}") from None
                self.metrics_port = ops.port
            try:
                await self._run_components(on_ready)
            finally:
                if ops is not None:
                    await ops.stop()
        finally:
            self.journal = None
            await journal.close()
            self.notifier.close()
        if self.fatal is not None:
            raise self.fatal
        log.info("relay stopped")

    async def _run_components(
        self, on_ready: Callable[[Relay], Awaitable[None] | None] | None
    ) -> None:
        assert self.stopping is not None
        assert self.runtime is not None
        stopping = self.stopping
        # The signal watcher outlives everything (a second signal must still be heard
        # while workers drain); workers (sources, sinks) outlive the control tasks.
        async with anyio.create_task_group() as outer:
            async with anyio.create_task_group() as workers:
                outer.start_soon(self._watch_signals, workers)
                async with anyio.create_task_group() as control:
                    control.start_soon(self._housekeeping)
                    if self.config.log.progress_interval > 0:
                        control.start_soon(self._progress, self.config.log.progress_interval)
                    watchdog = self.notifier.watchdog_interval()
                    if watchdog is not None:
                        control.start_soon(self._watchdog, watchdog)
                    self.cluster = Cluster(
                        self.journal_leases(), self._units(), ttl=self.config.cluster.lease_ttl,
                        tick=self._tick(), member=self.config.cluster.member)
                    workers.start_soon(self.cluster.run, workers, stopping, self._supervise)
                    log.info("relay started", sources=[s.name for s in self.sources],
                             sinks=[r.name for r in self.runners],
                             journal=self.config.journal.describe(),
                             metrics=f"{self.config.metrics.listen.rpartition(':')[0]}:"
                                     f"{self.metrics_port}" if self.metrics_port else "off")
                    self.notifier.ready(f"polling {len(self.sources)} source(s)")
                    if on_ready is not None:
                        result = on_ready(self)
                        if result is not None:
                            await result
                    await stopping.wait()
                    control.cancel_scope.cancel()
            outer.cancel_scope.cancel()

    def _tick(self) -> float:
        """How often leases are renewed: a fifth of their TTL, at most a second (the
        embedded journal's heartbeat is a file write: five times a second)."""
        if self.config.journal.type == "sqlite":
            return 0.2
        return min(1.0, self.config.cluster.lease_ttl / 5)

    def journal_leases(self) -> Leases:
        assert self.journal is not None
        return self.journal

    def _units(self) -> list[Unit]:
        """Every unit of work, each to be run under its own lease."""
        assert self.runtime is not None
        base = self.runtime
        units = []
        for source in self.sources:
            for key in source.units():
                name = f"source:{source.name}" + (f":{key}" if key else "")

                async def run_source(ctx: UnitContext, source: Source = source,
                                     key: str = key, name: str = name) -> None:
                    self._units_running[source.name] += 1
                    try:
                        await source.run(replace(
                            base, stopping=ctx.stopping, unit=key, fence=ctx.fence,
                            lease=ctx.lease, previous_end_ago=ctx.previous_end_ago,
                            health=UnitHealth(base.health, self._health_owners, name)))
                    finally:
                        self._units_running[source.name] -= 1
                        if not self._units_running[source.name]:
                            # Its gauges (last success, data age, ...) would go stale here
                            # while another relay runs it, and fire alerts for this one.
                            metrics.forget_source(source.name)

                units.append(Unit(name, run_source))
        for runner in self.runners:
            async def run_sink(ctx: UnitContext, runner: SinkRunner = runner) -> None:
                await runner.run(ctx.stopping, fence=ctx.fence)

            units.append(Unit(f"sink:{runner.name}", run_sink))
        return units

    def request_stop(self) -> None:
        if self.stopping is not None and not self.stopping.is_set():
            self.stopping.set()

    async def _watch_signals(self, workers: TaskGroup) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                if self.stopping is not None and self.stopping.is_set():
                    log.warning("second signal: exiting at once", signal=signum.name)
                    os._exit(128 + signum)
                log.info("stopping: finishing the batches in flight", signal=signum.name,
                         grace_seconds=self.config.shutdown_grace)
                self.notifier.stopping()
                self.request_stop()
                workers.cancel_scope.deadline = anyio.current_time() + self.config.shutdown_grace

    async def _supervise(self, what: str, start: Callable[[], Awaitable[None]]) -> None:
        """Keep a component running: a bug in one must not silently stop the relay."""
        assert self.stopping is not None
        while not self.stopping.is_set():
            try:
                await start()
                return
            except LeaseLostError as exc:
                # The unit moved to another relay: it ends here, the new holder goes on. What
                # it held unwritten is dropped (fenced); for RongCloud that batch is lost.
                log.warning("a write was refused: the unit moved to another relay",
                            component=what, error=str(exc))
                return
            except JournalError as exc:
                if exc.fatal:
                    self._fail(exc, what)
                    return
                log.exception("component failed on the journal; restarting it in 5 s",
                              component=what, error=str(exc))
            except Exception as exc:
                log.exception("component failed unexpectedly; restarting it in 5 s",
                              component=what, error=str(exc))
            with anyio.move_on_after(5):
                await self.stopping.wait()

    def _fail(self, exc: JournalError, what: str) -> None:
        """A fatal journal failure: stop everything (acknowledging nothing more), exit non-zero."""
        if self.fatal is None:
            self.fatal = exc
            log.critical("JOURNAL LOST: stopping without acknowledging anything more",
                         component=what, error=str(exc))
        self.request_stop()

    async def _housekeeping(self) -> None:
        assert self.journal is not None
        journal = self.journal
        c = self.config
        last_compact = time.monotonic()
        last_stats = 0.0
        while True:
            now = time.monotonic()
            try:
                # Also when idle: a deleted journal must be noticed before the next batch.
                await journal.check_intact()
                if now - last_compact >= c.journal.compact_interval:
                    last_compact = now
                    removed = await journal.compact(int(time.time() * 1000))
                    if removed:
                        metrics.JOURNAL_COMPACTED.inc(removed)
                        metrics.JOURNAL_EVENTS.dec(removed)
                        log.info("journal compacted", events=removed)
                if now - last_stats >= 30:
                    last_stats = now
                    stats = await journal.stats()
                    metrics.JOURNAL_EVENTS.set(stats.events)
                    metrics.JOURNAL_QUARANTINED.set(stats.quarantined)
                size = await journal.storage_bytes()
            except JournalError as exc:
                if exc.fatal:
                    self._fail(exc, "housekeeping")
                    return
                # E.g. the journal's database restarting: the next round tries again.
                log.warning("journal housekeeping failed; retrying", error=str(exc))
                await anyio.sleep(HOUSEKEEPING_INTERVAL)
                continue
            metrics.JOURNAL_BYTES.set(size)
            limit = c.journal.max_bytes
            if limit and size > limit and now - self._last_limit_warning > 300:
                self._last_limit_warning = now
                log.error(
                    "JOURNAL OVER ITS SIZE LIMIT: sinks are not keeping up; polling continues"
                    " (dropping data is never the default) until the disk is full",
                    size_bytes=size, limit_bytes=limit,
                )
            await anyio.sleep(HOUSEKEEPING_INTERVAL)

    async def _progress(self, interval: float) -> None:
        """One log line per interval: what came in per source, went out per sink, and lag."""
        before = self.stats()
        while True:
            await anyio.sleep(interval)
            now = self.stats()
            log.info("progress", interval_seconds=interval, **status.progress(now, before))
            before = now

    async def _watchdog(self, interval: float) -> None:
        """systemd's watchdog: pinged from its own task, so a long compaction never trips it.

        Each ping also proves the journal answers: a wedged journal thread stops them.
        """
        assert self.journal is not None
        while True:
            with anyio.move_on_after(interval * 1.5):
                # An error is an answer too: a database restart must not get the relay
                # killed (the journal's own retries handle it); only a wedged call does.
                with contextlib.suppress(JournalError):
                    await self.journal.get_cursors("\x00")
                self.notifier.watchdog()
            await anyio.sleep(interval)

