"""``batch_wait``: a sink that keeps up waits a moment for a fuller batch, never longer than
that after an event's fetch, and never when a full batch or older events are ready."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import anyio
import orjson
import pytest

from relay.journal import NewEvent, StoredEvent
from relay.journal.sqlite import SqliteJournal
from relay.sinks.base import Advance, DeliveryResult
from relay.sinks.file import FileSink, FileSinkConfig
from relay.sinks.runner import SinkRunner

pytestmark = pytest.mark.anyio


class CountingFileSink(FileSink):
    """A real file sink that remembers the size of every batch it was handed."""

    def __init__(self, name: str, config: FileSinkConfig) -> None:
        super().__init__(name, config)
        self.batches: list[int] = []

    async def deliver(self, events: Sequence[StoredEvent],
                      advance: Advance | None = None) -> DeliveryResult:
        self.batches.append(len(events))
        return await super().deliver(events, advance)


def new_event(n: int, fetched_at: int) -> NewEvent:
    payload = orjson.dumps({"id": f"rc:{n}", "fetched_at": fetched_at})
    return NewEvent(f"rc:{n}", fetched_at, b'["rc","rongcloud","message","direct","","d"]',
                    payload, 0)


def fresh_batches(count: int) -> list[list[NewEvent]]:
    """``count`` batches of 10 events fetched just now."""
    now = int(time.time() * 1000)
    return [[new_event(b * 10 + n, now) for n in range(10)] for b in range(count)]


def file_config(tmp_path: Path, **settings: object) -> FileSinkConfig:
    return FileSinkConfig.model_validate(
        {"type": "file", "path": str(tmp_path / "out.jsonl"), **settings})


async def _run(tmp_path: Path, config: FileSinkConfig, batches: list[list[NewEvent]],
               gap: float) -> tuple[list[int], float]:
    """Commit ``batches`` ``gap`` seconds apart while a runner delivers them; the batch
    sizes the sink was handed and the seconds until the last event was delivered."""
    journal = SqliteJournal.open(tmp_path / "j.db")
    total = sum(len(b) for b in batches)
    try:
        await journal.register_sinks(["f"], prune=True)
        sink = CountingFileSink("f", config)
        runner = SinkRunner(sink, config, journal)
        stopping = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(runner.run, stopping)
            started = time.monotonic()
            for batch in batches:
                await journal.commit_batch(batch)
                await anyio.sleep(gap)
            with anyio.fail_after(20):  # polled: the runner has no "done" to wait for
                while await journal.sink_cursor("f") < total:  # noqa: ASYNC110 - the cursor is in the journal
                    await anyio.sleep(0.005)
            took = time.monotonic() - started
            stopping.set()
        assert sum(sink.batches) == total
        return sink.batches, took
    finally:
        await journal.close()


async def test_a_sink_that_keeps_up_waits_for_a_fuller_batch(tmp_path: Path) -> None:
    config = file_config(tmp_path, batch_size=1000, batch_wait=1.0)
    batches, _ = await _run(tmp_path, config, fresh_batches(10), gap=0.01)
    # Ten commits within about 0.1 s, each of which a runner that does not wait delivers
    # on its own: with a second to wait, they go in one or two batches.
    assert len(batches) <= 2, batches


async def test_events_older_than_the_wait_and_full_batches_go_at_once(tmp_path: Path) -> None:
    old = int(time.time() * 1000) - 60_000  # fetched a minute ago: waited long enough
    config = file_config(tmp_path, batch_size=20, batch_wait=30.0)
    batches, took = await _run(tmp_path, config, [[new_event(n, old) for n in range(50)]],
                               gap=0)
    assert batches == [20, 20, 10]
    assert took < 10  # not one wait of 30 s


async def test_a_lone_event_waits_no_longer_than_batch_wait(tmp_path: Path) -> None:
    config = file_config(tmp_path, batch_wait=0.3)
    batches, took = await _run(tmp_path, config, [[new_event(1, int(time.time() * 1000))]],
                               gap=0)
    assert batches == [1]
    assert 0.2 <= took < 10


async def test_a_batch_that_fills_goes_before_the_wait_ends(tmp_path: Path) -> None:
    config = file_config(tmp_path, batch_size=20, batch_wait=30.0)
    batches, took = await _run(tmp_path, config, fresh_batches(2), gap=0.05)
    assert batches == [20]
    assert took < 10  # not the 30 s of batch_wait
