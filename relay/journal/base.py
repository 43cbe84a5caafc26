"""The journal interface: what sources, sinks and the CLI may rely on.

Everything outside ``relay.journal`` talks to the journal only through these
Protocols, and opens it only through :func:`relay.journal.open_journal`, so that
the shared backend (PostgreSQL) and the embedded one (SQLite) are interchangeable.
A backend implements every part; a consumer types against the parts it uses
(:class:`SinkJournal`, :class:`SourceJournal`), the relay and the CLI against
:class:`Journal`.

Exceptions::

    JournalError
    ├── JournalLockedError   another relay holds the journal (exit 2)
    ├── JournalFullError     no space left: stop acknowledging, retry later
    ├── JournalSchemaError   the file was written by a newer relay
    ├── JournalUnusableError the configured storage cannot be used (a path under a
    │                        file, a folder that is not writable): exit 2
    └── JournalGoneError     the journal's file (or schema) was deleted or replaced
                             under the relay: fatal (``fatal = True``), stop, exit non-zero

A database that cannot be reached raises plain :class:`JournalError`: callers
hold what they have and retry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Protocol

import orjson


class JournalError(Exception):
    """Base of the journal's errors."""

    #: Retrying cannot help: the relay must stop (without acknowledging anything more).
    fatal = False


class JournalLockedError(JournalError):
    """Another process holds the journal's single-writer lock."""


class JournalFullError(JournalError):
    """The journal's file system has no room: nothing was committed."""


class JournalSchemaError(JournalError):
    """The journal was written by a newer version and cannot be migrated."""


class JournalUnusableError(JournalError):
    """The journal cannot be opened where the configuration says: a configuration problem."""


class LeaseLostError(JournalError):
    """A write made under a lease that has moved to another holder: refused, nothing written.

    The unit (a source's uid, a sink) must stop at once; its new holder carries on.
    """


class JournalGoneError(JournalError):
    """The journal's storage is no longer the one the relay opened (deleted, replaced)."""

    fatal = True


#: Why writes cannot succeed now: the (SQLite) disk is nearly full, or the database
#: cannot be reached.
WriteBlocker = Literal["disk full", "database unreachable"]


class Routing(NamedTuple):
    """The event fields sinks route and key by, kept beside the payload."""

    source: str
    provider: str
    kind: str
    channel_type: str
    type: str
    conversation: str


_new_tuple = tuple.__new__
_EMPTY = b""


class NewEvent(NamedTuple):
    """A normalized event on its way into the journal (a tuple: built per event, kept cheap)."""

    id: str
    fetched_at: int
    routing: bytes  # a JSON array in Routing's order
    payload: bytes  # the event's JSON
    sent_at: int  # not stored: for the source's data-age figures

    @classmethod
    def from_event(cls, event: Mapping[str, Any]) -> NewEvent:
        routing = (event["source"], event["provider"], event["kind"], event["channel"]["type"],
                   event["type"], event["conversation"])
        # Copied at once to their exact size: orjson's bytes keep the 4 KiB buffer they
        # were written into (a 550-byte event held 4 KiB, and its routing 4 KiB more), so a
        # batch of them spread over 800 KiB of memory; the copy is 0.15 µs, and the
        # buffer, freed at once, is the next one's.
        # tuple.__new__ directly: a NamedTuple's generated __new__ is a Python call, 0.4 µs
        # against 0.17, once per event on the event loop.
        return _new_tuple(cls, (event["id"], event["fetched_at"],
                                _EMPTY.join((orjson.dumps(routing), _EMPTY)),
                                _EMPTY.join((orjson.dumps(event), _EMPTY)), event["sent_at"]))


class StoredEvent(NamedTuple):
    """An event as read back from the journal, in journal order (``seq``)."""

    seq: int
    id: str
    fetched_at: int
    routing_json: bytes
    payload: bytes

    def routing(self) -> Routing:
        """Decoded on demand: a sink that neither filters nor keys never pays for it."""
        return Routing(*orjson.loads(self.routing_json))


@dataclass(frozen=True, slots=True)
class QuarantinedRecord:
    """A provider record (or whole response) that could not be parsed, kept raw."""

    source: str
    endpoint: str
    error: str
    raw: bytes


@dataclass(frozen=True, slots=True)
class CommitResult:
    new: int
    duplicates: int
    quarantined: int
    last_seq: int


@dataclass(frozen=True, slots=True)
class SinkLag:
    sink: str
    cursor: int
    pending: int
    oldest_pending_fetched_at: int | None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An event a sink gave up on, with why and how often it tried."""

    dlid: int
    sink: str
    event_seq: int
    event_id: str
    error: str
    attempts: int
    failed_at: int
    payload: bytes
    replay: bool = False


class LedgerEntry(NamedTuple):
    """One provider message of an evacuated source, as the provider's history lists it."""

    conversation: str
    timestamp: int  # the provider's ms timestamp: with msg_id, the history's order
    msg_id: str
    error: str | None = None  # why it was quarantined instead of journaled, if it was


