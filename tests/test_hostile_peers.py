"""Hostile peers: absurd Retry-After, slow drips, redirects, ignored acks, leaky URLs, fd limits.

Real relay processes against real sockets on loopback.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.configs import file_sink, rongcloud_source, write_config
from tests.support.emulators import refused_port
from tests.support.hostile import DripServer, ScriptedRongCloud, ScriptedWuKongIM, serving_app
from tests.support.relay_process import RelayProcess, read_events, wait_for
from tests.support.webhook_receiver import receiving
from tests.test_hostile_records import delivered_ids, metric, rc_record, wk_record

pytestmark = pytest.mark.slow

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


def hook(url: str, **extra: Any) -> dict[str, Any]:
    return {"type": "webhook", "url": url, "secret": SECRET, "batch_size": 25,
            "retry_backoff": "100ms", "retry_backoff_max": "1s", **extra}


def rc_answer(first: int, count: int) -> bytes:
    return b'{"code":200,"results":[' + b",".join(
        rc_record(i) for i in range(first, first + count)) + b"]}"


# -- every remote duration is clamped ---------------------------------------------

@pytest.mark.parametrize(("value", "expected"), [
    ("2", 2.0), ("86400", 60.0), ("inf", None), ("-inf", None), ("nan", None), ("-5", None),
    ("1e400", None), ("soon", None), ("", None), (None, None),
    ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # a date in the past: now
])
def test_retry_after_is_clamped_and_nonsense_ignored(value: str | None,
                                                     expected: float | None) -> None:
    from relay.remote import clamp_remote_duration, parse_retry_after

    assert parse_retry_after(value, 60.0) == expected
    assert clamp_remote_duration(float("nan"), 5) is None
    assert clamp_remote_duration(1e9, 5) == 5


def test_rongcloud_retry_after_of_a_day_is_clamped(tmp_path: Path) -> None:
    provider = ScriptedRongCloud()
    provider.extra_headers.append((429, {"Retry-After": "86400"}))
    provider.queue("person", rc_answer(0, 10))
    with serving_app(provider.app()) as (_loop, urls):
        relay, events, _port = _start(tmp_path, rongcloud_source(
            urls, endpoints=["person"], max_retry_after="2s"))
        try:
            started = time.monotonic()
            wait_for(lambda: len(delivered_ids(events)) >= 10, timeout=20,
                     message="the endpoint polled again after a clamped wait")
            waited = time.monotonic() - started
        finally:
            relay.stop()
    print(f"Retry-After: 86400 -> polled again after {waited:.1f}s (max_retry_after 2s)")
    assert waited < 10, f"polled again only after {waited:.1f}s"


def test_rongcloud_max_retry_after_must_stay_well_inside_retention(tmp_path: Path) -> None:
    config = write_config(tmp_path, sources={"rc": rongcloud_source(
        ["http://127.0.0.1:1"], max_retry_after="1h")}, sinks={"f": file_sink(tmp_path / "e")})
    out = subprocess.run([sys.executable, "-m", "relay", "run", "--config", str(config)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert "max_retry_after" in out.stderr


def _start(tmp_path: Path, source: dict[str, Any],
           sinks: dict[str, Any] | None = None) -> tuple[RelayProcess, Path, int]:
    events = tmp_path / "events.jsonl"
    port = refused_port()
    config = write_config(tmp_path, sources={"src": source},
                          sinks=sinks or {"file": file_sink(events, batch_size=200)},
                          metrics={"enabled": True, "listen": f"127.0.0.1:{port}"})
    return RelayProcess(config, tmp_path / "relay.log").start(), events, port


# -- total deadlines -----------------------------------------------------------------

def test_a_dripping_provider_cannot_hold_a_request_past_its_deadline(tmp_path: Path) -> None:
    provider = ScriptedRongCloud()
    provider.queue("person", rc_answer(0, 20))
    with DripServer(interval=1.0) as drip, serving_app(provider.app()) as (_loop, urls):
        relay, events, port = _start(tmp_path, rongcloud_source(
            [drip.url, urls[0]], endpoints=["person"], request_deadline="3s",
            read_timeout="30s", failover_after=1))
        try:
            wait_for(lambda: len(delivered_ids(events)) >= 20, timeout=30,
                     message="failover to the healthy backup")
            assert metric(port, "relay_source_requests_total", outcome="timeout") >= 1
        finally:
            relay.stop()


def test_a_dripping_webhook_cannot_hold_its_lanes(tmp_path: Path) -> None:
    provider = ScriptedRongCloud()
    provider.queue("person", rc_answer(0, 10))
    with DripServer(interval=1.0) as drip, serving_app(provider.app()) as (_loop, urls):
        relay, _events, port = _start(
            tmp_path, rongcloud_source(urls, endpoints=["person"]),
            sinks={"hook": hook(drip.url, request_deadline="2s", breaker_failures=100)})
        try:
            # Each attempt ends at its deadline and is retried: attempts keep coming.
            wait_for(lambda: metric(port, "relay_sink_delivery_attempts_total",
                                    outcome="retry") >= 2, timeout=20)
            wait_for(lambda: drip.connections >= 2, timeout=10)
        finally:
            relay.stop()
    assert any("no whole answer within 2s" in json.dumps(r) for r in relay.log_records())


# -- webhook answers ----------------------------------------------------------------------

def test_webhook_retry_after_inf_does_not_park_and_nan_does_not_storm(tmp_path: Path) -> None:
    provider = ScriptedRongCloud()
    provider.queue("person", rc_answer(0, 10))
    with serving_app(provider.app()) as (_loop, urls), receiving() as (receiver, url, _l):
        receiver.behaviour.retry_after = (503, "inf")
        receiver.behaviour.retry_after_count = 1
        relay, _events, _port = _start(
            tmp_path, rongcloud_source(urls, endpoints=["person"]),
            sinks={"hook": hook(url, concurrency=1, max_retry_after="1s")})
        try:
            wait_for(lambda: len(receiver.delivered_events()) >= 10, timeout=20,
                     message="delivery after an infinite Retry-After")
            receiver.behaviour.retry_after = (503, "nan")
            receiver.behaviour.retry_after_count = 10**6
            provider.queue("person", rc_answer(100, 5))
            wait_for(lambda: len(receiver.received) >= 3, timeout=20)
            count = len(receiver.received)
            time.sleep(3)  # measuring a rate over a fixed window, not synchronizing
            rate = (len(receiver.received) - count) / 3
        finally:
            relay.stop()
    print(f"Retry-After: nan -> {rate:.1f} POST/s")
    assert rate < 20, f"Retry-After: nan caused {rate:.0f} POST/s"


def test_webhook_redirect_pauses_the_sink_and_dead_letters_nothing(tmp_path: Path) -> None:
    provider = ScriptedRongCloud()
    provider.queue("person", rc_answer(0, 40))
    with serving_app(provider.app()) as (_loop, urls), receiving() as (receiver, url, _l):
        receiver.behaviour.status = 302
        relay, _events, port = _start(tmp_path, rongcloud_source(urls, endpoints=["person"]),
                                      sinks={"hook": hook(url, paused_retry="1h")})
        try:
            wait_for(lambda: any("sink paused" in r.get("event", "")
                                 for r in relay.log_records()), timeout=20)
            assert metric(port, "relay_sink_dead_letters_total") == 0
            assert metric(port, "relay_sink_up") == 0
        finally:
            relay.stop()
    assert len(receiver.received) <= 4


# -- WuKongIM acks that do nothing ---------------------------------------------------------

def test_wukongim_ignored_acks_cost_one_sync_per_idle_interval(tmp_path: Path) -> None:
    provider = ScriptedWuKongIM(ignore_acks=True)
    provider.batches.append(b"[" + b",".join(wk_record(i, i + 1) for i in range(5)) + b"]")
    with serving_app(provider.app()) as (_loop, urls):
        relay, events, _port = _start(tmp_path, {
            "type": "wukongim", "base_url": urls[0], "uids": ["u1"], "idle_interval": "1s"})
        try:
            wait_for(lambda: len(delivered_ids(events)) >= 5, timeout=20)
            first = provider.syncs
            time.sleep(5)  # measuring a rate over a fixed window, not synchronizing
            syncs = provider.syncs - first
        finally:
            relay.stop()
    print(f"acks ignored: {syncs} syncs in 5 s (idle_interval 1s)")
    assert syncs <= 7, f"{syncs} syncs in 5 s with a 1 s idle interval"
    assert delivered_ids(events) == {f"src:{10**15 + i}": 1 for i in range(5)}


# -- credentials in URLs -----------------------------------------------------------------

def test_url_credentials_are_redacted_everywhere(tmp_path: Path) -> None:
    from relay.remote import display_url, url_secrets

    assert display_url("https://user:pw@h.example/p?token=abc&x=1") == \
        "https://h.example/p?token=***&x=***"
    assert set(url_secrets("https://user:pw@h/p?token=abc")) == {"user", "pw", "abc"}
    token = "TOKEN-8c1f2e9d4b"
    provider = ScriptedRongCloud()
    provider.queue("person", rc_answer(0, 5))
    with serving_app(provider.app()) as (_loop, urls), receiving() as (receiver, url, _l):
        receiver.behaviour.status = 401
        leaky = f"{url}?token={token}"
        relay, _events, port = _start(tmp_path, rongcloud_source(urls, endpoints=["person"]),
                                      sinks={"hook": hook(leaky)})
        try:
            wait_for(lambda: any("sink paused" in r.get("event", "")
                                 for r in relay.log_records()), timeout=20)
            ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).text
            scraped = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        finally:
            relay.stop()
        check = subprocess.run([sys.executable, "-m", "relay", "check", "--config",
                                str(tmp_path / "relay.toml")], capture_output=True, text=True,
                               timeout=60)
    assert "token=***" in ready
    for where, text in (("readyz", ready), ("metrics", scraped), ("log", relay.log_text()),
                        ("check", check.stdout + check.stderr)):
        assert token not in text, f"the URL's token leaked into {where}"


# -- the relay's own resources --------------------------------------------------------------

def test_parent_folders_are_owner_only_under_umask_zero(tmp_path: Path) -> None:
    provider = ScriptedRongCloud()
    provider.queue("person", rc_answer(0, 3))
    events = tmp_path / "x" / "y" / "events.jsonl"
    with serving_app(provider.app()) as (_loop, urls):
        config = write_config(tmp_path, sources={"src": rongcloud_source(urls,
                                                                         endpoints=["person"])},
                              sinks={"file": file_sink(events)},
                              journal={"path": str(tmp_path / "a" / "b" / "relay.db")})
        old = os.umask(0)
        try:
            relay = RelayProcess(config, tmp_path / "relay.log").start()
        finally:
            os.umask(old)
        try:
            wait_for(lambda: len(read_events(events)) >= 3, timeout=30)
        finally:
            relay.stop()
    for folder in (tmp_path / "a", tmp_path / "a" / "b", tmp_path / "x", tmp_path / "x" / "y"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder


@pytest.mark.parametrize("name", ["rc\n", "rc\r", "r c"])
def test_component_names_with_control_characters_are_refused(tmp_path: Path,
                                                             name: str) -> None:
    from relay.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match="not a valid name"):
        parse_config({"sources": {name: rongcloud_source(["http://127.0.0.1:1"])},
                      "sinks": {"f": file_sink(tmp_path / "e")}})


def test_an_oversized_answer_is_refused_without_reading_it_all(tmp_path: Path) -> None:
    provider = ScriptedRongCloud()
    big = rc_record(1, json.dumps({"content": "x" * 50_000_000}).encode())
    provider.queue("person", b'{"code":200,"results":[' + big + b"]}")
    provider.queue("person", rc_answer(10, 5))
    with serving_app(provider.app()) as (_loop, urls):
        relay, events, port = _start(tmp_path, rongcloud_source(
            urls, endpoints=["person"], max_answer_bytes="8MiB"))
        try:
            wait_for(lambda: len(delivered_ids(events)) >= 5, timeout=30)
            assert metric(port, "relay_source_requests_total", outcome="too_large") == 1
            assert metric(port, "relay_source_possible_loss_total") == 1
            rss = metric(port, "process_resident_memory_bytes")
        finally:
            relay.stop()
    print(f"a 50 MB answer (cap 8 MiB): refused, RSS {rss / 1e6:.0f} MB")
    assert 0 < rss < 250e6, f"RSS {rss / 1e6:.0f} MB after a 50 MB answer"


_OUT_OF_FDS = r"""
import asyncio, json, os, resource, socket, sys
from relay.sources.http import ProviderClient
from relay.sinks.webhook import WebhookSink, WebhookSinkConfig

