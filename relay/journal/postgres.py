"""The shared journal: one PostgreSQL schema (``relay`` by default), through asyncpg.

Tables mirror the SQLite journal's; every statement names them unqualified and
each connection's ``search_path`` is the journal's schema, so several journals
can share a database.

Order (SPEC §9). A sink reads ``WHERE seq > cursor``. With several committers,
a sequence handed out before another committer's larger one may become visible
after it, and a sink that already moved past would skip it for good. So every
transaction that inserts events first takes one transaction-level advisory lock
(per schema), and only then draws seqs: transactions that insert events commit
one after the other in seq order, and the lock is released only once the commit
is visible. A reader that sees a seq therefore already sees every smaller one.

Group commit as in SQLite: what arrives together is one transaction. Its
``pg_notify`` (sent at commit) wakes sinks waiting in :meth:`wait_for_events`,
on a connection of its own that is re-opened when it drops; while it is down,
waiting falls back to polling.

The database unreachable: every method raises plain :class:`JournalError` (never
an asyncpg error), so sources keep their batch and sinks their cursor write and
retry; ``relay_journal_up`` is 0 until the database answers again. The pool
reconnects by itself: nothing needs reopening.

Identity: the first migration stores a random ``journal_id``; every commit
checks it in its transaction, so a journal whose schema was dropped or recreated
under the relay fails with the fatal :class:`JournalGoneError`, as a deleted
SQLite file does.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, Literal, TypeAlias

import anyio
import asyncpg
import orjson
from asyncpg.pool import PoolConnectionProxy

from relay import metrics
from relay.journal.base import (
    CommitResult,
    ConversationTally,
    DeadLetter,
    Fence,
    Grant,
    JournalError,
    JournalFullError,
    JournalGoneError,
    JournalSchemaError,
    JournalStats,
    Lease,
    LeaseLostError,
    LedgerBatch,
    LedgerEntry,
    Member,
    NewEvent,
    QuarantinedRecord,
    SinkLag,
    StoredEvent,
    WriteBlocker,
)
from relay.journal.group import GroupCommit, Pending
from relay.logs import get_logger

log = get_logger("relay.journal")

Mode = Literal["writer", "status", "admin"]
Conn: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"

POOL_SIZE = 8  # sinks read, sources commit, housekeeping: few are busy at once
CONNECT_TIMEOUT = 10.0
COMMAND_TIMEOUT = 30.0
LISTEN_RETRY = 1.0  # between attempts to re-open the notification connection
LISTEN_PING = 5.0  # how often the idle notification connection proves it is alive
POLL_INTERVAL = 0.25  # wait_for_events while notifications are down
COMPACT_CHUNK = 20_000
IDLE_IN_TRANSACTION_MS = 30_000

# Migrations from version N-1 to N, each in the transaction that records it.
# ``{s}`` is the schema (a checked identifier, quoted).
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        "CREATE TABLE {s}.meta(key text PRIMARY KEY, value bigint NOT NULL)",
        "CREATE SEQUENCE {s}.event_seq AS bigint",
        # seq is drawn under the commit lock (see the module's docstring). Few columns
        # on purpose: every column costs on each insert and read.
        """CREATE TABLE {s}.events(
            seq bigint PRIMARY KEY DEFAULT nextval('{s}.event_seq'),
            id text NOT NULL UNIQUE,
            fetched_at bigint NOT NULL,
            routing bytea NOT NULL,
            payload bytea NOT NULL)""",
        "ALTER SEQUENCE {s}.event_seq OWNED BY {s}.events.seq",
        """CREATE TABLE {s}.cursors(
            key text PRIMARY KEY, value text NOT NULL, updated_at bigint NOT NULL)""",
        """CREATE TABLE {s}.sink_cursors(
            sink text PRIMARY KEY, seq bigint NOT NULL, updated_at bigint NOT NULL)""",
        """CREATE TABLE {s}.quarantine(
            qid bigserial PRIMARY KEY,
            source text NOT NULL, endpoint text NOT NULL, received_at bigint NOT NULL,
            error text NOT NULL, raw bytea NOT NULL)""",
        """CREATE TABLE {s}.dead_letters(
            dlid bigserial PRIMARY KEY,
            sink text NOT NULL, event_seq bigint NOT NULL, event_id text NOT NULL,
            error text NOT NULL, attempts integer NOT NULL, failed_at bigint NOT NULL,
            payload bytea NOT NULL, routing bytea NOT NULL, fetched_at bigint NOT NULL,
            replay boolean NOT NULL DEFAULT false)""",
        "CREATE INDEX dead_letters_sink ON {s}.dead_letters(sink, dlid)",
        """CREATE TABLE {s}.control(
            cid bigserial PRIMARY KEY, sink text NOT NULL, action text NOT NULL,
            arg text NOT NULL, created_at bigint NOT NULL)""",
    ),
    # The evacuation ledger (see :class:`relay.journal.base.Ledger`): keyed in the
    # history's own order, with an index per conversation for the check's tallies.
    2: (
        """CREATE TABLE {s}.ledger(
            source text NOT NULL, ts bigint NOT NULL, msg_id text NOT NULL,
            conv text NOT NULL, error text,
            PRIMARY KEY (source, ts, msg_id))""",
        "CREATE INDEX ledger_conversation ON {s}.ledger(source, conv, ts, msg_id)",
    ),
    # The cluster (SPEC §9): members' heartbeats and leases on units of work, all by
    # the database's clock, so that replicas never compare their own clocks.
    3: (
        """CREATE TABLE {s}.members(
            member text PRIMARY KEY, description text NOT NULL,
            heartbeat_at timestamptz NOT NULL)""",
        """CREATE TABLE {s}.leases(
            unit text PRIMARY KEY, holder text, epoch bigint NOT NULL,
            expires_at timestamptz NOT NULL, ended_at timestamptz)""",
    ),
}


def schema_version() -> int:
    """The newest schema version this relay knows."""
    return max(MIGRATIONS)


_EVENT_COLUMNS = "seq, id, fetched_at, routing, payload"

# One round trip: inserts, counts, and notifies (at commit) when anything is new.
# An id held from within the dedup window ($5 ms) is dropped; an older one takes
# its new seq (EXCLUDED.seq, drawn for the proposed row) and content, as new.
_INSERT_EVENTS = """
WITH ins AS (
    INSERT INTO events AS e (id, fetched_at, routing, payload)
    SELECT * FROM unnest($1::text[], $2::bigint[], $3::bytea[], $4::bytea[])
    ON CONFLICT (id) DO UPDATE SET seq = EXCLUDED.seq, fetched_at = EXCLUDED.fetched_at,
        routing = EXCLUDED.routing, payload = EXCLUDED.payload
    WHERE e.fetched_at < EXCLUDED.fetched_at - $5
    RETURNING seq)
