"""A thread of one's own for blocking calls that must run in order (a SQLite
connection, a file being appended to).

``anyio.to_thread.run_sync`` first takes its limiter, which gives the event loop a
turn: the call then waits behind every task that is ready, a millisecond or more
while sources are parsing answers, and a source's commit is on the path of its
next request. Here the call is handed to the thread at once, and the loop is free
while it runs. (The relay runs on asyncio, as aiohttp needs: the thread's future is
awaited as an asyncio one.)
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import anyio

_T = TypeVar("_T")


class WorkerThread:
    """Runs calls one at a time, in the order given, on one thread started on first use."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._executor: ThreadPoolExecutor | None = None
        self.pending = 0  # calls handed over and not yet finished (the running one too)

    async def run(self, fn: Callable[[], _T]) -> _T:
        """``fn()`` on the thread. Like ``anyio.to_thread.run_sync``, a cancelled
        caller still waits for the call to finish: what it started is never left
        running unseen."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self._name)
        context = contextvars.copy_context()  # log context and the like, as anyio does
        future = self._executor.submit(context.run, fn)
        self.pending += 1
        try:
            with anyio.CancelScope(shield=True):
                result = await asyncio.wrap_future(future)
        finally:
            self.pending -= 1
        return result

    def close(self) -> None:
        """Let the thread end once its calls are done (they are, if all were awaited);
        a later :meth:`run` starts another."""
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None
