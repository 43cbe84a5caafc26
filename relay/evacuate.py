"""``relay evacuate``: a LeanCloud app's whole history out, verifiably, before the service ends.

LeanCloud stops all public services on 2027-01-12 and then destroys all data.
The evacuation is the normal relay (every configured source and sink, the
journal, the delivery guarantees) with one LeanCloud source switched to
evacuation mode:

1. **Drain.** The source tails ``GET /1.2/rtm/messages`` from the first message
   ever (``start = "earliest"``, unless the journal already has its cursor), within
   ``[sources.NAME.evacuation] requests_per_minute``, with the settle delay as usual.
   Each batch also writes the ledger (:mod:`relay.journal.base`) and the drain's
   figures in the same transaction, so a crash or stop at any instant resumes from
   the journal cursor and the figures stay exact. Live messages keep flowing: the
   drain simply catches up with now and goes on tailing.
2. **Conversations.** Every conversation and chatroom (``GET /1.2/rtm/conversations``
   and ``/1.2/rtm/chatrooms``, paged) goes to ``conversations.jsonl``.
3. **Verify.** Once the history is drained, each conversation's own history
   (``GET /1.2/rtm/{conversations,chatrooms}/{id}/messages``, paged, up to where the
   drain had read) is compared with the ledger; whatever is missing (a message that
   became visible after the tail went past it, say) is fetched and committed like
   any batch, so it reaches every sink. ``verify = "sample"`` checks a fixed share.
4. **Report.** ``report.json`` and ``report.txt``: conversations checked, matching,
   repaired, unverified, messages still missing (with ids) and quarantined records.

Then it keeps tailing, or with ``--exit-when-done`` waits for the tail to pass the
end of the check and for every sink to deliver, and exits (0 when complete, 1 when
something could not be verified).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import orjson

from relay.app import Relay
from relay.config import RelayConfig
from relay.journal import (
    Journal,
    JournalError,
    Ledger,
    LedgerBatch,
    LedgerEntry,
    open_journal,
)
from relay.logs import get_logger
from relay.private_files import make_private_dirs
from relay.progress import Display, Figures, RateMeter, init_metrics, publish
from relay.remote import display_url
from relay.sinks.file import FileSinkConfig
from relay.sources import Source, SourceRuntime, build_source
from relay.sources.base import normalize_batch
from relay.sources.leancloud import LeanCloudSource, LeanCloudSourceConfig, ledger_entries
from relay.sources.leancloud_api import CHATROOMS, CONVERSATIONS, ApiError, LeanCloudApi, sampled
from relay.sources.leancloud_records import cursor_of, normalize

log = get_logger("relay.evacuate")

DRAIN, VERIFY, DONE = "drain", "verify", "done"
ENDPOINT = "verify"  # the repairs' endpoint label in metrics and the quarantine
QUARANTINE_LISTED = 10_000  # quarantined records named in the report
MISSING_LISTED = 1_000  # conversations named with their missing ids
TICK = 1.0


class EvacuationError(Exception):
    """The evacuation cannot start as configured (exit status 2)."""


@dataclass(frozen=True)
class Paths:
    directory: Path
    conversations: Path
    report_json: Path
    report_text: Path
    archives: tuple[str, ...]  # the file sinks that receive this source's events


def prepare(config: RelayConfig, name: str) -> tuple[RelayConfig, Paths]:
    """The relay's configuration with ``name`` in evacuation mode, and where things go."""
    source = config.sources.get(name)
    if source is None:
        raise EvacuationError(f"--source: no source {name!r} in the configuration")
    if not isinstance(source, LeanCloudSourceConfig):
        raise EvacuationError(f"--source: {name!r} is a {source.type} source; only LeanCloud"
                              " sources are evacuated")
    settings = source.evacuation
    directory = Path(settings.directory) if settings.directory else \
        Path(config.journal.path).parent / "evacuation" / name
    sinks = dict(config.sinks)
    if not sinks:
        sinks["archive"] = FileSinkConfig(type="file", path=str(directory / "events.jsonl"),
                                          rotate_bytes=settings.archive_rotate_bytes)
    archives = tuple(str(Path(s.path).resolve()) for s in sinks.values()
                     if isinstance(s, FileSinkConfig)
                     and (not s.filter.sources or name in s.filter.sources))
    evacuating = source.model_copy(update={
        "start": "earliest", "requests_per_minute": settings.requests_per_minute})
    relay_config = config.model_copy(update={
        "sources": {**config.sources, name: evacuating}, "sinks": sinks})
    return relay_config, Paths(directory, directory / "conversations.jsonl",
                               directory / "report.json", directory / "report.txt", archives)


