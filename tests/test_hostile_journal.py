"""The journal under pressure: replay never skips, a deleted journal stops the relay, group
commits survive cancellation, a really full disk pauses and resumes."""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from relay.emulators.wukongim import WuKongIMEmulator
from relay.journal import NewEvent
from relay.journal.sqlite import SqliteJournal
from tests.support.configs import file_sink, rongcloud_source, write_config
from tests.support.emulators import refused_port, serving
from tests.support.hostile import ScriptedRongCloud, serving_app
from tests.support.relay_process import RelayProcess, count_lines, wait_for
from tests.support.webhook_receiver import receiving
from tests.test_hostile_peers import hook, rc_answer
from tests.test_hostile_records import metric

pytestmark = pytest.mark.slow


def relay_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=60)


# -- replay only ever rewinds ---------------------------------------------------------------

@pytest.mark.parametrize("running", [False, True], ids=["relay stopped", "relay running"])
def test_replay_since_never_skips_a_lagging_sinks_backlog(tmp_path: Path, running: bool) -> None:
    provider = ScriptedRongCloud()
    provider.queue("person", rc_answer(0, 110))
    with serving_app(provider.app()) as (_loop, urls), receiving() as (receiver, url, _l):
        receiver.behaviour.status = 503  # the webhook lags: nothing is delivered
        config = write_config(tmp_path, sources={"rc": rongcloud_source(urls,
                                                                        endpoints=["person"])},
                              sinks={"hook": hook(url)})
        relay = RelayProcess(config, tmp_path / "relay.log").start()
        try:
            wait_for(lambda: len(receiver.received) >= 2, timeout=30)
            if not running:
                assert relay.terminate() == 0
            since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 1))
            out = relay_cli(config, "replay", "--sink", "hook", "--since", since)
            assert out.returncode == 0, out.stderr
            assert "never skips" in out.stdout
            receiver.behaviour.status = None
            if not running:
                relay.start()
            wait_for(lambda: len({e["id"] for e in receiver.delivered_events()}) >= 110,
                     timeout=30, message="the whole backlog delivered after the replay request")
        finally:
            relay.stop()
    assert len({e["id"] for e in receiver.delivered_events()}) == 110


def test_replay_rewinds_a_caught_up_sink(tmp_path: Path) -> None:
    provider = ScriptedRongCloud()
    provider.queue("person", rc_answer(0, 30))
    events = tmp_path / "events.jsonl"
    with serving_app(provider.app()) as (_loop, urls):
        config = write_config(tmp_path, sources={"rc": rongcloud_source(urls,
                                                                        endpoints=["person"])},
                              sinks={"file": file_sink(events)})
        relay = RelayProcess(config, tmp_path / "relay.log").start()
        try:
            wait_for(lambda: count_lines(events) >= 30, timeout=30)
            out = relay_cli(config, "replay", "--sink", "file", "--since", "1h")
            assert "30 event(s) it has delivered will be delivered again" in out.stdout
            wait_for(lambda: count_lines(events) >= 60, timeout=30)
        finally:
            relay.stop()


def test_replay_past_retention_says_what_is_held(tmp_path: Path) -> None:
    provider = ScriptedRongCloud()
    provider.queue("person", rc_answer(0, 3))
    events = tmp_path / "events.jsonl"
    with serving_app(provider.app()) as (_loop, urls):
        config = write_config(tmp_path, sources={"rc": rongcloud_source(urls,
                                                                        endpoints=["person"])},
                              sinks={"file": file_sink(events)})
        relay = RelayProcess(config, tmp_path / "relay.log").start()
        try:
            wait_for(lambda: count_lines(events) >= 3, timeout=30)
        finally:
            relay.stop()
    out = relay_cli(config, "replay", "--sink", "file", "--since", "48h")
    assert out.returncode == 0
    assert "holds events only from" in out.stderr


# -- the journal deleted under a running relay --------------------------------------------------

def test_a_deleted_journal_stops_the_relay_loudly_and_acknowledges_nothing_more(
        tmp_path: Path) -> None:
    emulator = WuKongIMEmulator("tok", uids=("u1",), channels=(), seed=3)
    emulator.generate(50, "u1")
    events = tmp_path / "events.jsonl"
    with serving(emulator) as (loop, server):
        config = write_config(tmp_path, sources={"wk": {
            "type": "wukongim", "base_url": server.urls[0], "token": "tok", "uids": ["u1"],
            "idle_interval": "100ms"}}, sinks={"file": file_sink(events)})
        relay = RelayProcess(config, tmp_path / "relay.log").start()
        try:
            wait_for(lambda: emulator.snapshot()["acked_messages"] >= 50, timeout=30)
            (tmp_path / "relay.db").unlink()
            acked = emulator.snapshot()["acked_messages"]
            loop.call(lambda: emulator.generate(50, "u1"))
            code = wait_for(lambda: None if relay.running() else relay.proc.returncode,  # type: ignore[union-attr]
                            timeout=30, message="the relay to exit")
        finally:
            relay.stop()
    assert code != 0
    assert any(r.get("level") == "critical" and "JOURNAL LOST" in r.get("event", "")
               for r in relay.log_records())
    # At most the batch in flight when the file vanished may have been acknowledged.
    assert emulator.snapshot()["acked_messages"] - acked <= 50
    assert len(emulator.unacked("u1")) >= 1