@dataclass(frozen=True, slots=True)
class LedgerBatch:
    """The ledger entries of one committed batch, for one source."""

    source: str
    entries: Sequence[LedgerEntry]


@dataclass(frozen=True, slots=True)
class ConversationTally:
    """What the ledger holds of one conversation: how many, the first and the last."""

    count: int
    first: tuple[int, str]  # (timestamp, msg_id)
    last: tuple[int, str]


@dataclass(frozen=True)
class JournalStats:
    path: str
    max_seq: int
    events: int
    bytes: int
    oldest_fetched_at: int | None
    quarantined: int
    dead_letters: int
    sinks: list[SinkLag] = field(default_factory=list)
    cursors: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Fence:
    """Proof of holding a lease: writes made under it are refused once the lease moved.

    ``epoch`` grows by one every time the lease changes hands; the journal checks
    holder and epoch in the same transaction as the write (SPEC §9, fencing).
    """

    unit: str
    holder: str
    epoch: int


@dataclass(frozen=True, slots=True)
class Lease:
    """One lease as the journal has it (``relay status``)."""

    unit: str
    holder: str | None
    epoch: int
    expires_in: float  # seconds by the journal's clock; negative once expired


@dataclass(frozen=True, slots=True)
class Grant:
    """A lease just acquired."""

    fence: Fence
    # Seconds since the previous holder's tenure ended (released or expired); None if
    # nobody held it before. A RongCloud budget must honour what was sent before.
    previous_end_ago: float | None


@dataclass(frozen=True, slots=True)
class Member:
    """A relay taking part in the cluster (``relay status``)."""

    member: str
    description: str
    seen_ago: float


class Leases(Protocol):
    """Leases on units of work (a source's uid, a sink) among relays sharing the journal.

    Times are the journal's own (one clock for every replica). The embedded
    single-writer journal grants every lease to its one relay.
    """

    async def heartbeat(self, member: str, description: str) -> None:
        """The member is alive (and, joining, now known)."""

    async def members(self, ttl: float) -> list[Member]:
        """Members seen within ``ttl`` seconds."""

    async def acquire(self, unit: str, member: str, ttl: float) -> Grant | None:
        """Take ``unit`` if it is free or expired (a new epoch), else None."""

    async def renew(self, fence: Fence, ttl: float) -> bool:
        """Extend a lease still held under ``fence``; False if it moved."""

    async def release(self, fence: Fence) -> None:
        """Give a lease up (it is free at once)."""

    async def leave(self, member: str) -> None:
        """A clean stop: the member and all its leases go."""

    async def leases(self) -> list[Lease]: ...


class EventLog(Protocol):
    """The deduplicating, ordered log of events: what sources append and sinks read."""

    async def commit_batch(
        self,
        events: Sequence[NewEvent],
        *,
        cursors: Mapping[str, str] | None = None,
        quarantine: Sequence[QuarantinedRecord] = (),
        ledger: LedgerBatch | None = None,
        fence: Fence | None = None,
    ) -> CommitResult:
        """Atomically insert new events, quarantined records, source cursor moves and
        evacuation-ledger entries (:class:`Ledger`).

        Under ``fence`` the whole batch is refused (:class:`LeaseLostError`) if the
        lease has moved to another holder, in the same transaction.

        An event whose id the journal holds from within the dedup window is
        dropped; one whose id was last accepted longer ago is accepted as new (at
        a new ``seq``). Events get ever-increasing ``seq`` in the order given; a
        reader that has seen a ``seq`` never later finds a smaller one appear.
        """

    async def read(self, after_seq: int, limit: int) -> list[StoredEvent]:
        """Events with ``seq > after_seq`` in journal order."""

    async def wait_for_events(self, after_seq: int, timeout: float) -> None:
        """Return when an event past ``after_seq`` may exist, or after ``timeout`` seconds."""

    async def count_since(self, since_ms: int, *, through_seq: int | None = None) -> int:
        """Events fetched at or after ``since_ms`` (with ``seq <= through_seq``, if given)."""

    async def count_after(self, after_seq: int) -> int:
        """Events with ``seq > after_seq``: a sink's exact backlog (seqs have gaps)."""

    async def compact(self, now_ms: int) -> int:
        """Drop events past retention that every sink has delivered; returns how many."""


class SourceState(Protocol):
    """Source cursors (provider positions), also moved by :meth:`EventLog.commit_batch`."""

    async def get_cursors(self, prefix: str) -> dict[str, str]:
        """Source cursors whose key starts with ``prefix``."""

    async def set_cursors(self, cursors: Mapping[str, str]) -> None:
        """Move cursors that are not tied to a batch (e.g. the time of the last poll)."""


