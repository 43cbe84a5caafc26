"""The embedded journal: one SQLite file in WAL mode with ``synchronous=FULL``.

A batch is committed in one transaction (events, quarantined records and the
source cursor together), so a crash leaves either all of it or none of it.
Blocking SQLite calls run in worker threads, one writer connection and one
reader connection, each used by one thread at a time; cancelling an awaiting
task never abandons a transaction half way (anyio waits for the thread).

Single writer: an exclusive ``flock`` on ``<path>.lock``; a second relay gets
:class:`JournalLockedError`. Read-only openers (``relay status``) take no lock.

The file the relay opened must stay the journal: SQLite writes on into a file
that was deleted (or renamed away) under it, and everything would be gone at
the next start while providers were being acknowledged. So every write
transaction checks, after committing, that the path still names the opened
file; if not, that write and every later one fail with the fatal
:class:`JournalGoneError` and the relay stops.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import anyio
import anyio.to_thread
import orjson

from relay.checks import CheckResult
from relay.journal import sqlite_commit, sqlite_dedup, sqlite_ledger
from relay.journal.base import (
    CommitResult,
    ConversationTally,
    DeadLetter,
    Fence,
    Grant,
    JournalError,
    JournalFullError,
    JournalGoneError,
    JournalLockedError,
    JournalSchemaError,
    JournalStats,
    JournalUnusableError,
    Lease,
    LedgerBatch,
    LedgerEntry,
    Member,
    NewEvent,
    QuarantinedRecord,
    SinkLag,
    StoredEvent,
    WriteBlocker,
)
from relay.journal.group import Pending
from relay.journal.local_leases import AliveFile, LocalLeases
from relay.journal.sqlite_checkpoint import WRITER_AUTOCHECKPOINT, Checkpointer
from relay.journal.sqlite_commit import ItemResult
from relay.journal.sqlite_group import ThreadGroupCommit
from relay.journal.sqlite_tail import TailCache
from relay.logs import get_logger
from relay.private_files import make_private_dirs
from relay.worker_thread import WorkerThread

SCHEMA_VERSION = 3

log = get_logger("relay.journal")

_T = TypeVar("_T")

# Migrations from version N-1 to N, applied in order inside one transaction each.
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        # seq is assigned by the (single) writer, never reused: see _next_seq.
        # Few columns on purpose: every column costs on each insert and read.
        """CREATE TABLE events(
            seq INTEGER PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            fetched_at INTEGER NOT NULL,
            routing BLOB NOT NULL,
            payload BLOB NOT NULL)""",
        "CREATE TABLE meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
        """CREATE TABLE cursors(
            key TEXT PRIMARY KEY, value TEXT NOT NULL, updated_at INTEGER NOT NULL)""",
        """CREATE TABLE sink_cursors(
            sink TEXT PRIMARY KEY, seq INTEGER NOT NULL, updated_at INTEGER NOT NULL)""",
        """CREATE TABLE quarantine(
            qid INTEGER PRIMARY KEY AUTOINCREMENT,
            source TEXT NOT NULL, endpoint TEXT NOT NULL, received_at INTEGER NOT NULL,
            error TEXT NOT NULL, raw BLOB NOT NULL)""",
        """CREATE TABLE dead_letters(
            dlid INTEGER PRIMARY KEY AUTOINCREMENT,
            sink TEXT NOT NULL, event_seq INTEGER NOT NULL, event_id TEXT NOT NULL,
            error TEXT NOT NULL, attempts INTEGER NOT NULL, failed_at INTEGER NOT NULL,
            payload BLOB NOT NULL, routing BLOB NOT NULL, fetched_at INTEGER NOT NULL,
            replay INTEGER NOT NULL DEFAULT 0)""",
        "CREATE INDEX dead_letters_sink ON dead_letters(sink, dlid)",
        # Requests from the CLI (replay) to a running relay, which applies them.
        """CREATE TABLE control(
            cid INTEGER PRIMARY KEY AUTOINCREMENT, sink TEXT NOT NULL, action TEXT NOT NULL,
            arg TEXT NOT NULL, created_at INTEGER NOT NULL)""",
    ),
    # The evacuation ledger: every message id an evacuated source took (relay evacuate).
    2: sqlite_ledger.MIGRATION,
    # Dedup without a random-order index on events.id: see sqlite_dedup.
    3: sqlite_dedup.MIGRATION,
}

_EVENT_COLUMNS = "seq, id, fetched_at, routing, payload"

# Page cache per connection (SQLite's own default). A page it misses comes from the
# kernel's page cache, which is not this process's memory: with 16 MB per connection
# the relay's RSS was ~55 MiB higher during a drain, and inserts and reads were no
# faster, in a fresh journal or one holding 1,000,000 events.
_CACHE_KIB = 2048


def _now_ms() -> int:
    return int(time.time() * 1000)


def _lock_holder(fd: int) -> str:
    """The pid the lock's holder wrote into the lock file, if it looks like one."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return text if text.isdigit() else ""


