"""Deduplication on event id for the SQLite journal, without a random-order index.

Event ids are random, so a unique index on them makes every insert dirty its
own page of that index, and SQLite writes each dirty page to the WAL whole: a
commit of 150 events wrote about 600 KiB and spent 4 ms where the rows alone
took 0.75 ms. So ids are held in two places instead:

- ``recent``: a dict in memory of the ids in the journal's tail, the rows with
  ``seq > seen_through``. It is rebuilt from those rows on open, so it costs
  nothing to keep durable: the rows themselves are the record.
- ``seen``: a table keyed by id (``WITHOUT ROWID``), into which the tail is
  merged in one sorted ``INSERT ... SELECT`` once it holds ``merge_at`` ids.
  A sorted bulk insert dirties each index page once per merge, not once per id.

A new batch is checked against the batch itself, then ``recent``, then one
``SELECT ... WHERE id IN`` over ``seen``, which reads pages but writes none, for
the ids a Bloom filter over ``seen`` may hold (:class:`SeenFilter`): once ``seen``
outgrows the page cache every lookup there is a read from the file, and a new
id, the usual case, needs none.
What a transaction adds to ``recent`` is kept aside until it commits (:meth:`DedupIndex.commit`);
a rollback forgets it (:meth:`DedupIndex.forget`).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterable, Sequence

from rbloom import Bloom

from relay.journal.base import NewEvent

# Schema version 3: ``events.id`` loses its UNIQUE index (the table is rebuilt, the one
# way SQLite drops a column constraint) and every id held moves into ``seen``.
MIGRATION: tuple[str, ...] = (
    """CREATE TABLE seen(
        id TEXT PRIMARY KEY, seq INTEGER NOT NULL, fetched_at INTEGER NOT NULL) WITHOUT ROWID""",
    "INSERT INTO seen(id, seq, fetched_at) SELECT id, seq, fetched_at FROM events ORDER BY id",
    """CREATE TABLE events_v3(
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL,
        fetched_at INTEGER NOT NULL,
        routing BLOB NOT NULL,
        payload BLOB NOT NULL)""",
    "INSERT INTO events_v3(seq, id, fetched_at, routing, payload)"
    " SELECT seq, id, fetched_at, routing, payload FROM events ORDER BY seq",
    "DROP TABLE events",
    "ALTER TABLE events_v3 RENAME TO events",
    "INSERT OR REPLACE INTO meta(key, value)"
    " SELECT 'seen_through', coalesce(max(seq), 0) FROM events",
)

# Ids held in memory before they are merged into ``seen``. A merge of 50,000 into a
# table of 350,000 took 190 ms (3.8 µs per id, in SQLite, the interpreter lock let go);
# the dict costs about 110 bytes per id (5.5 MB).
MERGE_AT = 50_000

_PROBE_CHUNK = 500  # ids per ``IN (...)``: well under SQLite's variable limit

_MERGE = (
    "INSERT INTO seen(id, seq, fetched_at) SELECT id, seq, fetched_at FROM events"
    " WHERE seq > ? ORDER BY id"
    " ON CONFLICT(id) DO UPDATE SET seq = excluded.seq, fetched_at = excluded.fetched_at"
)


# The filter's false positives: ids looked up in ``seen`` for nothing (1 % takes about
# 1.2 bytes per id). The first filter is sized for this many ids, or twice what ``seen``
# holds on open.
FILTER_ERROR = 0.01
FILTER_FIRST = 100_000
# Up to this many ids in ``seen`` the filter is filled on open (about 40 ms); a larger
# ``seen`` is read on a thread of its own (0.8 s per 1,000,000 ids), so that a large
# journal does not hold up the relay's start, and until then every id is looked up.
FILL_ON_OPEN = 50_000


class SeenFilter:
    """The ids in ``seen`` as Bloom filters: "not held" is certain, "maybe" is looked up.

    A Bloom filter cannot grow, so when one is full another twice its size is added;
    none is rebuilt, and an id deleted from ``seen`` (compaction, erasure) stays in
    them, costing at most a lookup. They are filled from ``seen`` on open
    (:meth:`fill`); ids merged while that runs are kept aside and added after it.
    """

    def __init__(self) -> None:
        self._filters: list[Bloom] = []
        self._capacity = self._room = 0  # the newest filter's
        self._filled = False
        self._abandoned = False
        self._late: list[str] = []
        self._lock = threading.Lock()  # fill() may run on another thread than add()

    def fill(self, conn: sqlite3.Connection) -> None:
        """Add what ``seen`` holds as ``conn`` sees it."""
        held = int(conn.execute("SELECT count(*) FROM seen").fetchone()[0])
        capacity = max(FILTER_FIRST, 2 * held)
        first = Bloom(capacity, FILTER_ERROR)
        first.update(event_id for (event_id,) in conn.execute("SELECT id FROM seen"))
        with self._lock:
            # Complete before anyone may read it: ids merged meanwhile first, then the
            # filters, and the flag that makes maybe_held trust them last.
            self._filters, self._capacity, self._room = [first], capacity, capacity - held
            self._add(self._late)
            self._late = []
            self._filled = True

    def abandon(self) -> None:
        """Not to be filled (reading ``seen`` failed): every id stays a maybe, and
        merged ids are no longer kept aside for a fill that will not come."""
        with self._lock:
            self._late = []
            self._abandoned = True

    def add(self, ids: Sequence[str]) -> None:
        with self._lock:
            if self._filled:
                self._add(ids)
            elif not self._abandoned:
                self._late.extend(ids)

    def _add(self, ids: Sequence[str]) -> None:
        if len(ids) > self._room:
            capacity = max(2 * self._capacity, 2 * len(ids))
            grown = Bloom(capacity, FILTER_ERROR)
            grown.update(ids)
            # Appended once it holds them (maybe_held may run on another thread).
            self._filters.append(grown)
            self._capacity, self._room = capacity, capacity - len(ids)
            return
        self._filters[-1].update(ids)
        self._room -= len(ids)

    def maybe_held(self, ids: list[str]) -> list[str]:
        """Those of ``ids`` that may be in ``seen`` (all of them until filled)."""
        if not self._filled:
            return ids
        filters = self._filters
        if len(filters) == 1:
            only = filters[0]
            return [i for i in ids if i in only]
        return [i for i in ids if any(i in f for f in filters)]


def _seen_through(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT value FROM meta WHERE key = 'seen_through'").fetchone()
    return int(row[0]) if row else 0


class DedupIndex:
    """Which ids the journal holds, for its single writer (see the module's text)."""

    def __init__(self, conn: sqlite3.Connection, *, window_ms: int,
                 merge_at: int = MERGE_AT,
                 connect: Callable[[], sqlite3.Connection] | None = None,
                 warn: Callable[[str], None] | None = None) -> None:
        self._window_ms = window_ms
        self._merge_at = merge_at
        self._seen_through = _seen_through(conn)
        self._recent: dict[str, int] = dict(conn.execute(
            "SELECT id, fetched_at FROM events WHERE seq > ? ORDER BY seq",
            (self._seen_through,)))
        self._added: dict[str, int] = {}  # by the transaction under way
        self._filter = SeenFilter()
        self._connect, self._warn = connect, warn
        # Filled at the first batch, not on open: a writer that stores no events (the
        # admin commands: dead letters, replay, erasure) never reads seen for it.
        self._fill_started = False
        self.filling: threading.Thread | None = None

    def _start_fill(self, conn: sqlite3.Connection) -> None:
        self._fill_started = True
        large = conn.execute("SELECT count(*) > ? FROM (SELECT 1 FROM seen LIMIT ?)",
                             (FILL_ON_OPEN, FILL_ON_OPEN + 1)).fetchone()[0]
        if self._connect is None or not large:
            self._filter.fill(conn)
        else:
            self.filling = threading.Thread(target=self._fill_apart,
                                            args=(self._connect, self._warn),
                                            name="relay-journal-dedup-fill", daemon=True)
            self.filling.start()

    def _fill_apart(self, connect: Callable[[], sqlite3.Connection],
                    warn: Callable[[str], None] | None) -> None:
        try:
            conn = connect()
            try:
                self._filter.fill(conn)
            finally:
                conn.close()
        except Exception as exc:  # said, and still correct
            # Every id goes on being looked up in seen.
            self._filter.abandon()
            if warn is not None:
                warn(f"journal dedup filter not built (every id is looked up instead): {exc}")

    def added_any(self, events: Sequence[NewEvent]) -> bool:
        """Does the transaction under way already hold one of these ids?"""
        added = self._added
        return any(e.id in added for e in events)

    def new_events(self, conn: sqlite3.Connection, events: Sequence[NewEvent]
                   ) -> tuple[list[NewEvent], tuple[int, ...], list[tuple[str, int]]]:
        """The events to insert (of each id not held within the window, its last copy),
        the positions of the others (duplicates), and the (id, seq) of stored copies to
        delete: an id accepted again after the window moves to its new seq."""
        if not self._fill_started:
            self._start_fill(conn)
        recent, added = self._recent, self._added
        ids = [e[0] for e in events]
        unheld = [i for i in ids if i not in added and i not in recent]
        unknown = self._filter.maybe_held(unheld)
        if not unknown and len(unheld) == len(ids) and len(set(ids)) == len(ids):
            # The usual batch: every id new to the journal, none twice in it. What the
            # loop below would conclude, without its per-event steps (on the writer's
            # thread, under the interpreter lock the event loop needs).
            added.update(zip(ids, [e[1] for e in events], strict=True))
            return list(events), (), []
        stored = self._probe(conn, unknown) if unknown else {}
        chosen: dict[str, int] = {}  # id -> position of the copy to insert
        duplicates: list[int] = []
        moved: list[tuple[str, int]] = []
        for position, event in enumerate(events):
            fetched = added.get(event.id)
            if fetched is None:
                fetched = recent.get(event.id)
            old_seq: int | None = None
            if fetched is None and event.id in stored:
                # Not popped: the same id again later in this batch is a duplicate too.
                old_seq, fetched = stored[event.id]
            if fetched is not None and fetched >= event.fetched_at - self._window_ms:
                duplicates.append(position)  # held, and not older than the window
                continue
            if fetched is not None:
                earlier = chosen.get(event.id)
                if earlier is not None:
                    # An earlier copy in this same batch, more than the window older:
                    # this one replaces it, as the old upsert did.
                    duplicates.append(earlier)
                else:
                    moved.extend((event.id, seq) for seq in self._copies(conn, event.id, old_seq))
            added[event.id] = event.fetched_at
            chosen[event.id] = position
        fresh = [events[p] for p in sorted(chosen.values())]
        return fresh, tuple(sorted(duplicates)), moved

    def _probe(self, conn: sqlite3.Connection, ids: list[str]) -> dict[str, tuple[int, int]]:
        found: dict[str, tuple[int, int]] = {}
        for start in range(0, len(ids), _PROBE_CHUNK):
            chunk = ids[start:start + _PROBE_CHUNK]
            rows = conn.execute(
                "SELECT id, seq, fetched_at FROM seen WHERE id IN"  # noqa: S608
                f" ({','.join('?' * len(chunk))})", chunk)
            found.update((i, (s, f)) for i, s, f in rows)
        return found

    def _copies(self, conn: sqlite3.Connection, event_id: str, old_seq: int | None) -> list[int]:
        if old_seq is not None:
            return [old_seq]
        # Held in the tail: rare (a tail that spans the whole window), so a scan of it will do.
        return [seq for (seq,) in conn.execute(
            "SELECT seq FROM events WHERE seq > ? AND id = ?", (self._seen_through, event_id))]

    def commit(self) -> None:
        """The transaction committed: what it added is held."""
        self._recent.update(self._added)
        self._added = {}

    def forget(self) -> None:
        """The transaction rolled back: what it added is not."""
        self._added = {}

    def merge_due(self) -> bool:
        return len(self._recent) >= self._merge_at

    def merge(self, conn: sqlite3.Connection, through_seq: int) -> None:
        """Move the tail up to ``through_seq`` into ``seen`` (inside the caller's transaction);
        call :meth:`merged` once it commits."""
        conn.execute(_MERGE, (self._seen_through,))
        conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('seen_through', ?)",
                     (through_seq,))

    def merged(self, through_seq: int) -> None:
        self._filter.add(list(self._recent))  # before they leave memory
        self._seen_through = through_seq
        self._recent.clear()

    def drop(self, ids: Iterable[str]) -> None:
        """Ids whose events were erased: a provider may deliver them again, as new."""
        for event_id in ids:
            self._recent.pop(event_id, None)


def lookup(conn: sqlite3.Connection, event_id: str) -> tuple[int, int] | None:
    """(seq, fetched_at) of the journal's copy of ``event_id``, for any connection."""
    through = _seen_through(conn)
    row = conn.execute("SELECT seq, fetched_at FROM events WHERE seq > ? AND id = ?"
                       " ORDER BY seq DESC LIMIT 1", (through, event_id)).fetchone()
    if row is None:
        row = conn.execute("SELECT seq, fetched_at FROM seen WHERE id = ?",
                           (event_id,)).fetchone()
    return (int(row[0]), int(row[1])) if row else None


# Run before the events they name are deleted (compaction, erasure), in the same transaction.
FORGET_COMPACTED = (
    "DELETE FROM seen WHERE (id, seq) IN (SELECT id, seq FROM events WHERE seq <= ?"
    " AND fetched_at < ? ORDER BY seq LIMIT ?)"
)
