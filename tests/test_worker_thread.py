"""relay.worker_thread: calls run in order on one thread; a cancelled caller waits."""

from __future__ import annotations

import threading
import time

import anyio
import pytest

from relay.worker_thread import WorkerThread

pytestmark = pytest.mark.anyio


async def test_calls_run_in_order_on_one_thread_and_errors_reach_the_caller() -> None:
    worker = WorkerThread("test-worker")
    seen: list[tuple[int, str]] = []

    def call(n: int) -> int:
        seen.append((n, threading.current_thread().name))
        return n * 2

    try:
        async with anyio.create_task_group() as tg:
            for n in range(20):
                tg.start_soon(worker.run, lambda n=n: call(n))
        assert [n for n, _ in seen] == list(range(20))
        assert len({name for _, name in seen}) == 1
        assert seen[0][1] != threading.current_thread().name
        assert await worker.run(lambda: call(21)) == 42

        def fail() -> None:
            raise OSError("disk gone")

        with pytest.raises(OSError, match="disk gone"):
            await worker.run(fail)
    finally:
        worker.close()
    # A closed worker starts a new thread when used again.
    assert await worker.run(lambda: 7) == 7
    worker.close()


async def test_a_cancelled_caller_still_waits_for_its_call_to_finish() -> None:
    worker = WorkerThread("test-worker")
    finished = threading.Event()

    def slow() -> None:
        time.sleep(0.3)
        finished.set()

    try:
        with anyio.move_on_after(0.05) as scope:
            await worker.run(slow)
        # Cancelled, but only once the call was done: nothing left running unseen.
        assert scope.cancelled_caught or finished.is_set()
        assert finished.is_set()
    finally:
        worker.close()
