"""The durable event journal (see :mod:`relay.journal.base` for the interface)."""

from relay.journal.base import (
    CommitResult,
    ConversationTally,
    DeadLetter,
    Journal,
    JournalError,
    JournalFullError,
    JournalGoneError,
    JournalLockedError,
    JournalSchemaError,
    JournalStats,
    LedgerBatch,
    LedgerEntry,
    NewEvent,
    QuarantinedRecord,
    Routing,
    SinkLag,
    StoredEvent,
)
from relay.journal.sqlite import SqliteJournal

__all__ = [
    "CommitResult",
    "ConversationTally",
    "DeadLetter",
    "Journal",
    "JournalError",
    "JournalFullError",
    "JournalGoneError",
    "JournalLockedError",
    "JournalSchemaError",
    "JournalStats",
    "LedgerBatch",
    "LedgerEntry",
    "NewEvent",
    "QuarantinedRecord",
    "Routing",
    "SinkLag",
    "SqliteJournal",
    "StoredEvent",
]
