"""The SQLite journal's group commit: what one transaction writes for a group of callers.

A group is the events of every source batch waiting (deduplicated by
:mod:`relay.journal.sqlite_dedup`), their cursors, quarantined records and ledger
entries, and sink cursors. It runs on the writer connection's thread.

(A process of its own for this was measured and not kept: the pickling and the socket
cost the event loop what the interpreter lock had, and a second interpreter's memory,
for no more events per second: 23,400 vs 22,500-25,200 in the thread, 41 vs 35-37 µs of
CPU per event, 116 vs 89 MiB.)
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from relay.journal import sqlite_dedup, sqlite_ledger
from relay.journal.base import NewEvent
from relay.journal.group import Pending

# Rows per INSERT statement: 5 parameters each, well under SQLite's variable limit
# (32,766 since 3.32), and a statement short enough to parse in well under a millisecond.
_ROWS_PER_INSERT = 1000


# The highest seq ever handed out, kept in meta by whatever deletes event rows (compaction,
# erasure), just before it does: with the rows gone, max(seq) alone would hand their seqs
# out again after a reopen, and a sink's cursor past them would skip the new events. A
# commit does not write it: its own rows carry the mark (one statement fewer per commit).
KEEP_HIGH_SEQ = (
    "INSERT INTO meta(key, value) SELECT 'high_seq', coalesce(max(seq), 0) FROM events"
    " WHERE true ON CONFLICT(key) DO UPDATE SET value = max(value, excluded.value)"
)


def _insert_rows(execute: Callable[[str, list[object]], object], insert: str, width: int,
                 values: list[object], tail: str = "") -> None:
    """``insert`` of ``values`` (``width`` to a row), many rows per statement: one call into
    SQLite per thousand rows instead of one per row (each call lets go of the interpreter
    lock and must win it back from the busy event loop)."""
    step = _ROWS_PER_INSERT * width
    row = "(" + ",".join("?" * width) + ")"
    for start in range(0, len(values), step):
        chunk = values if len(values) <= step else values[start:start + step]
        execute(f"{insert} VALUES {','.join((row,) * (len(chunk) // width))}{tail}", chunk)


@dataclass(frozen=True, slots=True)
class ItemResult:
    """``new`` events got the seqs up to ``last_seq``, in order, all but those at
    ``duplicates`` (their positions in the item's events)."""

    new: int
    duplicates: tuple[int, ...]
    quarantined: int
    last_seq: int
    moved: tuple[int, ...] = ()  # seqs of older copies deleted (accepted again after the window)


class GroupWriter:
    """Applies groups on the writer connection, from its thread only.

    A group whose writes come to one statement (the usual one: a few sources' events, up to
    a thousand, nothing quarantined; or a sink's cursor) runs it without BEGIN and COMMIT:
    SQLite commits a lone statement as it runs it, durably (the WAL, ``synchronous=FULL``)
    and whole, in one call. Each call lets go of the interpreter lock and must win it back
    from the busy event loop; a commit so makes one call where it made three. Any second
    write first opens the transaction (:meth:`_begin`), and the caller then commits it.
    """

    def __init__(self, conn: sqlite3.Connection, *, written_seq: int, window_ms: int,
                 merge_at: int, connect: Callable[[], sqlite3.Connection],
                 warn: Callable[[str], None]) -> None:
        self.conn = conn
        self.written_seq = written_seq
        self.dedup = sqlite_dedup.DedupIndex(conn, window_ms=window_ms, merge_at=merge_at,
                                             connect=connect, warn=warn)
        self.ledger = sqlite_ledger.LedgerWriter()
        # The group's first write, held back in case it is the only one.
        self._held: tuple[str, list[object]] | None = None

    def _flush(self) -> None:
        """Run the held-back write, if any (in the transaction if one is open)."""
        if self._held is not None:
            sql, params = self._held
            self._held = None
            self.conn.execute(sql, params)

    def _begin(self) -> None:
        """Before a write that cannot be the group's only one (a second write, quarantine,
        ledger, moved ids): one transaction for the group from here on, the held-back
        write first."""
        if not self.conn.in_transaction:
            self.conn.execute("BEGIN IMMEDIATE")
        self._flush()

    def _write(self, sql: str, params: list[object]) -> None:
        if self._held is None and not self.conn.in_transaction:
            self._held = (sql, params)  # perhaps the group's only statement
        else:
            self._begin()
            self.conn.execute(sql, params)

    def rolled_back(self) -> None:
        """The transaction :meth:`apply` ran in rolled back: forget what it remembered."""
        self._held = None
        self.ledger.forget()
        self.dedup.forget()

    def committed(self, results: Sequence[ItemResult]) -> None:
        self.dedup.commit()
        if results:
            self.written_seq = max(self.written_seq, results[-1].last_seq)

    def _insert(self, first: int, events: Sequence[NewEvent]) -> None:
        """Insert with seqs from ``first``, many rows per statement (:func:`_insert_rows`)."""
        values: list[object] = []
        for i, e in enumerate(events, first):
            values += (i, e[0], e[1], e[2], e[3])
        _insert_rows(self._write, "INSERT INTO events(seq, id, fetched_at, routing, payload)",
                     5, values)

    def apply(self, items: Sequence[Pending],
              more: Callable[[], Sequence[Pending]] | None = None) -> list[ItemResult]:
        """Write ``items``, then whatever ``more()`` hands over (callers that queued
        meanwhile) until it hands nothing; the caller then commits the transaction if one
        is open (``conn.in_transaction``), and calls :meth:`committed` or
        :meth:`rolled_back`."""
        results: list[ItemResult] = []
        last = self.written_seq
        while items:
            last = self._apply_round(items, last, results)
            items = more() if more is not None else ()
            if items and self._held is not None:
                # Joined: the earlier rows must be in the table before the later callers'
                # ids are checked (a copy older than the window is found there and moved).
                self._begin()
        self._flush()  # the group's only write: SQLite commits it as it runs it
        return results

    def _apply_round(self, items: Sequence[Pending], last: int,
                     results: list[ItemResult]) -> int:
        """Write ``items`` with seqs after ``last``; appends their results, returns the new
        last seq."""
        conn = self.conn
        now = int(time.time() * 1000)
        # The round's new events, in seq order, inserted together after the loop: one
        # statement for the round's callers instead of one per caller.
        fresh_all: list[NewEvent] = []
        # The group's cursors, a later caller's value for a key winning, written in one
        # statement: each statement lets go of the interpreter lock and waits to win it
        # back from the busy event loop (an executemany, once per row).
        cursors: dict[str, str] = {}
        for item in items:
            duplicates: tuple[int, ...] = ()
            moved: list[tuple[str, int]] = []
            events = item.events
            if events:
                # Explicit, ever-increasing seqs without gaps (cheaper than AUTOINCREMENT):
                # duplicates are found before the insert.
                if fresh_all and self.dedup.added_any(events):
                    # An id an earlier caller in this group added: its row must be in the
                    # table before this one is checked (a copy older than the window is
                    # found there and moved): written now, not held back.
                    self._begin()
                    self._insert(last - len(fresh_all) + 1, fresh_all)
                    fresh_all = []
                fresh, duplicates, moved = self.dedup.new_events(conn, events)
                if moved:  # accepted again after the dedup window: moves to its new seq
                    self._begin()
                    conn.executemany("DELETE FROM events WHERE seq = ?", [(q,) for _, q in moved])
                    # Its new copy is in the tail until the next merge; seen must not keep
                    # naming the deleted one (event_seq, compaction match on (id, seq)).
                    conn.executemany("DELETE FROM seen WHERE id = ? AND seq = ?", moved)
                fresh_all += fresh
                last += len(fresh)
            if item.quarantine:
                self._begin()
                conn.executemany(
                    "INSERT INTO quarantine(source, endpoint, received_at, error, raw)"
                    " VALUES (?,?,?,?,?)",
                    [(q.source, q.endpoint, now, q.error, q.raw) for q in item.quarantine],
                )
            if item.cursors:
                cursors.update(item.cursors)
            if item.ledger is not None and item.ledger.entries:
                self._begin()
                self.ledger.write(conn, item.ledger)
            if item.sink is not None:
                self._write(
                    "INSERT INTO sink_cursors(sink, seq, updated_at) VALUES (?,?,?)"
                    " ON CONFLICT(sink) DO UPDATE SET seq=max(seq, excluded.seq),"
                    " updated_at=excluded.updated_at",
                    [item.sink[0], item.sink[1], now],
                )
            results.append(ItemResult(new=len(events) - len(duplicates), duplicates=duplicates,
                                      quarantined=len(item.quarantine), last_seq=last,
                                      moved=tuple(q for _, q in moved)))
        if fresh_all:
            self._insert(last - len(fresh_all) + 1, fresh_all)
        if cursors:
            values: list[object] = []
            for key, value in cursors.items():
                values += (key, value, now)
            _insert_rows(self._write, "INSERT INTO cursors(key, value, updated_at)", 3, values,
                         " ON CONFLICT(key) DO UPDATE SET value=excluded.value,"
                         " updated_at=excluded.updated_at")
        return last
