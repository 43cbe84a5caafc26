"""Hostile records: whatever one record is, it costs no other record and never stops a stream.

Every test runs the relay as a real child process against a provider on loopback
that serves exactly the bytes the test chose (tests/support/hostile.py).
"""

from __future__ import annotations

import base64
import itertools
import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.configs import file_sink, rongcloud_source, write_config
from tests.support.emulators import refused_port
from tests.support.hostile import (
    ScriptedLeanCloud,
    ScriptedRongCloud,
    ScriptedWuKongIM,
    serving_app,
)
from tests.support.relay_process import RelayProcess, read_events, wait_for

pytestmark = pytest.mark.slow

_ids = itertools.count(1)


def deep(levels: int) -> Any:
    value: Any = "bottom"
    for _ in range(levels):
        value = [value]
    return value


def deep_bytes(levels: int) -> bytes:
    return b"[" * levels + b'"bottom"' + b"]" * levels


# -- records of each provider, as raw JSON bytes --------------------------------

def rc_record(n: int, content: bytes = b'{"content":"hello"}', **fields: Any) -> bytes:
    record = {"fromUserId": f"u{n % 7}", "toUserId": f"u{n % 5 + 10}", "objectName": "RC:TxtMsg",
              "msgUID": f"HOST-{n:012d}", "msgTimestamp": int(time.time() * 1000),
              "channelType": "PERSON", **fields}
    body = json.dumps(record, ensure_ascii=False).encode()
    return body[:-1] + b',"content":' + content + b"}"


def wk_record(n: int, seq: int, payload: bytes | None = None, **fields: Any) -> bytes:
    encoded = base64.b64encode(payload if payload is not None else
                               json.dumps({"type": 1, "content": f"hi {n}"}).encode()).decode()
    record = {"header": {"no_persist": 0, "red_dot": 1, "sync_once": 1}, "setting": 0,
              "message_id": 10**15 + n, "client_msg_no": f"c{n}", "message_seq": seq,
              "from_uid": "s1", "channel_id": "s1____cmd", "channel_type": 1,
              "timestamp": int(time.time()), "payload": encoded, **fields}
    return json.dumps(record).encode()


def lc_record(n: int, timestamp: int, data: bytes = b'"hello"', **fields: Any) -> bytes:
    record = {"timestamp": timestamp, "conv-id": "c1", "from": "a", "msg-id": f"m{n:012d}",
              "is-conv": True, "is-room": False, "to": "c1", "bin": False,
              "from-ip": "203.0.113.1", **fields}
    body = json.dumps(record).encode()
    return body[:-1] + b',"data":' + data + b"}"


def metric(port: int, name: str, **labels: str) -> float:
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except httpx.TransportError:
        return -1.0
    total = 0.0
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")) and all(
                f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def start(tmp_path: Path, source: dict[str, Any]) -> tuple[RelayProcess, Path, int]:
    events = tmp_path / "events.jsonl"
    port = refused_port()
    config = write_config(tmp_path, sources={"src": source},
                          sinks={"file": file_sink(events, batch_size=200)},
                          metrics={"enabled": True, "listen": f"127.0.0.1:{port}"})
    return RelayProcess(config, tmp_path / "relay.log").start(), events, port


def quarantined(port: int) -> float:
    return metric(port, "relay_source_events_total", outcome="quarantined")


def delivered_ids(events: Path) -> Counter[str]:
    return Counter(e["id"] for e in read_events(events))


# -- one record nested ~300 deep: parses, cannot be serialized -------------------

def test_rongcloud_answer_with_one_unserializable_record_keeps_the_other_49(
        tmp_path: Path) -> None:
    provider = ScriptedRongCloud()
    records = [rc_record(i) for i in range(49)]
    records.insert(20, rc_record(999, deep_bytes(300)))
    provider.queue("person", b'{"code":200,"results":[' + b",".join(records) + b"]}")
    with serving_app(provider.app()) as (_loop, urls):
        relay, events, port = start(tmp_path, rongcloud_source(urls, endpoints=["person"]))
        try:
            wait_for(lambda: quarantined(port) >= 1, timeout=30)
            wait_for(lambda: len(delivered_ids(events)) >= 49, timeout=30)
            assert metric(port, "relay_source_possible_loss_total") == 0
        finally:
            relay.stop()
    assert set(delivered_ids(events)) == {f"src:HOST-{i:012d}" for i in range(49)}


