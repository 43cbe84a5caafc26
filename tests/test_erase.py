"""Erasing one user's events on request (journal, dead letters, quarantine, file sinks)."""

from __future__ import annotations

import gzip
import os
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path

import orjson

from relay.emulators.rongcloud import RongCloudEmulator
from tests.support.configs import file_sink, rongcloud_source, write_config
from tests.support.emulators import serving
from tests.support.relay_process import RelayProcess, count_lines, wait_for


def all_lines(folder: Path) -> list[dict[str, object]]:
    events = []
    for file in folder.glob("events*"):
        opener = gzip.open if file.name.endswith(".gz") else open
        try:
            with opener(file, "rb") as f:
                events += [orjson.loads(line) for line in f if line.endswith(b"\n")]
        except (FileNotFoundError, EOFError):  # rotated (or being gzipped) meanwhile
            continue
    return events


def erase(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", "erase", "--config", str(config),
                           *args], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ))


def test_erase_one_users_events_everywhere_we_keep_them(tmp_path: Path) -> None:
    emulator = RongCloudEmulator("test-key", "test-secret", budget=None, seed=71)
    emulator.generate(900, "person")
    out = tmp_path / "out"
    with serving(emulator) as (_l, server):
        config = write_config(tmp_path, sources={"rc": rongcloud_source(
            server.urls, requests_per_second=50)}, sinks={"file": file_sink(
                out / "events.jsonl", rotate_bytes="64KiB", gzip=True)})
        relay = RelayProcess(config, tmp_path / "relay.log").start()
        try:
            wait_for(lambda: len(all_lines(out)) >= 900, timeout=60)
            assert erase(config, "--user", "u1").returncode == 2  # not while running
        finally:
            relay.stop()
    before = all_lines(out)
    senders = Counter(e["sender"] for e in before)
    user = senders.most_common(1)[0][0]
    assert isinstance(user, str)
    mine = [e for e in before if user in (e["sender"], e["recipient"])]
    assert any(f.name.endswith(".gz") for f in out.iterdir()), "rotated files must be covered"

    dry = erase(config, "--user", user, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"would erase {len(mine)} record(s) from events" in dry.stdout
    done = erase(config, "--user", user)
    assert done.returncode == 0, done.stderr
    assert f"erased {len(mine)} record(s) from file sink file" in done.stdout

    after = all_lines(out)
    assert len(after) == len(before) - len(mine)
    assert not [e for e in after if user in (e["sender"], e["recipient"])]
    conn = sqlite3.connect(tmp_path / "relay.db")
    left = conn.execute("SELECT count(*) FROM events WHERE instr(CAST(payload AS TEXT), ?) > 0",
                        (orjson.dumps(user).decode(),)).fetchone()[0]
    conn.close()
    assert left == 0
    raw = (tmp_path / "relay.db").read_bytes()
    assert f'"sender":"{user}"'.encode() not in raw, "erased content must not linger in pages"
    for file in out.iterdir():
        assert file.stat().st_mode & 0o077 == 0
    assert count_lines(out / "events.jsonl") >= 0
