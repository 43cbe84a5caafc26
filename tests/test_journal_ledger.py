"""The evacuation ledger, SQLite specifics (the behaviour both backends share is in
tests/test_journal_conformance.py): a failed commit writes no entry; version-1 files migrate."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from relay.journal import JournalError, LedgerBatch, LedgerEntry, NewEvent
from relay.journal.sqlite import _MIGRATIONS, SCHEMA_VERSION, SqliteJournal

pytestmark = pytest.mark.anyio


def event(native: str, fetched_at: int) -> NewEvent:
    return NewEvent(f"lc:{native}", fetched_at, b'["lc","leancloud","message","conversation","",'
                    b'"conversation:c1"]', b'{"id":"lc:%s"}' % native.encode(), fetched_at)


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
    assert check.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    check.close()
