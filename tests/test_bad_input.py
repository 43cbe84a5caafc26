"""Bad input of every kind: fuzzed configuration, oversized and mis-encoded answers, clock skew."""

from __future__ import annotations

import email.utils
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay import metrics
from relay.config import ConfigError, parse_config
from relay.emulators.harness import BackgroundLoop, EmulatorServer
from relay.emulators.rongcloud import RongCloudEmulator
from relay.remote import Reply
from relay.sources.http import ProviderClient
from tests.support.configs import file_sink, rongcloud_source, write_config
from tests.support.emulators import refused_port, serving
from tests.support.relay_process import RelayProcess, count_lines, read_events, wait_for

KEYS = ["type", "app_key", "app_secret", "base_urls", "path", "url", "secret", "uids",
        "channels", "topic", "bootstrap_servers", "batch_size", "idle_interval", "retain",
        "dedup_window", "listen", "level", "format", "filter", "rotate_bytes", "start",
        "master_key", "app_id", "base_url", "token", "limit", "requests_per_second"]
TYPES = ["rongcloud", "wukongim", "leancloud", "file", "kafka", "webhook", "nope"]
values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=True)
    | st.sampled_from([*TYPES, "1h", "10MiB", "http://127.0.0.1:1", "whsec_AAAA", "-5s", ""])
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYS), inner,
                                                                 max_size=4),
    max_leaves=10,
)
tables = st.dictionaries(st.text(min_size=1, max_size=6) | st.sampled_from(["rc", "a-b", "X"]),
                         st.dictionaries(st.sampled_from(KEYS), values, max_size=6)
                         | values, max_size=3)
configs = st.fixed_dictionaries({}, optional={
    "sources": tables, "sinks": tables,
    "journal": st.dictionaries(st.sampled_from(KEYS), values, max_size=3) | values,
    "metrics": st.dictionaries(st.sampled_from(KEYS), values, max_size=2) | values,
    "log": st.dictionaries(st.sampled_from(KEYS), values, max_size=2),
    "shutdown_grace": values, "bogus": values,
})


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs)
def test_config_loader_never_crashes(data: dict[str, Any]) -> None:
    try:
        parse_config(data)
    except ConfigError as exc:
        problems = exc.problems
    else:
        return
    assert problems
    for problem in problems:
        assert problem
        assert "Traceback" not in problem
        assert len(problem.splitlines()) == 1


class SkewedProvider:
    """A RongCloud-shaped endpoint whose clock is an hour ahead and whose data is odd."""

    def __init__(self) -> None:
        self.answers: list[bytes] = []

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        body = self.answers.pop(0) if self.answers else b'{"results":[],"size":0}'
        ahead = email.utils.formatdate(time.time() + 3600, usegmt=True)
        return web.Response(body=body, content_type="application/json", headers={"Date": ahead})


