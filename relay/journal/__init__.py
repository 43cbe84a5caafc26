"""The durable event journal (see :mod:`relay.journal.base` for the interface)."""

from relay.journal.base import (
    CommitResult,
    DeadLetter,
    Journal,
    JournalError,
    JournalFullError,
    JournalGoneError,
    JournalLockedError,
    JournalSchemaError,
    JournalStats,
    NewEvent,
    QuarantinedRecord,
    Routing,
    SinkLag,
    StoredEvent,
)
from relay.journal.sqlite import SqliteJournal

__all__ = [
    "CommitResult",
    "DeadLetter",
    "Journal",
    "JournalError",
    "JournalFullError",
    "JournalGoneError",
    "JournalLockedError",
    "JournalSchemaError",
    "JournalStats",
    "NewEvent",
    "QuarantinedRecord",
    "Routing",
    "SinkLag",
    "SqliteJournal",
    "StoredEvent",
]