SELECT count(*)::bigint, max(seq),
       CASE WHEN count(*) > 0 THEN pg_notify($6, max(seq)::text)::text END
FROM ins"""
_LOCK_AND_IDENTITY = ("SELECT pg_advisory_xact_lock($1),"
                      " (SELECT value FROM meta WHERE key = 'journal_id')")
_IDENTITY = "SELECT (SELECT value FROM meta WHERE key = 'journal_id')"
_UPSERT_CURSORS = (
    "INSERT INTO cursors(key, value, updated_at) SELECT k, v, $3"
    " FROM unnest($1::text[], $2::text[]) AS u(k, v)"
    " ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, updated_at = EXCLUDED.updated_at")
_INSERT_QUARANTINE = (
    "INSERT INTO quarantine(source, endpoint, received_at, error, raw)"
    " SELECT s, e, $5, err, r FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[])"
    " AS u(s, e, err, r)")
_INSERT_LEDGER = (
    "INSERT INTO ledger(source, ts, msg_id, conv, error)"
    " SELECT $1, t, m, c, e FROM unnest($2::bigint[], $3::text[], $4::text[], $5::text[])"
    " AS u(t, m, c, e) ON CONFLICT DO NOTHING")
# Per conversation: how many, and the first and last (ts, msg_id) in history order.
_LEDGER_TALLIES = """
SELECT conv, count(*),
    (SELECT ARRAY[f.ts::text, f.msg_id] FROM ledger f WHERE f.source = $1 AND f.conv = l.conv
     AND f.ts < $2 ORDER BY f.ts, f.msg_id LIMIT 1),
    (SELECT ARRAY[z.ts::text, z.msg_id] FROM ledger z WHERE z.source = $1 AND z.conv = l.conv
     AND z.ts < $2 ORDER BY z.ts DESC, z.msg_id DESC LIMIT 1)
FROM ledger l WHERE source = $1 AND ts < $2 GROUP BY conv"""
_FENCE = "SELECT epoch FROM leases WHERE unit = $1 AND holder = $2 FOR SHARE"
# A free or expired lease changes hands with a new epoch (the row locked by _PREVIOUS
# first, which also says how long ago the previous tenure ended, for the new holder's
# request budget).
_PREVIOUS = (
    "SELECT extract(epoch FROM clock_timestamp() - COALESCE(ended_at, expires_at))::float8,"
    " holder IS NULL OR expires_at < clock_timestamp() FROM leases WHERE unit = $1 FOR UPDATE")
_ACQUIRE = """
INSERT INTO leases AS l (unit, holder, epoch, expires_at)
VALUES ($1, $2, 1, clock_timestamp() + make_interval(secs => $3))
ON CONFLICT (unit) DO UPDATE SET holder = EXCLUDED.holder, epoch = l.epoch + 1,
    expires_at = EXCLUDED.expires_at, ended_at = NULL
WHERE l.holder IS NULL OR l.expires_at < clock_timestamp()
RETURNING l.epoch"""
_ADVANCE_SINK = (
    "INSERT INTO sink_cursors(sink, seq, updated_at) VALUES ($1, $2, $3)"
    " ON CONFLICT (sink) DO UPDATE SET seq = GREATEST(sink_cursors.seq, EXCLUDED.seq),"
    " updated_at = EXCLUDED.updated_at")
_MAX_SEQ = ("SELECT GREATEST((SELECT COALESCE(max(seq), 0) FROM events),"
            " (SELECT COALESCE(max(value), 0) FROM meta WHERE key = 'high_seq'))")
# Before rows are deleted, so that the highest seq ever assigned is never forgotten.
_KEEP_HIGH_SEQ = (
    "INSERT INTO meta(key, value) SELECT 'high_seq', COALESCE(max(seq), 0) FROM events"
    " ON CONFLICT (key) DO UPDATE SET value = GREATEST(meta.value, EXCLUDED.value)")

# Failures that mean "the database cannot be reached" (rather than "this query failed").
_UNREACHABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncio.TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.exceptions.OperatorInterventionError,  # admin_shutdown, crash_shutdown ...
    # A connection caught in the middle of the server going away ("another operation is
    # in progress"): the driver's own confusion, as unreachable as the rest.
    asyncpg.InternalClientError,
)
_DRIVER_ERRORS: tuple[type[BaseException], ...] = (*_UNREACHABLE, asyncpg.PostgresError)
# The journal's tables or schema are gone: the storage is not the one opened.
_GONE = (asyncpg.UndefinedTableError, asyncpg.InvalidSchemaNameError)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _lock_key(schema: str, purpose: str) -> int:
    """A stable signed 64-bit advisory-lock key per schema and purpose."""
    digest = hashlib.blake2b(f"im-relay:{schema}:{purpose}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _channel_name(schema: str) -> str:
    """The NOTIFY channel of one schema's journal (a channel name has at most 63 bytes)."""
    name = f"im_relay_events.{schema}"
    if len(name) <= 63:
        return name
    return "im_relay_events." + hashlib.blake2b(schema.encode(), digest_size=16).hexdigest()


