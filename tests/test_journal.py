"""The SQLite journal on a real file: atomic batches, dedup, cursors, compaction, locking."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from relay.journal import (
    JournalLockedError,
    JournalSchemaError,
    NewEvent,
    QuarantinedRecord,
)
from relay.journal.sqlite import SqliteJournal

pytestmark = pytest.mark.anyio


def new_event(native: str, *, source: str = "rc", fetched_at: int | None = None) -> NewEvent:
    now = fetched_at if fetched_at is not None else int(time.time() * 1000)
    return NewEvent(f"{source}:{native}", now, b'["rc","rongcloud","message","direct","","x"]',
                    b'{"id":"%s"}' % native.encode(), now)


async def test_batch_inserts_new_events_and_drops_known_ids(tmp_path: Path) -> None:
    journal = SqliteJournal.open(tmp_path / "j.db")
    try:
        first = await journal.commit_batch([new_event("a"), new_event("b"), new_event("a")],
                                           cursors={"rc:person:last_poll_ms": "1"})
        assert (first.new, first.duplicates) == (2, 1)
        second = await journal.commit_batch([new_event("b"), new_event("c")])
        assert (second.new, second.duplicates) == (1, 1)
        rows = await journal.read(0, 10)
        assert [r.id for r in rows] == ["rc:a", "rc:b", "rc:c"]
        assert [r.seq for r in rows] == sorted(r.seq for r in rows)
        assert await journal.get_cursors("rc:") == {"rc:person:last_poll_ms": "1"}
    finally:
        await journal.close()


async def test_everything_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    journal = SqliteJournal.open(path)
    await journal.commit_batch([new_event("a")], cursors={"k": "v"},
                               quarantine=[QuarantinedRecord("rc", "person", "bad", b"{")])
    await journal.register_sinks(["file"], prune=True)
    await journal.advance_sink("file", 1)
    await journal.close()
    journal = SqliteJournal.open(path)
    try:
        stats = await journal.stats()
        assert stats.events == 1
        assert stats.quarantined == 1
        assert await journal.sink_cursor("file") == 1
        assert (await journal.commit_batch([new_event("a")])).duplicates == 1
        assert await journal.max_seq() == 1
    finally:
        await journal.close()


async def test_second_writer_is_refused(tmp_path: Path) -> None:
    journal = SqliteJournal.open(tmp_path / "j.db")
    try:
        with pytest.raises(JournalLockedError, match="in use by another relay"):
            SqliteJournal.open(tmp_path / "j.db")
        reader = SqliteJournal.open_readonly(tmp_path / "j.db")
        assert (await reader.stats()).events == 0
        await reader.close()
    finally:
        await journal.close()


async def test_files_are_owner_only(tmp_path: Path) -> None:
    journal = SqliteJournal.open(tmp_path / "data" / "j.db")
    await journal.commit_batch([new_event("a")])
    try:
        for name in ("j.db", "j.db-wal", "j.db.lock"):
            mode = stat.S_IMODE(os.stat(tmp_path / "data" / name).st_mode)
            assert mode & 0o077 == 0, f"{name} is {oct(mode)}"
    finally:
        await journal.close()


async def test_compaction_keeps_undelivered_and_recent_events(tmp_path: Path) -> None:
    journal = SqliteJournal.open(tmp_path / "j.db", retain_seconds=3 * 3600)
    old = int(time.time() * 1000) - 4 * 3600 * 1000
    try:
        await journal.register_sinks(["a", "b"], prune=True)
        await journal.commit_batch([new_event(f"old{i}", fetched_at=old) for i in range(4)])
        await journal.commit_batch([new_event("fresh")])
        await journal.advance_sink("a", 5)
        await journal.advance_sink("b", 2)  # b has delivered only the first two
        assert await journal.compact(int(time.time() * 1000)) == 2
        assert [r.id for r in await journal.read(0, 10)] == ["rc:old2", "rc:old3", "rc:fresh"]
        await journal.advance_sink("b", 5)
        assert await journal.compact(int(time.time() * 1000)) == 2  # fresh stays: retention
        assert [r.id for r in await journal.read(0, 10)] == ["rc:fresh"]
    finally:
        await journal.close()


async def test_prune_drops_cursors_of_removed_sinks(tmp_path: Path) -> None:
    journal = SqliteJournal.open(tmp_path / "j.db")
    try:
        await journal.register_sinks(["a", "b"], prune=True)
        await journal.register_sinks(["a"], prune=True)
        assert [s.sink for s in (await journal.stats()).sinks] == ["a"]
    finally:
        await journal.close()


async def test_rewind_sink_to_a_point_in_time(tmp_path: Path) -> None:
    journal = SqliteJournal.open(tmp_path / "j.db")
    try:
        await journal.commit_batch(
            [new_event(n, fetched_at=t) for n, t in (("a", 1000), ("b", 2000), ("c", 3000))]
        )
        await journal.register_sinks(["s"], prune=True)
        await journal.advance_sink("s", 3)
        assert await journal.rewind_sink("s", 2000) == 1
        assert [r.id for r in await journal.read(await journal.sink_cursor("s"), 10)] == [
            "rc:b", "rc:c"]
    finally:
        await journal.close()


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "j.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version=99")
    conn.close()
    with pytest.raises(JournalSchemaError, match="upgrade the relay"):
        SqliteJournal.open(path)


async def test_wait_for_events_wakes_on_commit(tmp_path: Path) -> None:
    import anyio

    journal = SqliteJournal.open(tmp_path / "j.db")
    try:
        woke_after: list[float] = []

        async def waiter() -> None:
            start = anyio.current_time()
            await journal.wait_for_events(0, 10)
            woke_after.append(anyio.current_time() - start)

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            await journal.commit_batch([new_event("a")])
        assert woke_after
        assert woke_after[0] < 5
    finally:
        await journal.close()