def test_odd_answers_clock_skew_oversize_and_bad_encoding(tmp_path: Path) -> None:
    provider = SkewedProvider()
    now = int(time.time() * 1000)
    record = {"fromUserId": 12345, "toUserId": "u2", "msgTimestamp": str(now + 7_200_000),
              "objectName": "RC:TxtMsg", "msgUID": "SKEW-0000-0000-0001", "channelType": "PERSON",
              "content": {"content": "x" * 3_000_000}}  # 3 MB, two hours in the future
    provider.answers = [
        json.dumps({"results": [record], "size": 1}).encode(),
        b'{"results":[{"fromUserId":"u1","toUserId":"u2","content":"\xff\xfe bad utf-8"}]}',
        b'{"results":[{"fromUserId": ["not", "a", "string"], "toUserId": "u2",'
        b' "msgTimestamp": "1", "msgUID": "BAD-1"}], "size": 1}',
    ]
    app = web.Application()
    app.router.add_post("/rtmsg/person/qrymsg.json", provider.handle)
    loop = BackgroundLoop()
    loop.start()
    server = EmulatorServer(app)
    loop.run(server.start())
    port = refused_port()
    events_file = tmp_path / "events.jsonl"
    config = write_config(
        tmp_path, sources={"rc": rongcloud_source(server.urls, endpoints=["person"])},
        sinks={"file": file_sink(events_file)},
        metrics={"enabled": True, "listen": f"127.0.0.1:{port}"})
    relay = RelayProcess(config, tmp_path / "relay.log").start()
    try:
        wait_for(lambda: count_lines(events_file) >= 1 and not provider.answers, timeout=30)
        text = wait_for(lambda: _metrics(port) if "quarantined" in (_metrics(port) or "")
                        else None, timeout=15)
        wait_for(lambda: any("clock" in r.get("event", "") for r in relay.log_records()),
                 timeout=10)
        assert relay.running()
    finally:
        relay.stop()
        loop.run(server.stop())
        loop.stop()
    (event,) = read_events(events_file)
    assert event["sender"] == "12345"  # a number where a string belongs: taken as text
    assert len(event["content"]["content"]) == 3_000_000
    assert event["sent_at"] == now + 7_200_000  # provider time is kept as given
    skew = _value(text, "relay_source_clock_skew_seconds")
    assert 3500 < skew < 3700
    assert _value(text, 'relay_source_events_total{endpoint="person",outcome="quarantined"') >= 1
    assert _value(text, 'relay_source_requests_total{endpoint="person",outcome="malformed"') >= 1


def _metrics(port: int) -> str | None:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    except httpx.TransportError:
        return None


def _value(text: str, prefix: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(prefix))


def test_emulator_traffic_with_every_fault_at_once(tmp_path: Path) -> None:
    """5xx, truncated JSON and slow answers together: the relay keeps going, nothing is lost."""
    emulator = RongCloudEmulator("test-key", "test-secret", batch_size=20, budget=None, seed=51)
    emulator.faults.update({"error_ratio": 0.15, "malformed_ratio": 0.15, "slow_ratio": 0.1,
                            "slow_seconds": 0.3})
    keys = emulator.generate(1500)
    events_file = tmp_path / "events.jsonl"
    with serving(emulator) as (_loop, server):
        config = write_config(tmp_path, sources={"rc": rongcloud_source(
            server.urls, requests_per_second=50, transient_backoff="20ms",
            transient_backoff_max="100ms")}, sinks={"file": file_sink(events_file)})
        relay = RelayProcess(config, tmp_path / "relay.log").start()
        try:
            wait_for(lambda: count_lines(events_file) >= len(keys), timeout=90)
        finally:
            relay.stop()
    assert len({e["id"] for e in read_events(events_file)}) == len(keys)


def test_the_provider_clock_is_read_once_per_date_header_and_follows_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The Date header changes once a second; a loop reading a hundred answers a second
    parses it once, and a changed header (the provider's clock jumped) is read again."""
    parsed: list[str] = []
    real = email.utils.parsedate_to_datetime

    def counting(value: str) -> Any:
        parsed.append(value)
        return real(value)

    monkeypatch.setattr(email.utils, "parsedate_to_datetime", counting)
    client = ProviderClient("skewed", connect_timeout=1, read_timeout=1, verify_tls=True)
    ahead = email.utils.formatdate(time.time() + 3600, usegmt=True)
    for _ in range(3):
        client._observe_clock(Reply(200, {"date": ahead}, b""))
    assert parsed == [ahead]
    assert 3590 < metrics.SOURCE_CLOCK_SKEW.labels("skewed")._value.get() < 3610
    now = email.utils.formatdate(time.time(), usegmt=True)
    client._observe_clock(Reply(200, {"date": now}, b""))
    assert parsed == [ahead, now]
    assert abs(metrics.SOURCE_CLOCK_SKEW.labels("skewed")._value.get()) < 5