def _text(value: str) -> str:
    """PostgreSQL text cannot hold NUL: a hostile one must not wedge a commit."""
    return value.replace("\x00", "\ufffd") if "\x00" in value else value


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


class PostgresJournal:
    """The shared :class:`~relay.journal.base.Journal`."""

    def __init__(self, pool: asyncpg.Pool, *, dsn: str, schema: str, mode: Mode,
                 retain_ms: int, dedup_window_ms: int, location: str, journal_id: int,
                 known_max: int, secrets_: Sequence[str]) -> None:
        self._pool = pool
        self._dsn = dsn
        self.schema = schema
        self._mode = mode
        self._retain_ms = retain_ms
        self._dedup_window_ms = dedup_window_ms
        self.location = location
        self._journal_id = journal_id
        self._secrets = [s for s in secrets_ if len(s) >= 4]
        self._channel = _channel_name(schema)
        self._commit_key = _lock_key(schema, "commit")
        self._known_max = known_max
        self._empty_read_at = -1  # _known_max when a read last found nothing new
        self._max_checked = time.monotonic()
        self._group = GroupCommit(self._commit_group)
        self._new_events: anyio.Event | None = None
        self._up = True
        self._gone: str | None = None
        self._listening = False
        self._listener: asyncio.Task[None] | None = None
        self._listen_tried = asyncio.Event()  # set after the listener's first attempt
        self._closed = False
        # For tests only: the order-guarantee test holds a transaction open after it
        # drew its seqs, and shows what happens without the lock.
        self._after_insert: Callable[[], Awaitable[None]] | None = None
        self._serialize_commits = True
        self._insert_events = _INSERT_EVENTS

    # -- opening -----------------------------------------------------------

    @classmethod
    async def open(cls, dsn: str, *, schema: str = "relay", mode: Mode = "writer",
                   retain_seconds: float = 86400.0, dedup_window_seconds: float = 86400.0,
                   location: str | None = None, secrets_: Sequence[str] = (),
                   listen: bool = True) -> PostgresJournal:
        """Connect; the writer creates or migrates the schema and (``listen``) listens
        for commits."""
        where = location or f"PostgreSQL schema {schema}"
        hidden = [*secrets_, dsn]
        settings = {"application_name": f"im-relay {mode}", "search_path": _quote(schema),
                    # A client that stalls inside a transaction (paused, partitioned) must
                    # not hold the commit lock, and so every other committer, for long.
                    "idle_in_transaction_session_timeout": str(IDLE_IN_TRANSACTION_MS)}
        if mode == "status":
            settings["default_transaction_read_only"] = "on"
        try:
            # min_size 0: no floor for asyncpg to restore (and log tracebacks about)
            # while the database is down; connections open on demand.
            pool = await asyncpg.create_pool(
                dsn, min_size=0, max_size=POOL_SIZE if mode == "writer" else 2,
                timeout=CONNECT_TIMEOUT, command_timeout=COMMAND_TIMEOUT,
                server_settings=settings)
        except (*_DRIVER_ERRORS, ValueError) as exc:  # type: ignore[misc]
            metrics.JOURNAL_UP.set(0)
            raise JournalError(_scrub(f"cannot open the journal {where}: "
                                      f"{type(exc).__name__}: {exc}", hidden)) from None
        try:
            async with pool.acquire() as conn:
                if mode == "writer":
                    journal_id = await _migrate(conn, schema)
                else:
                    journal_id = await _check_version(conn, schema, where, exact=mode == "admin")
                known_max = int(await conn.fetchval(_MAX_SEQ))
        except JournalError:
            await pool.close()
            raise
        except _DRIVER_ERRORS as exc:
            await pool.close()
            raise JournalError(_scrub(f"cannot open the journal {where}: "
                                      f"{type(exc).__name__}: {exc}", hidden)) from None
        journal = cls(pool, dsn=dsn, schema=schema, mode=mode,
                      retain_ms=int(retain_seconds * 1000),
                      dedup_window_ms=int(dedup_window_seconds * 1000), location=where,
                      journal_id=journal_id, known_max=known_max, secrets_=hidden)
        if mode == "writer" and listen:
            metrics.JOURNAL_UP.set(1)
            journal._listener = asyncio.get_running_loop().create_task(journal._listen())
            # Sinks start right away: let them have notifications from the first batch.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(journal._listen_tried.wait(), CONNECT_TIMEOUT)
        return journal

    async def close(self) -> None:
        self._closed = True
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None
        with contextlib.suppress(*_DRIVER_ERRORS):
            await asyncio.wait_for(self._pool.close(), 10)
        self._pool.terminate()

    # -- errors --------------------------------------------------------------

    def _set_up(self, up: bool) -> None:
        if up != self._up:
            self._up = up
            if up:
                log.info("journal database reachable again", journal=self.location)
            else:
                log.error("JOURNAL DATABASE UNREACHABLE: holding batches and cursor moves,"
                          " retrying", journal=self.location)
        if self._mode == "writer":
            metrics.JOURNAL_UP.set(1 if up else 0)

    def _error(self, exc: BaseException) -> JournalError:
        """The JournalError for a driver failure (its text without any secret)."""
        if isinstance(exc, JournalError):
            return exc
        detail = _scrub(f"{type(exc).__name__}: {exc}", self._secrets)
        if isinstance(exc, _GONE):
            self._gone = (f"the journal {self.location} lost its tables while the relay was"
                          f" running ({detail}): nothing written since is safe; stopping")
            return JournalGoneError(self._gone)
        if isinstance(exc, _UNREACHABLE):
            self._set_up(False)
            return JournalError(f"journal database unreachable: {detail}")
        if isinstance(exc, asyncpg.DiskFullError):
            return JournalFullError(f"journal write failed, the database has no space: {detail}")
        return JournalError(f"journal query failed: {detail}")

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Conn]:
        """A pooled connection; driver failures leave as :class:`JournalError`."""
        if self._gone is not None:
            raise JournalGoneError(self._gone)
        try:
            async with self._pool.acquire(timeout=CONNECT_TIMEOUT) as conn:
                try:
                    yield conn
                except _DRIVER_ERRORS:
                    # A connection that failed mid-operation (the server shutting down) can
                    # be left consuming the error: never hand it out again.
                    conn.terminate()
                    raise
        except JournalError:
            raise
        except _DRIVER_ERRORS as exc:
            raise self._error(exc) from None
        self._set_up(True)

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        async with self._connection() as conn:
            rows: list[asyncpg.Record] = await conn.fetch(sql, *args)
        return rows

    async def _fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        async with self._connection() as conn:
            row: asyncpg.Record | None = await conn.fetchrow(sql, *args)
            return row

    async def _fetchval(self, sql: str, *args: Any) -> Any:
        async with self._connection() as conn:
            return await conn.fetchval(sql, *args)

    def _check_identity(self, found: int | None) -> None:
        if found != self._journal_id:
            self._gone = (f"the journal {self.location} was deleted or replaced while the"
                          " relay was running (its identity row is gone or different):"
                          " nothing written since is safe; stopping")
            raise JournalGoneError(self._gone)

    async def check_intact(self) -> None:
        if self._mode != "writer":
            return
        self._check_identity(await self._fetchval(_IDENTITY))

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[Conn]:
        """One transaction holding the commit lock: no other journal commits meanwhile
        (``relay journal copy`` fills the tables through it)."""
        async with self._connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", self._commit_key)
            yield conn

    # -- writing -----------------------------------------------------------

    async def _commit_group(self, group: list[Pending]) -> None:
        async with self._connection() as conn, conn.transaction():
            if self._serialize_commits and any(item.events for item in group):
                # Before any seq is drawn: see the module's docstring.
                row = await conn.fetchrow(_LOCK_AND_IDENTITY, self._commit_key)
                self._check_identity(row[1] if row else None)
            else:
                self._check_identity(await conn.fetchval(_IDENTITY))
            await self._apply_group(conn, group)

    async def _apply_group(self, conn: Conn, group: list[Pending]) -> None:
        now = _now_ms()
        last = self._known_max
        for item in group:
            if item.fence is not None:
                # The lease row stays locked (FOR SHARE) until this commit ends: a new
                # holder's takeover waits for it, and this write is the old epoch's last.
                epoch = await conn.fetchval(_FENCE, item.fence.unit, item.fence.holder)
                if epoch != item.fence.epoch:
                    item.error = LeaseLostError(
                        f"the lease on {item.fence.unit} has moved: nothing written")
                    continue
            new = 0
            events = item.events
            if events:
                columns: tuple[Sequence[Any], ...] = tuple(zip(*events, strict=True))
                ids = columns[0]
                if len(set(ids)) != len(ids) or "\x00" in "".join(ids):
                    columns = _unique(events)
                row = await conn.fetchrow(
                    self._insert_events, columns[0], columns[1], columns[2], columns[3],
                    self._dedup_window_ms, self._channel)
                new = int(row[0]) if row is not None else 0
                if new and row is not None:
                    last = max(last, int(row[1]))
                if self._after_insert is not None:
                    await self._after_insert()
            if item.quarantine:
                q = item.quarantine
                await conn.execute(_INSERT_QUARANTINE, [_text(r.source) for r in q],
                                   [_text(r.endpoint) for r in q], [_text(r.error) for r in q],
                                   [r.raw for r in q], now)
            if item.cursors:
                await conn.execute(_UPSERT_CURSORS, [_text(k) for k in item.cursors],
                                   [_text(v) for v in item.cursors.values()], now)
            if item.sink is not None:
                await conn.execute(_ADVANCE_SINK, item.sink[0], item.sink[1], now)
            if item.ledger is not None and item.ledger.entries:
                entries = item.ledger.entries
                await conn.execute(_INSERT_LEDGER, _text(item.ledger.source),
                                   [e.timestamp for e in entries],
                                   [_text(e.msg_id) for e in entries],
                                   [_text(e.conversation) for e in entries],
                                   [None if e.error is None else _text(e.error)
                                    for e in entries])
            item.result = CommitResult(
                new=new, duplicates=len(events) - new, quarantined=len(item.quarantine),
                last_seq=last)

    async def commit_batch(
        self,
        events: Sequence[NewEvent],
        *,
        cursors: Mapping[str, str] | None = None,
        quarantine: Sequence[QuarantinedRecord] = (),
        ledger: LedgerBatch | None = None,
        fence: Fence | None = None,
    ) -> CommitResult:
        result = await self._group.submit(
            Pending(events=events, cursors=cursors, quarantine=quarantine, ledger=ledger,
                    fence=fence))
        if result.new:
            self._saw(result.last_seq)
        return result

    def _saw(self, seq: int) -> None:
        if seq > self._known_max:
            self._known_max = seq
            if self._new_events is not None:
                self._new_events.set()
                self._new_events = None

    async def set_cursors(self, cursors: Mapping[str, str]) -> None:
        await self.commit_batch((), cursors=cursors)

    async def get_cursors(self, prefix: str) -> dict[str, str]:
        if "\x00" in prefix:  # no key holds one (see _text): only prove the database answers
            await self._fetchval("SELECT 1")
            return {}
        rows = await self._fetch("SELECT key, value FROM cursors WHERE starts_with(key, $1)",
                                 prefix)
        return {r[0]: r[1] for r in rows}

    # -- reading -----------------------------------------------------------

    async def read(self, after_seq: int, limit: int) -> list[StoredEvent]:
        known = self._known_max
        rows = await self._fetch(
            f"SELECT {_EVENT_COLUMNS} FROM events WHERE seq > $1 ORDER BY seq LIMIT $2",  # noqa: S608
            after_seq, limit)
        if not rows:
            self._empty_read_at = known
            return []
        events = list(map(StoredEvent._make, rows))
        if events[-1].seq > self._known_max:
            self._known_max = events[-1].seq
        return events

    async def wait_for_events(self, after_seq: int, timeout: float) -> None:
        # Past after_seq, unless a read just found nothing there (erased): then wait.
        if self._known_max > after_seq and self._known_max != self._empty_read_at:
            return
        if not self._listening:  # no notifications: the caller reads again soon
            await anyio.sleep(min(timeout, POLL_INTERVAL))
            return
        if self._new_events is None:
            self._new_events = anyio.Event()
        with anyio.move_on_after(timeout):
            await self._new_events.wait()

    async def _listen(self) -> None:
        """Keep a connection LISTENing for commits; re-open it when it drops."""
        while not self._closed:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(
                    self._dsn, timeout=CONNECT_TIMEOUT, command_timeout=CONNECT_TIMEOUT,
                    server_settings={"application_name": "im-relay listener"})
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
                await conn.add_listener(self._channel, self._notified)
                self._listening = True
                self._listen_tried.set()
                self._set_up(True)
                self._wake()  # whatever committed while we were deaf: read it
                while not lost.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lost.wait(), LISTEN_PING)
                    if not lost.is_set():
                        await conn.fetchval("SELECT 1")
            except asyncio.CancelledError:
                raise
            except _DRIVER_ERRORS as exc:
                if self._listening or self._up:
                    log.warning("journal notifications lost; polling until they are back",
                                error=_scrub(f"{type(exc).__name__}: {exc}", self._secrets))
                if isinstance(exc, _UNREACHABLE):
                    self._set_up(False)
            finally:
                self._listening = False
                self._listen_tried.set()
                if conn is not None:
                    conn.terminate()
            await asyncio.sleep(LISTEN_RETRY)

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        try:
            self._saw(int(str(payload)))
        except ValueError:
            self._wake()

    def _wake(self) -> None:
        self._empty_read_at = -1
        if self._new_events is not None:
            self._new_events.set()
            self._new_events = None

    async def count_since(self, since_ms: int, *, through_seq: int | None = None) -> int:
        if through_seq is None:
            value = await self._fetchval(
                "SELECT count(*) FROM events WHERE fetched_at >= $1", since_ms)
        else:
            value = await self._fetchval(
                "SELECT count(*) FROM events WHERE fetched_at >= $1 AND seq <= $2",
                since_ms, through_seq)
        return int(value)

    async def count_after(self, after_seq: int) -> int:
        return int(await self._fetchval("SELECT count(*) FROM events WHERE seq > $1",
                                        after_seq))

    # -- sinks -------------------------------------------------------------

    async def register_sinks(self, names: Sequence[str], *, prune: bool) -> None:
        now = _now_ms()
        async with self._connection() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO sink_cursors(sink, seq, updated_at) SELECT n, 0, $2"
                " FROM unnest($1::text[]) AS u(n) ON CONFLICT (sink) DO NOTHING",
                list(names), now)
            if prune:
                await conn.execute("DELETE FROM sink_cursors WHERE NOT (sink = ANY($1::text[]))",
                                   list(names))

    async def sink_cursor(self, sink: str) -> int:
        value = await self._fetchval("SELECT seq FROM sink_cursors WHERE sink = $1", sink)
        return int(value) if value is not None else 0

    async def advance_sink(self, sink: str, seq: int, *, fence: Fence | None = None) -> None:
        await self._group.submit(Pending(sink=(sink, seq), fence=fence))

    # -- the cluster -----------------------------------------------------------

    async def heartbeat(self, member: str, description: str) -> None:
        await self._execute(
            "INSERT INTO members(member, description, heartbeat_at)"
            " VALUES ($1, $2, clock_timestamp()) ON CONFLICT (member) DO UPDATE"
            " SET description = EXCLUDED.description, heartbeat_at = EXCLUDED.heartbeat_at",
            member, _text(description))

    async def members(self, ttl: float) -> list[Member]:
        rows = await self._fetch(
            "SELECT member, description,"
            " extract(epoch FROM clock_timestamp() - heartbeat_at)::float8 FROM members"
            " WHERE heartbeat_at > clock_timestamp() - make_interval(secs => $1)"
            " ORDER BY member", ttl)
        return [Member(r[0], r[1], float(r[2])) for r in rows]

    async def acquire(self, unit: str, member: str, ttl: float) -> Grant | None:
        async with self._connection() as conn, conn.transaction():
            previous = await conn.fetchrow(_PREVIOUS, _text(unit))
            if previous is not None and not previous[1]:
                return None  # held, and not expired
            epoch = await conn.fetchval(_ACQUIRE, _text(unit), member, ttl)
        if epoch is None:
            return None
        return Grant(Fence(unit, member, int(epoch)),
                     None if previous is None else max(0.0, float(previous[0])))

    async def renew(self, fence: Fence, ttl: float) -> bool:
        row = await self._fetchrow(
            "UPDATE leases SET expires_at = clock_timestamp() + make_interval(secs => $4)"
            " WHERE unit = $1 AND holder = $2 AND epoch = $3 RETURNING epoch",
            _text(fence.unit), fence.holder, fence.epoch, ttl)
        return row is not None

    async def release(self, fence: Fence) -> None:
        await self._execute(
            "UPDATE leases SET holder = NULL, expires_at = clock_timestamp(),"
            " ended_at = clock_timestamp() WHERE unit = $1 AND holder = $2 AND epoch = $3",
            _text(fence.unit), fence.holder, fence.epoch)

    async def leave(self, member: str) -> None:
        async with self._connection() as conn, conn.transaction():
            await conn.execute(
                "UPDATE leases SET holder = NULL, expires_at = clock_timestamp(),"
                " ended_at = clock_timestamp() WHERE holder = $1", member)
            await conn.execute("DELETE FROM members WHERE member = $1", member)

    async def leases(self) -> list[Lease]:
        rows = await self._fetch(
            "SELECT unit, holder, epoch,"
            " extract(epoch FROM expires_at - clock_timestamp())::float8 FROM leases"
            " ORDER BY unit")
        return [Lease(r[0], r[1], int(r[2]), float(r[3])) for r in rows]

    async def event_seq(self, event_id: str, fetched_at: int | None = None) -> int | None:
        rows = await self._fetch("SELECT seq, fetched_at FROM events WHERE id = $1",
                                 _text(event_id))
        row = rows[0] if rows else None
        if row is None or (fetched_at is not None and int(row[1]) != fetched_at):
            return None
        return int(row[0])

    async def journal_id(self) -> int:
        return self._journal_id

    async def rewind_sink(self, sink: str, since_ms: int) -> int:
        now = _now_ms()
        async with self._connection() as conn, conn.transaction():
            first = await conn.fetchval("SELECT min(seq) FROM events WHERE fetched_at >= $1",
                                        since_ms)
            target = int(first) - 1 if first is not None else int(await conn.fetchval(_MAX_SEQ))
            # Only ever back (SPEC §4 e).
            value = await conn.fetchval(
                "INSERT INTO sink_cursors(sink, seq, updated_at) VALUES ($1, $2, $3)"
                " ON CONFLICT (sink) DO UPDATE SET seq = LEAST(sink_cursors.seq, EXCLUDED.seq),"
                " updated_at = EXCLUDED.updated_at RETURNING seq", sink, target, now)
        return int(value)

    # -- dead letters ------------------------------------------------------

    async def add_dead_letters(
        self, sink: str, events: Sequence[StoredEvent], error: str, attempts: int
    ) -> None:
        now = _now_ms()
        async with self._connection() as conn:
            await conn.executemany(
                "INSERT INTO dead_letters(sink, event_seq, event_id, error, attempts, failed_at,"
                " payload, routing, fetched_at) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9)",
                [(sink, e.seq, e.id, _text(error), attempts, now, e.payload, e.routing_json,
                  e.fetched_at) for e in events])

    async def dead_letters(self, sink: str | None, limit: int, *,
                           dlid: int | None = None) -> list[DeadLetter]:
        rows = await self._fetch(
            "SELECT dlid, sink, event_seq, event_id, error, attempts, failed_at, payload, replay"
            " FROM dead_letters WHERE ($1::text IS NULL OR sink = $1)"
            " AND ($2::bigint IS NULL OR dlid = $2) ORDER BY dlid LIMIT $3", sink, dlid, limit)
        return [DeadLetter(dlid=r[0], sink=r[1], event_seq=r[2], event_id=r[3], error=r[4],
                           attempts=r[5], failed_at=r[6], payload=r[7], replay=bool(r[8]))
                for r in rows]

    async def request_dead_letter_replay(self, sink: str | None, dlids: Sequence[int]) -> int:
        if dlids:
            status = await self._execute(
                "UPDATE dead_letters SET replay = true WHERE dlid = ANY($1::bigint[])",
                list(dlids))
        elif sink is not None:
            status = await self._execute("UPDATE dead_letters SET replay = true WHERE sink = $1",
                                         sink)
        else:
            status = await self._execute("UPDATE dead_letters SET replay = true")
        return _rowcount(status)

    async def _execute(self, sql: str, *args: Any) -> str:
        async with self._connection() as conn:
            status: str = await conn.execute(sql, *args)
        return status

    async def dead_letters_to_replay(self, sink: str, limit: int) -> list[tuple[int,
                                                                             StoredEvent]]:
        rows = await self._fetch(
            "SELECT dlid, event_seq, event_id, fetched_at, routing, payload FROM dead_letters"
            " WHERE sink = $1 AND replay ORDER BY dlid LIMIT $2", sink, limit)
        return [(r[0], StoredEvent(r[1], r[2], r[3], r[4], r[5])) for r in rows]

    async def settle_dead_letters(self, delivered: Sequence[int],
                                  refused: Sequence[tuple[int, str]]) -> None:
        now = _now_ms()
        async with self._connection() as conn, conn.transaction():
            if delivered:
                await conn.execute("DELETE FROM dead_letters WHERE dlid = ANY($1::bigint[])",
                                   list(delivered))
            if refused:
                await conn.executemany(
                    "UPDATE dead_letters SET replay = false, attempts = attempts + 1,"
                    " error = $1, failed_at = $2 WHERE dlid = $3",
                    [(_text(err), now, d) for d, err in refused])

    async def remove_dead_letters(self, dlids: Sequence[int], *, sink: str | None = None,
                                  everything: bool = False) -> int:
        if dlids:
            status = await self._execute("DELETE FROM dead_letters WHERE dlid = ANY($1::bigint[])",
                                         list(dlids))
        elif sink is not None:
            status = await self._execute("DELETE FROM dead_letters WHERE sink = $1", sink)
        elif everything:
            status = await self._execute("DELETE FROM dead_letters")
        else:
            return 0
        return _rowcount(status)

    # -- control requests --------------------------------------------------

    async def request_control(self, sink: str, action: str, arg: str) -> None:
        await self._execute(
            "INSERT INTO control(sink, action, arg, created_at) VALUES ($1, $2, $3, $4)",
            sink, action, _text(arg), _now_ms())

    async def take_control(self, sink: str) -> list[tuple[str, str]]:
        rows = await self._fetch(
            "DELETE FROM control WHERE sink = $1 RETURNING cid, action, arg", sink)
        return [(r[1], r[2]) for r in sorted(rows, key=lambda r: int(r[0]))]

    # -- personal data -----------------------------------------------------

    async def erase_user(self, user_id: str, *, dry_run: bool = False) -> dict[str, int]:
        """Delete every event, dead letter and quarantined record of one user.

        The bytes go from the tables at once; PostgreSQL reuses the freed space
        (a VACUUM follows) but, unlike SQLite's secure_delete, does not overwrite it.
        """
        token = orjson.dumps(user_id)  # how the id appears inside raw JSON
        # The byte search keeps the JSON parsing to the rows that can match.
        where = ("position($2::bytea in payload) > 0 AND"
                 " (convert_from(payload, 'UTF8')::json ->> 'sender' = $1"
                 " OR convert_from(payload, 'UTF8')::json ->> 'recipient' = $1)")
        counts: dict[str, int] = {}
        async with self._connection() as conn, conn.transaction():
            if not dry_run:
                await conn.execute(_KEEP_HIGH_SEQ)
            for table in ("events", "dead_letters"):
                if dry_run:
                    value = await conn.fetchval(
                        f"SELECT count(*) FROM {table} WHERE {where}", user_id, token)  # noqa: S608
                else:
                    value = _rowcount(await conn.execute(
                        f"DELETE FROM {table} WHERE {where}", user_id, token))  # noqa: S608
                counts[table] = int(value)
            verb = "SELECT count(*)" if dry_run else "DELETE"
            sql = f"{verb} FROM quarantine WHERE position($1::bytea in raw) > 0"
            counts["quarantine"] = int(await conn.fetchval(sql, token)) if dry_run else \
                _rowcount(await conn.execute(sql, token))
        if not dry_run:
            async with self._connection() as conn:
                await conn.execute("VACUUM events, dead_letters, quarantine")
        return counts

    # -- housekeeping ------------------------------------------------------

    async def compact(self, now_ms: int) -> int:
        cutoff = now_ms - self._retain_ms
        deleted = 0
        async with self._connection() as conn:
            async with conn.transaction():
                await conn.execute(_KEEP_HIGH_SEQ)
            delivered = await conn.fetchval("SELECT min(seq) FROM sink_cursors")
            if delivered is None:
                delivered = await conn.fetchval(_MAX_SEQ)
            # Chunks keep each transaction short.
            while True:
                count = _rowcount(await conn.execute(
                    "DELETE FROM events WHERE seq IN (SELECT seq FROM events WHERE seq <= $1"
                    " AND fetched_at < $2 ORDER BY seq LIMIT $3)",
                    int(delivered), cutoff, COMPACT_CHUNK))
                deleted += count
                if count < COMPACT_CHUNK:
                    break
            await conn.execute("DELETE FROM quarantine WHERE received_at < $1", cutoff)
        return deleted

    # -- the evacuation ledger ------------------------------------------------------

    async def ledger_tallies(self, source: str, before_ms: int) -> dict[str, ConversationTally]:
        rows = await self._fetch(_LEDGER_TALLIES, _text(source), before_ms)
        return {r[0]: ConversationTally(int(r[1]), (int(r[2][0]), r[2][1]),
                                        (int(r[3][0]), r[3][1])) for r in rows}

    async def ledger_missing(self, source: str,
                             keys: Sequence[tuple[int, str]]) -> list[tuple[int, str]]:
        if not keys:
            return []
        rows = await self._fetch(
            "SELECT t, m FROM unnest($2::bigint[], $3::text[]) WITH ORDINALITY AS u(t, m, n)"
            " WHERE NOT EXISTS (SELECT 1 FROM ledger WHERE source = $1 AND ts = u.t"
            " AND msg_id = u.m) ORDER BY n", _text(source), [k[0] for k in keys],
            [_text(k[1]) for k in keys])
        return [(int(r[0]), r[1]) for r in rows]

    async def ledger_quarantined(self, source: str, limit: int) -> list[LedgerEntry]:
        rows = await self._fetch(
            "SELECT conv, ts, msg_id, error FROM ledger WHERE source = $1 AND error IS NOT NULL"
            " ORDER BY ts, msg_id LIMIT $2", _text(source), limit)
        return [LedgerEntry(r[0], int(r[1]), r[2], r[3]) for r in rows]

    async def max_seq(self) -> int:
        if not self._listening and time.monotonic() - self._max_checked >= 1.0:
            # No notifications to keep it current: ask, at most once a second.
            self._max_checked = time.monotonic()
            with contextlib.suppress(JournalError):
                self._saw(int(await self._fetchval(_MAX_SEQ)))
        return self._known_max

    async def storage_bytes(self) -> int:
        value = await self._fetchval(
            "SELECT COALESCE(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = $1 AND c.relkind = 'r'", self.schema)
        return int(value)

    def write_blocker(self) -> WriteBlocker | None:
        return None if self._up else "database unreachable"

    async def stats(self) -> JournalStats:
        async with self._connection() as conn, conn.transaction(isolation="repeatable_read",
                                                                 readonly=True):
            max_seq = int(await conn.fetchval(_MAX_SEQ))
            count, oldest = _row(await conn.fetchrow(
                "SELECT count(*), min(fetched_at) FROM events"))
            quarantined = await conn.fetchval("SELECT count(*) FROM quarantine")
            dead = await conn.fetchval("SELECT count(*) FROM dead_letters")
            sinks = []
            for sink, cursor in await conn.fetch(
                    "SELECT sink, seq FROM sink_cursors ORDER BY sink"):
                pending, oldest_pending = _row(await conn.fetchrow(
                    "SELECT count(*), min(fetched_at) FROM events WHERE seq > $1", cursor))
                sinks.append(SinkLag(sink, int(cursor), int(pending), oldest_pending))
            cursors = {r[0]: r[1] for r in await conn.fetch(
                "SELECT key, value FROM cursors ORDER BY key")}
        return JournalStats(
            path=self.location, max_seq=max_seq, events=int(count),
            bytes=await self.storage_bytes(), oldest_fetched_at=oldest,
            quarantined=int(quarantined), dead_letters=int(dead), sinks=sinks, cursors=cursors)


