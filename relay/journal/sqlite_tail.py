"""The journal's newest events, kept in memory for the sinks that follow close behind.

A sink that keeps up reads what was committed a moment ago; from here that read is a
list slice instead of a query on another thread (2,000 rows: 4.5 ms, most of it
building tuples while holding the interpreter lock the event loop needs). A sink
further behind than the cache holds reads from SQLite as before.
"""

from __future__ import annotations

from collections.abc import Sequence

from relay.journal.base import NewEvent, StoredEvent
from relay.journal.sqlite_commit import ItemResult

# About 1 KB per event (NewEvent.from_event copies orjson's output to its exact size:
# held as written, 8,000 events took 64 MiB instead of 8).
TAIL_EVENTS = 8_000
_new_tuple = tuple.__new__


class TailCache:
    """Every event with seq in [first, first + len): contiguous, in seq order."""

    def __init__(self, size: int = TAIL_EVENTS) -> None:
        self._size = size
        self._events: list[StoredEvent] = []
        self._first = 0

    def clear(self) -> None:
        """Rows were deleted (erasure, an id moving to a new seq): trust SQLite again."""
        self._events = []

    def add(self, events: Sequence[NewEvent], committed: ItemResult) -> None:
        """``committed.new`` of ``events`` (all but ``committed.duplicates``) now end at
        ``committed.last_seq``."""
        first = committed.last_seq - committed.new + 1
        if self._events and first != self._first + len(self._events):
            self._events = []  # not adjacent (never, with one writer): start again
        if not self._events:
            self._first = first
        kept = events
        if committed.duplicates:  # the usual batch has none: no test per event then
            skip = set(committed.duplicates)
            kept = [e for position, e in enumerate(events) if position not in skip]
        # not StoredEvent(...): see NewEvent.from_event
        self._events += [_new_tuple(StoredEvent, (seq, e[0], e[1], e[2], e[3]))
                         for seq, e in enumerate(kept, first)]
        excess = len(self._events) - self._size
        if excess > self._size // 4:  # trimmed now and then, not at every commit
            del self._events[:excess]
            self._first += excess

    def read(self, after_seq: int, limit: int) -> list[StoredEvent] | None:
        """The events after ``after_seq`` (at most ``limit``), or None if not all are here."""
        if not self._events or after_seq + 1 < self._first:
            return None
        start = after_seq + 1 - self._first
        return self._events[start:start + limit]
