"""What every sink provides, its routing filter, and how it reports failure.

A sink receives batches of journal events in journal order. One call of
:meth:`Sink.deliver` is one attempt: the sink never sleeps or retries by
itself, it *classifies* what happened and the runner waits, retries and
reports (one retry layer, so the runner's lag gauges and alerts see every
outage). Whole-batch failures are exceptions::

    SinkError
    ├── RetryableError   transient: retry the same batch later (honours retry_after)
    ├── SinkPausedError  the destination itself is wrong (auth, 404, a redirect, a
    │                    missing topic): pause and alert
    └── SinkFencedError  another writer took the destination over (a second relay, a
                         moved lease): stop delivering, alert; retrying cannot help

Partial failure is data, in :class:`DeliveryResult`: events the destination
refuses for good (``rejected``) go to the dead-letter store; events this
attempt did not deliver (``retry``, e.g. one lane of a webhook) are tried
again by the runner; everything else was delivered.

Position. A sink whose destination records where it stands, atomically with
the data (``commits_position``: Kafka with ``exactly_once``, whose transactions
hold a cursor record; a file, whose last line is the last event it holds),
says so through :meth:`Sink.position`. At start the runner takes that
position over the journal's cursor when it is ahead (the crash fell between
the destination's commit and the journal's cursor write), so nothing is
delivered twice; never when it is behind (the journal's cursor is never moved
back silently). Each delivery carries an :class:`Advance`: the seq the batch
moves the cursor to, to be recorded with the data, and ``settle``, which keeps
refused events as dead letters *before* the position commits (a position
committed first would skip them for good after a crash).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field

from relay.checks import CheckResult
from relay.config_base import ComponentConfig, Duration
from relay.journal import StoredEvent


class SinkError(Exception):
    """A delivery that did not complete."""


class RetryableError(SinkError):
    def __init__(self, message: str, retry_after: float | None = None, *,
                 state: str = "retrying") -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.state = state  # what operators see meanwhile ("retrying", "breaker_open")


class SinkPausedError(SinkError):
    """The destination rejects the sink itself (credentials, address): an operator must act."""


class SinkFencedError(SinkError):
    """Another writer holds the destination now (a newer producer with the sink's
    transactional id): this one must write nothing more."""


@dataclass(frozen=True, slots=True)
class SinkPosition:
    """Where a destination stands, as it recorded it itself.

    Either the journal ``seq`` it recorded (with the ``journal`` it belongs to),
    or the last event it holds (``event_id`` and its ``fetched_at``), which the
    runner looks up in the journal. ``where`` names it in the logs.
    """

    where: str
    seq: int | None = None
    journal: int | None = None
    event_id: str | None = None
    fetched_at: int | None = None


#: Keeps refused events as dead letters; False if the relay stopped first (then the
#: sink must not commit its position: the batch repeats after the restart).
Settle = Callable[[Sequence[tuple[StoredEvent, str]]], Awaitable[bool]]


async def _settled_later(_refused: Sequence[tuple[StoredEvent, str]]) -> bool:
    return True


@dataclass(frozen=True, slots=True)
class Advance:
    """What a batch moves, for a sink that records its position with the data.

    ``seq`` is the journal seq the sink's cursor moves to with this batch (None:
    it stays, e.g. re-delivered dead letters); ``journal`` the journal's identity,
    recorded beside it.
    """

    seq: int | None
    journal: int = 0
    settle: Settle = _settled_later


@dataclass
class DeliveryResult:
    rejected: list[tuple[StoredEvent, str]] = field(default_factory=list)  # → dead letters
    retry: list[StoredEvent] = field(default_factory=list)  # not delivered by this attempt
    retry_after: float | None = None  # the destination's own hint for ``retry`` (clamped)
    error: str = ""  # why ``retry`` is not empty


class SinkFilter(BaseModel):
    """Route only matching events to a sink; an empty list matches everything."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sources: list[str] = Field(default_factory=list)
    providers: list[str] = Field(default_factory=list)
    kinds: list[str] = Field(default_factory=list)
    channel_types: list[str] = Field(default_factory=list)
    types: list[str] = Field(default_factory=list, description="Glob patterns, e.g. 'RC:*'.")

    def is_empty(self) -> bool:
        return not (self.sources or self.providers or self.kinds or self.channel_types
                    or self.types)

    def matches(self, event: StoredEvent) -> bool:
        r = event.routing()
        return (
            (not self.sources or r.source in self.sources)
            and (not self.providers or r.provider in self.providers)
            and (not self.kinds or r.kind in self.kinds)
            and (not self.channel_types or r.channel_type in self.channel_types)
            and (not self.types or any(fnmatch.fnmatchcase(r.type, p) for p in self.types))
        )


class SinkConfig(ComponentConfig):
    """Settings every sink shares."""

    filter: SinkFilter = Field(default_factory=SinkFilter)
    batch_size: int = Field(default=1000, ge=1, le=100_000)
    # A batch smaller than batch_size waits for more events until its oldest has waited
    # this long since it was fetched: fewer, fuller deliveries (each one a write, an fsync
    # or a round trip, and a cursor commit) for at most this much latency. 0: at once.
    batch_wait: Duration = Field(default=0.0, le=60)
    # The one retry layer (the runner's): exponential backoff with jitter between attempts.
    retry_backoff: Duration = 0.5
    retry_backoff_max: Duration = 60.0
    # A destination's Retry-After is obeyed up to this (absurd values must not park a sink).
    max_retry_after: Duration = 60.0
    paused_retry: Duration = 60.0


class Sink(Protocol):
    name: str
    #: The destination records its position with the data (see the module's docstring).
    commits_position: bool

    async def start(self) -> None:
        """Connect / open; may raise :class:`SinkError` (the runner retries)."""

    async def position(self) -> SinkPosition | None:
        """Where the destination stands (after :meth:`start`); None if it does not know.

        May raise :class:`SinkError` (the runner retries).
        """

    async def deliver(self, events: Sequence[StoredEvent],
                      advance: Advance | None = None) -> DeliveryResult:
        """One attempt at the batch; what is not in ``rejected`` or ``retry`` is safe.

        A sink that commits its position records ``advance.seq`` with the data and
        passes what it refuses to ``advance.settle`` before committing (and still
        returns it in ``rejected``).
        """

    async def close(self) -> None: ...

    async def check(self) -> list[CheckResult]: ...