def test_wukongim_poison_record_is_quarantined_and_the_batch_acknowledged(
        tmp_path: Path) -> None:
    provider = ScriptedWuKongIM()
    good = [wk_record(i, i + 1) for i in range(10)]
    poison = wk_record(99, 11, payload=json.dumps({"deep": deep(300)}).encode())
    provider.batches.append(b"[" + b",".join([*good[:5], poison, *good[5:]]) + b"]")
    with serving_app(provider.app()) as (_loop, urls):
        relay, events, port = start(tmp_path, {
            "type": "wukongim", "base_url": urls[0], "uids": ["u1"], "idle_interval": "200ms"})
        try:
            wait_for(lambda: not provider.batches, timeout=30,
                     message="the batch to be acknowledged")
            wait_for(lambda: len(delivered_ids(events)) >= 10, timeout=30)
            assert quarantined(port) == 1
        finally:
            relay.stop()
    assert not any("restarting it" in r.get("event", "") for r in relay.log_records())
    assert set(delivered_ids(events)) == {f"src:{10**15 + i}" for i in range(10)}


def test_leancloud_poison_record_does_not_wedge_the_history(tmp_path: Path) -> None:
    provider = ScriptedLeanCloud()
    base = int(time.time() * 1000) - 60_000
    for i in range(10):
        provider.add(base + i, f"m{i:012d}", lc_record(i, base + i))
    provider.add(base + 5, "m000000000005x", lc_record(
        5, base + 5, json.dumps(json.dumps({"deep": deep(300)})).encode(),
        **{"msg-id": "m000000000005x"}))
    with serving_app(provider.app()) as (_loop, urls):
        relay, events, port = start(tmp_path, {
            "type": "leancloud", "base_url": urls[0], "app_id": "a", "master_key": "k",
            "start": "1h", "settle_delay": "1s", "idle_interval": "200ms"})
        try:
            wait_for(lambda: len(delivered_ids(events)) >= 10, timeout=30)
            assert quarantined(port) >= 1
        finally:
            relay.stop()
    assert not any("restarting it" in r.get("event", "") for r in relay.log_records())
    assert set(delivered_ids(events)) == {f"src:m{i:012d}" for i in range(10)}


# -- WuKongIM channel records without a usable message_seq -------------------------

def test_wukongim_channel_records_without_a_usable_seq_are_quarantined_not_gaps(
        tmp_path: Path) -> None:
    provider = ScriptedWuKongIM()
    records = [wk_record(i, i + 1, channel_id="g1", channel_type=2) for i in range(4)]
    bad = [wk_record(50, 0, channel_id="g1", channel_type=2),
           wk_record(51, -3, channel_id="g1", channel_type=2),
           wk_record(52, "x", channel_id="g1", channel_type=2)]  # type: ignore[arg-type]
    messages = [records[0], bad[0], records[1], bad[1], records[2], bad[2], records[3]]
    provider.pages.append(b'{"start_message_seq":1,"end_message_seq":0,"more":0,"messages":['
                          + b",".join(messages) + b"]}")
    with serving_app(provider.app()) as (_loop, urls):
        relay, events, port = start(tmp_path, {
            "type": "wukongim", "base_url": urls[0], "channels": [{"id": "g1", "type": 2}],
            "idle_interval": "200ms"})
        try:
            wait_for(lambda: quarantined(port) >= 3, timeout=30)
            wait_for(lambda: len(delivered_ids(events)) >= 4, timeout=30)
            assert metric(port, "relay_source_seq_gaps_total") == 0
        finally:
            relay.stop()
    assert not any("gap" in r.get("event", "") for r in relay.log_records())


# -- the property: random mixes, per provider --------------------------------------

KINDS = ("valid", "deep", "large", "bad_utf8", "wrong_type", "unserializable")
batches = st.lists(st.lists(st.sampled_from(KINDS), min_size=1, max_size=8), min_size=1,
                   max_size=3)


