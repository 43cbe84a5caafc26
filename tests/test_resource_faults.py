"""The journal's disk filling up, and the journal passing its configured size.

"Full" is made real with the relay process's own file-size limit (RLIMIT_FSIZE,
changed from outside with prlimit): every write that would grow a file fails
with EFBIG exactly as a full file system fails with ENOSPC.
"""

from __future__ import annotations

import os
import resource
import sqlite3
from collections import Counter
from pathlib import Path

import httpx
import pytest

from relay.emulators.rongcloud import RongCloudEmulator, message_key
from tests.support.configs import file_sink, rongcloud_source, write_config
from tests.support.emulators import refused_port, serving
from tests.support.relay_process import RelayProcess, count_lines, read_events, wait_for

pytestmark = pytest.mark.slow


def metric(port: int, name: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def metric_sum(port: int, name: str, label: str) -> float:
    """The sum of ``name``'s series that carry ``label`` (as written, ``outcome="new"``)."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and label in line)


def test_full_disk_stops_acknowledging_and_resumes_without_loss(tmp_path: Path) -> None:
    emulator = RongCloudEmulator("test-key", "test-secret", batch_size=20, seed=41)
    keys = emulator.generate(600)
    events_file = tmp_path / "events.jsonl"
    port = refused_port()
    config = write_config(tmp_path, sources={"rc": rongcloud_source([""])},
                          sinks={"file": file_sink(events_file, batch_size=100)},
                          metrics={"enabled": True, "listen": f"127.0.0.1:{port}"})
    with serving(emulator) as (loop, server):
        config.write_text(config.read_text().replace('[""]', f'["{server.urls[0]}"]'))
        relay = RelayProcess(config, tmp_path / "relay.log",
                             env={"RELAY_SOURCES__RC__IDLE_INTERVAL": "100ms"}).start()
        # A reader's snapshot held open from the start (``relay status``, a backup): the
        # WAL can be neither checkpointed past it nor reused from its start, so it grows
        # with every commit and is the largest file when the limit below is set. (Without
        # one, commits go on in the WAL's space already allocated, full disk or not, as
        # often as not.)
        snapshot = sqlite3.connect(":memory:")
        try:
            wait_for(lambda: "relay started" in relay.log_text(), timeout=30)
            snapshot = sqlite3.connect(tmp_path / "relay.db")
            snapshot.execute("BEGIN")
            snapshot.execute("SELECT count(*) FROM events").fetchone()
            wait_for(lambda: count_lines(events_file) >= len(keys), timeout=60)
            # From now on no file of the relay may grow: the disk is "full".
            sizes = [os.path.getsize(p) for p in tmp_path.glob("relay.db*")] + \
                [os.path.getsize(events_file), os.path.getsize(tmp_path / "relay.log")]
            soft, hard = resource.prlimit(relay.pid, resource.RLIMIT_FSIZE)
            resource.prlimit(relay.pid, resource.RLIMIT_FSIZE, (max(sizes), hard))
            more = loop.call(lambda: emulator.generate(600))
            wait_for(lambda: metric(port, "relay_journal_disk_full") == 1, timeout=60,
                     interval=0.2, message="the relay to notice the full disk")
            # Each endpoint holds at most the one batch it fetched and could not journal;
            # the rest stays with the provider, unacknowledged. (Commits into WAL space
            # already allocated still succeed on a full disk: they are journaled, and count.)
            journaled = metric_sum(port, "relay_source_events_total", 'outcome="new"')
            served = emulator.snapshot()["served_messages"]
            assert served - journaled <= 3 * 20
            assert sum(emulator.snapshot()["queued"].values()) > 0  # the relay did stop
            assert any(r.get("level") == "error" and "disk full" in r.get("event", "")
                       for r in relay.log_records())
            assert relay.running()
            # Space returns.
            resource.prlimit(relay.pid, resource.RLIMIT_FSIZE, (soft, hard))
            snapshot.close()
            wait_for(lambda: count_lines(events_file) >= len(keys) + len(more), timeout=90,
                     message="everything after space returned")
            wait_for(lambda: metric(port, "relay_journal_disk_full") == 0, timeout=30)
        finally:
            snapshot.close()
            relay.stop()
    seen = Counter(message_key(e["native"]) for e in read_events(events_file))
    assert set(seen) == set(keys) | set(more), "nothing lost across the full disk"
    assert max(seen.values()) <= 2  # a file batch torn by the full disk may repeat once


def test_journal_over_its_size_limit_alerts_loudly_and_keeps_polling(tmp_path: Path) -> None:
    emulator = RongCloudEmulator("test-key", "test-secret", batch_size=50, budget=None, seed=42)
    keys = emulator.generate(2000)
    events_file = tmp_path / "events.jsonl"
    port = refused_port()
    with serving(emulator) as (_loop, server):
        config = write_config(
            tmp_path, sources={"rc": rongcloud_source(server.urls, requests_per_second=50)},
            sinks={"file": file_sink(events_file)}, journal={"max_bytes": "200KiB"},
            metrics={"enabled": True, "listen": f"127.0.0.1:{port}"})
        relay = RelayProcess(config, tmp_path / "relay.log").start()
        try:
            wait_for(lambda: count_lines(events_file) >= len(keys), timeout=60)
            alert = wait_for(lambda: [r for r in relay.log_records()
                                      if "JOURNAL OVER ITS SIZE LIMIT" in r.get("event", "")],
                             timeout=20)
            assert metric(port, "relay_journal_size_bytes") > \
                metric(port, "relay_journal_limit_bytes") > 0
        finally:
            relay.stop()
    assert alert[0]["level"] == "error"
    assert len(read_events(events_file)) == len(keys)  # polling went on regardless
