"""``relay journal copy --from sqlite:PATH --to postgresql://...``: a real SQLite file,
the suite's real PostgreSQL server, the CLI as a child process."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from relay.config import JournalConfig
from relay.journal import Journal, NewEvent, QuarantinedRecord, open_journal
from tests.support.postgres import PostgresServer

pytestmark = pytest.mark.anyio

ROUTING = b'["rc","rongcloud","message","direct","","x"]'


def new_event(native: str, fetched_at: int | None = None) -> NewEvent:
    now = fetched_at if fetched_at is not None else int(time.time() * 1000)
    return NewEvent(f"rc:{native}", now, ROUTING, b'{"id":"rc:%s"}' % native.encode(), now)


def copy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", "journal", "copy", *args],
                          capture_output=True, text=True, timeout=120, check=False)


async def fill_sqlite(path: Path) -> None:
    """An installation mid-life: compacted, one sink behind, dead letters, requests."""
    journal = await open_journal(JournalConfig(path=str(path), retain=3 * 3600,
                                               dedup_window=3 * 3600))
    try:
        await journal.register_sinks(["file", "hook"], prune=True)
        old = int(time.time() * 1000) - 4 * 3600 * 1000
        await journal.commit_batch([new_event(f"old{i}", old) for i in range(3)])
        await journal.commit_batch([new_event(f"e{i}") for i in range(1200)],
                                   cursors={"rc:person:last_poll_ms": "123"},
                                   quarantine=[QuarantinedRecord("rc", "person", "bad", b"{")])
        await journal.advance_sink("file", 1203)
        await journal.advance_sink("hook", 3)
        assert await journal.compact(int(time.time() * 1000)) == 3  # old0..2: delivered by all
        rows = await journal.read(3, 2)
        await journal.add_dead_letters("hook", rows, "HTTP 422", attempts=3)
        await journal.request_dead_letter_replay(None, [1])
        await journal.request_control("hook", "replay", "1000")
    finally:
        await journal.close()


async def snapshot(journal: Journal) -> dict[str, object]:
    events = await journal.read(0, 5000)
    stats = await journal.stats()
    return {
        "events": [(e.seq, e.id, e.fetched_at, e.routing_json, e.payload) for e in events],
        "max_seq": stats.max_seq, "cursors": stats.cursors, "quarantined": stats.quarantined,
        "sinks": [(s.sink, s.cursor, s.pending) for s in stats.sinks],
        "dead": [(d.dlid, d.sink, d.event_seq, d.event_id, d.error, d.attempts, d.replay)
                 for d in await journal.dead_letters(None, 100)],
    }


async def test_copy_moves_everything_and_is_idempotent(
        tmp_path: Path, postgres_dsn: str, postgres_server: PostgresServer) -> None:
    path = tmp_path / "relay.db"
    await fill_sqlite(path)
    source = await open_journal(JournalConfig(path=str(path)), mode="status")
    expected = await snapshot(source)
    await source.close()

    first = copy("--from", f"sqlite:{path}", "--to", postgres_dsn)
    assert first.returncode == 0, first.stderr
    assert postgres_server.password not in first.stdout + first.stderr
    assert "events             1200 in the source,      1200 new" in first.stdout
    assert "dead_letters          2 in the source,         2 new" in first.stdout

    target_config = JournalConfig(type="postgres", dsn=postgres_dsn)
    target = await open_journal(target_config, mode="admin")
    try:
        assert await snapshot(target) == expected
        assert await target.take_control("hook") == [("replay", "1000")]
    finally:
        await target.close()

    # Again (e.g. after an interrupted first attempt): nothing changes.
    (tmp_path / "dsn").write_text(postgres_dsn + "\n")
    again = copy("--from", f"sqlite:{path}", "--to-dsn-file", str(tmp_path / "dsn"))
    assert again.returncode == 0, again.stderr
    assert "already held a copy" in again.stdout
    assert "1200 in the source,         0 new" in again.stdout

    # The relay runs on the target now: new events follow the copied seqs.
    target = await open_journal(target_config)
    try:
        assert (await target.commit_batch([new_event("new")])).last_seq > expected["max_seq"]
        assert (await target.commit_batch([new_event("e5")])).duplicates == 1  # dedup kept
    finally:
        await target.close()

    # Copying the old journal over a target that moved on is refused ...
    refused = copy("--from", f"sqlite:{path}", "--to", postgres_dsn)
    assert refused.returncode == 1
    assert "--replace-target" in refused.stderr
    assert postgres_server.password not in refused.stderr
    # ... unless asked to replace it.
    replaced = copy("--from", f"sqlite:{path}", "--to", postgres_dsn, "--replace-target")
    assert replaced.returncode == 0, replaced.stderr
    assert "emptied the target" in replaced.stdout
    target = await open_journal(target_config, mode="admin")
    try:
        assert await snapshot(target) == expected
    finally:
        await target.close()


async def test_copy_refuses_a_running_relay_and_another_journal(
        tmp_path: Path, postgres_dsn: str) -> None:
    path = tmp_path / "relay.db"
    await fill_sqlite(path)
    other = tmp_path / "other.db"
    journal = await open_journal(JournalConfig(path=str(other)))
    await journal.commit_batch([new_event("x")])
    try:
        running = copy("--from", f"sqlite:{other}", "--to", postgres_dsn)
        assert running.returncode == 2
        assert "stop it" in running.stderr
    finally:
        await journal.close()
    assert copy("--from", f"sqlite:{other}", "--to", postgres_dsn).returncode == 0
    mixed = copy("--from", f"sqlite:{path}", "--to", postgres_dsn)
    assert mixed.returncode == 1
    assert "not empty (1 events" in mixed.stderr
    assert copy("--from", "kafka:x", "--to", postgres_dsn).returncode == 2
    assert copy("--from", f"sqlite:{path}", "--to", "mysql://x@y/z").returncode == 2
    assert copy("--from", f"sqlite:{tmp_path / 'none.db'}", "--to", postgres_dsn).returncode == 1
