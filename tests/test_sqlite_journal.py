"""What only the SQLite journal has, beyond the conformance suite both backends pass.

Dedup without a unique index (relay.journal.sqlite_dedup): the in-memory tail, its
merge into ``seen`` (forced often here with a tiny ``dedup_merge_at``), the tail
rebuilt on reopen, and the migration of a journal written with the unique index; the
tail cache the sinks read from; checkpoints beside the writer.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import anyio.to_thread
import pytest

from relay.journal import NewEvent, sqlite_dedup
from relay.journal import sqlite as sqlite_backend
from relay.journal.sqlite import SqliteJournal
from relay.journal.sqlite_checkpoint import CHECKPOINT_EVERY
from relay.journal.sqlite_tail import TAIL_EVENTS

pytestmark = pytest.mark.anyio

ROUTING = b'["rc","rongcloud","message","direct","","x"]'


def event(n: int, *, fetched_at: int | None = None) -> NewEvent:
    now = fetched_at if fetched_at is not None else int(time.time() * 1000)
    return NewEvent(f"rc:m{n}", now, ROUTING, b'{"id":"rc:m%d"}' % n, now)


def committed_rows(path: Path) -> int:
    """Events on disk, as another connection (another process) sees them."""
    with sqlite3.connect(path) as conn:
        return int(conn.execute("SELECT count(*) FROM events").fetchone()[0])


def hold_the_loop_until(done: Callable[[], bool], seconds: float = 5.0) -> None:
    """Block the event loop (what a long parse does) until ``done()`` or the deadline."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not done():
        time.sleep(0.005)


async def journal_holding_100_merged(tmp_path: Path) -> Path:
    """A closed journal whose 100 events were merged into ``seen`` ten at a time."""
    path = tmp_path / "relay.db"
    journal = SqliteJournal.open(path, dedup_merge_at=10)
    try:
        for start in range(0, 100, 10):
            await journal.commit_batch([event(n) for n in range(start, start + 10)])
    finally:
        await journal.close()
    return path


def seen_rows(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute("SELECT count(*) FROM seen").fetchone()[0])


