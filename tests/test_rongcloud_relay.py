"""RongCloud emulator → relay (a real child process) → file sink, on loopback sockets."""

from __future__ import annotations

import math
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from relay.emulators.rongcloud import ENDPOINTS, RongCloudEmulator, message_key
from tests.support.configs import file_sink, rongcloud_source, write_config
from tests.support.emulators import refused_port, serving
from tests.support.hostile import ScriptedRongCloud, serving_app
from tests.support.relay_process import RelayProcess, count_lines, read_events, wait_for

pytestmark = pytest.mark.slow


def event_key(event: dict[str, Any]) -> str:
    return message_key(event["native"])


def utilisation(arrivals: list[tuple[float, bool]], budget: int) -> float:
    """Requests per budget over the whole seconds during which a backlog was being drained."""
    busy = [t for t, had_data in arrivals if had_data]
    start, end = busy[0], busy[-1]
    whole_seconds = math.floor(end - start)
    assert whole_seconds >= 3, "the drain must last several seconds to be measured"
    sent = sum(1 for t, _ in arrivals if start <= t < start + whole_seconds)
    return sent / (budget * whole_seconds)


def start_relay(tmp_path: Path, urls: list[str], **source: Any) -> tuple[RelayProcess, Path]:
    events = tmp_path / "events.jsonl"
    config = write_config(
        tmp_path,
        sources={"rc": rongcloud_source(urls, **source)},
        sinks={"archive": file_sink(events, batch_size=500)},
    )
    return RelayProcess(config, tmp_path / "relay.log").start(), events


def test_backlog_drains_exactly_once_within_budget(tmp_path: Path) -> None:
    emulator = RongCloudEmulator("test-key", "test-secret", batch_size=20, budget=10,
                                 redelivery_ratio=0.05, seed=7)
    keys = emulator.generate(6000)
    with serving(emulator) as (_loop, server):
        relay, events_file = start_relay(tmp_path, server.urls)
        try:
            wait_for(lambda: count_lines(events_file) >= len(keys)
                     and not any(emulator.snapshot()["queued"].values()),
                     timeout=90, message="the backlog to drain into the file")
            # Redeliveries still queued behind the last batch are served once more:
            # wait until the emulator has nothing left and the file stops growing.
            settled = wait_for(lambda: _settled(events_file), timeout=10)
        finally:
            relay.stop()
        stats = emulator.snapshot()

    events = read_events(events_file)
    assert settled == len(events)
    ids = Counter(e["id"] for e in events)
    assert not [i for i, n in ids.items() if n > 1], "an event landed twice"
    assert {event_key(e) for e in events} == set(keys)
    assert all(e["id"] == f"rc:{e['native']['msgUID']}" for e in events if "msgUID" in e["native"])
    assert stats["redelivered"] > 100, "the emulator must actually have redelivered"
    chatroom = [e for e in events if e["channel"]["type"] == "chatroom"]
    assert len(chatroom) == 2000
    assert all(e["kind"] == "presence" for e in chatroom)
    assert stats["over_budget"] == 0
    for endpoint in ENDPOINTS:
        ratio = utilisation(emulator.arrivals[endpoint], 10)
        print(f"budget utilisation {endpoint}: {ratio:.3f}")
        assert ratio >= 0.95, f"{endpoint}: {ratio:.3f} of the budget used while draining"


def _settled(path: Path) -> int:
    before = count_lines(path)
    time.sleep(1.0)
    after = count_lines(path)
    return after if after == before else 0


def test_failover_when_first_base_url_refuses(tmp_path: Path) -> None:
    emulator = RongCloudEmulator("test-key", "test-secret", batch_size=50, seed=3)
    keys = emulator.generate(900)
    with serving(emulator) as (_loop, server):
        urls = [f"http://127.0.0.1:{refused_port()}", server.urls[0]]
        relay, events_file = start_relay(tmp_path, urls)
        try:
            wait_for(lambda: count_lines(events_file) >= len(keys), timeout=60,
                     message="all messages after failover")
        finally:
            relay.stop()
    events = read_events(events_file)
    assert sorted(event_key(e) for e in events) == sorted(keys)
    assert any(r.get("event") == "failing over to the next base URL"
               for r in relay.log_records())