async def read_state(config: RelayConfig, name: str) -> dict[str, str]:
    """The evacuation's persisted state, read before the relay starts (the tracker needs it
    from the first batch on). Nothing yet when the journal does not exist."""
    try:
        journal = await open_journal(config.journal, mode="status")
    except JournalError:
        return {}
    try:
        return await journal.get_cursors(f"{name}:")
    finally:
        await journal.close()


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds") \
        .replace("+00:00", "Z")


def _parse_iso(text: Any) -> int | None:
    if not isinstance(text, str):
        return None
    try:
        return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)
    except ValueError:
        return None


def conversation_line(source: str, kind: str, row: dict[str, Any]) -> bytes:
    """One ``conversations.jsonl`` line: the useful fields, and the row as LeanCloud gave it."""
    members = row.get("m")
    return orjson.dumps({
        "schema": "im-relay.conversation/1", "source": source, "provider": "leancloud",
        "kind": kind, "id": row.get("objectId"), "name": row.get("name"),
        "members": members if isinstance(members, list) else [],
        "creator": row.get("c"), "attributes": row.get("attr"),
        "created_at": _parse_iso(row.get("createdAt")),
        "updated_at": _parse_iso(row.get("updatedAt")), "native": row}) + b"\n"


class Evacuation:
    """The tracker the source reports to, and the controller run beside the relay."""

    def __init__(self, name: str, source_config: LeanCloudSourceConfig, paths: Paths, *,
                 exit_when_done: bool, state: dict[str, str],
                 display: Display | None = None) -> None:
        self.name = name
        self.config = source_config
        self.settings = source_config.evacuation
        self.paths = paths
        self.exit_when_done = exit_when_done
        self.display = display or Display(self.settings.progress_interval)
        self.state_key = f"{name}:evacuation"
        self.drain_key = f"{name}:evacuation:drain"
        self.cursor_key = f"{name}:messages:cursor"
        now = int(time.time() * 1000)
        self.resumed_cursor = self.cursor_key in state
        self.drain: dict[str, Any] = orjson.loads(state[self.drain_key]) \
            if self.drain_key in state else {"started_at": now, "exported": 0,
                                             "quarantined": 0, "first_ts": None,
                                             "cursor_ts": None, "requests": 0}
        self.control: dict[str, Any] = orjson.loads(state[self.state_key]) \
            if self.state_key in state else {"phase": DRAIN, "started_at": now}
        self.exit_code: int | None = None
        self._proposal: dict[str, Any] | None = None
        self._read_till: int | None = None
        self._read_more = anyio.Event()
        self._ledger_journal: Ledger | None = None
        self._requests = int(self.drain.get("requests") or 0)
        self._drain_meter = RateMeter()
        self._verify_meter = RateMeter()
        self._budget: Any = None
        self._source: LeanCloudSource | None = None

    # -- the tracker (called by the source, on the relay's event loop) ----------

    def build_source(self, name: str, config: Any) -> Source:
        if name != self.name:
            return build_source(name, config)
        self._source = LeanCloudSource(name, config, tracker=self)
        return self._source

    def requested(self, outcome: str) -> None:
        self._count_request("history", outcome)

    def batch_cursors(self, entries: Any, cursor: tuple[int, str]) -> dict[str, str]:
        drain = dict(self.drain)
        drain["exported"] = int(drain["exported"]) + len(entries)
        drain["quarantined"] = int(drain["quarantined"]) + sum(1 for e in entries if e.error)
        if drain["first_ts"] is None and entries:
            drain["first_ts"] = min(e.timestamp for e in entries)
        drain["cursor_ts"] = cursor[0]
        drain["requests"] = self._requests
        self._proposal = drain
        return {self.drain_key: orjson.dumps(drain).decode()}

    def committed(self, entries: Any, cursor: tuple[int, str]) -> None:
        if self._proposal is not None:
            self.drain = self._proposal
            self._proposal = None

    def read_up_to(self, till: int) -> None:
        if self._read_till is None or till > self._read_till:
            self._read_till = till
            self._read_more.set()
            self._read_more = anyio.Event()

    async def _read_through(self, ms: int) -> None:
        """Until the tail has read everything visible up to ``ms``."""
        while self._read_till is None or self._read_till < ms:
            await self._read_more.wait()

    def _count_request(self, purpose: str, outcome: str) -> None:
        from relay import metrics

        self._requests += 1
        kind = outcome if outcome in ("ok", "throttled") else \
            "ok" if outcome == "empty" else "error"
        metrics.EVACUATION_REQUESTS.labels(self.name, purpose, kind).inc()

    # -- figures ------------------------------------------------------------------

    @property
    def phase(self) -> str:
        return str(self.control.get("phase", DRAIN))

    def figures(self) -> Figures:
        now = int(time.time() * 1000)
        verify = self.control.get("verify") or {}
        f = Figures(
            source=self.name, phase=self.phase,
            exported=int(self.drain["exported"]) + int(verify.get("repaired_messages", 0)),
            quarantined=int(self.drain["quarantined"]), first_ts=self.drain.get("first_ts"),
            cursor_ts=self.drain.get("cursor_ts"), now_ms=now, requests=self._requests,
            requests_last_minute=self._budget.in_window() if self._budget else 0,
            budget_per_minute=self.settings.requests_per_minute,
            rate=self._drain_meter.rate(),
            verify_total=int(verify.get("total", 0)), verify_checked=int(verify.get("next", 0)),
            matching=int(verify.get("matching", 0)), repaired=int(verify.get("repaired", 0)),
            repaired_messages=int(verify.get("repaired_messages", 0)),
            unverified=len(verify.get("unverified", [])))
        if f.phase == DRAIN:
            f.eta_seconds = self._drain_meter.eta(
                f.cursor_ts, now - int(self.config.settle_delay * 1000))
        elif f.phase == VERIFY:
            rate = self._verify_meter.rate()
            f.eta_seconds = (f.verify_total - f.verify_checked) / rate if rate else None
        return f

    def _state_json(self, figures: Figures | None = None) -> str:
        self.control["figures"] = (figures or self.figures()).to_json()
        return orjson.dumps(self.control).decode()

    async def _persist(self, journal: Journal) -> None:
        await journal.set_cursors({self.state_key: self._state_json()})

    async def _ticker(self, journal: Journal) -> None:
        """Figures to the display and metrics every second; to the journal every few."""
        last_saved = 0.0
        while True:
            if self.drain.get("cursor_ts") is not None:  # the pace of history needs a cursor
                self._drain_meter.add(int(self.drain["exported"]), self.drain["cursor_ts"])
            if self.phase == VERIFY:
                verify = self.control.get("verify") or {}
                self._verify_meter.add(int(verify.get("next", 0)), None)
            figures = self.figures()
            publish(figures)
            self.display.update(figures)
            if time.monotonic() - last_saved >= 5:
                last_saved = time.monotonic()
                try:
                    await journal.set_cursors({self.state_key: self._state_json(figures)})
                except JournalError as exc:  # figures only: the next tick tries again
                    log.warning("could not save the evacuation's figures", error=str(exc))
            await anyio.sleep(TICK)

    # -- the controller -----------------------------------------------------------

    async def control_relay(self, relay: Relay) -> None:
        """Run beside the relay (its ``on_ready``); returns when done or stopping."""
        assert relay.journal is not None
        assert relay.runtime is not None
        assert relay.stopping is not None
        if self._source is None:
            raise EvacuationError(f"source {self.name} was not built for the evacuation")
        runtime = relay.runtime
        self._budget = self._source.budget(runtime)
        init_metrics(self.name)
        stopping = relay.stopping
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(self._ticker, relay.journal)

                async def stop_watch() -> None:
                    await stopping.wait()
                    tasks.cancel_scope.cancel()

                tasks.start_soon(stop_watch)
                await self._run(relay, runtime)
                tasks.cancel_scope.cancel()
        except (ApiError, EvacuationError, JournalError) as exc:
            log.error("evacuation stopped", source=self.name, error=str(exc))
            self.display.message(f"evacuation {self.name}: stopped: {exc}")
            self.exit_code = 1
            relay.request_stop()
        finally:
            self.display.update(self.figures(), force=True)
            self.display.close()

    def _journal(self, relay: Relay) -> Journal:
        """The relay's whole journal (the source's own view of it has no ledger reads)."""
        assert relay.journal is not None
        self._ledger_journal = relay.journal
        return relay.journal

    @property
    def _ledger(self) -> Ledger:
        assert self._ledger_journal is not None
        return self._ledger_journal

    async def _run(self, relay: Relay, runtime: SourceRuntime) -> None:
        journal = self._journal(relay)
        say = self.display.message
        if self.paths.archives:
            say(f"evacuation {self.name}: archive {', '.join(self.paths.archives)}")
        say(f"evacuation {self.name}: conversations, report → {self.paths.directory}")
        if self.resumed_cursor and not self.drain.get("exported"):
            say(f"evacuation {self.name}: the journal already has this source's cursor; the"
                " drain resumes there and the check fetches anything older")
        make_private_dirs(self.paths.directory)  # conversations hold member ids: owner-only
        assert self._source is not None
        async with self._source.api(runtime, self._count_request) as api:
            if not (self.control.get("metadata") or {}).get("file"):
                try:
                    self.control["metadata"] = await self._export_conversations(api)
                except ApiError as exc:
                    # The drain goes on; the check covers the conversations the history
                    # names, and the report says the list is missing. A restart retries.
                    self.control["metadata"] = {"conversations": 0, "chatrooms": 0,
                                                "error": str(exc)[:300]}
                    log.error("conversation lists could not be exported", source=self.name,
                              error=str(exc))
                    say(f"evacuation {self.name}: conversation lists not exported: {exc}")
                else:
                    await self._persist(journal)
                    meta = self.control["metadata"]
                    say(f"evacuation {self.name}: {meta['conversations']:,} conversations and"
                        f" {meta['chatrooms']:,} chatrooms → {self.paths.conversations}")
            if self.phase == DRAIN:
                await self._read_through(0)
                self.control.update(phase=VERIFY, bound_ms=self._read_till,
                                    drained_at=int(time.time() * 1000))
                await self._persist(journal)
                say(f"evacuation {self.name}: history drained up to"
                    f" {_iso(self._read_till)} ({int(self.drain['exported']):,} messages);"
                    " checking every conversation")
            if self.phase == VERIFY:
                await self._verify(api, runtime)
                report = await self._report(journal)
                self.control.update(phase=DONE, finished_at=int(time.time() * 1000),
                                    complete=report["complete"])
                await self._persist(journal)
                say(self.summary(report))
        if self.exit_when_done:
            await self._finish(relay, journal)
        else:
            await anyio.sleep_forever()  # tailing on, with its figures, until stopped

    async def _export_conversations(self, api: LeanCloudApi) -> dict[str, Any]:
        partial_file = self.paths.conversations.with_name(
            self.paths.conversations.name + ".partial")
        counts = {"conversations": 0, "chatrooms": 0}
        fd = os.open(partial_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            for path, kind, key in ((CONVERSATIONS, "conversation", "conversations"),
                                    (CHATROOMS, "chatroom", "chatrooms")):
                async for page in api.list_rows(path):
                    out.writelines(conversation_line(self.name, kind, row) for row in page)
                    counts[key] += len(page)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial_file, self.paths.conversations)
        return {**counts, "file": str(self.paths.conversations)}

    def _conversations(self, tallies: dict[str, Any]) -> list[tuple[str, bool]]:
        """Every conversation to check: listed ones, and any the history named."""
        rooms: dict[str, bool] = {}
        if self.paths.conversations.exists():
            with self.paths.conversations.open("rb") as f:
                for line in f:
                    row = orjson.loads(line)
                    if isinstance(row.get("id"), str):
                        rooms[row["id"]] = row.get("kind") == "chatroom"
        for conv in tallies:
            rooms.setdefault(conv, False)
        return sorted(rooms.items())

    async def _verify(self, api: LeanCloudApi, runtime: SourceRuntime) -> None:
        journal = self._ledger
        bound = int(self.control["bound_ms"])
        tallies = await journal.ledger_tallies(self.name, bound)
        every = self._conversations(tallies)
        ratio = self.settings.sample_ratio if self.settings.verify == "sample" else 1.0
        chosen = [(c, room) for c, room in every if sampled(c, ratio)]
        verify = self.control.setdefault("verify", {
            "mode": self.settings.verify, "sample_ratio": ratio, "total": len(chosen),
            "next": 0, "matching": 0, "repaired": 0, "repaired_messages": 0, "extra": 0,
            "unverified": [], "missing": [], "conversations_known": len(every)})
        if not verify["next"]:
            messages = sum(tallies[c].count for c, _ in chosen if c in tallies)
            cost = len(chosen) + messages // 1000
            self.display.message(
                f"evacuation {self.name}: checking {len(chosen):,} of {len(every):,}"
                f" conversations ({verify['mode']}): about {cost:,} requests,"
                f" {cost / self.settings.requests_per_minute:,.1f} minutes at the budget")
        width = self.settings.verify_concurrency
        while verify["next"] < len(chosen):
            window = chosen[verify["next"]:verify["next"] + width]
            # Repairs commit the state (with this) in their own transaction: after a crash
            # the window is checked again and its repaired conversations still count so.
            earlier = verify.get("current") or {}
            verify["current"] = {c: int(earlier.get(c, 0)) for c, _ in window}
            outcomes: dict[str, tuple[str, Any]] = {}
            async with anyio.create_task_group() as checks:
                for conv, room in window:
                    checks.start_soon(self._check_into, outcomes, api, runtime, conv, room,
                                      bound, tallies.get(conv), verify)
            # The window's outcomes and the move past it: one state, saved together.
            for conv, _ in window:
                kind, detail = outcomes[conv]
                if kind == "unverified":
                    verify["unverified"].append({"conversation": conv, "error": detail})
                else:
                    verify[kind] += 1
                    verify["extra"] += detail
            verify["current"] = None
            verify["next"] += len(window)

    async def _check_into(self, outcomes: dict[str, tuple[str, Any]], api: LeanCloudApi,
                          runtime: SourceRuntime, conv: str, room: bool, bound: int,
                          tally: Any, verify: dict[str, Any]) -> None:
        outcomes[conv] = await self._verify_one(api, runtime, conv, room, bound, tally, verify)

    async def _verify_one(self, api: LeanCloudApi, runtime: SourceRuntime, conv: str,
                          room: bool, bound: int, tally: Any,
                          verify: dict[str, Any]) -> tuple[str, Any]:
        """One conversation's history against the ledger, repairing what is missing.

        Returns (``matching``, messages kept but gone from LeanCloud), (``repaired``, 0),
        (``missing``, msg-ids that could not be journaled) or (``unverified``, error).
        """
        served = 0
        try:
            async for page in api.conversation_history(conv, room=room, before_ms=bound):
                served += len(page)
                keyed = [(cursor_of(r), r) for r in page]
                absent = set(await self._ledger.ledger_missing(
                    self.name, [k for k, _ in keyed if k is not None]))
                records = [r for k, r in keyed if k is not None and k in absent]
                if records:
                    # Journaled like any batch (retried while the journal cannot take it).
                    await self._repair(runtime, conv, records, verify)
        except ApiError as exc:
            log.error("conversation could not be checked", source=self.name,
                      conversation=conv, error=str(exc))
            return "unverified", str(exc)[:300]
        if verify["current"][conv]:
            return "repaired", 0
        extra = tally.count - served if tally is not None and tally.count > served else 0
        return "matching", extra  # extra: gone from LeanCloud since the drain; kept

    async def _repair(self, runtime: SourceRuntime, conv: str, records: list[Any],
                      verify: dict[str, Any]) -> None:
        """Journal what the check found missing, like any batch: it reaches every sink."""
        fetched_at = int(time.time() * 1000)
        events, quarantine = normalize_batch(
            self.name, ENDPOINT, records,
            partial(normalize, source=self.name, fetched_at=fetched_at))
        entries = ledger_entries(self.name, records, events, quarantine)
        verify["repaired_messages"] += len(records)
        verify["current"][conv] += len(records)
        await runtime.commit(self.name, ENDPOINT, events, quarantine=quarantine,
                             ledger=LedgerBatch(self.name, entries),
                             cursors={self.state_key: self._state_json()})
        log.info("missing messages fetched", source=self.name, count=len(records),
                 conversation=conv)

    async def _report(self, journal: Journal) -> dict[str, Any]:
        verify = self.control.get("verify") or {}
        quarantined: list[LedgerEntry] = await journal.ledger_quarantined(
            self.name, QUARANTINE_LISTED)
        meta = self.control.get("metadata") or {}
        missing = verify.get("missing", [])
        report = {
            "schema": "im-relay.evacuation-report/1", "source": self.name,
            "app_id": self.config.app_id, "base_url": display_url(self.config.base_url),
            "started_at": _iso(self.control.get("started_at")),
            "drained_at": _iso(self.control.get("drained_at")),
            "finished_at": _iso(int(time.time() * 1000)),
            "history": {"first_message_at": _iso(self.drain.get("first_ts")),
                        "read_up_to": _iso(self.drain.get("cursor_ts")),
                        "checked_before": _iso(self.control.get("bound_ms"))},
            "exported_messages": int(self.drain["exported"]) + verify.get("repaired_messages", 0),
            "exported_by_the_drain": int(self.drain["exported"]),
            "requests": self._requests,
            "budget_per_minute": self.settings.requests_per_minute,
            "archive": {"events": list(self.paths.archives),
                        "conversations": str(self.paths.conversations),
                        "conversations_count": meta.get("conversations", 0),
                        "chatrooms_count": meta.get("chatrooms", 0)},
            "verification": {
                "mode": verify.get("mode"), "sample_ratio": verify.get("sample_ratio"),
                "conversations_known": verify.get("conversations_known", 0),
                "conversations_checked": verify.get("next", 0),
                "matching": verify.get("matching", 0), "repaired": verify.get("repaired", 0),
                "repaired_messages": verify.get("repaired_messages", 0),
                "unverified": verify.get("unverified", []),
                "still_missing_messages": sum(len(m["msg_ids"]) for m in missing),
                "still_missing": missing[:MISSING_LISTED],
                "kept_but_gone_from_leancloud": verify.get("extra", 0)},
            "quarantined_count": int(self.drain.get("quarantined", 0)),
            "quarantined": [{"conversation": q.conversation, "timestamp": q.timestamp,
                             "msg_id": q.msg_id, "error": q.error} for q in quarantined],
            "conversations_error": meta.get("error"),
            "complete": not missing and not verify.get("unverified") and not meta.get("error"),
        }
        _write_private(self.paths.report_json, orjson.dumps(report, option=orjson.OPT_INDENT_2))
        _write_private(self.paths.report_text, self.summary(report).encode() + b"\n")
        return report

    def summary(self, report: dict[str, Any]) -> str:
        v = report["verification"]
        lines = [
            f"evacuation {report['source']}: {'COMPLETE' if report['complete'] else 'INCOMPLETE'}",
            f"  messages exported     {report['exported_messages']:,}"
            f" (history {report['history']['first_message_at']} →"
            f" {report['history']['read_up_to']})",
            f"  requests              {report['requests']:,}"
            f" (budget {report['budget_per_minute']:,}/min)",
            f"  conversations checked {v['conversations_checked']:,} of"
            f" {v['conversations_known']:,} ({v['mode']})",
            f"    matching            {v['matching']:,}",
            f"    repaired            {v['repaired']:,} ({v['repaired_messages']:,} messages"
            " fetched and journaled)",
            f"    unverified          {len(v['unverified']):,}",
            f"  still missing         {v['still_missing_messages']:,} messages",
            f"  quarantined           {report['quarantined_count']:,} records",
        ]
        lines += [f"    {q['conversation']} {q['msg_id']} at {q['timestamp']}: {q['error']}"
                  for q in report["quarantined"][:20]]
        lines += [f"    unverified {u['conversation']}: {u['error']}" for u in v["unverified"][:20]]
        lines += [f"    missing in {m['conversation']}: {', '.join(m['msg_ids'][:10])}"
                  for m in v["still_missing"][:20]]
        if report.get("conversations_error"):
            lines.append(f"  conversation lists    NOT EXPORTED: {report['conversations_error']}")
        lines += [f"  archive               {', '.join(report['archive']['events']) or '-'}",
                  f"  conversations         {report['archive']['conversations']}",
                  f"  report                {self.paths.report_json}"]
        return "\n".join(lines)

    async def _finish(self, relay: Relay, journal: Journal) -> None:
        """--exit-when-done: the tail past the end of the check, every sink delivered, exit."""
        finished = int(self.control.get("finished_at") or time.time() * 1000)
        await self._read_through(finished)
        target = await journal.max_seq()
        for sink in relay.config.sinks:
            # Sinks move their cursors in the journal; nothing to wait on but the cursor.
            while await journal.sink_cursor(sink) < target:  # noqa: ASYNC110
                await anyio.sleep(0.2)
        self.exit_code = 0 if self.control.get("complete") else 1
        self.display.message(f"evacuation {self.name}: every sink has delivered; exiting")
        relay.request_stop()


def _write_private(path: Path, data: bytes) -> None:
    partial_file = path.with_name(path.name + ".partial")
    fd = os.open(partial_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(partial_file, path)


def run_evacuation(config: RelayConfig, name: str, *, exit_when_done: bool,
                   on_ready: Callable[[Relay], Any] | None = None) -> int:
    """Run the relay with ``name`` evacuating; returns the exit status."""
    relay_config, paths = prepare(config, name)
    source_config = relay_config.sources[name]
    assert isinstance(source_config, LeanCloudSourceConfig)

    async def main() -> int:
        state = await read_state(relay_config, name)
        evacuation = Evacuation(name, source_config, paths, exit_when_done=exit_when_done,
                                state=state)
        relay = Relay(relay_config, source_factory=evacuation.build_source)

        async def ready(r: Relay) -> None:
            if on_ready is not None:
                on_ready(r)
            await evacuation.control_relay(r)

        await relay.run(ready)
        return evacuation.exit_code if evacuation.exit_code is not None else 0

    return anyio.run(main)
