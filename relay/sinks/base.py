"""What every sink provides, its routing filter, and how it reports failure.

A sink receives batches of journal events in journal order. One call of
:meth:`Sink.deliver` is one attempt: the sink never sleeps or retries by
itself, it *classifies* what happened and the runner waits, retries and
reports (one retry layer, so the runner's lag gauges and alerts see every
outage). Whole-batch failures are exceptions::

    SinkError
    ├── RetryableError   transient: retry the same batch later (honours retry_after)
    └── SinkPausedError  the destination itself is wrong (auth, 404, a redirect, a
                         missing topic): pause and alert

Partial failure is data, in :class:`DeliveryResult`: events the destination
refuses for good (``rejected``) go to the dead-letter store; events this
attempt did not deliver (``retry``, e.g. one lane of a webhook) are tried
again by the runner; everything else was delivered.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
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
    # The one retry layer (the runner's): exponential backoff with jitter between attempts.
    retry_backoff: Duration = 0.5
    retry_backoff_max: Duration = 60.0
    # A destination's Retry-After is obeyed up to this (absurd values must not park a sink).
    max_retry_after: Duration = 60.0
    paused_retry: Duration = 60.0


class Sink(Protocol):
    name: str

    async def start(self) -> None:
        """Connect / open; may raise :class:`SinkError` (the runner retries)."""

    async def deliver(self, events: Sequence[StoredEvent]) -> DeliveryResult:
        """One attempt at the batch; what is not in ``rejected`` or ``retry`` is safe."""

    async def close(self) -> None: ...

    async def check(self) -> list[CheckResult]: ...
