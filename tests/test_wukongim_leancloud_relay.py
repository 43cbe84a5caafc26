"""Provider-specific end-to-end guarantees for WuKongIM and LeanCloud (real processes, loopback)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from relay.emulators.leancloud import LeanCloudEmulator
from relay.emulators.wukongim import WuKongIMEmulator
from tests.support.configs import file_sink, write_config
from tests.support.emulators import serving
from tests.support.relay_process import RelayProcess, count_lines, read_events, wait_for

pytestmark = pytest.mark.slow


def test_wukongim_kill_between_commit_and_syncack(tmp_path: Path) -> None:
    emulator = WuKongIMEmulator("tok", uids=("u1",), channels=(), seed=9)
    generated = emulator.generate(250, "u1")
    emulator.ack_delay = 60.0  # the relay commits, then waits on the syncack
    events_file = tmp_path / "events.jsonl"
    config = write_config(
        tmp_path,
        sources={"wk": {"type": "wukongim", "base_url": "", "token": "tok", "uids": ["u1"],
                        "sync_limit": 100, "idle_interval": "100ms"}},
        sinks={"file": file_sink(events_file, batch_size=50)},
    )
    with serving(emulator) as (_loop, server):
        config.write_text(config.read_text().replace('base_url = ""',
                                                     f'base_url = "{server.urls[0]}"'))
        relay = RelayProcess(config, tmp_path / "relay.log").start()
        # Committed and delivered to the file, with the ack still in flight.
        wait_for(lambda: emulator.acks_waiting >= 1 and count_lines(events_file) >= 100,
                 timeout=30)
        relay.kill9()
        assert emulator.snapshot()["acked_messages"] == 0
        emulator.ack_delay = 0.0
        relay.start()
        try:
            wait_for(lambda: not emulator.unacked("u1"), timeout=60,
                     message="every message acknowledged after the restart")
            wait_for(lambda: count_lines(events_file) >= len(generated), timeout=30)
        finally:
            relay.stop()
    seen = Counter(e["native"]["message_id"] for e in read_events(events_file))
    assert seen == Counter(generated), "lost or duplicated across the kill"
    assert emulator.snapshot()["redelivered"] >= 100, "the unacknowledged batch came back"


def lc_source(url: str, **extra: object) -> dict[str, object]:
    return {"type": "leancloud", "base_url": url, "app_id": "app", "master_key": "mk",
            "settle_delay": "1s", "idle_interval": "100ms", "requests_per_minute": 3000,
            **extra}


def test_leancloud_many_messages_sharing_timestamps(tmp_path: Path) -> None:
    emulator = LeanCloudEmulator("app", "mk", seed=10)
    ids = emulator.generate_same_timestamps(1000, distinct=4)
    events_file = tmp_path / "events.jsonl"
    with serving(emulator) as (_loop, server):
        config = write_config(tmp_path, sources={"lc": lc_source(server.urls[0], limit=97)},
                              sinks={"file": file_sink(events_file)})
        relay = RelayProcess(config, tmp_path / "relay.log").start()
        try:
            wait_for(lambda: count_lines(events_file) >= len(ids), timeout=60)
        finally:
            relay.stop()
    events = read_events(events_file)
    assert Counter(e["native"]["msg-id"] for e in events) == Counter(ids)
    assert len({e["sent_at"] for e in events}) == 4


def test_leancloud_late_visible_messages_within_the_settle_delay(tmp_path: Path) -> None:
    emulator = LeanCloudEmulator("app", "mk", seed=11)
    events_file = tmp_path / "events.jsonl"
    with serving(emulator) as (loop, server):
        config = write_config(tmp_path, sources={"lc": lc_source(server.urls[0],
                                                                 settle_delay="2s")},
                              sinks={"file": file_sink(events_file)})
        relay = RelayProcess(config, tmp_path / "relay.log").start()
        try:
            ids: list[str] = []
            for _ in range(5):
                # Sent now but visible only after 0.8 s, while later messages show at once.
                ids += loop.call(lambda: emulator.generate(20, delay=0.8))
                ids += loop.call(lambda: emulator.generate(20))
            wait_for(lambda: count_lines(events_file) >= len(ids), timeout=60)
        finally:
            relay.stop()
    assert Counter(e["native"]["msg-id"] for e in read_events(events_file)) == Counter(ids)