def test_backup_domain_going_down_mid_run_loses_nothing(tmp_path: Path) -> None:
    emulator = RongCloudEmulator("test-key", "test-secret", batch_size=20, seed=5)
    keys = emulator.generate(3000)
    with serving(emulator, ports=[0, 0]) as (loop, server):
        relay, events_file = start_relay(tmp_path, server.urls)
        try:
            wait_for(lambda: count_lines(events_file) >= 300, timeout=60)
            loop.run(server.refuse(0))  # the primary domain stops accepting connections
            wait_for(lambda: count_lines(events_file) >= len(keys), timeout=90,
                     message="the rest through the backup domain")
        finally:
            relay.stop()
    assert sorted(event_key(e) for e in read_events(events_file)) == sorted(keys)


def test_kill_9_mid_drain_loses_at_most_the_response_in_flight(tmp_path: Path) -> None:
    emulator = RongCloudEmulator("test-key", "test-secret", batch_size=20, budget=10, seed=11)
    keys = emulator.generate(6000)
    with serving(emulator) as (loop, server):
        relay, events_file = start_relay(tmp_path, server.urls)
        wait_for(lambda: count_lines(events_file) >= 1500, timeout=60)
        relay.kill9()
        killed_at = time.monotonic()
        served_before_kill = loop.call(lambda: list(emulator.served))
        relay.start()
        try:
            wait_for(lambda: not any(emulator.snapshot()["queued"].values()), timeout=90,
                     message="the emulator to be drained after the restart")
            wait_for(lambda: _settled(events_file), timeout=15)
        finally:
            relay.stop()

    events = read_events(events_file)
    seen = Counter(event_key(e) for e in events)
    missing = set(keys) - set(seen)
    in_flight: set[str] = set()
    for endpoint in ENDPOINTS:
        batches = [b for b in served_before_kill if b.endpoint == endpoint and b.at <= killed_at]
        if batches:
            in_flight.update(batches[-1].keys)
    assert missing <= in_flight, f"{len(missing - in_flight)} messages lost beyond the in-flight"
    duplicates = sum(n - 1 for n in seen.values())
    assert duplicates <= 500, f"{duplicates} duplicates: more than one sink batch"
    print(f"kill -9: missing {len(missing)} (in-flight {len(in_flight)}), "
          f"duplicates {duplicates}")


def test_bad_signature_logs_error_and_retries_slowly(tmp_path: Path) -> None:
    emulator = RongCloudEmulator("test-key", "the-real-secret", seed=1)
    emulator.generate(30)
    with serving(emulator) as (_loop, server):
        relay, _events = start_relay(tmp_path, server.urls, app_secret="a-wrong-secret-value")
        try:
            wait_for(lambda: emulator.snapshot()["bad_signature"] >= 3, timeout=20)
            first = emulator.snapshot()["requests"]
            time.sleep(4)  # a window in which a hot loop would send hundreds
            later = emulator.snapshot()["requests"]
        finally:
            relay.stop()
    assert later - first <= 3, f"{later - first} requests in 4 s after a signature error"
    errors = [r for r in relay.log_records()
              if r.get("level") == "error" and "rejects the relay's configuration" in r["event"]]
    assert errors
    assert "1004" in errors[0]["detail"]
    assert "a-wrong-secret-value" not in relay.log_text()


def test_sigterm_exits_zero_and_loses_nothing(tmp_path: Path) -> None:
    emulator = RongCloudEmulator("test-key", "test-secret", batch_size=20, seed=13)
    keys = emulator.generate(3000)
    with serving(emulator) as (_loop, server):
        relay, events_file = start_relay(tmp_path, server.urls)
        wait_for(lambda: count_lines(events_file) >= 600, timeout=60)
        started = time.monotonic()
        assert relay.terminate(timeout=20) == 0
        print(f"graceful stop took {time.monotonic() - started:.2f}s")
        relay.start()
        try:
            wait_for(lambda: count_lines(events_file) >= len(keys), timeout=90)
        finally:
            relay.stop()
    events = read_events(events_file)
    assert set(event_key(e) for e in events) == set(keys)


