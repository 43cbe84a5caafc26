"""One journal conformance suite, run against both backends through ``open_journal``.

SQLite on a real file in a temporary folder; PostgreSQL on the suite's real server
(a fresh database per test). Backend-specific behaviour (SQLite's single-writer lock
and file permissions, PostgreSQL's commit order across processes and outages) is at
the end, marked by the backend it needs.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import asyncpg
import pytest

from relay import metrics
from relay.config import JournalConfig
from relay.journal import (
    ConversationTally,
    Fence,
    Journal,
    JournalError,
    JournalGoneError,
    JournalLockedError,
    JournalSchemaError,
    LeaseLostError,
    LedgerBatch,
    LedgerEntry,
    NewEvent,
    OpenMode,
    QuarantinedRecord,
    StoredEvent,
    open_journal,
)
from relay.journal import postgres as pg_backend
from relay.journal import sqlite as sqlite_backend
from tests.support.postgres import PostgresServer

pytestmark = pytest.mark.anyio

HOUR_MS = 3_600_000
ROUTING = b'["rc","rongcloud","message","direct","","x"]'


def new_event(native: str, *, fetched_at: int | None = None, sender: str = "u1",
              recipient: str = "u2") -> NewEvent:
    now = fetched_at if fetched_at is not None else int(time.time() * 1000)
    payload = (b'{"id":"rc:%s","sender":"%s","recipient":"%s"}'
               % (native.encode(), sender.encode(), recipient.encode()))
    return NewEvent(f"rc:{native}", now, ROUTING, payload, now)


@dataclass
class Backend:
    """One journal's storage, opened as often as a test likes."""

    kind: str
    config: JournalConfig
    tmp_path: Path
    server: PostgresServer | None = None

    async def open(self, mode: OpenMode = "writer", **settings: Any) -> Journal:
        config = self.config.model_copy(update=settings) if settings else self.config
        return await open_journal(config, mode=mode)

    @asynccontextmanager
    async def journal(self, mode: OpenMode = "writer", **settings: Any) -> AsyncIterator[Journal]:
        journal = await self.open(mode, **settings)
        try:
            yield journal
        finally:
            await journal.close()


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        return Backend("sqlite", JournalConfig(path=str(tmp_path / "j.db")), tmp_path)
    dsn = request.getfixturevalue("postgres_dsn")
    server = request.getfixturevalue("postgres_server")
    return Backend("postgres", JournalConfig(type="postgres", dsn=dsn), tmp_path, server)


@pytest.fixture(autouse=True)
def _no_polling_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """A PostgreSQL waiter without notifications polls every POLL_INTERVAL: made long
    here, so that a fast wake-up can only come from a notification."""
    monkeypatch.setattr(pg_backend, "POLL_INTERVAL", 30.0)