def _unique(events: Sequence[NewEvent]) -> tuple[Sequence[Any], ...]:
    """Columns without repeated ids (the first stays) and with NUL-free ids.

    Rare (a provider repeating an id inside one answer, or a hostile id): ON
    CONFLICT DO UPDATE may not touch one row twice in a statement.
    """
    seen: set[str] = set()
    ids: list[str] = []
    fetched_at: list[int] = []
    routing: list[bytes] = []
    payload: list[bytes] = []
    for event in events:
        key = _text(event.id)
        if key in seen:
            continue
        seen.add(key)
        ids.append(key)
        fetched_at.append(event.fetched_at)
        routing.append(event.routing)
        payload.append(event.payload)
    return ids, fetched_at, routing, payload


def _row(row: asyncpg.Record | None) -> asyncpg.Record:
    if row is None:  # never: an aggregate answers one row
        raise JournalError("journal query answered no row")
    return row


def _rowcount(status: str) -> int:
    """Rows touched, from a command tag such as ``DELETE 3`` or ``INSERT 0 3``."""
    tail = status.rpartition(" ")[2]
    return int(tail) if tail.isdigit() else 0


def _scrub(text: str, hidden: Sequence[str]) -> str:
    for secret in hidden:
        if secret and secret in text:
            text = text.replace(secret, "[REDACTED]")
    return text