async def main() -> None:
    url = sys.argv[1]
    client = ProviderClient("rc", connect_timeout=2, read_timeout=2, verify_tls=True)
    sink = WebhookSink("hook", WebhookSinkConfig(type="webhook", url=url, secret=sys.argv[2]))
    await sink.start()
    # Every descriptor the process may open is in use: the next socket() fails (EMFILE).
    spare = len(os.listdir("/proc/self/fd"))
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (spare, hard))
    hold = []
    try:
        while True:
            hold.append(socket.socket())
    except OSError:
        pass
    answer = await client.request("POST", url, data={"a": "1"})
    outcome = await sink._post([])
    print(json.dumps({"kind": answer.kind, "detail": answer.detail,
                      "sink": [outcome[0], outcome[1]], "breaker": sink._breaker._count}))
    for s in hold:
        s.close()
    await client.aclose()
    await sink.close()

asyncio.run(main())
"""


def test_out_of_file_descriptors_is_named_as_the_relays_own_problem(tmp_path: Path) -> None:
    # A real process with no descriptor left: the source's request and the webhook's POST
    # both report the relay's own problem (not the peer's), and the breaker is not tripped.
    url = f"http://127.0.0.1:{refused_port()}/x"
    run = subprocess.run([sys.executable, "-c", _OUT_OF_FDS, url, SECRET],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout)
    print(f"out of file descriptors: {seen}")
    assert seen["kind"] == "local_error"
    assert "out of a local resource" in seen["detail"]
    assert "LimitNOFILE" in seen["detail"]
    assert seen["sink"][0] == "retry"
    assert "LimitNOFILE" in seen["sink"][1]
    assert seen["breaker"] == 0


def test_a_certificate_that_does_not_verify_is_named_and_verify_tls_false_accepts_it(
        tmp_path: Path) -> None:
    # A real TLS server on loopback with a self-signed certificate.
    import asyncio
    import ssl

    from relay.sinks.webhook import WebhookSink, WebhookSinkConfig
    from relay.sources.http import ProviderClient

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                         b"Content-Type: application/json\r\n\r\n{}")
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass  # the verifying client hangs up during the handshake
        finally:
            writer.close()

    async def main() -> dict[str, Any]:
        server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=context)
        url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}/x"
        seen: dict[str, Any] = {}
        for verify in (True, False):
            client = ProviderClient("rc", connect_timeout=5, read_timeout=5, verify_tls=verify)
            got = await client.request("POST", url, data={"a": "1"})
            await client.aclose()
            seen[f"source verify={verify}"] = (got.kind, got.status, got.detail)
        sink = WebhookSink("hook", WebhookSinkConfig(type="webhook", url=url, secret=SECRET))
        seen["webhook check"] = (await sink.check())[0].detail
        server.close()
        await server.wait_closed()
        return seen

    seen = asyncio.run(main())
    print(f"a self-signed peer: {seen}")
    kind, _, detail = seen["source verify=True"]
    assert kind == "connect_error"
    assert "TLS:" in detail
    assert "certificate" in detail
    assert seen["source verify=False"][:2] == ("response", 200)
    assert "TLS:" in seen["webhook check"]


def test_a_peer_speaking_garbage_is_described_without_the_urls_secrets() -> None:
    # aiohttp's protocol errors quote the URL whole; a token in its query is a secret.
    import asyncio

    from relay.sinks.webhook import WebhookSink, WebhookSinkConfig
    from relay.sources.http import ProviderClient

    token = "tok-5ecret-in-the-query"

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"GARBAGE\r\n\r\n")
        await writer.drain()
        writer.close()

    async def main() -> list[str]:
        server = await asyncio.start_server(garbage, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/x?token={token}"
        client = ProviderClient("rc", connect_timeout=5, read_timeout=5, verify_tls=True)
        got = await client.request("GET", url)
        await client.aclose()
        sink = WebhookSink("hook", WebhookSinkConfig(type="webhook", url=url, secret=SECRET))
        await sink.start()
        _, sink_detail, _ = await sink._post([])
        await sink.close()
        server.close()
        await server.wait_closed()
        return [got.kind, got.detail, sink_detail]

    kind, source_detail, sink_detail = asyncio.run(main())
    print(f"a peer speaking garbage: {source_detail!r}")
    assert kind == "timeout"  # sent, no usable answer: it may have acted
    for detail in (source_detail, sink_detail):
        assert "ClientResponseError" in detail
        assert token not in detail
        assert "\n" not in detail