async def test_duplicates_are_found_in_the_tail_in_seen_and_across_a_reopen(
        tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    journal = SqliteJournal.open(path, dedup_merge_at=10)
    try:
        for start in range(0, 25, 5):
            result = await journal.commit_batch([event(n) for n in range(start, start + 5)])
            assert result.new == 5
        merged = seen_rows(path)
        assert 10 <= merged < 25  # some merged, some still in the tail
        again = await journal.commit_batch([event(n) for n in range(25)])
        assert (again.new, again.duplicates) == (0, 25)
        # The same held id twice in one batch, from seen and from the tail: both dropped.
        twice = await journal.commit_batch([event(0), event(0), event(24), event(24)])
        assert (twice.new, twice.duplicates) == (0, 4)
        # Seqs have no gaps from duplicates: 25 events, seqs 1..25.
        assert [e.seq for e in await journal.read(0, 100)] == list(range(1, 26))
        assert await journal.event_seq("rc:m0") == 1  # merged into seen
        assert await journal.event_seq("rc:m24") == 25  # in the tail
    finally:
        await journal.close()
    reopened = SqliteJournal.open(path, dedup_merge_at=10)
    try:
        result = await reopened.commit_batch([event(n) for n in range(27)])
        assert (result.new, result.duplicates) == (2, 25)
        assert result.last_seq == 27
    finally:
        await reopened.close()


async def test_an_id_older_than_the_window_moves_to_its_new_seq_from_seen_and_the_tail(
        tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    old = int(time.time() * 1000) - 2 * 3_600_000
    journal = SqliteJournal.open(path, dedup_merge_at=3, dedup_window_seconds=3600)
    try:
        await journal.commit_batch([event(n, fetched_at=old) for n in range(3)])  # merged
        await journal.commit_batch([event(n, fetched_at=old) for n in range(3, 5)])  # tail
        result = await journal.commit_batch([event(n) for n in (0, 4)])
        assert (result.new, result.duplicates) == (2, 0)
        seqs = {e.id: e.seq for e in await journal.read(0, 100)}
        assert seqs == {"rc:m1": 2, "rc:m2": 3, "rc:m3": 4, "rc:m0": 6, "rc:m4": 7}
        assert await journal.event_seq("rc:m0", old) is None
        assert await journal.event_seq("rc:m0") == 6
    finally:
        await journal.close()


async def test_a_sink_close_behind_reads_the_tail_cache_and_a_far_one_sqlite(
        tmp_path: Path) -> None:
    journal = SqliteJournal.open(tmp_path / "relay.db")
    try:
        total = TAIL_EVENTS * 2
        for start in range(0, total, 1000):
            await journal.commit_batch([event(n) for n in range(start, start + 1000)])
        # Far behind: from SQLite; close behind: from memory. The same rows either way.
        far = await journal.read(0, 5)
        near = await journal.read(total - 3, 10)
        assert [e.seq for e in far] == [1, 2, 3, 4, 5]
        assert [(e.seq, e.id, e.payload) for e in near] == [
            (n + 1, f"rc:m{n}", b'{"id":"rc:m%d"}' % n) for n in range(total - 3, total)]
        assert await journal.read(total, 10) == []
        erased = await journal.erase_user("nobody")
        assert erased["events"] == 0
    finally:
        await journal.close()


async def test_a_journal_written_with_the_unique_index_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    conn = sqlite3.connect(path, isolation_level=None)
    for version in (1, 2):
        for statement in sqlite_backend._MIGRATIONS[version]:
            conn.execute(statement)
    conn.execute("PRAGMA user_version=2")
    now = int(time.time() * 1000)
    conn.executemany("INSERT INTO events(seq, id, fetched_at, routing, payload) VALUES"
                     " (?,?,?,?,?)", [(n + 1, f"rc:m{n}", now, ROUTING, b"{}") for n in range(4)])
    conn.close()
    journal = SqliteJournal.open(path)
    try:
        result = await journal.commit_batch([event(n) for n in range(6)])
        assert (result.new, result.duplicates, result.last_seq) == (2, 4, 6)
        assert await journal.event_seq("rc:m2") == 3
    finally:
        await journal.close()
    with sqlite3.connect(path) as check:
        assert check.execute("PRAGMA user_version").fetchone()[0] == sqlite_backend.SCHEMA_VERSION
        indexes = check.execute("SELECT name FROM sqlite_master WHERE type = 'index'"
                                " AND tbl_name = 'events'").fetchall()
        assert indexes == []  # no index on events.id left to dirty a page per insert


async def test_checkpoints_beside_the_writer_keep_the_wal_small(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    journal = SqliteJournal.open(path)
    payload = b"x" * 1000
    try:
        for batch in range(200):  # 20 MB of events, 200 commits
            now = int(time.time() * 1000)
            await journal.commit_batch([
                NewEvent(f"rc:b{batch}-{n}", now, ROUTING, payload, now) for n in range(100)])
        # The checkpoint thread copied pages while the writer went on, and the WAL was
        # reused from its start (a few MB for 20 MB written).
        assert journal._checkpointer is not None
        assert journal._checkpointer.runs >= 200 // CHECKPOINT_EVERY // 2
        wal = Path(f"{path}-wal").stat().st_size
        assert wal < 8 * 1024 * 1024, f"WAL of {wal} bytes after 20 MB of commits"
    finally:
        await journal.close()
    assert not [t for t in threading.enumerate() if t.name == "relay-journal-checkpoint"]


async def test_one_batch_holding_an_id_twice_further_apart_than_the_window_keeps_the_later(
        tmp_path: Path) -> None:
    hour = 3_600_000
    t0 = int(time.time() * 1000) - 10 * hour
    journal = SqliteJournal.open(tmp_path / "relay.db", dedup_window_seconds=3600)
    try:
        result = await journal.commit_batch([event(1, fetched_at=t0),
                                             event(1, fetched_at=t0 + 2 * hour)])
        assert result.new == 1
        rows = await journal.read(0, 10)
        assert [(e.id, e.fetched_at) for e in rows] == [("rc:m1", t0 + 2 * hour)]
    finally:
        await journal.close()


async def test_a_moved_copy_compacted_before_the_merge_leaves_no_seq_behind(
        tmp_path: Path) -> None:
    hour = 3_600_000
    t0 = int(time.time() * 1000) - 10 * hour
    journal = SqliteJournal.open(tmp_path / "relay.db", dedup_window_seconds=3600,
                                 retain_seconds=3600, min_free_bytes=0, dedup_merge_at=2)
    try:
        await journal.commit_batch([event(0, fetched_at=t0), event(1, fetched_at=t0)])  # merged
        await journal.commit_batch([event(1, fetched_at=t0 + 2 * hour)])  # moves to seq 3
        assert await journal.compact(t0 + 3 * hour + 1) == 2  # seq 2 went with the move
        assert await journal.read(0, 10) == []
        assert await journal.event_seq("rc:m1") is None
        assert await journal.event_seq("rc:m1", t0) is None
    finally:
        await journal.close()


async def test_a_commit_reaches_its_thread_without_waiting_for_the_loop(tmp_path: Path) -> None:
    """A source's commit is on the path of its next request: it must not first wait
    behind every other ready task (another endpoint parsing an answer). Here a task
    that holds the loop for a while is ready when the commit starts; the row must be
    on disk before that task gives the loop back."""
    path = tmp_path / "relay.db"
    journal = SqliteJournal.open(path)
    seen_by_hog: list[int] = []

    async def hog() -> None:
        hold_the_loop_until(lambda: committed_rows(path) > 0)
        seen_by_hog.append(committed_rows(path))

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(hog)  # ready before the commit below starts
            result = await journal.commit_batch([event(n) for n in range(100)])
        assert result.new == 100
        assert seen_by_hog == [100]
    finally:
        await journal.close()


async def test_new_ids_are_not_looked_up_in_seen_and_held_ones_are_found_as_filters_grow(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Bloom filters over ``seen`` spare a new id its lookup there (a read from the
    file once ``seen`` outgrows the page cache), and hold every id merged, through
    several filters added as they fill and across a reopen."""
    monkeypatch.setattr(sqlite_dedup, "FILTER_FIRST", 16)
    path = tmp_path / "relay.db"
    journal = SqliteJournal.open(path, dedup_merge_at=10)
    statements: list[str] = []
    try:
        for start in range(0, 200, 20):
            result = await journal.commit_batch([event(n) for n in range(start, start + 20)])
            assert result.new == 20
        assert seen_rows(path) >= 180
        assert journal._group_writer is not None
        assert len(journal._group_writer.dedup._filter._filters) > 2  # it grew
        journal._group_writer.conn.set_trace_callback(statements.append)
        fresh = await journal.commit_batch([event(n) for n in range(1000, 1050)])
        assert fresh.new == 50
        # Only the filters' false positives (1 % each) are looked up, not all 50.
        looked_up = sum(s.count("'rc:m") for s in statements if "FROM seen" in s)
        assert looked_up <= 5
        again = await journal.commit_batch([event(n) for n in range(200)])
        assert (again.new, again.duplicates) == (0, 200)
    finally:
        await journal.close()
    reopened = SqliteJournal.open(path, dedup_merge_at=10)
    try:
        again = await reopened.commit_batch([event(n) for n in range(200)])
        assert (again.new, again.duplicates) == (0, 200)
    finally:
        await reopened.close()


def test_ids_merged_while_the_filter_fills_are_held_after_it(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "seen.db")
    conn.execute(sqlite_dedup.MIGRATION[0])  # the seen table
    conn.executemany("INSERT INTO seen VALUES (?, 1, 1)", [(f"old{n}",) for n in range(100)])
    held = sqlite_dedup.SeenFilter()
    assert held.maybe_held(["x", "y"]) == ["x", "y"]  # not filled: everything is a maybe
    held.add(["late0", "late1"])  # merged while the fill reads seen
    held.fill(conn)
    maybe = set(held.maybe_held([f"old{n}" for n in range(100)] + ["late0", "late1"]))
    assert maybe == {f"old{n}" for n in range(100)} | {"late0", "late1"}
    fresh = [f"new{n}" for n in range(1000)]
    assert len(held.maybe_held(fresh)) < 50  # false positives only (1 %)
    grown = [f"grown{n}" for n in range(300_000)]  # more than the first filter's room
    held.add(grown)
    assert len(held.maybe_held(grown)) == len(grown)
    conn.close()


async def test_a_large_seen_is_read_into_the_filter_beside_the_writer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_dedup, "FILL_ON_OPEN", 20)
    path = await journal_holding_100_merged(tmp_path)
    reopened = SqliteJournal.open(path, dedup_merge_at=10)
    try:
        assert reopened._group_writer is not None
        again = await reopened.commit_batch([event(n) for n in range(100)])
        assert (again.new, again.duplicates) == (0, 100)  # filled or not
        filling = reopened._group_writer.dedup.filling
        assert filling is not None  # more than FILL_ON_OPEN ids: filled on its own thread
        filling.join(timeout=10)
        assert not filling.is_alive()
        again = await reopened.commit_batch([event(n) for n in range(100)])
        assert (again.new, again.duplicates) == (0, 100)
    finally:
        await reopened.close()


async def test_batches_queued_behind_a_commit_are_committed_while_the_loop_is_busy(
        tmp_path: Path) -> None:
    """Groups form on the writer's thread: what is queued when a commit ends is
    committed next without a turn of the event loop (which parsing answers keeps busy)."""
    path = tmp_path / "relay.db"
    journal = SqliteJournal.open(path)
    seen_by_hog: list[int] = []

    def slow(_conn: object) -> None:
        time.sleep(0.3)  # the writer's thread is busy when both batches arrive

    async def hog() -> None:
        await anyio.sleep(0.05)  # both batches queued by now
        hold_the_loop_until(lambda: committed_rows(path) >= 20)
        seen_by_hog.append(committed_rows(path))

    async def commit(start: int) -> None:
        await journal.commit_batch([event(n) for n in range(start, start + 10)])

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(journal._write, slow)
            await anyio.sleep(0.01)
            tg.start_soon(commit, 0)
            tg.start_soon(commit, 10)
            tg.start_soon(hog)
        assert seen_by_hog == [20]
    finally:
        await journal.close()


def test_a_filter_being_filled_is_not_trusted_before_it_holds_the_late_ids(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fill runs beside the writer: stopped at any point, the writer must never be
    told "not held" for an id that is in seen (merged while the fill read it)."""
    conn = sqlite3.connect(tmp_path / "seen.db", check_same_thread=False)
    conn.execute(sqlite_dedup.MIGRATION[0])
    conn.executemany("INSERT INTO seen VALUES (?, 1, 1)", [(f"old{n}",) for n in range(100)])
    held = sqlite_dedup.SeenFilter()
    held.add(["late0"])  # merged while the fill reads seen
    inside, go = threading.Event(), threading.Event()
    add = sqlite_dedup.SeenFilter._add

    def paused_add(self: sqlite_dedup.SeenFilter, ids: list[str]) -> None:
        if threading.current_thread().name == "fill":
            inside.set()
            go.wait(5)  # the interpreter switching threads here
        add(self, ids)

    monkeypatch.setattr(sqlite_dedup.SeenFilter, "_add", paused_add)
    fill = threading.Thread(target=held.fill, args=(conn,), name="fill")
    fill.start()
    try:
        assert inside.wait(5)
        assert held.maybe_held(["late0", "old1"]) == ["late0", "old1"]
    finally:
        go.set()
        fill.join(5)
    assert held.maybe_held(["late0", "old1"]) == ["late0", "old1"]
    conn.close()


async def test_a_merge_that_fails_unexpectedly_stops_no_later_commit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    journal = SqliteJournal.open(tmp_path / "relay.db", dedup_merge_at=5)
    merged = sqlite_dedup.DedupIndex.merged

    def fails_once(self: sqlite_dedup.DedupIndex, through: int) -> None:
        monkeypatch.setattr(sqlite_dedup.DedupIndex, "merged", merged)
        raise MemoryError("a larger filter could not be allocated")

    monkeypatch.setattr(sqlite_dedup.DedupIndex, "merged", fails_once)
    try:
        first = await journal.commit_batch([event(n) for n in range(10)])  # merge due: fails
        assert first.new == 10
        with anyio.fail_after(5):
            second = await journal.commit_batch([event(n) for n in range(20)])
        assert (second.new, second.duplicates) == (10, 10)  # the unmerged ids still found
    finally:
        await journal.close()


async def _commit_as_one_group(journal: SqliteJournal, batches: list[list[NewEvent]]) -> None:
    """Commit ``batches`` from concurrent callers, all queued behind one slow commit, so
    that the writer's thread takes them as one group."""
    release = threading.Event()
    group = journal._group
    assert group is not None

    def slow(_conn: object) -> None:
        release.wait(5)

    async def commit(batch: list[NewEvent]) -> None:
        await journal.commit_batch(batch)

    async with anyio.create_task_group() as tg:
        tg.start_soon(journal._write, slow)
        for batch in batches:
            tg.start_soon(commit, batch)
        deadline = time.monotonic() + 5
        while len(group._queue) < len(batches) and time.monotonic() < deadline:  # noqa: ASYNC110 - a queue the writer thread owns
            await anyio.sleep(0.001)
        assert len(group._queue) == len(batches)
        release.set()


async def test_a_group_of_callers_inserts_its_events_in_one_statement(tmp_path: Path) -> None:
    """Each statement lets go of the interpreter lock and must win it back from the busy
    event loop: a group writes all its callers' events at once, in seq order."""
    journal = SqliteJournal.open(tmp_path / "relay.db")
    inserts: list[str] = []
    writer = journal._group_writer
    assert writer is not None
    writer.conn.set_trace_callback(
        lambda sql: inserts.append(sql) if sql.startswith("INSERT INTO events") else None)
    try:
        await _commit_as_one_group(journal, [[event(n) for n in range(s, s + 10)]
                                             for s in (0, 10, 20)])
        assert len(inserts) == 1
        rows = await journal.read(0, 100)
        assert sorted(e.id for e in rows) == sorted(f"rc:m{n}" for n in range(30))
        assert [e.seq for e in rows] == list(range(1, 31))
        # Each caller's events are contiguous, in its own order.
        ids = [e.id for e in rows]
        for s in (0, 10, 20):
            at = ids.index(f"rc:m{s}")
            assert ids[at:at + 10] == [f"rc:m{n}" for n in range(s, s + 10)]
    finally:
        writer.conn.set_trace_callback(None)
        await journal.close()


async def test_a_caller_queued_while_a_group_is_written_joins_its_transaction(
        tmp_path: Path) -> None:
    """A batch that arrives while the group before it is being written (its rows are the
    slow part) is written in the same transaction, before the COMMIT, instead of waiting
    for that whole transaction and then one of its own. (The first batch carries a cursor,
    so that its rows are written inside a transaction: a group of one statement runs it
    after its last look for joiners, and who queues while it runs waits for the next.)"""
    journal = SqliteJournal.open(tmp_path / "relay.db")
    writer = journal._group_writer
    group = journal._group
    assert writer is not None
    assert group is not None
    inserting, release = threading.Event(), threading.Event()
    commits: list[str] = []

    def trace(sql: str) -> None:  # on the writer's thread, as SQLite runs each statement
        if sql.startswith("INSERT INTO events") and not inserting.is_set():
            inserting.set()
            release.wait(5)  # the first group's rows are being written
        if sql == "COMMIT":
            commits.append(sql)

    writer.conn.set_trace_callback(trace)
    try:
        results = []

        async def commit(first: int) -> None:
            results.append(await journal.commit_batch(
                [event(n) for n in range(first, first + 10)],
                cursors={"rc:x": str(first)} if first == 0 else None))

        async with anyio.create_task_group() as tg:
            tg.start_soon(commit, 0)
            await anyio.to_thread.run_sync(inserting.wait, 5)
            tg.start_soon(commit, 10)
            deadline = time.monotonic() + 5
            while not group._queue and time.monotonic() < deadline:  # noqa: ASYNC110 - a queue the writer thread owns
                await anyio.sleep(0.001)
            assert group._queue  # the second batch waits behind the first group
            release.set()
        assert len(commits) == 1
        assert sorted((r.new, r.last_seq) for r in results) == [(10, 10), (10, 20)]
        rows = await journal.read(0, 100)
        assert [e.id for e in rows] == [f"rc:m{n}" for n in range(20)]
        assert [e.seq for e in rows] == list(range(1, 21))
    finally:
        writer.conn.set_trace_callback(None)
        await journal.close()


async def test_a_group_of_one_statement_commits_without_begin_and_commit(
        tmp_path: Path) -> None:
    """SQLite commits a lone statement as it runs it: a group whose writes are one INSERT
    (the usual source batch) makes one call into SQLite, not three, each of which lets go
    of the interpreter lock. Two writes open a transaction, as before."""
    path = tmp_path / "relay.db"
    journal = SqliteJournal.open(path)
    writer = journal._group_writer
    assert writer is not None
    statements: list[str] = []  # what writes or ends a transaction (reads are no matter)
    writer.conn.set_trace_callback(
        lambda sql: None if sql.startswith("SELECT") else statements.append(sql))
    try:
        await journal.commit_batch([event(n) for n in range(10)])
        assert [sql.split(" ")[:3] for sql in statements] == [["INSERT", "INTO", "events(seq,"]]
        statements.clear()
        await journal.commit_batch([event(n) for n in range(10, 20)], cursors={"rc:x": "1"})
        assert [sql.split(" ")[0] for sql in statements] == ["BEGIN", "INSERT", "INSERT", "COMMIT"]
    finally:
        writer.conn.set_trace_callback(None)
        await journal.close()
    reopened = SqliteJournal.open(path)
    try:
        assert [e.seq for e in await reopened.read(0, 100)] == list(range(1, 21))
        assert await reopened.get_cursors("rc:") == {"rc:x": "1"}
    finally:
        await reopened.close()


async def test_callers_in_one_group_holding_an_id_further_apart_than_the_window_keep_one(
        tmp_path: Path) -> None:
    """The later copy moves the earlier one even when both are in the same group (the
    earlier caller's rows are written before the later one is checked)."""
    hour = 3_600_000
    t0 = int(time.time() * 1000) - 10 * hour
    journal = SqliteJournal.open(tmp_path / "relay.db", dedup_window_seconds=3600)
    try:
        await _commit_as_one_group(journal, [
            [event(1, fetched_at=t0), event(2, fetched_at=t0)],
            [event(1, fetched_at=t0 + 2 * hour), event(3, fetched_at=t0 + 2 * hour)],
        ])
        rows = await journal.read(0, 10)
        assert sorted((e.id, e.fetched_at) for e in rows) == [
            ("rc:m1", t0 + 2 * hour), ("rc:m2", t0), ("rc:m3", t0 + 2 * hour)]
        assert len({e.seq for e in rows}) == 3
    finally:
        await journal.close()


async def test_a_writer_that_stores_no_events_never_reads_seen_into_the_filter(
        tmp_path: Path) -> None:
    """The admin commands open the writer for dead letters, cursors and erasure: with a
    large ``seen`` they must not wait for a filter they never use."""
    path = await journal_holding_100_merged(tmp_path)
    reopened = SqliteJournal.open(path, dedup_merge_at=10)
    try:
        writer = reopened._group_writer
        assert writer is not None
        await reopened.commit_batch([], cursors={"rc:x": "1"})
        assert not writer.dedup._filter._filled
        assert writer.dedup.filling is None
        again = await reopened.commit_batch([event(n) for n in range(100)])
        assert (again.new, again.duplicates) == (0, 100)
        assert writer.dedup._filter._filled  # the first batch filled it
    finally:
        await reopened.close()


async def test_a_deleted_journal_is_not_created_again_by_a_later_connection(
        tmp_path: Path) -> None:
    """The checkpoint's and the dedup fill's connections open after the journal did; if
    its file was deleted meanwhile, they must fail, not leave an empty database (with the
    process's default permissions) where the journal was."""
    path = tmp_path / "relay.db"
    journal = SqliteJournal.open(path)
    try:
        await journal.commit_batch([event(1)])
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        with pytest.raises(sqlite3.OperationalError):
            SqliteJournal._connect(path)
        assert not path.exists()
    finally:
        await journal.close()
    assert not path.exists()


async def test_a_clean_stop_leaves_the_high_seq_mark_current(tmp_path: Path) -> None:
    """Commits do not write the mark (their rows carry it); a relay of an earlier version
    opening this file (the same schema) does not keep it in its compaction, so the stop
    leaves it current for it."""
    path = tmp_path / "relay.db"
    journal = SqliteJournal.open(path)
    await journal.commit_batch([event(1), event(2), event(3)])
    await journal.close()
    with sqlite3.connect(path) as conn:
        mark = conn.execute("SELECT value FROM meta WHERE key = 'high_seq'").fetchone()
    assert mark == (3,)