async def _schema_exists(conn: Conn, schema: str) -> bool:
    return bool(await conn.fetchval("SELECT EXISTS (SELECT 1 FROM pg_namespace"
                                    " WHERE nspname = $1)", schema))


async def _current_version(conn: Conn, schema: str) -> int:
    exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL",
                                 f"{_quote(schema)}.schema_version")
    if not exists:
        return 0
    value = await conn.fetchval(
        f"SELECT COALESCE(max(version), 0) FROM {_quote(schema)}.schema_version")  # noqa: S608
    return int(value)


def _newer(version: int, where: str) -> JournalSchemaError:
    return JournalSchemaError(
        f"the journal {where} has schema version {version}; this relay knows"
        f" {schema_version()}: upgrade the relay")


async def _migrate(conn: Conn, schema: str) -> int:
    """Create or migrate the schema forward (replicas starting together take turns)."""
    s = _quote(schema)
    latest = schema_version()
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _lock_key(schema, "migrate"))
        if not await _schema_exists(conn, schema):
            # Only when missing: CREATE SCHEMA needs a right a DBA may not grant.
            await conn.execute(f"CREATE SCHEMA {s}")
        await conn.execute(f"CREATE TABLE IF NOT EXISTS {s}.schema_version("
                           "version integer PRIMARY KEY, applied_at bigint NOT NULL)")
        current = await _current_version(conn, schema)
        if current > latest:
            raise _newer(current, f"schema {schema}")
        for target in range(current + 1, latest + 1):
            for statement in MIGRATIONS[target]:
                await conn.execute(statement.format(s=s))
            await conn.execute(
                f"INSERT INTO {s}.schema_version(version, applied_at) VALUES ($1, $2)",  # noqa: S608
                target, _now_ms())
            log.info("journal schema migrated", schema=schema, version=target)
        await conn.execute(
            f"INSERT INTO {s}.meta(key, value) VALUES ('journal_id', $1)"  # noqa: S608
            " ON CONFLICT (key) DO NOTHING", secrets.randbits(62))
        return int(await conn.fetchval(
            f"SELECT value FROM {s}.meta WHERE key = 'journal_id'"))  # noqa: S608


async def _check_version(conn: Conn, schema: str, where: str, *,
                         exact: bool) -> int:
    version = await _current_version(conn, schema)
    if version == 0:
        raise JournalError(f"no journal at {where} (a relay creates it at its first start)")
    if version > schema_version():
        raise _newer(version, where)
    if exact and version != schema_version():
        raise JournalSchemaError(
            f"the journal {where} has schema version {version}, this relay"
            f" {schema_version()}: run this relay version once (relay run) to migrate it first")
    value = await conn.fetchval(
        f"SELECT value FROM {_quote(schema)}.meta WHERE key = 'journal_id'")  # noqa: S608
    return int(value) if value is not None else 0