def _is_disk_full(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR):
        return True
    # Some I/O failures surface only as text (extended codes vary by platform).
    text = str(exc).lower()
    return "disk is full" in text or "disk i/o error" in text


class _Connection:
    """A sqlite3 connection and the one thread that uses it."""

    def __init__(self, conn: sqlite3.Connection, name: str) -> None:
        self.conn = conn
        self.thread = WorkerThread(name)

    async def run(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        return await self.thread.run(partial(fn, self.conn))


class SqliteJournal:
    """The embedded :class:`~relay.journal.base.Journal`."""

    def __init__(
        self,
        path: Path,
        writer: sqlite3.Connection | None,
        reader: sqlite3.Connection,
        lock_fd: int | None,
        *,
        retain_ms: int,
        min_free_bytes: int,
        dedup_window_ms: int = 86_400_000,
        dedup_merge_at: int = sqlite_dedup.MERGE_AT,
    ) -> None:
        self.path = path
        self._writer = _Connection(writer, "relay-journal-writer") \
            if writer is not None else None
        self._reader = _Connection(reader, "relay-journal-reader")
        self._lock_fd = lock_fd
        self._retain_ms = retain_ms
        self._min_free_bytes = min_free_bytes
        self._tail = TailCache()
        self._checkpointer: Checkpointer | None = None
        if writer is not None:
            writer.execute(f"PRAGMA wal_autocheckpoint={WRITER_AUTOCHECKPOINT}")
            self._checkpointer = Checkpointer(partial(self._connect, path), log.warning)
        self._last_seq = self._query_max_seq(reader)
        # An id already held is dropped unless its stored copy was fetched longer ago
        # than the window: then it is inserted again at a new seq, as new.
        self._group_writer = sqlite_commit.GroupWriter(
            writer, written_seq=self._last_seq, window_ms=int(dedup_window_ms),
            merge_at=dedup_merge_at, connect=partial(self._connect, path),
            warn=log.warning) if writer is not None else None
        self._group: ThreadGroupCommit[list[ItemResult]] | None = ThreadGroupCommit(
            self._writer.thread, self._commit_group, self._group_committed,
            self._merge_if_due) if self._writer is not None else None
        self._empty_read_at = -1  # _last_seq when a read last found nothing new
        self._new_events: anyio.Event | None = None
        self._space_checked_at = 0.0
        self._space_ok = True
        self._identity = self._file_identity()
        self._gone: str | None = None
        self._leases = LocalLeases()
        # Only the writer says it is alive; readers (relay status) leave the file alone.
        self._alive = AliveFile(Path(f"{path}.alive"), write=writer is not None)

    # -- opening -----------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        retain_seconds: float = 86400.0,
        min_free_bytes: int = 64 * 1024 * 1024,
        dedup_window_seconds: float = 86400.0,
        dedup_merge_at: int = sqlite_dedup.MERGE_AT,
    ) -> SqliteJournal:
        """Open (creating and migrating) the journal for writing; takes the single-writer lock."""
        db_path = Path(path)
        try:
            make_private_dirs(db_path.parent)
            lock_fd = os.open(f"{db_path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise JournalUnusableError(
                f"journal.path: cannot use {db_path}: {exc.strerror}"
                f" ({exc.filename or db_path.parent})") from None
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(lock_fd)
            os.close(lock_fd)
            raise JournalLockedError(
                f"the journal {db_path} is in use by another relay process"
                f"{f' (pid {holder})' if holder else ''} (one writer per journal)"
            ) from None
        # Who holds the lock, for the next one to say (the lock itself is the flock).
        os.ftruncate(lock_fd, 0)
        os.pwrite(lock_fd, f"{os.getpid()}\n".encode(), 0)
        try:
            # Chat content: owner-only from the first byte. SQLite gives the
            # -wal and -shm files the permissions of the main file.
            os.close(os.open(db_path, os.O_RDWR | os.O_CREAT, 0o600))
            writer = cls._connect(db_path)
            cls._migrate(writer)
            reader = cls._connect(db_path)
        except sqlite3.Error as exc:
            os.close(lock_fd)
            raise JournalUnusableError(f"journal.path: cannot open the journal {db_path}: {exc}")\
                from None
        except OSError as exc:
            os.close(lock_fd)
            raise JournalUnusableError(
                f"journal.path: cannot create {db_path}: {exc.strerror}") from None
        except BaseException:
            os.close(lock_fd)
            raise
        return cls(
            db_path,
            writer,
            reader,
            lock_fd,
            retain_ms=int(retain_seconds * 1000),
            min_free_bytes=min_free_bytes,
            dedup_window_ms=int(dedup_window_seconds * 1000),
            dedup_merge_at=dedup_merge_at,
        )

    @classmethod
    def open_readonly(cls, path: str | os.PathLike[str]) -> SqliteJournal:
        """Open an existing journal for reading (``relay status``); takes no lock."""
        db_path = Path(path)
        if not db_path.exists():
            raise JournalError(f"no journal at {db_path}")
        try:
            reader = sqlite3.connect(
                f"file:{db_path}?mode=ro", uri=True, check_same_thread=False, isolation_level=None
            )
            version = reader.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.Error as exc:
            raise JournalError(f"cannot read the journal {db_path}: {exc}") from None
        if version > SCHEMA_VERSION:
            raise JournalSchemaError(
                f"the journal {db_path} has schema version {version}; this relay knows "
                f"{SCHEMA_VERSION}: upgrade the relay"
            )
        return cls(db_path, None, reader, None, retain_ms=0, min_free_bytes=0)

    @classmethod
    def open_admin(cls, path: str | os.PathLike[str]) -> SqliteJournal:
        """Open for small writes beside a running relay (``relay dlq``, ``relay replay``).

        Takes no single-writer lock: SQLite serializes the writes, and what the
        CLI writes (requests, dead-letter flags) the running relay only reads.
        """
        db_path = Path(path)
        if not db_path.exists():
            raise JournalError(f"no journal at {db_path}")
        try:
            writer = cls._connect(db_path)
            version = writer.execute("PRAGMA user_version").fetchone()[0]
            reader = cls._connect(db_path)
        except sqlite3.Error as exc:
            raise JournalError(f"cannot open the journal {db_path}: {exc}") from None
        if version != SCHEMA_VERSION:
            writer.close()
            reader.close()
            if version > SCHEMA_VERSION:
                raise JournalSchemaError(
                    f"the journal {db_path} has schema version {version}; this relay knows "
                    f"{SCHEMA_VERSION}: upgrade the relay")
            raise JournalSchemaError(
                f"the journal {db_path} has schema version {version}, this relay {SCHEMA_VERSION}:"
                " run this relay version once (relay run) to migrate it first")
        return cls(db_path, writer, reader, None, retain_ms=0, min_free_bytes=0)

    @staticmethod
    def check_path(path: str | os.PathLike[str], min_free_bytes: int) -> CheckResult:
        """Whether a journal can live at ``path`` (for ``relay check``; touches nothing)."""
        db_path = Path(path)
        folder = db_path.parent
        probe = folder
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        target = str(db_path)
        if not probe.is_dir():
            return CheckResult("journal", target, False, f"{probe} is not a folder")
        if not os.access(probe, os.W_OK | os.X_OK) or (
                db_path.exists() and not os.access(db_path, os.R_OK | os.W_OK)):
            return CheckResult("journal", target, False, f"{probe} is not writable")
        try:
            free = shutil.disk_usage(probe).free
        except OSError as exc:
            return CheckResult("journal", target, False, f"cannot stat {probe}: {exc.strerror}")
        if free < min_free_bytes:
            return CheckResult("journal", target, False,
                               f"only {free} bytes free (journal.min_free_bytes {min_free_bytes})")
        lock = Path(f"{db_path}.lock")
        if lock.exists():
            fd = os.open(lock, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _lock_holder(fd)
                return CheckResult("journal", target, True,
                                   f"held by a running relay{f' (pid {holder})' if holder else ''}",
                                   warning=True)
            finally:
                os.close(fd)
        state = "exists" if db_path.exists() else "will be created"
        return CheckResult("journal", target, True, f"writable, {free / 1e9:.1f} GB free ({state})")

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        # mode=rw: the file exists (open() creates it owner-only first). A connection made
        # later (the checkpoint's, the dedup fill's) must fail if it was deleted meanwhile,
        # not create an empty database with default permissions where the journal was.
        conn = sqlite3.connect(f"file:{quote(os.fspath(path))}?mode=rw", uri=True,
                               check_same_thread=False, isolation_level=None, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute(f"PRAGMA cache_size=-{_CACHE_KIB}")
        return conn

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise JournalSchemaError(
                f"the journal has schema version {version}; this relay knows {SCHEMA_VERSION}: "
                "upgrade the relay"
            )
        if version == 0:
            # Both must precede the first table to take effect. 4 KiB pages: every dirty
            # page is written to the WAL whole, and each commit rewrites pages it only
            # touches (the table's last, partly filled page, the interior pages above it,
            # cursors, meta), which cost more the larger they are.
            # With the random-order id index of schema 1, 4 KiB pages took 0.6x the CPU
            # and 0.5x the commit time of 16 KiB ones (1,000,000 events held); without it
            # (schema 3) a whole drain, 3 alternated rounds: 19,400 / 18,500 / 17,100
            # events/s and 50.0 / 53.0 / 55.9 µs per event with 4 / 8 / 16 KiB pages.
            conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
            conn.execute("PRAGMA journal_mode=DELETE")
            conn.execute("PRAGMA page_size=4096")
            conn.execute("VACUUM")
            conn.execute("PRAGMA journal_mode=WAL")
        for target in range(version + 1, SCHEMA_VERSION + 1):
            started = time.monotonic()
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _MIGRATIONS[target]:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version={target}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            if version:  # an existing journal (version 3 rewrites the events table)
                log.info("journal schema migrated", version=target,
                         seconds=round(time.monotonic() - started, 1))
        # Who this journal is (``relay journal copy`` marks its target with it); not a
        # schema change: older files gain the row at their next writable open.
        conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('journal_id', ?)",
                     (secrets.randbits(62),))

    @staticmethod
    def _query_max_seq(conn: sqlite3.Connection) -> int:
        """The highest seq ever assigned, even if compaction or erasure removed its row."""
        stored = conn.execute("SELECT max(seq) FROM events").fetchone()[0] or 0
        mark = conn.execute("SELECT value FROM meta WHERE key = 'high_seq'").fetchone()
        return max(int(stored), int(mark[0]) if mark else 0)

    # -- the file itself ------------------------------------------------------

    def _file_identity(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    async def check_intact(self) -> None:
        self._check_intact()

    def _check_intact(self) -> None:
        """Raise :class:`JournalGoneError` if the path no longer names the opened journal."""
        if self._gone is None and self._writer is not None \
                and self._file_identity() != self._identity:
            self._gone = (f"the journal file {self.path} was deleted or replaced while the relay"
                          " was running: nothing written since is safe; stopping")
        if self._gone is not None:
            raise JournalGoneError(self._gone)

    # -- writing -----------------------------------------------------------

    async def max_seq(self) -> int:
        if self._writer is not None:  # the only writer: it knows
            return self._last_seq
        return await self._reader.run(self._query_max_seq)

    def _groups(self) -> ThreadGroupCommit[list[ItemResult]]:
        self._w()  # refuses a read-only journal
        assert self._group is not None  # there is one with every writer
        return self._group

    def _w(self) -> _Connection:
        if self._writer is None:
            raise JournalError("the journal was opened read-only")
        return self._writer

    def _transaction(self, conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], _T],
                     *, begin: bool = True) -> _T:
        """``fn`` in one immediate transaction (on the writer's thread). ``begin=False``:
        ``fn`` opens it when it writes more than one statement (a lone statement commits
        as it runs), and it is committed here if open."""
        # Whether the file is still the one opened is asked after the commit, which is
        # what decides (a write into a deleted file is lost either way); before it, only
        # what is known: one file look-up per commit, not two, each letting go of the
        # interpreter lock and waiting to win it back from the busy event loop.
        if self._gone is not None:
            raise JournalGoneError(self._gone)
        try:
            if begin:
                conn.execute("BEGIN IMMEDIATE")
            result = fn(conn)
            # begin=True: COMMIT even if the transaction ended unseen, so that SQLite says why.
            if begin or conn.in_transaction:
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            self._check_intact()
            if _is_disk_full(exc):
                raise JournalFullError(f"journal write failed, no space: {exc}") from None
            raise JournalError(f"journal write failed: {exc}") from None
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        # Committed, but into the file we opened only if the path still names it.
        self._check_intact()
        return result

    async def _write(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``fn`` in one immediate transaction on the writer connection."""
        return await self._w().run(partial(self._transaction, fn=fn))

    def _commit_group(self, group: list[Pending],
                      more: Callable[[], list[Pending]]) -> list[ItemResult]:
        """On the writer's thread: one transaction (one fsync) for a group of callers,
        those ``more()`` hands it while it writes included (it adds them to ``group``)."""
        writer = self._group_writer
        assert writer is not None  # _w() refused a read-only journal already
        try:
            results = self._transaction(writer.conn, lambda conn: writer.apply(group, more),
                                        begin=False)
        except BaseException:
            writer.rolled_back()
            raise
        writer.committed(results)
        for pending, result in zip(group, results, strict=True):
            pending.result = CommitResult(new=result.new, duplicates=len(result.duplicates),
                                          quarantined=result.quarantined,
                                          last_seq=result.last_seq)
        return results

    def _group_committed(self, group: list[Pending], results: list[ItemResult]) -> None:
        """On the loop, in commit order: what readers of the journal see moves on."""
        if self._checkpointer is not None:
            self._checkpointer.committed()
        for pending, result in zip(group, results, strict=True):
            if result.moved:
                self._tail.clear()
            if result.new:
                self._tail.add(pending.events, result)
        # Here, in commit order, not by each caller as it resumes: a caller cancelled
        # after its batch was taken never resumes, and its events are there all the same.
        last = results[-1].last_seq if results else self._last_seq
        if last > self._last_seq:
            self._last_seq = last
            if self._new_events is not None:
                self._new_events.set()
                self._new_events = None

    def _merge_if_due(self) -> None:
        """On the writer's thread, after a commit: the next group waits for the merge."""
        writer = self._group_writer
        assert writer is not None
        if not writer.dedup.merge_due():
            return
        through = writer.written_seq
        try:
            self._transaction(writer.conn, lambda conn: writer.dedup.merge(conn, through))
            writer.dedup.merged(through)
        except Exception as exc:  # said; its ids stay in memory, still found
            # The group is committed all the same; the tail stays in memory and the
            # merge is tried again after the next commit.
            log.warning("journal dedup merge failed; retried after the next commit",
                        error=str(exc))

    async def commit_batch(
        self,
        events: Sequence[NewEvent],
        *,
        cursors: Mapping[str, str] | None = None,
        quarantine: Sequence[QuarantinedRecord] = (),
        ledger: LedgerBatch | None = None,
        fence: Fence | None = None,
    ) -> CommitResult:
        self._leases.check(fence)
        return await self._groups().submit(
            Pending(events=events, cursors=cursors, quarantine=quarantine, ledger=ledger))

    async def set_cursors(self, cursors: Mapping[str, str]) -> None:
        await self.commit_batch((), cursors=cursors)

    async def get_cursors(self, prefix: str) -> dict[str, str]:
        def query(conn: sqlite3.Connection) -> dict[str, str]:
            rows = conn.execute(
                "SELECT key, value FROM cursors WHERE substr(key, 1, ?) = ?", (len(prefix), prefix)
            ).fetchall()
            return {k: v for k, v in rows}

        return await self._reader.run(query)

    # -- sinks -------------------------------------------------------------

    async def read(self, after_seq: int, limit: int) -> list[StoredEvent]:
        def query(conn: sqlite3.Connection) -> list[StoredEvent]:
            rows = conn.execute(
                f"SELECT {_EVENT_COLUMNS} FROM events WHERE seq > ? ORDER BY seq LIMIT ?",  # noqa: S608
                (after_seq, limit),
            ).fetchall()
            return list(map(StoredEvent._make, rows))

        known = self._last_seq
        rows = self._tail.read(after_seq, limit)
        if rows is None:
            rows = await self._reader.run(query)
        if not rows:
            self._empty_read_at = known
        return rows

    async def wait_for_events(self, after_seq: int, timeout: float) -> None:
        # Past after_seq, unless a read just found nothing there (the events past it
        # were erased): then wait for the next commit instead of spinning.
        if self._last_seq > after_seq and self._last_seq != self._empty_read_at:
            return
        if self._new_events is None:
            self._new_events = anyio.Event()
        with anyio.move_on_after(timeout):
            await self._new_events.wait()

    async def register_sinks(self, names: Sequence[str], *, prune: bool) -> None:
        now = _now_ms()

        def apply(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT OR IGNORE INTO sink_cursors(sink, seq, updated_at) VALUES (?, 0, ?)",
                [(name, now) for name in names],
            )
            if prune:
                marks = ",".join("?" * len(names))
                conn.execute(f"DELETE FROM sink_cursors WHERE sink NOT IN ({marks})", tuple(names))  # noqa: S608

        await self._write(apply)

    async def sink_cursor(self, sink: str) -> int:
        def query(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT seq FROM sink_cursors WHERE sink = ?", (sink,)).fetchone()
            return int(row[0]) if row else 0

        return await self._reader.run(query)

    async def advance_sink(self, sink: str, seq: int, *, fence: Fence | None = None) -> None:
        self._leases.check(fence)
        await self._groups().submit(Pending(sink=(sink, seq)))

    # -- leases: one writer (the flock), so every lease is this relay's ---------

    async def heartbeat(self, member: str, description: str) -> None:
        self._leases.heartbeat(member, description)
        self._alive.beat()

    async def members(self, ttl: float) -> list[Member]:
        return self._leases.members()

    async def acquire(self, unit: str, member: str, ttl: float) -> Grant | None:
        grant = self._leases.acquire(unit, member)
        if grant is None:
            return None
        return Grant(grant.fence, self._alive.previous_end_ago())

    async def renew(self, fence: Fence, ttl: float) -> bool:
        return self._leases.holds(fence)

    async def release(self, fence: Fence) -> None:
        self._leases.release(fence)

    async def leave(self, member: str) -> None:
        self._leases.leave(member)
        self._alive.beat()

    async def leases(self) -> list[Lease]:
        return self._leases.leases()

    async def rewind_sink(self, sink: str, since_ms: int) -> int:
        now = _now_ms()

        def apply(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "SELECT min(seq) FROM events WHERE fetched_at >= ?", (since_ms,)
            ).fetchone()
            target = (int(row[0]) - 1) if row and row[0] is not None else self._query_max_seq(conn)
            # Only ever back: a lagging sink's cursor must not jump past what it has not
            # delivered yet (SPEC §4 e).
            conn.execute(
                "INSERT INTO sink_cursors(sink, seq, updated_at) VALUES (?,?,?)"
                " ON CONFLICT(sink) DO UPDATE SET seq=min(seq, excluded.seq),"
                " updated_at=excluded.updated_at",
                (sink, target, now),
            )
            return int(conn.execute("SELECT seq FROM sink_cursors WHERE sink = ?",
                                    (sink,)).fetchone()[0])

        return await self._write(apply)

    async def event_seq(self, event_id: str, fetched_at: int | None = None) -> int | None:
        def query(conn: sqlite3.Connection) -> int | None:
            row = sqlite_dedup.lookup(conn, event_id)
            if row is None or (fetched_at is not None and row[1] != fetched_at):
                return None
            return row[0]

        return await self._reader.run(query)

    # -- dead letters ------------------------------------------------------

    async def add_dead_letters(
        self, sink: str, events: Sequence[StoredEvent], error: str, attempts: int
    ) -> None:
        now = _now_ms()

        def apply(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT INTO dead_letters(sink, event_seq, event_id, error, attempts, failed_at,"
                " payload, routing, fetched_at) VALUES (?,?,?,?,?,?,?,?,?)",
                [(sink, e.seq, e.id, error, attempts, now, e.payload, e.routing_json,
                  e.fetched_at) for e in events],
            )

        await self._write(apply)

    async def dead_letters(self, sink: str | None, limit: int, *,
                           dlid: int | None = None) -> list[DeadLetter]:
        def query(conn: sqlite3.Connection) -> list[DeadLetter]:
            sql = (
                "SELECT dlid, sink, event_seq, event_id, error, attempts, failed_at, payload,"
                " replay FROM dead_letters WHERE 1=1"
            )
            params: list[Any] = []
            if sink is not None:
                sql += " AND sink = ?"
                params.append(sink)
            if dlid is not None:
                sql += " AND dlid = ?"
                params.append(dlid)
            rows = conn.execute(sql + " ORDER BY dlid LIMIT ?", (*params, limit)).fetchall()
            return [DeadLetter(dlid=r[0], sink=r[1], event_seq=r[2], event_id=r[3], error=r[4],
                               attempts=r[5], failed_at=r[6], payload=r[7], replay=bool(r[8]))
                    for r in rows]

        return await self._reader.run(query)

    async def request_dead_letter_replay(self, sink: str | None, dlids: Sequence[int]) -> int:
        """Mark dead letters for re-delivery (all of ``sink``'s when no ids are given)."""

        def apply(conn: sqlite3.Connection) -> int:
            if dlids:
                cur = conn.executemany("UPDATE dead_letters SET replay = 1 WHERE dlid = ?",
                                       [(d,) for d in dlids])
            elif sink is not None:
                cur = conn.execute("UPDATE dead_letters SET replay = 1 WHERE sink = ?", (sink,))
            else:
                cur = conn.execute("UPDATE dead_letters SET replay = 1")
            return cur.rowcount

        return await self._write(apply)

    async def dead_letters_to_replay(self, sink: str, limit: int) -> list[tuple[int,
                                                                             StoredEvent]]:
        def query(conn: sqlite3.Connection) -> list[tuple[int, StoredEvent]]:
            rows = conn.execute(
                "SELECT dlid, event_seq, event_id, fetched_at, routing, payload FROM dead_letters"
                " WHERE sink = ? AND replay = 1 ORDER BY dlid LIMIT ?", (sink, limit)).fetchall()
            return [(row[0], StoredEvent(*row[1:])) for row in rows]

        return await self._reader.run(query)

    async def settle_dead_letters(self, delivered: Sequence[int],
                                  refused: Sequence[tuple[int, str]]) -> None:
        """After a replay: drop what was delivered, count another attempt on the rest."""
        now = _now_ms()

        def apply(conn: sqlite3.Connection) -> None:
            conn.executemany("DELETE FROM dead_letters WHERE dlid = ?",
                             [(d,) for d in delivered])
            conn.executemany(
                "UPDATE dead_letters SET replay = 0, attempts = attempts + 1, error = ?,"
                " failed_at = ? WHERE dlid = ?", [(err, now, d) for d, err in refused])

        await self._write(apply)

    async def remove_dead_letters(self, dlids: Sequence[int], *, sink: str | None = None,
                                  everything: bool = False) -> int:
        def apply(conn: sqlite3.Connection) -> int:
            if dlids:
                cur = conn.executemany("DELETE FROM dead_letters WHERE dlid = ?",
                                       [(d,) for d in dlids])
            elif sink is not None:
                cur = conn.execute("DELETE FROM dead_letters WHERE sink = ?", (sink,))
            elif everything:
                cur = conn.execute("DELETE FROM dead_letters")
            else:
                return 0
            return cur.rowcount

        return await self._write(apply)

    # -- personal data -----------------------------------------------------

    async def erase_user(self, user_id: str, *, dry_run: bool = False) -> dict[str, int]:
        """Delete every event, dead letter and quarantined record of one user."""
        token = orjson.dumps(user_id).decode()  # how the id appears inside raw JSON
        where_event = ("(json_extract(CAST(payload AS TEXT), '$.sender') = ?"
                       " OR json_extract(CAST(payload AS TEXT), '$.recipient') = ?)")

        def apply(conn: sqlite3.Connection) -> dict[str, int]:
            counts = {}
            conn.execute("PRAGMA secure_delete=ON")  # erased chat content is overwritten
            if not dry_run:
                conn.execute(sqlite_commit.KEEP_HIGH_SEQ)
                erased.extend(i for (i,) in conn.execute(
                    f"SELECT id FROM events WHERE {where_event}", (user_id, user_id)))  # noqa: S608
                conn.executemany("DELETE FROM seen WHERE id = ?", [(i,) for i in erased])
            for table in ("events", "dead_letters"):
                verb = "SELECT count(*)" if dry_run else "DELETE"
                cur = conn.execute(f"{verb} FROM {table} WHERE {where_event}",
                                   (user_id, user_id))
                counts[table] = cur.fetchone()[0] if dry_run else cur.rowcount
            verb = "SELECT count(*)" if dry_run else "DELETE"
            cur = conn.execute(f"{verb} FROM quarantine WHERE instr(CAST(raw AS TEXT), ?) > 0",
                               (token,))
            counts["quarantine"] = cur.fetchone()[0] if dry_run else cur.rowcount
            return counts

        erased: list[str] = []
        counts = await self._write(apply)
        if not dry_run:
            self._tail.clear()
            writer = self._group_writer
            if writer is not None:
                await self._w().run(lambda conn: writer.dedup.drop(erased))
            # Freed pages still hold the bytes until reused: give them back and scrub.
            def vacuum(conn: sqlite3.Connection) -> None:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
                conn.execute("VACUUM")

            await self._w().run(vacuum)
        return counts

    # -- control requests --------------------------------------------------

    async def request_control(self, sink: str, action: str, arg: str) -> None:
        now = _now_ms()

        def apply(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO control(sink, action, arg, created_at) VALUES (?,?,?,?)",
                         (sink, action, arg, now))

        await self._write(apply)

    async def take_control(self, sink: str) -> list[tuple[str, str]]:
        """Pending requests for ``sink`` (removed as they are returned)."""

        def apply(conn: sqlite3.Connection) -> list[tuple[str, str]]:
            rows = conn.execute("SELECT cid, action, arg FROM control WHERE sink = ?"
                                " ORDER BY cid", (sink,)).fetchall()
            if rows:
                conn.executemany("DELETE FROM control WHERE cid = ?", [(r[0],) for r in rows])
            return [(r[1], r[2]) for r in rows]

        return await self._write(apply)

    async def count_since(self, since_ms: int, *, through_seq: int | None = None) -> int:
        def query(conn: sqlite3.Connection) -> int:
            sql = "SELECT count(*) FROM events WHERE fetched_at >= ?"
            params: tuple[int, ...] = (since_ms,)
            if through_seq is not None:
                sql += " AND seq <= ?"
                params += (through_seq,)
            return int(conn.execute(sql, params).fetchone()[0])

        return await self._reader.run(query)

    async def count_after(self, after_seq: int) -> int:
        return int(await self._reader.run(lambda conn: conn.execute(
            "SELECT count(*) FROM events WHERE seq > ?", (after_seq,)).fetchone()[0]))

    # -- moving an installation (relay journal copy) ------------------------

    async def journal_id(self) -> int:
        """This journal's identity (0 for a read-only open of a file that has none yet)."""
        def query(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT value FROM meta WHERE key = 'journal_id'").fetchone()
            return int(row[0]) if row else 0

        return await self._reader.run(query)

    async def export_rows(self, table: str, columns: Sequence[str], after: int,
                          limit: int) -> list[tuple[Any, ...]]:
        """Rows of ``table`` whose first column (its integer key) is past ``after``.

        ``table`` and ``columns`` come from the copy tool's fixed list, never from input.
        """
        sql = (f"SELECT {', '.join(columns)} FROM {table} WHERE {columns[0]} > ?"  # noqa: S608
               f" ORDER BY {columns[0]} LIMIT ?")

        def query(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
            return conn.execute(sql, (after, limit)).fetchall()

        return await self._reader.run(query)

    async def export_keyed(self, table: str, columns: Sequence[str]) -> list[tuple[Any, ...]]:
        """Every row of a small table keyed by text (cursors, sink cursors)."""
        sql = f"SELECT {', '.join(columns)} FROM {table} ORDER BY {columns[0]}"  # noqa: S608
        return await self._reader.run(lambda conn: conn.execute(sql).fetchall())

    async def high_seq(self) -> int:
        """The highest seq ever assigned (also after its row was compacted or erased)."""
        return await self._reader.run(self._query_max_seq)

    # -- housekeeping ------------------------------------------------------

    async def compact(self, now_ms: int) -> int:
        cutoff = now_ms - self._retain_ms

        def apply(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT min(seq) FROM sink_cursors").fetchone()
            delivered = int(row[0]) if row and row[0] is not None else self._query_max_seq(conn)
            deleted = 0
            # Chunks keep each transaction (and the writer's lock) short.
            while True:
                conn.execute(sqlite_commit.KEEP_HIGH_SEQ)
                conn.execute(sqlite_dedup.FORGET_COMPACTED, (delivered, cutoff, 20000))
                cur = conn.execute(
                    "DELETE FROM events WHERE seq IN (SELECT seq FROM events WHERE seq <= ?"
                    " AND fetched_at < ? ORDER BY seq LIMIT 20000)",
                    (delivered, cutoff),
                )
                deleted += cur.rowcount
                if cur.rowcount < 20000:
                    break
                conn.execute("COMMIT")
                conn.execute("BEGIN IMMEDIATE")
            conn.execute("DELETE FROM quarantine WHERE received_at < ?", (cutoff,))
            return deleted

        deleted = await self._write(apply)
        if deleted:
            self._tail.clear()  # a slow journal's tail can be older than the retention
            await self._w().run(lambda conn: conn.execute("PRAGMA incremental_vacuum").fetchall())
        return deleted

    # -- the evacuation ledger ------------------------------------------------

    async def ledger_tallies(self, source: str, before_ms: int) -> dict[str, ConversationTally]:
        return await self._reader.run(
            lambda conn: sqlite_ledger.tallies(conn, source, before_ms))

    async def ledger_missing(self, source: str,
                             keys: Sequence[tuple[int, str]]) -> list[tuple[int, str]]:
        return await self._reader.run(lambda conn: sqlite_ledger.missing(conn, source, keys))

    async def ledger_quarantined(self, source: str, limit: int) -> list[LedgerEntry]:
        return await self._reader.run(
            lambda conn: sqlite_ledger.quarantined(conn, source, limit))

    async def storage_bytes(self) -> int:
        return self.size_bytes()

    def size_bytes(self) -> int:
        total = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(OSError):
                total += os.stat(f"{self.path}{suffix}").st_size
        return total

    def write_blocker(self) -> WriteBlocker | None:
        return None if self._has_space() else "disk full"

    def _has_space(self) -> bool:
        if self._min_free_bytes <= 0:
            return True
        now = time.monotonic()
        if now - self._space_checked_at >= 1.0:
            self._space_checked_at = now
            try:
                self._space_ok = shutil.disk_usage(self.path.parent).free >= self._min_free_bytes
            except OSError:
                self._space_ok = False
        return self._space_ok

    async def stats(self) -> JournalStats:
        def query(conn: sqlite3.Connection) -> JournalStats:
            max_seq = self._query_max_seq(conn)
            count, oldest = conn.execute("SELECT count(*), min(fetched_at) FROM events").fetchone()
            quarantined = conn.execute("SELECT count(*) FROM quarantine").fetchone()[0]
            dead = conn.execute("SELECT count(*) FROM dead_letters").fetchone()[0]
            sinks = []
            for sink, cursor in conn.execute("SELECT sink, seq FROM sink_cursors ORDER BY sink"):
                pending, oldest_pending = conn.execute(
                    "SELECT count(*), min(fetched_at) FROM events WHERE seq > ?", (cursor,)
                ).fetchone()
                sinks.append(SinkLag(sink, int(cursor), int(pending), oldest_pending))
            cursors = dict(conn.execute("SELECT key, value FROM cursors ORDER BY key").fetchall())
            return JournalStats(
                path=str(self.path),
                max_seq=max_seq,
                events=int(count),
                bytes=self.size_bytes(),
                oldest_fetched_at=oldest,
                quarantined=int(quarantined),
                dead_letters=int(dead),
                sinks=sinks,
                cursors=cursors,
            )

        return await self._reader.run(query)

    async def close(self) -> None:
        if self._group_writer is not None and self._gone is None:
            # A relay of an earlier version (the same schema) keeps the high seq mark at
            # every commit and not in its compaction: current at a clean stop, it cannot
            # hand out the seqs of rows that this one compacted or erased.
            with contextlib.suppress(JournalError):
                await self._write(lambda conn: conn.execute(sqlite_commit.KEEP_HIGH_SEQ))
        if self._checkpointer is not None:
            await anyio.to_thread.run_sync(self._checkpointer.close)
        filling = self._group_writer.dedup.filling if self._group_writer is not None else None
        if filling is not None:
            await anyio.to_thread.run_sync(filling.join)
        self._alive.close()
        for conn in (self._writer, self._reader):
            if conn is not None:
                await conn.run(lambda c: c.close())
                conn.thread.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