@pytest.fixture
def postgres(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    dsn = request.getfixturevalue("postgres_dsn")
    server = request.getfixturevalue("postgres_server")
    return Backend("postgres", JournalConfig(type="postgres", dsn=dsn), tmp_path, server)


async def eventually(condition: Callable[[], Awaitable[Any]], timeout: float,
                     message: str) -> Any:
    """Poll an async condition until it is truthy; fail after ``timeout`` seconds."""
    deadline = anyio.current_time() + timeout
    while True:
        value = await condition()
        if value:
            return value
        if anyio.current_time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        await anyio.sleep(0.05)


def ids(rows: list[StoredEvent]) -> list[str]:
    return [r.id for r in rows]


# -- commits and deduplication ---------------------------------------------------


async def test_batch_inserts_new_events_and_drops_known_ids(backend: Backend) -> None:
    async with backend.journal() as journal:
        first = await journal.commit_batch([new_event("a"), new_event("b"), new_event("a")],
                                           cursors={"rc:person:last_poll_ms": "1"})
        assert (first.new, first.duplicates) == (2, 1)
        second = await journal.commit_batch([new_event("b"), new_event("c")])
        assert (second.new, second.duplicates) == (1, 1)
        rows = await journal.read(0, 10)
        assert ids(rows) == ["rc:a", "rc:b", "rc:c"]
        assert [r.seq for r in rows] == sorted({r.seq for r in rows})
        assert second.last_seq == rows[-1].seq == await journal.max_seq()
        assert await journal.get_cursors("rc:") == {"rc:person:last_poll_ms": "1"}
        assert await journal.get_cursors("other:") == {}
        assert rows[0].payload == new_event("a").payload
        assert rows[0].routing().provider == "rongcloud"


async def test_an_id_is_dropped_within_the_dedup_window_and_new_after_it(
        backend: Backend) -> None:
    now = int(time.time() * 1000)
    async with backend.journal(dedup_window=3 * 3600.0, retain=3 * 3600.0) as journal:
        await journal.commit_batch([new_event("old", fetched_at=now - 4 * HOUR_MS),
                                    new_event("recent", fetched_at=now - 2 * HOUR_MS)])
        again = await journal.commit_batch([new_event("old", fetched_at=now),
                                            new_event("recent", fetched_at=now)])
        assert (again.new, again.duplicates) == (1, 1)
        rows = await journal.read(0, 10)
        # Accepted as new: at a new seq, after everything before it, with the new copy.
        assert ids(rows) == ["rc:recent", "rc:old"]
        assert rows[-1].fetched_at == now
        assert rows[-1].seq == again.last_seq
        # And now it is recent again: dropped.
        assert (await journal.commit_batch([new_event("old", fetched_at=now)])).duplicates == 1


async def test_the_default_window_is_a_day(backend: Backend) -> None:
    now = int(time.time() * 1000)
    async with backend.journal() as journal:
        await journal.commit_batch([new_event("a", fetched_at=now - 23 * HOUR_MS),
                                    new_event("b", fetched_at=now - 25 * HOUR_MS)])
        result = await journal.commit_batch([new_event("a"), new_event("b")])
        assert (result.new, result.duplicates) == (1, 1)


async def test_a_failed_commit_leaves_neither_events_nor_cursors(backend: Backend) -> None:
    async with backend.journal() as journal:
        await journal.commit_batch([new_event("a")], cursors={"rc:c": "1"})
        broken = NewEvent("rc:b", 1, ROUTING, None, 1)  # type: ignore[arg-type]
        with pytest.raises(JournalError):
            await journal.commit_batch([new_event("c"), broken], cursors={"rc:c": "2"},
                                       quarantine=[QuarantinedRecord("rc", "p", "bad", b"{")])
        assert ids(await journal.read(0, 10)) == ["rc:a"]
        assert await journal.get_cursors("rc:") == {"rc:c": "1"}
        assert (await journal.stats()).quarantined == 0
        # And the journal goes on.
        assert (await journal.commit_batch([new_event("c")])).new == 1


async def test_everything_survives_reopen(backend: Backend) -> None:
    async with backend.journal() as journal:
        await journal.commit_batch([new_event("a")], cursors={"k": "v"},
                                   quarantine=[QuarantinedRecord("rc", "person", "bad", b"{")])
        await journal.set_cursors({"rc:poll_ms": "5"})
        await journal.register_sinks(["file"], prune=True)
        await journal.advance_sink("file", 1)
    async with backend.journal() as journal:
        stats = await journal.stats()
        assert (stats.events, stats.quarantined, stats.max_seq) == (1, 1, 1)
        assert stats.cursors == {"k": "v", "rc:poll_ms": "5"}
        assert await journal.sink_cursor("file") == 1
        assert (await journal.commit_batch([new_event("a")])).duplicates == 1
        assert await journal.max_seq() == 1


async def test_hostile_text_commits(backend: Backend) -> None:
    """A NUL in an id, a cursor or an error (PostgreSQL text cannot hold one)."""
    async with backend.journal() as journal:
        result = await journal.commit_batch(
            [new_event("nul\x00id"), new_event("plain")], cursors={"rc:k": "v\x00"},
            quarantine=[QuarantinedRecord("rc", "p", "error \x00 text", b"\x00raw")])
        assert result.new == 2
        assert len(await journal.read(0, 10)) == 2
        assert (await journal.commit_batch([new_event("nul\x00id")])).duplicates == 1


# -- sink cursors -------------------------------------------------------------------


async def test_sink_cursors_only_advance_and_rewind_only_goes_back(backend: Backend) -> None:
    async with backend.journal() as journal:
        await journal.commit_batch(
            [new_event(n, fetched_at=t) for n, t in (("a", 1000), ("b", 2000), ("c", 3000))])
        await journal.register_sinks(["s", "t"], prune=True)
        assert await journal.sink_cursor("s") == 0
        await journal.advance_sink("s", 3)
        await journal.advance_sink("s", 1)  # late, out of order: ignored
        assert await journal.sink_cursor("s") == 3
        assert await journal.rewind_sink("s", 2000) == 1
        assert ids(await journal.read(await journal.sink_cursor("s"), 10)) == ["rc:b", "rc:c"]
        # t is at 0: a rewind to later than its position must not move it forward.
        assert await journal.rewind_sink("t", 3000) == 0
        # Nothing fetched since: the rewind point is the end, still never forward.
        assert await journal.rewind_sink("s", 9_999_999_999_999) == 1
        await journal.register_sinks(["s"], prune=True)
        assert [s.sink for s in (await journal.stats()).sinks] == ["s"]
        await journal.register_sinks(["s", "u"], prune=False)
        assert await journal.sink_cursor("s") == 1  # registering again keeps the cursor


async def test_an_event_id_is_found_at_its_seq_and_only_as_that_copy(backend: Backend) -> None:
    """What a sink that knows only its last event id (a file) resumes from."""
    now = int(time.time() * 1000)
    async with backend.journal(dedup_window=3 * 3600.0, retain=3 * 3600.0) as journal:
        await journal.commit_batch([new_event("a", fetched_at=now - 4 * HOUR_MS),
                                    new_event("b", fetched_at=now)])
        rows = {r.id: r for r in await journal.read(0, 10)}
        assert await journal.event_seq("rc:b") == rows["rc:b"].seq
        assert await journal.event_seq("rc:b", rows["rc:b"].fetched_at) == rows["rc:b"].seq
        assert await journal.event_seq("rc:nul\x00") is None  # PostgreSQL text cannot hold NUL
        assert await journal.event_seq("rc:never") is None
        # Accepted again after the dedup window: the old copy's fetched_at no longer matches.
        old = rows["rc:a"]
        await journal.commit_batch([new_event("a", fetched_at=now)])
        assert await journal.event_seq("rc:a", old.fetched_at) is None
        assert (await journal.event_seq("rc:a", now) or 0) > rows["rc:b"].seq
        # Erased (as compaction would): gone.
        await journal.erase_user("u1")
        assert await journal.event_seq("rc:b") is None
        identity = await journal.journal_id()
        assert identity != 0
    async with backend.journal() as journal:
        assert await journal.journal_id() == identity, "an identity lasts the journal's life"


# -- dead letters and control requests ---------------------------------------------


async def test_dead_letters_list_replay_settle_and_purge(backend: Backend) -> None:
    async with backend.journal() as journal:
        await journal.commit_batch([new_event(n) for n in "abcd"])
        rows = await journal.read(0, 10)
        await journal.add_dead_letters("hook", rows[:3], "HTTP 422", attempts=1)
        await journal.add_dead_letters("kafka", rows[3:], "too large", attempts=2)
        letters = await journal.dead_letters(None, 10)
        assert [(d.sink, d.event_id, d.error) for d in letters] == [
            ("hook", "rc:a", "HTTP 422"), ("hook", "rc:b", "HTTP 422"),
            ("hook", "rc:c", "HTTP 422"), ("kafka", "rc:d", "too large")]
        assert [d.event_id for d in await journal.dead_letters("kafka", 10)] == ["rc:d"]
        one = await journal.dead_letters(None, 1, dlid=letters[1].dlid)
        assert [d.event_id for d in one] == ["rc:b"]
        assert one[0].payload == rows[1].payload

        assert await journal.request_dead_letter_replay(None, [letters[0].dlid]) == 1
        assert await journal.request_dead_letter_replay("hook", []) == 3
        marked = await journal.dead_letters_to_replay("hook", 10)
        assert [e.id for _, e in marked] == ["rc:a", "rc:b", "rc:c"]
        assert marked[0][1] == rows[0]
        assert await journal.dead_letters_to_replay("kafka", 10) == []

        await journal.settle_dead_letters([marked[0][0], marked[1][0]],
                                          [(marked[2][0], "still 422")])
        left = await journal.dead_letters("hook", 10)
        assert [(d.event_id, d.attempts, d.error, d.replay) for d in left] == [
            ("rc:c", 2, "still 422", False)]
        assert await journal.remove_dead_letters([]) == 0
        assert await journal.remove_dead_letters([], sink="kafka") == 1
        assert await journal.remove_dead_letters([left[0].dlid]) == 1
        await journal.add_dead_letters("hook", rows, "x", attempts=1)
        assert await journal.remove_dead_letters([], everything=True) == 4
        assert (await journal.stats()).dead_letters == 0


async def test_control_requests_are_taken_once_in_order(backend: Backend) -> None:
    async with backend.journal() as journal:
        await journal.request_control("s", "replay", "1000")
        await journal.request_control("t", "replay", "5")
        await journal.request_control("s", "replay", "2000")
        assert await journal.take_control("s") == [("replay", "1000"), ("replay", "2000")]
        assert await journal.take_control("s") == []
        assert await journal.take_control("t") == [("replay", "5")]


async def test_admin_opener_works_beside_the_writer(backend: Backend) -> None:
    async with backend.journal() as writer:
        await writer.commit_batch([new_event("a")])
        await writer.register_sinks(["s"], prune=True)
        async with backend.journal("admin") as admin:
            await admin.request_control("s", "replay", "0")
            assert await admin.count_since(0) == 1
        assert await writer.take_control("s") == [("replay", "0")]
        async with backend.journal("status") as status:
            stats = await status.stats()
            assert (stats.events, stats.max_seq) == (1, 1)
            assert [s.pending for s in stats.sinks] == [1]


# -- compaction, erasure, stats ---------------------------------------------------


async def test_compaction_keeps_undelivered_and_recent_events(backend: Backend) -> None:
    old = int(time.time() * 1000) - 4 * HOUR_MS
    async with backend.journal(retain=3 * 3600.0, dedup_window=3 * 3600.0) as journal:
        await journal.register_sinks(["a", "b"], prune=True)
        await journal.commit_batch([new_event(f"old{i}", fetched_at=old) for i in range(4)])
        await journal.commit_batch([new_event("fresh")])
        await journal.advance_sink("a", 5)
        await journal.advance_sink("b", 2)  # b has delivered only the first two
        assert await journal.compact(int(time.time() * 1000)) == 2
        assert ids(await journal.read(0, 10)) == ["rc:old2", "rc:old3", "rc:fresh"]
        await journal.advance_sink("b", 5)
        assert await journal.compact(int(time.time() * 1000)) == 2  # fresh stays: retention
        assert ids(await journal.read(0, 10)) == ["rc:fresh"]
        assert await journal.count_since(0) == 1
        assert await journal.count_since(0, through_seq=4) == 0


async def test_erase_removes_a_users_events_everywhere(backend: Backend) -> None:
    async with backend.journal() as journal:
        await journal.commit_batch(
            [new_event("a", sender="alice"), new_event("b", recipient="alice"),
             new_event("c", sender="bob", recipient="carol"),
             new_event("d", sender="alicea")],  # a different user sharing a prefix
            quarantine=[QuarantinedRecord("rc", "p", "bad", b'{"fromUserId":"alice"'),
                        QuarantinedRecord("rc", "p", "bad", b'{"fromUserId":"bob"')])
        rows = await journal.read(0, 10)
        await journal.add_dead_letters("hook", rows[:1] + rows[2:3], "422", attempts=1)
        top = await journal.max_seq()
        assert await journal.erase_user("alice", dry_run=True) == {
            "events": 2, "dead_letters": 1, "quarantine": 1}
        assert len(await journal.read(0, 10)) == 4
        assert await journal.erase_user("alice") == {
            "events": 2, "dead_letters": 1, "quarantine": 1}
        assert ids(await journal.read(0, 10)) == ["rc:c", "rc:d"]
        assert [d.event_id for d in await journal.dead_letters(None, 10)] == ["rc:c"]
        assert (await journal.stats()).quarantined == 1
        assert await journal.max_seq() == top  # seqs are never reused


async def test_seqs_continue_after_a_reopen_once_the_newest_rows_are_gone(
        backend: Backend) -> None:
    """A sink's cursor names a seq: a seq handed out again would make it skip the event."""
    old = int(time.time() * 1000) - 4 * HOUR_MS
    async with backend.journal(retain=3 * 3600.0, dedup_window=3 * 3600.0) as journal:
        await journal.register_sinks(["file"], prune=True)
        await journal.commit_batch([new_event(f"old{i}", fetched_at=old) for i in range(3)])
        await journal.advance_sink("file", 3)
        assert await journal.compact(int(time.time() * 1000)) == 3  # every row is gone
    async with backend.journal(retain=3 * 3600.0, dedup_window=3 * 3600.0) as journal:
        assert await journal.max_seq() == 3
        await journal.commit_batch([new_event("a", sender="bob"), new_event("b", sender="eve")])
        assert [r.seq for r in await journal.read(3, 10)] == [4, 5]
        await journal.erase_user("eve")  # the newest row
    async with backend.journal(retain=3 * 3600.0, dedup_window=3 * 3600.0) as journal:
        assert await journal.max_seq() == 5
        await journal.commit_batch([new_event("c")])
        assert [r.seq for r in await journal.read(3, 10)] == [4, 6]


async def test_erasing_the_newest_events_leaves_no_busy_wait(backend: Backend) -> None:
    async with backend.journal() as journal:
        await journal.commit_batch([new_event("a", sender="bob"), new_event("b", sender="eve")])
        await journal.erase_user("eve")
        assert ids(await journal.read(1, 10)) == []
        started = anyio.current_time()
        await journal.wait_for_events(1, 0.3)
        assert anyio.current_time() - started >= 0.2, "returned at once: the sink would spin"


async def test_the_ledger_is_written_with_its_batch_and_outlives_compaction(
        backend: Backend) -> None:
    old = int(time.time() * 1000) - 10_000
    entries = [LedgerEntry("c1", 100, "m1"), LedgerEntry("c2", 100, "m0"),
               LedgerEntry("c1", 100, "m2"), LedgerEntry("c1", 250, "m3"),
               LedgerEntry("c2", 300, "bad", "data is not a string")]
    async with backend.journal(retain=0.0, dedup_window=0.0) as journal:
        await journal.register_sinks(["file"], prune=True)
        await journal.commit_batch([new_event(e.msg_id, fetched_at=old) for e in entries[:4]],
                                   cursors={"lc:messages:cursor": '[300,"bad"]'},
                                   ledger=LedgerBatch("lc", entries))
        # The same batch again (a crash before the cursor moved elsewhere): counted once.
        await journal.commit_batch([], ledger=LedgerBatch("lc", entries[:2]))
        await journal.commit_batch([], ledger=LedgerBatch("other", [LedgerEntry("c1", 1, "x")]))
        await journal.advance_sink("file", await journal.max_seq())
        assert await journal.compact(int(time.time() * 1000)) == 4
        assert (await journal.stats()).events == 0
        assert await journal.ledger_tallies("lc", 10_000) == {
            "c1": ConversationTally(3, (100, "m1"), (250, "m3")),
            "c2": ConversationTally(2, (100, "m0"), (300, "bad")),
        }
        assert await journal.ledger_tallies("lc", 250) == {
            "c1": ConversationTally(2, (100, "m1"), (100, "m2")),
            "c2": ConversationTally(1, (100, "m0"), (100, "m0")),
        }
        assert await journal.ledger_missing("lc", [(100, "m2"), (101, "m2"), (300, "bad"),
                                                   (1, "x")]) == [(101, "m2"), (1, "x")]
        assert await journal.ledger_missing("nobody", [(1, "x")]) == [(1, "x")]
        assert await journal.ledger_quarantined("lc", 10) == [
            LedgerEntry("c2", 300, "bad", "data is not a string")]
        assert await journal.ledger_tallies("nobody", 10_000) == {}
    # Kept across a reopen, readable by `relay status`-style read-only openers.
    async with backend.journal("status") as reader:
        assert (await reader.ledger_tallies("lc", 10_000))["c1"].count == 3


async def test_stats_describe_the_journal(backend: Backend) -> None:
    async with backend.journal() as journal:
        await journal.register_sinks(["s"], prune=True)
        await journal.commit_batch([new_event("a", fetched_at=1000), new_event("b")],
                                   cursors={"rc:k": "v"},
                                   quarantine=[QuarantinedRecord("rc", "p", "bad", b"{")])
        await journal.advance_sink("s", 1)
        stats = await journal.stats()
        assert (stats.max_seq, stats.events, stats.quarantined, stats.dead_letters) == (
            2, 2, 1, 0)
        assert stats.oldest_fetched_at == 1000
        assert [(s.sink, s.cursor, s.pending) for s in stats.sinks] == [("s", 1, 1)]
        assert stats.cursors == {"rc:k": "v"}
        assert stats.bytes > 0
        assert await journal.storage_bytes() > 0
        assert journal.write_blocker() is None
        await journal.check_intact()
        if backend.server is not None:
            assert backend.server.password not in stats.path
            assert stats.path.startswith("postgresql://relay@127.0.0.1:")


# -- schema versions -----------------------------------------------------------------


def _patch_migrations(monkeypatch: pytest.MonkeyPatch, kind: str, extra: str) -> None:
    """Pretend this relay knows one schema version more than the real one."""
    if kind == "sqlite":
        version = sqlite_backend.SCHEMA_VERSION + 1
        monkeypatch.setattr(sqlite_backend, "_MIGRATIONS",
                            {**sqlite_backend._MIGRATIONS, version: (extra,)})
        monkeypatch.setattr(sqlite_backend, "SCHEMA_VERSION", version)
    else:
        version = pg_backend.schema_version() + 1
        monkeypatch.setattr(pg_backend, "MIGRATIONS",
                            {**pg_backend.MIGRATIONS, version: (extra.replace("x_", "{s}.x_"),)})


async def test_migrations_forward_and_refusing_a_newer_schema(
        backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    async with backend.journal() as journal:  # fresh: created at the current version
        await journal.commit_batch([new_event("a")], cursors={"k": "v"})
    with monkeypatch.context() as patch:
        _patch_migrations(patch, backend.kind, "CREATE TABLE x_later(v integer)")
        with pytest.raises(JournalSchemaError, match="migrate it first"):
            await backend.open("admin")  # older than this "newer" relay: not migrated here
        async with backend.journal() as journal:  # migrates forward, data intact
            assert ids(await journal.read(0, 10)) == ["rc:a"]
            assert await journal.get_cursors("") == {"k": "v"}
        async with backend.journal("admin"):
            pass
    # Back to the real relay, which is now the older one.
    for mode in ("writer", "status", "admin"):
        with pytest.raises(JournalSchemaError, match="upgrade the relay"):
            await backend.open(mode)  # type: ignore[arg-type]


async def test_a_missing_journal_is_not_created_by_readers(backend: Backend) -> None:
    for mode in ("status", "admin"):
        with pytest.raises(JournalError, match="no journal"):
            await backend.open(mode)  # type: ignore[arg-type]


async def test_a_new_sqlite_journal_has_small_pages(tmp_path: Path) -> None:
    # Random ids dirty one page of the id index per insert: the page is what the WAL writes.
    journal = await open_journal(JournalConfig(path=str(tmp_path / "new.db")))
    await journal.close()
    conn = sqlite3.connect(tmp_path / "new.db")
    try:
        assert conn.execute("PRAGMA page_size").fetchone()[0] == 4096
    finally:
        conn.close()


async def test_version_1_sqlite_files_open_and_gain_an_identity(tmp_path: Path) -> None:
    """A file written by the first release (schema 1, no identity row) opens and works."""
    path = tmp_path / "v1.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA page_size=16384")
    for statement in sqlite_backend._MIGRATIONS[1]:
        conn.execute(statement)
    conn.execute("INSERT INTO events VALUES (7, 'rc:a', 1, ?, ?)", (ROUTING, b"{}"))
    conn.execute("INSERT INTO sink_cursors VALUES ('s', 7, 1)")
    conn.execute("PRAGMA user_version=1")
    conn.commit()
    conn.close()
    config = JournalConfig(path=str(path))
    journal = await open_journal(config)
    try:
        assert await journal.max_seq() == 7
        assert (await journal.commit_batch([new_event("b")])).last_seq == 8
        assert await journal.sink_cursor("s") == 7
    finally:
        await journal.close()
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM meta WHERE key = 'journal_id'").fetchone() == (1,)
    conn.close()


# -- concurrency and waiting ---------------------------------------------------------


async def test_concurrent_committers_lose_and_skip_nothing(backend: Backend) -> None:
    """Committers in parallel (several journals on one PostgreSQL database), a tailing
    reader: every event is read exactly once, in ever-increasing seq."""
    writers = [await backend.open() for _ in range(3 if backend.kind == "postgres" else 1)]
    reader = writers[0] if backend.kind == "sqlite" else await backend.open("admin")
    expected = {f"rc:w{w}t{t}b{b}e{e}" for w in range(len(writers)) for t in range(3)
                for b in range(30) for e in range(10)}
    seen: list[StoredEvent] = []
    done = anyio.Event()

    async def commit(w: int, t: int) -> None:
        for b in range(30):
            await writers[w].commit_batch(
                [new_event(f"w{w}t{t}b{b}e{e}") for e in range(10)]
                + [new_event(f"w{w}t{t}b{max(0, b - 1)}e9")])  # a repeat, as redeliveries do

    async def tail() -> None:
        cursor = 0
        while True:
            rows = await reader.read(cursor, 100)
            if rows:
                assert rows[0].seq > cursor
                seen.extend(rows)
                cursor = rows[-1].seq
            elif done.is_set() and cursor == await writers[0].max_seq():
                rows = await reader.read(cursor, 100)
                if not rows:
                    return
            else:
                await reader.wait_for_events(cursor, 0.2)

    try:
        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                tg.start_soon(tail)
                async with anyio.create_task_group() as committers:
                    for w in range(len(writers)):
                        for t in range(3):
                            committers.start_soon(commit, w, t)
                # writers[0] must know the last seq of every writer before tail may stop.
                top = max([await w.max_seq() for w in writers])
                await eventually(lambda: _knows(writers[0], top), 10, "the last seq")
                done.set()
    finally:
        for journal in {id(j): j for j in [*writers, reader]}.values():
            await journal.close()
    assert [r.seq for r in seen] == sorted({r.seq for r in seen})
    assert sorted(r.id for r in seen) == sorted(expected)


async def _knows(journal: Journal, seq: int) -> bool:
    await journal.read(seq - 1, 1)
    return await journal.max_seq() >= seq


async def test_wait_for_events_wakes_on_a_commit(backend: Backend) -> None:
    async with backend.journal() as journal:
        other = journal if backend.kind == "sqlite" else await backend.open()
        woke_after: list[float] = []

        async def waiter() -> None:
            start = anyio.current_time()
            await journal.wait_for_events(0, 10)
            woke_after.append(anyio.current_time() - start)

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(waiter)
                await anyio.wait_all_tasks_blocked()
                await other.commit_batch([new_event("a")])  # another process, for PostgreSQL
        finally:
            if other is not journal:
                await other.close()
        assert woke_after
        assert woke_after[0] < 5
        started = anyio.current_time()
        await journal.wait_for_events(0, 10)  # already past: at once
        assert anyio.current_time() - started < 1


# -- the storage itself ---------------------------------------------------------------


async def test_a_journal_deleted_under_the_relay_is_fatal(backend: Backend) -> None:
    async with backend.journal() as journal:
        await journal.commit_batch([new_event("a")])
        if backend.kind == "sqlite":
            os.unlink(backend.config.path)
        else:
            assert backend.server is not None
            conn = await asyncpg.connect(backend.config.dsn.get_secret_value())  # type: ignore[union-attr]
            await conn.execute("DROP SCHEMA relay CASCADE")
            await conn.close()
        with pytest.raises(JournalGoneError) as raised:
            await journal.commit_batch([new_event("b")])
        assert raised.value.fatal
        with pytest.raises(JournalGoneError):
            await journal.check_intact()


async def test_a_journal_replaced_under_the_relay_is_fatal(postgres: Backend) -> None:
    async with postgres.journal() as journal:
        await journal.commit_batch([new_event("a")])
        dsn = postgres.config.dsn.get_secret_value()  # type: ignore[union-attr]
        conn = await asyncpg.connect(dsn)
        await conn.execute("DROP SCHEMA relay CASCADE")
        await conn.close()
        await (await postgres.open()).close()  # another relay creates a new, empty journal
        with pytest.raises(JournalGoneError, match="deleted or replaced"):
            await journal.commit_batch([new_event("b")])


async def test_sqlite_second_writer_is_refused(tmp_path: Path) -> None:
    backend = Backend("sqlite", JournalConfig(path=str(tmp_path / "j.db")), tmp_path)
    async with backend.journal():
        with pytest.raises(JournalLockedError, match="in use by another relay"):
            await backend.open()
        async with backend.journal("status") as reader:
            assert (await reader.stats()).events == 0


async def test_sqlite_files_are_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "data" / "j.db"
    async with Backend("sqlite", JournalConfig(path=str(path)), tmp_path).journal() as journal:
        await journal.commit_batch([new_event("a")])
        for name in ("j.db", "j.db-wal", "j.db.lock"):
            mode = stat.S_IMODE(os.stat(tmp_path / "data" / name).st_mode)
            assert mode & 0o077 == 0, f"{name} is {oct(mode)}"


# -- PostgreSQL: order across committers, outages -----------------------------------


async def _waiting_advisory_locks(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"))
    finally:
        await conn.close()


async def _interleave(postgres: Backend, *, serialize: bool) -> tuple[list[str], list[str]]:
    """Journal A draws its seq and holds its transaction open; journal B commits
    meanwhile; a reader reads between. Returns (first read, read after both)."""
    dsn = postgres.config.dsn.get_secret_value()  # type: ignore[union-attr]
    a, b = await postgres.open(), await postgres.open()
    reader = await postgres.open("admin")
    for journal in (a, b):
        journal._serialize_commits = serialize  # type: ignore[attr-defined]
    holding, release = anyio.Event(), anyio.Event()

    async def hold() -> None:
        holding.set()
        await release.wait()

    a._after_insert = hold  # type: ignore[attr-defined]
    first: list[StoredEvent] = []
    try:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(a.commit_batch, [new_event("first")])
                await holding.wait()  # A holds seq 1, uncommitted
                if serialize:
                    tg.start_soon(b.commit_batch, [new_event("second")])
                    await eventually(lambda: _waiting_advisory_locks(dsn), 10,
                                     "B to wait for A's commit lock")
                else:
                    await b.commit_batch([new_event("second")])  # seq 2, committed
                first = await reader.read(0, 10)
                release.set()
        cursor = first[-1].seq if first else 0
        later = await reader.read(cursor, 10)
        return ids(first), ids(later)
    finally:
        for journal in (a, b, reader):
            await journal.close()


async def test_a_reader_never_skips_an_event_committed_after_a_higher_seq(
        postgres: Backend) -> None:
    first, later = await _interleave(postgres, serialize=True)
    assert first == []  # B could not commit past A's open transaction
    assert later == ["rc:first", "rc:second"]


async def test_without_the_commit_lock_a_reader_would_skip(postgres: Backend) -> None:
    """The hazard the lock prevents, shown: B's higher seq is visible first, the reader
    moves past it, and A's smaller seq, committed later, is never read."""
    first, later = await _interleave(postgres, serialize=False)
    assert first == ["rc:second"]
    assert later == []


def _journal_up() -> float | None:
    return metrics.REGISTRY.get_sample_value("relay_journal_up")


async def test_database_outage_raises_journal_errors_and_recovers(postgres: Backend) -> None:
    server = postgres.server
    assert server is not None
    password = server.password
    async with postgres.journal() as journal:
        await journal.register_sinks(["s"], prune=True)
        await journal.commit_batch([new_event("before")])
        assert _journal_up() == 1
        await anyio.to_thread.run_sync(server.stop)
        try:
            with pytest.raises(JournalError) as raised:
                await journal.commit_batch([new_event("during")], cursors={"rc:k": "1"})
            assert type(raised.value) is JournalError
            assert not raised.value.fatal
            assert raised.value.__cause__ is None
            assert password not in str(raised.value)
            assert "unreachable" in str(raised.value)
            for call in (lambda: journal.read(0, 10), lambda: journal.advance_sink("s", 1),
                         lambda: journal.get_cursors(""), journal.stats):
                with pytest.raises(JournalError):
                    await call()
            assert journal.write_blocker() == "database unreachable"
            assert _journal_up() == 0
            assert await journal.max_seq() == 1  # what it knew; no error
            started = anyio.current_time()
            await journal.wait_for_events(1, 0.3)  # polling, not spinning
            assert anyio.current_time() - started >= 0.2
        finally:
            await anyio.to_thread.run_sync(server.start)

        async def commits() -> bool:
            try:
                await journal.commit_batch([new_event("during")], cursors={"rc:k": "1"})
            except JournalError:
                return False
            return True

        await eventually(commits, 30, "commits to work again (same journal object)")
        assert ids(await journal.read(0, 10)) == ["rc:before", "rc:during"]
        assert await journal.get_cursors("rc:") == {"rc:k": "1"}
        assert journal.write_blocker() is None
        assert _journal_up() == 1
        # Notifications are back too: another journal's commit wakes a waiter.
        other = await postgres.open()
        try:
            async def wakes() -> bool:
                woke: list[float] = []

                async def waiter() -> None:
                    start = anyio.current_time()
                    await journal.wait_for_events(await journal.max_seq(), 5)
                    woke.append(anyio.current_time() - start)

                async with anyio.create_task_group() as tg:
                    tg.start_soon(waiter)
                    await anyio.wait_all_tasks_blocked()
                    await other.commit_batch([new_event(f"after{time.monotonic_ns()}")])
                return bool(woke) and woke[0] < 1.0

            await eventually(wakes, 20, "a notification to wake the waiter")
        finally:
            await other.close()


async def test_journals_in_two_schemas_of_one_database_are_apart(postgres: Backend) -> None:
    long_name = "tenant_" + "x" * 56  # 63 characters: the longest schema name
    async with postgres.journal(schema_name=long_name) as a, \
            postgres.journal(schema_name="other") as b:
        writer = await postgres.open(schema_name=long_name)
        try:
            woke: list[float] = []

            async def waiter() -> None:
                start = anyio.current_time()
                await a.wait_for_events(0, 10)
                woke.append(anyio.current_time() - start)

            async with anyio.create_task_group() as tg:
                tg.start_soon(waiter)
                await anyio.wait_all_tasks_blocked()
                await writer.commit_batch([new_event("a")])
            assert woke
            assert woke[0] < 5  # notified on the long schema's channel
        finally:
            await writer.close()
        await b.commit_batch([new_event("a")])  # the same id: another journal
        assert ids(await a.read(0, 10)) == ["rc:a"]
        assert ids(await b.read(0, 10)) == ["rc:a"]
        assert (await a.stats()).path.endswith(f"(schema {long_name})")


# -- leases and fencing -------------------------------------------------------------


async def test_a_lease_has_one_holder_and_fences_the_last(backend: Backend) -> None:
    async with backend.journal() as journal:
        await journal.register_sinks(["s"], prune=False)
        grant = await journal.acquire("sink:s", "a", 10.0)
        assert grant is not None
        assert await journal.acquire("sink:s", "a", 10.0) is None, "held: not granted twice"
        assert await journal.renew(grant.fence, 10.0)
        await journal.commit_batch([new_event("x")], fence=grant.fence)
        await journal.advance_sink("s", 1, fence=grant.fence)
        await journal.release(grant.fence)
        again = await journal.acquire("sink:s", "b", 10.0)
        assert again is not None
        assert again.fence.epoch == grant.fence.epoch + 1
        assert not await journal.renew(grant.fence, 10.0)
        with pytest.raises(LeaseLostError):
            await journal.commit_batch([new_event("y")], fence=grant.fence)
        with pytest.raises(LeaseLostError):
            await journal.advance_sink("s", 5, fence=grant.fence)
        assert ids(await journal.read(0, 10)) == ["rc:x"], "nothing written under the old fence"
        assert await journal.sink_cursor("s") == 1
        held = {lease.unit: lease for lease in await journal.leases()}
        assert held["sink:s"].holder == "b"
        assert held["sink:s"].epoch == again.fence.epoch


async def test_leases_expire_and_members_come_and_go(postgres: Backend) -> None:
    async with postgres.journal() as a, postgres.journal() as b:
        await a.heartbeat("a", "host-a pid 1")
        await b.heartbeat("b", "host-b pid 2")
        assert [m.member for m in await a.members(10.0)] == ["a", "b"]
        grant = await a.acquire("source:rc", "a", 0.3)
        assert grant is not None
        assert grant.previous_end_ago is None
        assert await b.acquire("source:rc", "b", 10.0) is None
        taken = await eventually(lambda: b.acquire("source:rc", "b", 10.0), 5,
                                 "the expired lease to be taken over")
        assert taken.fence.epoch == grant.fence.epoch + 1
        assert taken.previous_end_ago is not None
        assert 0 <= taken.previous_end_ago < 5
        # A stale holder's batch is refused in its own transaction: nothing of it lands.
        with pytest.raises(LeaseLostError):
            await a.commit_batch([new_event("late")], cursors={"rc:x": "1"},
                                 fence=grant.fence)
        assert await a.get_cursors("rc:x") == {}
        await b.leave("b")
        assert [m.member for m in await a.members(10.0)] == ["a"]
        free = {lease.unit: lease for lease in await a.leases()}["source:rc"]
        assert free.holder is None


async def test_a_group_commit_refuses_only_the_fenced_member(postgres: Backend) -> None:
    async with postgres.journal() as journal:
        old = await journal.acquire("source:a", "me", 10.0)
        assert old is not None
        await journal.release(old.fence)
        assert await journal.acquire("source:a", "other", 10.0) is not None
        results = {}

        async def commit(name: str, fence: Fence | None) -> None:
            try:
                results[name] = await journal.commit_batch([new_event(name)], fence=fence)
            except LeaseLostError as exc:
                results[name] = exc

        async with anyio.create_task_group() as tg:
            tg.start_soon(commit, "fenced", old.fence)
            tg.start_soon(commit, "free", None)
        assert isinstance(results["fenced"], LeaseLostError)
        assert ids(await journal.read(0, 10)) == ["rc:free"]
