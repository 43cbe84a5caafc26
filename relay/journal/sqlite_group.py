"""The SQLite journal's group commit, formed on the writer's thread.

:class:`relay.journal.group.GroupCommit` forms groups on the event loop: the task
that gets its lock hands the group to the writer's thread and waits for the answer,
and only then can the next group start. Each group so paid two hand-overs between
the loop and the thread (each waiting for the interpreter lock while sources parse
answers), and the commits of a drain ran back to back: a group of 150 events took
6.3 ms on the loop for 2.5 ms of work in SQLite, and sources waited 10.5 ms for a
commit.

Here the writer's thread takes whatever is queued when it finishes a commit and
commits it at once; the loop only queues items and is told the outcome, in commit
order. A caller cancelled while its item is still queued takes it back out; once the
thread has taken it, it is committed all the same (a RongCloud batch exists nowhere
else), and the caller no longer waits for it.

A caller that queues while a group is being written joins it (``more``): its rows go
into the same transaction before the COMMIT, instead of waiting for that whole
transaction and then one of its own. Writing the rows is most of a transaction's
time, and with several sources a batch often arrives during it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from functools import partial
from typing import Generic, TypeVar

from relay.journal.base import CommitResult, JournalError
from relay.journal.group import Pending
from relay.worker_thread import WorkerThread

_Queued = tuple[Pending, "asyncio.Future[CommitResult]"]
_R = TypeVar("_R")

# Callers a group may hold, the first ones and those that joined it: each one that joins
# lengthens the transaction for those already in it.
JOIN_LIMIT = 16


class ThreadGroupCommit(Generic[_R]):
    """``commit(group, more)`` runs on the writer's thread: one transaction for the
    group and whatever ``more()`` hands it before the COMMIT (callers queued since, added
    to ``group`` as they join), setting every member's ``result`` (or raising
    :class:`JournalError`); ``committed(group, what_commit_returned)`` then runs on the
    loop, in commit order; ``after()`` on the thread after each commit (the dedup merge)."""

    def __init__(self, thread: WorkerThread,
                 commit: Callable[[list[Pending], Callable[[], list[Pending]]], _R],
                 committed: Callable[[list[Pending], _R], None],
                 after: Callable[[], None]) -> None:
        self._thread = thread
        self._commit = commit
        self._committed = committed
        self._after = after
        self._lock = threading.Lock()  # the queue and the flag: loop and thread both
        self._queue: list[_Queued] = []
        self._scheduled = False  # a drain is queued on, or running in, the thread

    async def submit(self, item: Pending) -> CommitResult:
        """Commit ``item`` (with whatever else is waiting); raises its error."""
        future: asyncio.Future[CommitResult] = asyncio.get_running_loop().create_future()
        with self._lock:
            self._queue.append((item, future))
            start, self._scheduled = not self._scheduled, True
        if start:
            try:
                self._thread.start_soon(self._drain)
            except BaseException:  # no thread to run it (cannot start one)
                with self._lock:
                    self._scheduled = False
                    self._queue = [q for q in self._queue if q[0] is not item]
                raise
        try:
            return await future
        except BaseException:
            with self._lock:  # cancelled: out of the queue, unless the thread took it
                self._queue = [q for q in self._queue if q[0] is not item]
            raise

    def _drain(self) -> None:
        """On the thread: commit groups until nothing is queued."""
        try:
            while True:
                with self._lock:
                    if not self._queue:
                        self._scheduled = False
                        return
                    taken, self._queue = self._queue, []
                group = [item for item, _ in taken]
                error: JournalError | None = None
                outcome: _R | None = None
                try:
                    outcome = self._commit(group, partial(self._join, taken, group))
                except JournalError as exc:
                    error = exc
                except BaseException as exc:  # every member is told
                    error = JournalError(f"journal write failed: {exc!r}")
                # On the loop of the callers (one loop: the relay's).
                with contextlib.suppress(RuntimeError):  # closed: nobody is waiting
                    taken[0][1].get_loop().call_soon_threadsafe(
                        self._finish, taken, outcome, error)
                if error is None:
                    self._after()
        finally:
            # Left by an exception (never, but then): the next submit starts a drain
            # again instead of queueing behind one that is gone.
            with self._lock:
                self._scheduled = False

    def _join(self, taken: list[_Queued], group: list[Pending]) -> list[Pending]:
        """On the thread, inside a group's transaction: the callers queued since it was
        taken, now its members (in ``group``, and told its outcome with the others)."""
        with self._lock:
            room = JOIN_LIMIT - len(taken)
            if room <= 0 or not self._queue:
                return []
            joined, self._queue = self._queue[:room], self._queue[room:]
        taken += joined
        items = [item for item, _ in joined]
        group += items
        return items

    def _finish(self, taken: list[_Queued], outcome: _R | None,
                error: JournalError | None) -> None:
        """On the loop, in commit order."""
        if error is None:
            try:
                self._committed([item for item, _ in taken], outcome)  # type: ignore[arg-type]
            except Exception as exc:
                error = JournalError(f"journal commit finished badly: {exc!r}")
        for item, future in taken:
            if future.done():  # its caller was cancelled after the thread took it
                continue
            if error is not None:
                future.set_exception(error)
            elif item.result is None:  # never: commit() gives every member a result
                future.set_exception(JournalError("journal commit finished without a result"))
            else:
                future.set_result(item.result)
