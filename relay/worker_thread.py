"""A thread of one's own for blocking calls that must run in order (a SQLite
connection, a file being appended to).

``anyio.to_thread.run_sync`` first takes its limiter, which gives the event loop a
turn: the call then waits behind every task that is ready, a millisecond or more
while sources are parsing answers, and a source's commit is on the path of its
next request. Here the call is handed to the thread at once, and the loop is free
while it runs. The hand-over is a ``queue.SimpleQueue`` (written in C) and the
answer comes back with ``call_soon_threadsafe``: 40 µs of CPU for a call's round
trip against 90 µs through a ``ThreadPoolExecutor``. (The relay runs on asyncio, as
aiohttp needs: the answer is an asyncio future.)
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
from collections.abc import Callable
from queue import SimpleQueue
from typing import Any, TypeVar

import anyio

_T = TypeVar("_T")

# What the thread is handed: the loop to answer on and the future to answer (None: no
# answer wanted), the context to run in, the call. None: stop.
_Call = tuple[asyncio.AbstractEventLoop | None, "asyncio.Future[Any] | None",
              contextvars.Context, Callable[[], Any]]


def _answer(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # its task was cancelled from outside anyio: nobody is waiting
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _serve(calls: SimpleQueue[_Call | None]) -> None:
    while (call := calls.get()) is not None:
        loop, future, context, fn = call
        result, error = None, None
        try:
            result = context.run(fn)
        except BaseException as exc:  # handed to the caller, who raises it
            error = exc
        if loop is not None and future is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
                loop.call_soon_threadsafe(_answer, future, result, error)
        del call, future, fn, result, error  # hold nothing between calls


class WorkerThread:
    """Runs calls one at a time, in the order given, on one thread started on first use."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._calls: SimpleQueue[_Call | None] | None = None
        self.pending = 0  # calls handed over and not yet finished (the running one too)

    async def run(self, fn: Callable[[], _T]) -> _T:
        """``fn()`` on the thread. Like ``anyio.to_thread.run_sync``, a cancelled
        caller still waits for the call to finish: what it started is never left
        running unseen."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()
        # Log context and the like go along, as with anyio.
        self._queue().put((loop, future, contextvars.copy_context(), fn))
        self.pending += 1
        try:
            with anyio.CancelScope(shield=True):
                result = await future
        finally:
            self.pending -= 1
        return result

    def start_soon(self, fn: Callable[[], object]) -> None:
        """Queue ``fn()`` and return at once: it reports its outcome itself (an
        exception it lets out is lost), after the calls queued before it."""
        self._queue().put((None, None, contextvars.copy_context(), fn))

    def _queue(self) -> SimpleQueue[_Call | None]:
        if self._calls is None:
            self._calls = SimpleQueue()
            # A daemon: a relay that exits without closing (a second signal) is not held
            # up by an idle thread; what a call writes is crash-safe on its own.
            threading.Thread(target=_serve, args=(self._calls,), name=self._name,
                             daemon=True).start()
        return self._calls

    def close(self) -> None:
        """Let the thread end once its calls are done (they are, if all were awaited);
        a later :meth:`run` starts another."""
        if self._calls is not None:
            self._calls.put(None)
            self._calls = None
