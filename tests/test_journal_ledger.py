"""The evacuation ledger on a real SQLite file: written with its batch, outlives compaction."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from relay.journal import (
    ConversationTally,
    JournalError,
    LedgerBatch,
    LedgerEntry,
    NewEvent,
    SqliteJournal,
)
from relay.journal.sqlite import _MIGRATIONS

pytestmark = pytest.mark.anyio


def event(native: str, fetched_at: int) -> NewEvent:
    return NewEvent(f"lc:{native}", fetched_at, b'["lc","leancloud","message","conversation","",'
                    b'"conversation:c1"]', b'{"id":"lc:%s"}' % native.encode(), fetched_at)


async def test_ledger_is_written_with_its_batch_and_outlives_compaction(tmp_path: Path) -> None:
    journal = SqliteJournal.open(tmp_path / "j.db", retain_seconds=0)
    old = int(time.time() * 1000) - 10_000
    entries = [LedgerEntry("c1", 100, "m1"), LedgerEntry("c2", 100, "m0"),
               LedgerEntry("c1", 100, "m2"), LedgerEntry("c1", 250, "m3"),
               LedgerEntry("c2", 300, "bad", "data is not a string")]
    try:
        await journal.register_sinks(["file"], prune=True)
        await journal.commit_batch([event(e.msg_id, old) for e in entries[:4]],
                                   cursors={"lc:messages:cursor": "[300,\"bad\"]"},
                                   ledger=LedgerBatch("lc", entries))
        # The same batch again (a crash before the cursor moved elsewhere): counted once.
        await journal.commit_batch([], ledger=LedgerBatch("lc", entries[:2]))
        await journal.commit_batch([], ledger=LedgerBatch("other", [LedgerEntry("c1", 1, "x")]))
        await journal.advance_sink("file", journal.last_seq)
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
    finally:
        await journal.close()
    # Kept across a reopen, readable by `relay status`-style read-only openers.
    reader = SqliteJournal.open_readonly(tmp_path / "j.db")
    try:
        assert (await reader.ledger_tallies("lc", 10_000))["c1"].count == 3
    finally:
        await reader.close()


async def test_a_failed_commit_writes_no_ledger_entry(tmp_path: Path) -> None:
    journal = SqliteJournal.open(tmp_path / "j.db")
    try:
        bad = NewEvent("lc:x", 1, b"[]", b"{}", 1)
        await journal.commit_batch([bad], ledger=LedgerBatch("lc", [LedgerEntry("c", 1, "x")]))
        conn = sqlite3.connect(tmp_path / "j.db")
        # A ledger write that fails takes its whole batch (events, cursor) with it.
        conn.execute("CREATE TRIGGER boom BEFORE INSERT ON ledger BEGIN"
                     " SELECT RAISE(ABORT, 'no'); END")
        conn.close()
        with pytest.raises(JournalError):
            await journal.commit_batch([NewEvent("lc:y", 1, b"[]", b"{}", 1)],
                                       ledger=LedgerBatch("lc", [LedgerEntry("c9", 2, "y")]))
        assert [e.id for e in await journal.read(0, 10)] == ["lc:x"]
    finally:
        await journal.close()


async def test_version_1_journal_migrates_to_the_ledger(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    conn = sqlite3.connect(path, isolation_level=None)
    for statement in _MIGRATIONS[1]:
        conn.execute(statement)
    conn.execute("INSERT INTO events VALUES (1, 'lc:a', 1, '[]', '{}')")
    conn.execute("PRAGMA user_version=1")
    conn.close()
    journal = SqliteJournal.open(path)
    try:
        assert [e.id for e in await journal.read(0, 10)] == ["lc:a"]
        await journal.commit_batch([], ledger=LedgerBatch("lc", [LedgerEntry("c", 5, "a")]))
        assert await journal.ledger_missing("lc", [(5, "a")]) == []
    finally:
        await journal.close()
    check = sqlite3.connect(path)
    assert check.execute("PRAGMA user_version").fetchone()[0] == 2
    check.close()
