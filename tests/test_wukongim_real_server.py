"""The relay against the WuKongIM emulator with every real-server behaviour on.

WUKONGIM-SERVER.md: per-channel ``message_seq``, direct command channels named
after either party, acks that do nothing for a new conversation's first
minute, and the ``limit`` bug that loses conversations past the sync limit.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from relay.emulators.wukongim import ServerQuirks, WuKongIMEmulator
from tests.support.configs import file_sink, write_config
from tests.support.emulators import refused_port, serving
from tests.support.relay_process import RelayProcess, count_lines, read_events, wait_for
from tests.test_hostile_records import metric

pytestmark = pytest.mark.slow


def real(**changes: Any) -> ServerQuirks:
    return ServerQuirks.real().updated(changes)


def start(tmp_path: Path, url: str, **source: Any) -> tuple[RelayProcess, Path, int]:
    events = tmp_path / "events.jsonl"
    port = refused_port()
    config = write_config(tmp_path, sources={"wk": {
        "type": "wukongim", "base_url": url, "token": "tok", "uids": ["u1", "u2"],
        "idle_interval": "200ms", **source}},
        sinks={"file": file_sink(events, batch_size=500)},
        metrics={"enabled": True, "listen": f"127.0.0.1:{port}"})
    return RelayProcess(config, tmp_path / "relay.log").start(), events, port


def test_a_large_default_sync_limit_loses_nothing_to_the_limit_bug(tmp_path: Path) -> None:
    emulator = WuKongIMEmulator("tok", uids=("u1", "u2"), channels=(), seed=11,
                                quirks=real(conversation_persist_seconds=1.0,
                                            senders_per_uid=4))
    ids = emulator.generate(2500)
    with serving(emulator) as (_loop, server):
        relay, events, _port = start(tmp_path, server.urls[0])  # the default sync_limit
        try:
            wait_for(lambda: count_lines(events) >= len(ids), timeout=60)
            wait_for(lambda: not emulator.unacked("u1") and not emulator.unacked("u2"),
                     timeout=60, message="everything acknowledged")
        finally:
            relay.stop()
    assert emulator.lost_ids() == []
    assert Counter(int(e["native"]["message_id"]) for e in read_events(events)) == Counter(ids)


def test_a_small_sync_limit_is_warned_about_and_its_losses_show_as_gaps(tmp_path: Path) -> None:
    emulator = WuKongIMEmulator("tok", uids=("u1",), channels=(), seed=12,
                                quirks=real(conversation_persist_seconds=0.0,
                                            senders_per_uid=4))
    emulator.generate(2500, "u1")
    with serving(emulator) as (loop, server):
        relay, _events, port = start(tmp_path, server.urls[0], uids=["u1"], sync_limit=500)
        try:
            wait_for(lambda: emulator.lost_ids("u1"), timeout=60,
                     message="the server to lose conversations past the limit")
            wait_for(lambda: not emulator.unacked("u1"), timeout=60)
            # New commands in every conversation: the lost ones now show a seq gap.
            loop.call(lambda: emulator.generate(200, "u1"))
            wait_for(lambda: metric(port, "relay_source_seq_gaps_total") > 0, timeout=60,
                     message="per-(uid, channel) gaps reported")
        finally:
            relay.stop()
    records = relay.log_records()
    assert any("sync came back full" in r.get("event", "") for r in records)
    assert any("gap in a command channel" in r.get("event", "") for r in records)


def test_direct_commands_name_the_synced_uid_as_recipient(tmp_path: Path) -> None:
    emulator = WuKongIMEmulator("tok", uids=("u1", "u2"), channels=(), seed=13,
                                quirks=real(conversation_persist_seconds=1.0,
                                            group_share=0.0, system_share=0.0))
    ids = emulator.generate(2000)
    with serving(emulator) as (_loop, server):
        relay, events, _port = start(tmp_path, server.urls[0])
        try:
            wait_for(lambda: count_lines(events) >= len(ids), timeout=60)
        finally:
            relay.stop()
    direct = [e for e in read_events(events) if e["channel"]["type"] == "direct"]
    assert len(direct) == 2000
    owners = Counter(e["native"]["channel_id"].removesuffix("____cmd") == e["sender"]
                     for e in direct)
    assert owners[True], "the server names some channels after the sender"
    assert owners[False], "and some after the recipient"
    for e in direct:
        uid = e["recipient"]
        assert uid in ("u1", "u2"), e
        assert e["channel"]["id"] == uid
        assert e["conversation"] == "direct:" + "|".join(sorted((e["sender"], uid)))
        assert e["sender"] != uid


def test_acks_that_do_nothing_cost_one_sync_per_idle_interval(tmp_path: Path) -> None:
    emulator = WuKongIMEmulator("tok", uids=("u1",), channels=(), seed=14,
                                quirks=real(conversation_persist_seconds=3600.0))
    emulator.generate(5, "u1")
    with serving(emulator) as (_loop, server):
        relay, events, _port = start(tmp_path, server.urls[0], uids=["u1"],
                                     idle_interval="1s")
        try:
            wait_for(lambda: count_lines(events) >= 5, timeout=30)
            before = emulator.snapshot()["syncs_by_uid"].get("u1", 0)
            wait_for(lambda: emulator.snapshot()["ignored_acks"] >= 4, timeout=30)
            after = emulator.snapshot()["syncs_by_uid"].get("u1", 0)
        finally:
            relay.stop()
    # About four idle intervals went by: a spinning relay would have made thousands.
    assert after - before <= 8, f"{after - before} syncs while acks were ignored"
    assert count_lines(events) == 5
