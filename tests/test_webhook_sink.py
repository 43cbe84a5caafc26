"""Webhook sink against a real HTTP receiver on loopback; dead letters, replay and routing."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import orjson
import pytest
from standardwebhooks import Webhook

from relay.emulators.rongcloud import RongCloudEmulator
from relay.journal import StoredEvent
from relay.sinks.webhook import body_of, sign, signing_key, webhook_id
from tests.support.configs import file_sink, rongcloud_source, write_config
from tests.support.emulators import serving
from tests.support.relay_process import RelayProcess, count_lines, read_events, wait_for
from tests.support.webhook_receiver import receiving

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


def hook(url: str, **extra: Any) -> dict[str, Any]:
    return {"type": "webhook", "url": url, "secret": SECRET, "batch_size": 25,
            "retry_backoff": "50ms", "retry_backoff_max": "500ms", **extra}


def stored(n: int) -> StoredEvent:
    return StoredEvent(n, f"rc:{n}", 1, b'["rc","rongcloud","message","direct","","c"]',
                       orjson.dumps({"id": f"rc:{n}"}))


def test_signature_matches_an_independent_implementation() -> None:
    batch = [stored(1), stored(2)]
    body = body_of(batch)
    msg_id = webhook_id(batch)
    stamp = int(time.time())
    headers = {"webhook-id": msg_id, "webhook-timestamp": str(stamp),
               "webhook-signature": sign(signing_key(SECRET), msg_id, stamp, body)}
    assert Webhook(SECRET).verify(body, headers) == {"events": [{"id": "rc:1"}, {"id": "rc:2"}]}
    assert webhook_id(batch) == webhook_id([stored(1), stored(2)])
    assert webhook_id(batch) != webhook_id([stored(2), stored(1)])
    with pytest.raises(ValueError, match="whsec_"):
        signing_key("plain-secret")


def run_relay(tmp_path: Path, emulator: RongCloudEmulator, urls: list[str],
              sinks: dict[str, Any], **top: Any) -> RelayProcess:
    config = write_config(tmp_path, sources={"rc": rongcloud_source(urls,
                                                                    requests_per_second=50)},
                          sinks=sinks, **top)
    return RelayProcess(config, tmp_path / "relay.log").start()


@pytest.mark.slow
def test_flaky_receiver_loses_nothing_and_keeps_webhook_ids(tmp_path: Path) -> None:
    emulator = RongCloudEmulator("test-key", "test-secret", batch_size=40, budget=None, seed=31)
    keys = emulator.generate(1200)
    with serving(emulator) as (_l, server), receiving(seed=1) as (receiver, url, _loop):
        receiver.behaviour.fail_ratio = 0.5
        relay = run_relay(tmp_path, emulator, server.urls, {"hook": hook(url)})
        try:
            wait_for(lambda: len({e["id"] for e in receiver.delivered_events()}) >= len(keys),
                     timeout=120)
        finally:
            relay.stop()
    received = list(receiver.received)
    assert {e["id"] for e in receiver.delivered_events()} == {f"rc:{k}" for k in keys
                                                              if "|" not in k} | {
        e["id"] for e in receiver.delivered_events() if e["kind"] == "presence"}
    assert len({e["id"] for e in receiver.delivered_events()}) == len(keys)
    failed = [r for r in received if r.status == 503]
    assert len(failed) > 20, "the receiver must really have failed half of its calls"
    by_id: dict[str, list[Any]] = defaultdict(list)
    for r in received:
        by_id[r.webhook_id].append(r)
    for attempts in by_id.values():
        # One webhook-id per batch: every attempt carries the same events, and ends delivered.
        assert len({tuple(e["id"] for e in a.events) for a in attempts}) == 1
        assert attempts[-1].status == 200
    verifier = Webhook(SECRET)
    for r in received:
        verifier.verify(r.body, r.headers)  # raises on any invalid signature
    print(f"{len(received)} requests, {len(failed)} failed, {len(by_id)} batches, "
          "100 % signatures valid")


def test_retry_after_is_honoured(tmp_path: Path) -> None:
    emulator = RongCloudEmulator("test-key", "test-secret", budget=None, seed=32)
    emulator.generate(10)
    with serving(emulator) as (_l, server), receiving() as (receiver, url, _loop):
        receiver.behaviour.retry_after = (429, "2")
        receiver.behaviour.retry_after_count = 1
        relay = run_relay(tmp_path, emulator, server.urls, {"hook": hook(url, concurrency=1)})
        try:
            wait_for(lambda: len(receiver.delivered_events()) >= 10, timeout=30)
        finally:
            relay.stop()
    first, second = receiver.received[0], receiver.received[1]
    assert first.status == 429
    waited = second.at - first.at
    print(f"Retry-After: 2 -> next request after {waited:.2f}s")
    assert 1.9 <= waited <= 3.5
    assert second.webhook_id == first.webhook_id


def relay_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=60, env=dict(os.environ))


@pytest.mark.slow
def test_refused_event_goes_to_dead_letters_and_replays(tmp_path: Path) -> None:
    emulator = RongCloudEmulator("test-key", "test-secret", batch_size=20, budget=None, seed=33)
    keys = emulator.generate(60, "person")
    poison = f"rc:{keys[17]}"
    with serving(emulator) as (_l, server), receiving() as (receiver, url, _loop):
        receiver.behaviour.refuse_ids = {poison}
        relay = run_relay(tmp_path, emulator, server.urls, {"hook": hook(url)})
        config = tmp_path / "relay.toml"
        try:
            wait_for(lambda: len(receiver.delivered_events()) >= len(keys) - 1, timeout=30)
            listing = wait_for(lambda: poison in (out := relay_cli(config, "dlq", "list",
                                                                   "--json")).stdout and out,
                               timeout=15)
            letters = json.loads(listing.stdout)
            assert [d["event_id"] for d in letters] == [poison]
            assert "HTTP 400" in letters[0]["error"]
            shown = json.loads(relay_cli(config, "dlq", "show", str(letters[0]["id"])).stdout)
            assert shown["event"]["id"] == poison
            # The receiver is fixed; the operator replays.
            receiver.behaviour.refuse_ids = set()
            replayed = relay_cli(config, "dlq", "replay", "--sink", "hook")
            assert replayed.returncode == 0, replayed.stderr
            wait_for(lambda: poison in {e["id"] for e in receiver.delivered_events()},
                     timeout=15)
            wait_for(lambda: "no dead letters" in relay_cli(config, "dlq", "list").stdout,
                     timeout=15)
        finally:
            relay.stop()
    ids = Counter(e["id"] for e in receiver.delivered_events())
    assert set(ids) == {f"rc:{k}" for k in keys}
    assert SECRET not in relay.log_text()


@pytest.mark.slow
@pytest.mark.kafka
def test_a_dead_webhook_does_not_delay_other_sinks(tmp_path: Path, kafka_broker: Any,
                                                   kafka_topic: str) -> None:
    emulator = RongCloudEmulator("test-key", "test-secret", batch_size=20, budget=None, seed=34)
    events_file = tmp_path / "events.jsonl"
    with serving(emulator) as (loop, server), receiving() as (receiver, url, rloop):
        receiver.behaviour.hang = True  # accepts connections, never answers
        relay = run_relay(tmp_path, emulator, server.urls, {
            "hook": hook(url, timeout="2s", breaker_failures=2, breaker_open="5s"),
            "archive": file_sink(events_file, batch_size=100),
            "bus": {"type": "kafka", "bootstrap_servers": kafka_broker.bootstrap,
                    "topic": kafka_topic}})
        config = tmp_path / "relay.toml"
        caught_up: dict[str, list[float]] = {"archive": [], "bus": []}

        def pending() -> dict[str, int]:
            status = json.loads(relay_cli(config, "status", "--json").stdout)
            return {s["sink"]: s["pending"] for s in status["sinks"]}

        try:
            generated = 0
            for step in range(8):
                if step == 4:  # from hanging to refusing connections
                    rloop.run(receiver.server.refuse(0))  # type: ignore[union-attr]
                    receiver.behaviour.hang = False
                generated += len(loop.call(lambda: emulator.generate(100)))
                made = time.monotonic()
                wait_for(lambda n=generated: count_lines(events_file) >= n, timeout=20)
                caught_up["archive"].append(time.monotonic() - made)
                wait_for(lambda: pending()["bus"] == 0, timeout=20, interval=0.1)
                caught_up["bus"].append(time.monotonic() - made)
                assert pending()["hook"] > 0
            rloop.run(receiver.server.resume(0))  # type: ignore[union-attr]
            wait_for(lambda: len({e["id"] for e in receiver.delivered_events()}) >= generated,
                     timeout=90)
        finally:
            relay.stop()
    for sink, lags in caught_up.items():
        # Step 0 includes the relay's start-up; "bus" includes a `relay status` process start.
        steady = lags[1:]
        median = sorted(steady)[len(steady) // 2]
        print(f"{sink}: caught up after new traffic while the webhook was dead in "
              f"{', '.join(f'{x:.2f}' for x in lags)} s (median {median:.2f})")
        assert max(steady) < 3.0
    assert len(read_events(events_file)) == generated


@pytest.mark.slow
def test_routing_filters(tmp_path: Path) -> None:
    emulator = RongCloudEmulator("test-key", "test-secret", budget=None, seed=35)
    emulator.generate(300)
    presence_file = tmp_path / "presence.jsonl"
    messages_file = tmp_path / "messages.jsonl"
    all_file = tmp_path / "all.jsonl"
    with serving(emulator) as (_l, server), receiving() as (receiver, url, _loop):
        relay = run_relay(tmp_path, emulator, server.urls, {
            "presence": file_sink(presence_file, filter={"kinds": ["presence"]}),
            "texts": file_sink(messages_file, filter={"types": ["RC:Txt*", "RC:Img*"],
                                                     "channel_types": ["direct"]}),
            "everything": file_sink(all_file),
            "hook": hook(url, filter={"providers": ["wukongim"]}),
        })
        try:
            wait_for(lambda: count_lines(all_file) >= 300, timeout=30)
            wait_for(lambda: count_lines(presence_file) == 100, timeout=10)
        finally:
            relay.stop()
    everything = read_events(all_file)
    assert {e["id"] for e in read_events(presence_file)} == \
        {e["id"] for e in everything if e["kind"] == "presence"}
    assert {e["id"] for e in read_events(messages_file)} == \
        {e["id"] for e in everything if e["type"] in ("RC:TxtMsg", "RC:ImgMsg")
         and e["channel"]["type"] == "direct"}
    assert receiver.received == []  # no WuKongIM events: nothing for the hook


@pytest.mark.slow
def test_replay_refeeds_a_sink_from_a_point_in_time(tmp_path: Path) -> None:
    emulator = RongCloudEmulator("test-key", "test-secret", budget=None, seed=36)
    emulator.generate(150)
    events_file = tmp_path / "events.jsonl"
    with serving(emulator) as (_l, server):
        relay = run_relay(tmp_path, emulator, server.urls, {"archive": file_sink(events_file)})
        config = tmp_path / "relay.toml"
        try:
            wait_for(lambda: count_lines(events_file) >= 150, timeout=30)
            out = relay_cli(config, "replay", "--sink", "archive", "--since", "1h")
            assert out.returncode == 0, out.stderr
            assert "150 event(s)" in out.stdout
            wait_for(lambda: count_lines(events_file) >= 300, timeout=15)
        finally:
            relay.stop()
    ids = Counter(e["id"] for e in read_events(events_file))
    assert set(ids.values()) == {2}
    assert relay_cli(config, "replay", "--sink", "nope", "--since", "1h").returncode == 2
    assert relay_cli(config, "replay", "--sink", "archive", "--since", "later").returncode == 2


def test_endpoint_rejecting_the_sink_pauses_it(tmp_path: Path) -> None:
    emulator = RongCloudEmulator("test-key", "test-secret", budget=None, seed=37)
    emulator.generate(20)
    with serving(emulator) as (_l, server), receiving() as (receiver, url, _loop):
        receiver.behaviour.status = 401
        relay = run_relay(tmp_path, emulator, server.urls,
                          {"hook": hook(url, paused_retry="1h")})
        try:
            wait_for(lambda: any("sink paused" in r.get("event", "")
                                 for r in relay.log_records()), timeout=20)
        finally:
            relay.stop()
    # One request per lane at most, then the sink waits for paused_retry (an hour here).
    assert len(receiver.received) <= 4, "a rejected endpoint is not hammered"
