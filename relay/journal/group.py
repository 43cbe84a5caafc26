"""Group commit: what several callers submit at the same time is committed together.

Sources on several endpoints and sinks moving their cursors commit at the same
time; the first to get the lock commits everything queued so far (one
transaction, one fsync), the others find their result ready. The PostgreSQL journal
uses it; the SQLite journal forms its groups on its writer's thread instead
(:mod:`relay.journal.sqlite_group`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

import anyio

from relay.journal.base import (
    CommitResult,
    Fence,
    JournalError,
    LedgerBatch,
    NewEvent,
    QuarantinedRecord,
)


@dataclass(eq=False)
class Pending:
    """One caller's share of a group commit."""

    events: Sequence[NewEvent] = ()
    cursors: Mapping[str, str] | None = None
    quarantine: Sequence[QuarantinedRecord] = ()
    sink: tuple[str, int] | None = None
    ledger: LedgerBatch | None = None
    fence: Fence | None = None
    result: CommitResult | None = None
    error: JournalError | None = None
    done: bool = False


class GroupCommit:
    """Serializes commits; ``apply(group)`` commits a group in one transaction.

    ``apply`` sets every member's ``result`` (or its own ``error``: a member whose
    fence failed), or raises (a :class:`JournalError` then reaches every member).
    The holder commits shielded from cancellation:
    the others' batches depend on it (a RongCloud batch exists nowhere else). A
    caller cancelled while it waits takes its own item back out of the queue,
    unless a holder already took it.
    """

    def __init__(self, apply: Callable[[list[Pending]], Awaitable[None]]) -> None:
        self._apply = apply
        self._queue: list[Pending] = []
        self._lock: anyio.Lock | None = None

    async def submit(self, item: Pending) -> CommitResult:
        """Commit ``item`` (with whatever else is waiting); raises its error."""
        self._queue.append(item)
        if self._lock is None:
            # No turn of the loop when the lock is free: a commit is on its source's path.
            self._lock = anyio.Lock(fast_acquire=True)
        try:
            await self._lock.acquire()
        except BaseException:
            if item in self._queue:
                self._queue.remove(item)
            raise
        try:
            if not item.done:
                group, self._queue = self._queue, []
                with anyio.CancelScope(shield=True):
                    try:
                        await self._apply(group)
                    except JournalError as exc:
                        for pending in group:
                            pending.error = exc
                    except BaseException as exc:
                        error = JournalError(f"journal write failed: {exc!r}")
                        for pending in group:
                            pending.error = error
                        raise
                    finally:
                        for pending in group:
                            pending.done = True
        finally:
            self._lock.release()
        if item.error is not None:
            raise item.error
        if item.result is None:  # never: a group marks every member with a result or error
            raise JournalError("journal commit finished without a result")
        return item.result