class Scenario:
    """One provider's way of turning record kinds into an answer, and of serving it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.seq = 0
        self.keys: dict[bytes, tuple[int, str]] = {}

    def record(self, kind: str, n: int) -> tuple[bytes, str | None]:
        """(raw record, its event id if it must be delivered)."""
        if self.name == "rongcloud":
            payload = {"valid": b'{"content":"ok"}', "deep": deep_bytes(1000),
                       "large": json.dumps({"content": "x" * 5_000_000}).encode(),
                       "bad_utf8": b'"bad \xff\xfe bytes"', "wrong_type": b'"x"',
                       "unserializable": deep_bytes(300)}[kind]
            raw = rc_record(n, payload) if kind != "wrong_type" else \
                rc_record(n, payload, fromUserId=[1, 2])
            return raw, f"src:HOST-{n:012d}" if kind == "valid" else None
        if self.name == "wukongim":
            self.seq += 1
            if kind == "bad_utf8":
                raw = wk_record(n, self.seq)[:-1] + b',"note":"\xff\xfe"}'
            elif kind == "wrong_type":
                raw = wk_record(n, self.seq, from_uid={"not": "a string"})
            else:
                payload = {"valid": None, "deep": deep_bytes(1000),
                           "large": b"x" * 5_000_000,
                           "unserializable": json.dumps(deep(300)).encode()}[kind]
                raw = wk_record(n, self.seq, payload)
                if kind == "deep":  # nested in the record itself, not only in its payload
                    raw = raw[:-1] + b',"extra":' + deep_bytes(1000) + b"}"
            return raw, f"src:{10**15 + n}" if kind == "valid" else None
        stamp = self.base + n
        data = {"valid": b'"ok"', "deep": deep_bytes(1000),
                "large": json.dumps("x" * 5_000_000).encode(), "bad_utf8": b'"\xff\xfe"',
                "wrong_type": b"12345", "unserializable": deep_bytes(300)}[kind]
        raw = lc_record(n, stamp, data)
        self.keys[raw] = (stamp, f"m{n:012d}")
        return raw, f"src:m{n:012d}" if kind == "valid" else None

    base = int(time.time() * 1000) - 3_600_000


@pytest.mark.parametrize("provider", ["rongcloud", "wukongim", "leancloud"])
def test_random_hostile_batches_cost_no_valid_record(tmp_path: Path, provider: str) -> None:
    scenario = Scenario(provider)
    rc, wk, lc = ScriptedRongCloud(), ScriptedWuKongIM(), ScriptedLeanCloud()
    app = {"rongcloud": rc, "wukongim": wk, "leancloud": lc}[provider].app()
    with serving_app(app) as (_loop, urls):
        source: dict[str, Any] = {
            "rongcloud": rongcloud_source(urls, endpoints=["person"], requests_per_second=50),
            "wukongim": {"type": "wukongim", "base_url": urls[0], "uids": ["u1"],
                         "idle_interval": "100ms"},
            "leancloud": {"type": "leancloud", "base_url": urls[0], "app_id": "a",
                          "master_key": "k", "start": "2h", "settle_delay": "1s",
                          "idle_interval": "100ms", "requests_per_minute": 6000},
        }[provider]
        relay, events, port = start(tmp_path, source)
        expected: Counter[str] = Counter()
        bad_total = 0
        try:
            wait_for(lambda: quarantined(port) >= 0, timeout=30, message="metrics")

            @settings(max_examples=6, deadline=None, database=None,
                      suppress_health_check=[HealthCheck.too_slow,
                                             HealthCheck.function_scoped_fixture])
            @given(batches)
            def feed(answers: list[list[str]]) -> None:
                nonlocal bad_total
                for kinds in answers:
                    raws = []
                    for kind in kinds:
                        raw, event_id = scenario.record(kind, next(_ids))
                        raws.append(raw)
                        if event_id:
                            expected[event_id] += 1
                        else:
                            bad_total += 1
                    if provider == "leancloud":
                        # A valid record last, so the cursor passes every bad one once.
                        raw, event_id = scenario.record("valid", next(_ids))
                        raws.append(raw)
                        expected[str(event_id)] += 1
                        for raw in raws:
                            stamp, msg_id = scenario.keys[raw]
                            lc.add(stamp, msg_id, raw)
                    elif provider == "rongcloud":
                        rc.queue("person", b'{"code":200,"results":[' + b",".join(raws) + b"]}")
                    else:
                        wk.batches.append(b"[" + b",".join(raws) + b"]")
                # The stream never stalls: each example is taken in full, within a deadline.
                wait_for(_all_in(events, expected, port, bad_total), timeout=60,
                         message="every valid record delivered and every bad one quarantined")

            feed()
        finally:
            relay.stop()
    assert delivered_ids(events) == expected, "a valid record was lost or duplicated"
    assert relay.log_records(), "the relay logged nothing"
    assert not any("restarting it" in r.get("event", "") for r in relay.log_records())


def _all_in(events: Path, expected: Counter[str], port: int,
            bad: int) -> Callable[[], bool]:
    def check() -> bool:
        return delivered_ids(events) == expected and quarantined(port) >= bad
    return check