def test_second_signal_exits_at_once_and_the_journal_survives(tmp_path: Path) -> None:
    import signal
    import sqlite3

    emulator = RongCloudEmulator("test-key", "test-secret", batch_size=20, seed=17)
    keys = emulator.generate(1500)
    with serving(emulator) as (loop, server):
        relay, events_file = start_relay(tmp_path, server.urls)
        wait_for(lambda: count_lines(events_file) >= 300, timeout=60)
        # Answers now take 5 s: the first SIGTERM has to wait for the ones in flight.
        emulator.faults.update({"slow_ratio": 1.0, "slow_seconds": 5.0})
        wait_for(lambda: sum(1 for b in emulator.served if time.monotonic() - b.at < 1) >= 1,
                 timeout=10, message="slow answers in flight")
        assert relay.proc is not None
        relay.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "stopping" in relay.log_text(), timeout=10)
        second = time.monotonic()
        relay.proc.send_signal(signal.SIGTERM)
        code = relay.wait(timeout=10)
        exit_took = time.monotonic() - second
        killed_at = time.monotonic()
        served_before = loop.call(lambda: list(emulator.served))
        emulator.faults.update({"slow_ratio": 0.0})
        check = sqlite3.connect(tmp_path / "relay.db")
        assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        check.close()
        relay.start()
        try:
            wait_for(lambda: not any(emulator.snapshot()["queued"].values()), timeout=60)
            wait_for(lambda: _settled(events_file), timeout=15)
        finally:
            relay.stop()
    print(f"second signal: exit {code} after {exit_took:.2f}s")
    assert code == 128 + signal.SIGTERM
    assert exit_took < 2.0
    seen = {event_key(e) for e in read_events(events_file)}
    in_flight: set[str] = set()
    for endpoint in ENDPOINTS:
        batches = [b for b in served_before if b.endpoint == endpoint and b.at <= killed_at]
        if batches:
            in_flight.update(batches[-1].keys)
    assert set(keys) - seen <= in_flight


def test_first_request_waits_out_the_budget_window_only_after_a_crash(tmp_path: Path) -> None:
    # SPEC §7: no needless hold-off. The window is 4 s so that the hold-off after a crash
    # stands out from a child process's start-up, however loaded the machine is.
    server = ScriptedRongCloud()
    with serving_app(server.app()) as (_, urls):
        config = write_config(tmp_path, sources={"rc": rongcloud_source(
            urls, budget_window="4s", requests_per_second=20)},
            sinks={"out": file_sink(tmp_path / "events.jsonl")})
        log = tmp_path / "relay.log"
        relay = RelayProcess(config, log)
        alive = tmp_path / "relay.db.alive"

        def first_request() -> tuple[float, float]:
            """(seconds from spawn, seconds from the relay's "relay started") to its first."""
            with server.lock:
                seen = len(server.arrived_wall)
            spawned = time.time()
            relay.start()

            def arrived() -> list[float]:
                with server.lock:
                    return server.arrived_wall[seen:]
            wait_for(lambda: bool(arrived()), timeout=60, message="a first request")
            started = max(datetime.fromisoformat(r["timestamp"]).timestamp()
                          for r in relay.log_records() if r.get("event") == "relay started")
            return arrived()[0] - spawned, arrived()[0] - started

        new = first_request()
        relay.stop()
        # The previous relay gone for longer than the window (its last heartbeat):
        wait_for(lambda: time.time() - float(alive.read_text()) > 4.2, timeout=20)
        clean = first_request()
        relay.kill9()
        try:
            crash = first_request()
        finally:
            relay.stop()
    for name, (spawn, up) in (("new journal", new), ("gone longer than the window", clean),
                              ("right after kill -9", crash)):
        print(f"first request, {name}: {spawn:.2f}s after spawn, {up:.3f}s after start")
    # Generous bounds (a loaded machine starts processes slowly): a hold-off is 4 s here.
    assert crash[0] >= 3.0, "a restart right after a crash must wait out the budget window"
    assert new[1] < 1.0, "a new journal has no predecessor to honour"
    assert clean[1] < 1.0, "a predecessor gone longer than the window needs no hold-off"
