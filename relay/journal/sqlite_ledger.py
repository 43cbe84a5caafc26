"""The evacuation ledger in SQLite (see the ledger section of :mod:`relay.journal.base`).

Compact on purpose: it holds one row per provider message for as long as the
journal lives. Source and conversation names are stored once and referred to
by number; a row is (source_no, timestamp, msg_id, conv_no, error) in a
WITHOUT ROWID table keyed by (source_no, timestamp, msg_id) — the history's
own order, so an evacuation, which walks the history in that order, appends
at the end of the B-tree instead of scattering writes over it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from relay.journal.base import ConversationTally, LedgerBatch, LedgerEntry

MIGRATION: tuple[str, ...] = (
    "CREATE TABLE ledger_sources(source_no INTEGER PRIMARY KEY, source TEXT NOT NULL UNIQUE)",
    """CREATE TABLE ledger_conversations(
        conv_no INTEGER PRIMARY KEY, source_no INTEGER NOT NULL, conv TEXT NOT NULL,
        UNIQUE(source_no, conv))""",
    """CREATE TABLE ledger(
        source_no INTEGER NOT NULL, ts INTEGER NOT NULL, msg_id TEXT NOT NULL,
        conv_no INTEGER NOT NULL, error TEXT,
        PRIMARY KEY(source_no, ts, msg_id)) WITHOUT ROWID""",
)

_CACHE_LIMIT = 100_000  # conversation numbers kept in memory by the writer


class LedgerWriter:
    """Numbers for names, cached; used only inside the writer's transactions."""

    def __init__(self) -> None:
        self._sources: dict[str, int] = {}
        self._convs: dict[tuple[int, str], int] = {}

    def _source_no(self, conn: sqlite3.Connection, source: str) -> int:
        number = self._sources.get(source)
        if number is None:
            conn.execute("INSERT OR IGNORE INTO ledger_sources(source) VALUES (?)", (source,))
            number = int(conn.execute("SELECT source_no FROM ledger_sources WHERE source = ?",
                                      (source,)).fetchone()[0])
            self._sources[source] = number
        return number

    def _conv_nos(self, conn: sqlite3.Connection, source_no: int,
                  convs: set[str]) -> dict[str, int]:
        found = {c: n for c in convs if (n := self._convs.get((source_no, c))) is not None}
        wanted = [c for c in convs if c not in found]
        if wanted:
            conn.executemany("INSERT OR IGNORE INTO ledger_conversations(source_no, conv)"
                             " VALUES (?, ?)", [(source_no, c) for c in wanted])
            for start in range(0, len(wanted), 500):
                chunk = wanted[start:start + 500]
                marks = ",".join("?" * len(chunk))
                rows = conn.execute(
                    f"SELECT conv, conv_no FROM ledger_conversations WHERE source_no = ?"  # noqa: S608
                    f" AND conv IN ({marks})", (source_no, *chunk)).fetchall()
                found.update({c: int(n) for c, n in rows})
            if len(self._convs) > _CACHE_LIMIT:
                self._convs.clear()
            self._convs.update({(source_no, c): found[c] for c in wanted})
        return found

    def write(self, conn: sqlite3.Connection, batch: LedgerBatch) -> None:
        if not batch.entries:
            return
        source_no = self._source_no(conn, batch.source)
        numbers = self._conv_nos(conn, source_no, {e.conversation for e in batch.entries})
        conn.executemany(
            "INSERT INTO ledger(source_no, ts, msg_id, conv_no, error) VALUES (?,?,?,?,?)"
            " ON CONFLICT DO NOTHING",
            [(source_no, e.timestamp, e.msg_id, numbers[e.conversation], e.error)
             for e in batch.entries])

    def forget(self) -> None:
        """After a rolled-back transaction, numbers it created do not exist."""
        self._sources.clear()
        self._convs.clear()


def _source_no(conn: sqlite3.Connection, source: str) -> int | None:
    row = conn.execute("SELECT source_no FROM ledger_sources WHERE source = ?",
                       (source,)).fetchone()
    return None if row is None else int(row[0])


def tallies(conn: sqlite3.Connection, source: str,
            before_ms: int) -> dict[str, ConversationTally]:
    """One pass over the source's entries in history order (first seen = first)."""
    source_no = _source_no(conn, source)
    if source_no is None:
        return {}
    names = dict(conn.execute("SELECT conv_no, conv FROM ledger_conversations"
                              " WHERE source_no = ?", (source_no,)).fetchall())
    counts: dict[int, int] = {}
    firsts: dict[int, tuple[int, str]] = {}
    lasts: dict[int, tuple[int, str]] = {}
    rows = conn.execute("SELECT conv_no, ts, msg_id FROM ledger WHERE source_no = ? AND ts < ?"
                        " ORDER BY ts, msg_id", (source_no, before_ms))
    for conv_no, ts, msg_id in rows:
        key = (int(ts), str(msg_id))
        if conv_no in counts:
            counts[conv_no] += 1
        else:
            counts[conv_no] = 1
            firsts[conv_no] = key
        lasts[conv_no] = key
    return {names[n]: ConversationTally(c, firsts[n], lasts[n]) for n, c in counts.items()}


def missing(conn: sqlite3.Connection, source: str,
            keys: Sequence[tuple[int, str]]) -> list[tuple[int, str]]:
    source_no = _source_no(conn, source)
    if source_no is None:
        return list(keys)
    lookup = "SELECT 1 FROM ledger WHERE source_no = ? AND ts = ? AND msg_id = ?"
    return [k for k in keys if conn.execute(lookup, (source_no, k[0], k[1])).fetchone() is None]


def quarantined(conn: sqlite3.Connection, source: str, limit: int) -> list[LedgerEntry]:
    source_no = _source_no(conn, source)
    if source_no is None:
        return []
    rows = conn.execute(
        "SELECT c.conv, l.ts, l.msg_id, l.error FROM ledger l JOIN ledger_conversations c"
        " ON c.conv_no = l.conv_no WHERE l.source_no = ? AND l.error IS NOT NULL"
        " ORDER BY l.ts, l.msg_id LIMIT ?", (source_no, limit)).fetchall()
    return [LedgerEntry(c, int(t), m, e) for c, t, m, e in rows]
