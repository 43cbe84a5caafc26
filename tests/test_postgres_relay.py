"""The relay as a real process on the PostgreSQL journal: RongCloud emulator → relay
(``[journal] type = "postgres"``) → file sink, and the database stopped mid-run."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from relay.emulators.rongcloud import RongCloudEmulator, message_key
from tests.support.configs import file_sink, rongcloud_source, write_config
from tests.support.emulators import refused_port, serving
from tests.support.postgres import PostgresServer
from tests.support.relay_process import RelayProcess, count_lines, read_events, wait_for

pytestmark = pytest.mark.slow


def metric(port: int, name: str) -> float | None:
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except httpx.HTTPError:
        return None
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def start_relay(tmp_path: Path, urls: list[str], dsn: str,
                metrics_port: int | None = None) -> tuple[RelayProcess, Path, Path]:
    events = tmp_path / "events.jsonl"
    config = write_config(
        tmp_path,
        sources={"rc": rongcloud_source(urls, idle_interval="100ms")},
        sinks={"archive": file_sink(events, batch_size=200)},
        journal={"type": "postgres", "dsn": dsn},
        metrics={"enabled": metrics_port is not None,
                 "listen": f"127.0.0.1:{metrics_port or 0}"},
    )
    return RelayProcess(config, tmp_path / "relay.log").start(), events, config


def test_rongcloud_to_file_through_postgres_exactly_once(
        tmp_path: Path, postgres_dsn: str, postgres_server: PostgresServer) -> None:
    emulator = RongCloudEmulator("test-key", "test-secret", batch_size=50, budget=None,
                                 redelivery_ratio=0.05, seed=17)
    keys = emulator.generate(4000)
    with serving(emulator) as (_loop, server):
        relay, events_file, config = start_relay(tmp_path, server.urls, postgres_dsn)
        try:
            wait_for(lambda: count_lines(events_file) >= len(keys)
                     and not any(emulator.snapshot()["queued"].values()),
                     timeout=90, message="the backlog to drain through PostgreSQL")
            status = subprocess.run(
                [sys.executable, "-m", "relay", "status", "--config", str(config)],
                capture_output=True, text=True, timeout=60, check=False)
        finally:
            relay.stop()
    assert relay.proc is not None
    assert relay.proc.returncode == 0, relay.log_text()[-3000:]
    events = read_events(events_file)
    ids = Counter(e["id"] for e in events)
    assert not [i for i, n in ids.items() if n > 1], "an event landed twice"
    assert {message_key(e["native"]) for e in events} == set(keys)
    assert emulator.snapshot()["redelivered"] > 50, "the emulator must have redelivered"
    assert status.returncode == 0, status.stderr
    assert "postgresql://relay@127.0.0.1:" in status.stdout
    assert postgres_server.password not in status.stdout + relay.log_text()
    assert "archive" in status.stdout


def test_postgres_stopped_mid_run_loses_nothing_and_the_relay_resumes(
        tmp_path: Path, postgres_dsn: str, postgres_server: PostgresServer) -> None:
    emulator = RongCloudEmulator("test-key", "test-secret", batch_size=20, budget=None,
                                 seed=23)
    first = emulator.generate(1500)
    port = refused_port()
    with serving(emulator) as (loop, server):
        relay, events_file, _ = start_relay(tmp_path, server.urls, postgres_dsn, port)
        try:
            wait_for(lambda: count_lines(events_file) >= len(first), timeout=90,
                     message="the first messages")
            assert metric(port, "relay_journal_up") == 1
            postgres_server.stop()
            outage_started = time.monotonic()
            more = loop.call(lambda: emulator.generate(1500))
            wait_for(lambda: metric(port, "relay_journal_up") == 0, timeout=20, interval=0.2,
                     message="relay_journal_up to drop to 0")
            # Down for ~10 s, the relay holding on: running, nothing acknowledged beyond
            # the batch each endpoint holds in memory.
            while time.monotonic() - outage_started < 10:
                assert relay.running(), relay.log_text()[-3000:]
                assert metric(port, "relay_journal_up") == 0
                time.sleep(0.5)  # the outage's length, not a synchronization
            queued = sum(emulator.snapshot()["queued"].values())
            assert queued >= len(more) - 3 * 20, "polling must pause while nothing commits"
            postgres_server.start()
            wait_for(lambda: count_lines(events_file) >= len(first) + len(more), timeout=120,
                     interval=0.2, message="everything after PostgreSQL came back")
            wait_for(lambda: metric(port, "relay_journal_up") == 1, timeout=20)
        finally:
            if not postgres_server.is_running:
                postgres_server.start()
            relay.stop()
    records = relay.log_records()
    assert any("UNREACHABLE" in r.get("event", "") for r in records)
    assert any("reachable again" in r.get("event", "") for r in records)
    seen = Counter(message_key(e["native"]) for e in read_events(events_file))
    assert set(seen) == set(first) | set(more), "nothing lost across the outage"
    assert max(seen.values()) <= 2
