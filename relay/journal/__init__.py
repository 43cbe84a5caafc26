"""The durable event journal (see :mod:`relay.journal.base` for the interface).

:func:`open_journal` is the only place that knows which backends exist: the
relay and the CLI open the journal through it and use it through the
Protocols of :mod:`relay.journal.base`, whatever ``[journal] type`` says.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from relay import metrics
from relay.checks import CheckResult
from relay.journal.base import (
    CommitResult,
    ControlRequests,
    ConversationTally,
    DeadLetter,
    DeadLetters,
    Erasure,
    EventLog,
    Fence,
    Grant,
    Health,
    Journal,
    JournalError,
    JournalFullError,
    JournalGoneError,
    JournalLockedError,
    JournalSchemaError,
    JournalStats,
    JournalUnusableError,
    Lease,
    LeaseLostError,
    Leases,
    Ledger,
    LedgerBatch,
    LedgerEntry,
    Member,
    NewEvent,
    QuarantinedRecord,
    Routing,
    SinkCursors,
    SinkJournal,
    SinkLag,
    SourceJournal,
    SourceState,
    StoredEvent,
    WriteBlocker,
)

if TYPE_CHECKING:
    from relay.config import JournalConfig

#: ``writer``: the relay itself (creates and migrates; SQLite takes its single-writer
#: lock). ``status``: read only, no lock, no migration. ``admin``: small writes beside
#: a running relay (``relay dlq``, ``relay replay``); the schema must be current.
OpenMode = Literal["writer", "status", "admin"]


async def open_journal(config: JournalConfig, *, mode: OpenMode = "writer") -> Journal:
    """Open the journal ``config`` describes; raises :class:`JournalError` subclasses."""
    if config.type == "postgres":
        from relay.journal.postgres import PostgresJournal

        assert config.dsn is not None  # the config's validator requires it
        return await PostgresJournal.open(
            config.dsn.get_secret_value(), schema=config.schema_name, mode=mode,
            retain_seconds=config.retain, dedup_window_seconds=config.dedup_window,
            location=config.describe(), secrets_=config.secret_values())
    from relay.journal.sqlite import SqliteJournal

    if mode == "status":
        return SqliteJournal.open_readonly(config.path)
    if mode == "admin":
        return SqliteJournal.open_admin(config.path)
    journal = SqliteJournal.open(
        config.path, retain_seconds=config.retain, min_free_bytes=config.min_free_bytes,
        dedup_window_seconds=config.dedup_window)
    metrics.JOURNAL_UP.set(1)  # a local file: up while open
    return journal


async def check_journal(config: JournalConfig, *, offline: bool) -> CheckResult:
    """``relay check``'s line for the journal: can it live where the configuration says?

    SQLite: the folder (creatable, writable, free space) and whether a relay holds
    it; touches nothing. PostgreSQL: offline only what the setting says, else one
    read-only connection.
    """
    if config.type == "postgres":
        target = config.describe()
        if offline:
            return CheckResult("journal", target, True, "not reached (offline)")
        try:
            journal = await open_journal(config, mode="status")
        except JournalError as exc:
            return CheckResult("journal", target, False, str(exc))
        await journal.close()
        return CheckResult("journal", target, True, "reachable, schema current")
    from relay.journal.sqlite import SqliteJournal

    return SqliteJournal.check_path(config.path, config.min_free_bytes)


__all__ = [
    "CommitResult",
    "ControlRequests",
    "ConversationTally",
    "DeadLetter",
    "DeadLetters",
    "Erasure",
    "EventLog",
    "Fence",
    "Grant",
    "Health",
    "Journal",
    "JournalError",
    "JournalFullError",
    "JournalGoneError",
    "JournalLockedError",
    "JournalSchemaError",
    "JournalStats",
    "JournalUnusableError",
    "Lease",
    "LeaseLostError",
    "Leases",
    "Ledger",
    "LedgerBatch",
    "LedgerEntry",
    "Member",
    "NewEvent",
    "OpenMode",
    "QuarantinedRecord",
    "Routing",
    "SinkCursors",
    "SinkJournal",
    "SinkLag",
    "SourceJournal",
    "SourceState",
    "StoredEvent",
    "WriteBlocker",
    "check_journal",
    "open_journal",
]