class SinkCursors(Protocol):
    """Each sink's position in the event log."""

    async def register_sinks(self, names: Sequence[str], *, prune: bool) -> None:
        """Create cursors for new sinks (at the start of the journal); drop unknown ones."""

    async def sink_cursor(self, sink: str) -> int:
        """The last ``seq`` the sink has delivered."""

    async def advance_sink(self, sink: str, seq: int, *, fence: Fence | None = None) -> None:
        """Record that the sink delivered everything up to ``seq`` (never moves back);
        refused under a ``fence`` whose lease moved (:class:`LeaseLostError`)."""

    async def rewind_sink(self, sink: str, since_ms: int) -> int:
        """Move a sink's cursor back to re-deliver events fetched at or after ``since_ms``.

        Never forward: a cursor already before that point stays. Returns the cursor.
        """

    async def event_seq(self, event_id: str, fetched_at: int | None = None) -> int | None:
        """The ``seq`` the journal holds the event ``event_id`` at, or None if it holds none.

        With ``fetched_at``: only that copy. An id accepted again after the dedup
        window is another copy at a later seq; a sink that holds the older one
        must not take the newer one's place. None also when compacted or erased.
        """

    async def journal_id(self) -> int:
        """This journal's identity: fixed for its life, another for a new journal (even in
        the same place). A destination records it beside a seq, so that a seq from
        another journal is never taken for one of this journal's."""


class DeadLetters(Protocol):
    """Events a sink gave up on, kept with the error; replayable from the CLI."""

    async def add_dead_letters(
        self, sink: str, events: Sequence[StoredEvent], error: str, attempts: int
    ) -> None:
        """Keep events a sink gave up on, with the error."""

    async def dead_letters(self, sink: str | None, limit: int, *,
                           dlid: int | None = None) -> list[DeadLetter]: ...

    async def request_dead_letter_replay(self, sink: str | None, dlids: Sequence[int]) -> int:
        """Mark dead letters for re-delivery by their sink (all of ``sink``'s without ids)."""

    async def dead_letters_to_replay(self, sink: str, limit: int) -> list[tuple[int,
                                                                             StoredEvent]]:
        """Dead letters marked for replay, as ``(dlid, event)``."""

    async def settle_dead_letters(self, delivered: Sequence[int],
                                  refused: Sequence[tuple[int, str]]) -> None:
        """Drop replayed dead letters that were delivered; keep the refused ones."""

    async def remove_dead_letters(self, dlids: Sequence[int], *, sink: str | None = None,
                                  everything: bool = False) -> int:
        """Purge by ids, by sink, or everything."""


class ControlRequests(Protocol):
    """Requests from the CLI to a sink's runner (running now or later)."""

    async def request_control(self, sink: str, action: str, arg: str) -> None:
        """Leave a request (e.g. ``replay``) for the sink's runner."""

    async def take_control(self, sink: str) -> list[tuple[str, str]]:
        """The sink's pending requests, removed as they are taken."""


class Erasure(Protocol):
    async def erase_user(self, user_id: str, *, dry_run: bool = False) -> dict[str, int]:
        """Remove one user's events (as sender or recipient) everywhere the journal keeps data."""


class Health(Protocol):
    """What the relay watches about the journal itself."""

    async def max_seq(self) -> int:
        """The highest ``seq`` committed (by any writer) that this journal knows of.

        Cheap enough for a gauge per delivered batch: it may lag another writer's
        latest commit by a moment, never this process's own. Never raises: while
        the storage cannot be reached it answers what it last knew.
        """

    async def storage_bytes(self) -> int:
        """Bytes the journal occupies (files, or the database's tables and indexes)."""

    def write_blocker(self) -> WriteBlocker | None:
        """Why the journal cannot take writes now, or None: while it cannot, sources
        must not fetch what they could not commit."""

    async def check_intact(self) -> None:
        """Raise :class:`JournalGoneError` if the storage is no longer the one opened."""

    async def stats(self) -> JournalStats: ...


class Ledger(Protocol):
    """The evacuation ledger (``relay evacuate``).

    A compact record of every message id a source has taken from a provider's
    history (journaled or quarantined), written in the same transaction as its
    batch and never compacted: it outlives ``retain``, so the completeness check
    at the end of an evacuation does not depend on events still being in the
    journal. Only the evacuated source writes it. Entries are unique on
    (source, timestamp, msg_id); the same entry committed twice counts once.
    """

    async def ledger_tallies(self, source: str, before_ms: int) -> dict[str, ConversationTally]:
        """Per conversation, the source's entries with a timestamp below ``before_ms``."""

    async def ledger_missing(self, source: str,
                             keys: Sequence[tuple[int, str]]) -> list[tuple[int, str]]:
        """Those ``(timestamp, msg_id)`` keys the source's ledger does not hold, in order."""

    async def ledger_quarantined(self, source: str, limit: int) -> list[LedgerEntry]:
        """The source's entries that were quarantined, oldest first (at most ``limit``)."""


class SinkJournal(EventLog, SourceState, SinkCursors, DeadLetters, ControlRequests, Health,
                  Protocol):
    """What a sink's runner uses (named cursors too: its replay mark)."""


class SourceJournal(EventLog, SourceState, Health, Protocol):
    """What a source uses (commits, cursors, whether to poll)."""


class Journal(EventLog, SourceState, SinkCursors, DeadLetters, ControlRequests, Erasure,
              Health, Ledger, Leases, Protocol):
    """Durable, deduplicating event log with per-source and per-sink cursors."""

    async def close(self) -> None: ...