# -- group commits and cancellation ------------------------------------------------------------

@pytest.mark.anyio
async def test_a_cancelled_commit_costs_no_other_batch(tmp_path: Path) -> None:
    """Callers cancelled (a shutdown) while the writer's thread is busy: one whose item
    is still queued takes it back out; the other members' batches (a RongCloud batch
    exists nowhere else) are committed all the same, in one group."""
    journal = SqliteJournal.open(tmp_path / "relay.db")
    await journal.register_sinks(["s"], prune=False)

    def batch(prefix: str) -> list[NewEvent]:
        return [NewEvent(f"{prefix}{i}", 1, b'["s","rongcloud","message","direct","","c"]',
                         b"{}", 1) for i in range(5)]

    def slow(_conn: object) -> None:
        time.sleep(0.4)  # a long write (compaction, erasure) holding the writer connection

    async def until(condition: Callable[[], bool]) -> None:
        # Polling the journal's internal state with a deadline (nothing to wait on instead).
        with anyio.fail_after(10):
            while not condition():  # noqa: ASYNC110
                await anyio.sleep(0.01)

    def queued() -> int:
        assert journal._group is not None
        return len(journal._group._queue)

    results: dict[str, object] = {}
    try:
        async with anyio.create_task_group() as tg:
            cursor = anyio.CancelScope()

            async def advance_cursor() -> None:
                with cursor:
                    await journal.advance_sink("s", 7)

            async def commit(name: str) -> None:
                results[name] = await journal.commit_batch(batch(name))

            tg.start_soon(journal._write, slow)
            await until(lambda: journal._writer is not None
                        and journal._writer.thread.pending == 1)
            tg.start_soon(commit, "c")
            tg.start_soon(advance_cursor)
            tg.start_soon(commit, "b")
            await until(lambda: queued() == 3)  # all behind the slow write
            cursor.cancel()
            await until(lambda: queued() == 2)  # the cancelled one took its item back
        assert getattr(results.get("b"), "new", None) == 5, "b's batch was dropped"
        assert getattr(results.get("c"), "new", None) == 5, "c's batch was dropped"
        rows = await journal.read(0, 100)
        assert {f"{p}{i}" for p in "bc" for i in range(5)} <= {e.id for e in rows}
        assert await journal.sink_cursor("s") == 0  # the cancelled advance never ran
    finally:
        await journal.close()


# -- a really full disk ---------------------------------------------------------------------------

@contextlib.contextmanager
def small_filesystem(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                              str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small file system here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_really_full_disk_pauses_everything_and_resumes_when_space_returns(
        tmp_path: Path) -> None:
    """The journal's disk really full (min_free_bytes tiny): deliveries that succeed cannot
    record their cursor. The runner must hold, not crash and re-send; all resumes after."""
    provider = ScriptedRongCloud()
    with small_filesystem(tmp_path / "disk", "48m") as disk, \
            serving_app(provider.app()) as (_loop, urls), \
            receiving() as (receiver, url, _l):
        receiver.behaviour.status = 503  # events pile up in the journal meanwhile
        port = refused_port()
        config = write_config(
            tmp_path, sources={"rc": rongcloud_source(urls, endpoints=["person"],
                                                      idle_interval="100ms")},
            sinks={"hook": hook(url, batch_size=100)},
            journal={"path": str(disk / "relay.db"), "min_free_bytes": 1},
            metrics={"enabled": True, "listen": f"127.0.0.1:{port}"})
        relay = RelayProcess(config, tmp_path / "relay.log").start()
        # A reader's snapshot held open from the start (``relay status``, a backup): the
        # WAL can be neither checkpointed past it nor reused from its start, so every
        # write, a sink cursor's too, needs new space. (Without one, small writes go on
        # in the WAL's space already allocated, full disk or not.)
        snapshot = sqlite3.connect(":memory:")
        try:
            wait_for(lambda: "relay started" in relay.log_text(), timeout=30)
            snapshot = sqlite3.connect(disk / "relay.db")
            snapshot.execute("BEGIN")
            snapshot.execute("SELECT count(*) FROM events").fetchone()
            for i in range(20):
                provider.queue("person", rc_answer(i * 100, 100))
            wait_for(lambda: metric(port, "relay_source_events_total", outcome="new") >= 2000,
                     timeout=60)
            ballast = disk / "ballast"
            with ballast.open("wb") as f, contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * 65536)
            for i in range(20, 40):
                provider.queue("person", rc_answer(i * 100, 100))
            receiver.behaviour.status = None  # deliveries succeed; cursor writes cannot
            wait_for(lambda: "journal write failed after a delivery" in relay.log_text()
                     or "unexpectedly" in relay.log_text(), timeout=60,
                     message="a cursor write to fail on the full disk")
            time.sleep(6)  # long enough for a crashed runner to restart and re-send once
            assert relay.running()
            assert "unexpectedly" not in relay.log_text(), "the sink runner crashed"
            snapshot.close()
            ballast.unlink()
            wait_for(lambda: len({e["id"] for e in receiver.delivered_events()}) >= 4000,
                     timeout=120, message="everything delivered once space returned")
        finally:
            snapshot.close()
            relay.stop()
        delivered = Counter(e["id"] for e in receiver.delivered_events())
    assert len(delivered) == 4000
    assert sum(delivered.values()) - len(delivered) <= 100, "re-sent beyond the batch in flight"
