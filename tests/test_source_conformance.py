"""The same behaviours, run against every source (RongCloud, WuKongIM, LeanCloud).

Each test starts the provider's emulator on loopback and the relay as a real
child process writing to a file sink, then checks what arrived.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from relay.event import json_schema
from tests.support.configs import file_sink, write_config
from tests.support.emulators import refused_port, serving
from tests.support.providers import ADAPTERS, ProviderAdapter
from tests.support.relay_process import RelayProcess, count_lines, read_events, wait_for

pytestmark = pytest.mark.slow
VALIDATOR = jsonschema.Draft202012Validator(json_schema())


@pytest.fixture(params=ADAPTERS, ids=lambda a: a.name)
def adapter(request: pytest.FixtureRequest) -> ProviderAdapter:
    return request.param  # type: ignore[no-any-return]


def start(tmp_path: Path, adapter: ProviderAdapter, urls: list[str], *, metrics_port: int = 0,
          journal: dict[str, Any] | None = None, **source: Any) -> tuple[RelayProcess, Path]:
    events = tmp_path / "events.jsonl"
    metrics = {"enabled": True, "listen": f"127.0.0.1:{metrics_port}"} if metrics_port else \
        {"enabled": False}
    config = write_config(tmp_path, sources={"src": adapter.source(urls, **source)},
                          sinks={"file": file_sink(events, batch_size=200)},
                          metrics=metrics, journal=journal or {})
    return RelayProcess(config, tmp_path / "relay.log").start(), events


def delivered(events_file: Path, adapter: ProviderAdapter) -> Counter[str]:
    return Counter(adapter.key(e) for e in read_events(events_file))


def test_exactly_once_and_schema(tmp_path: Path, adapter: ProviderAdapter) -> None:
    emulator = adapter.emulator(seed=1)
    expected = adapter.generate(emulator, 600)
    with serving(emulator) as (_loop, server):
        relay, events_file = start(tmp_path, adapter, server.urls)
        try:
            wait_for(lambda: count_lines(events_file) >= len(expected), timeout=60)
        finally:
            relay.stop()
    events = read_events(events_file)
    assert Counter(adapter.key(e) for e in events) == Counter(expected)
    for event in events:
        VALIDATOR.validate(event)
        assert event["provider"] == adapter.name
        assert event["source"] == "src"
        assert event["id"].startswith("src:")


def test_resumes_from_its_cursor_after_a_restart(tmp_path: Path, adapter: ProviderAdapter) -> None:
    emulator = adapter.emulator(seed=2)
    first = adapter.generate(emulator, 300)
    with serving(emulator) as (loop, server):
        relay, events_file = start(tmp_path, adapter, server.urls)
        wait_for(lambda: count_lines(events_file) >= len(first), timeout=60)
        assert relay.terminate() == 0
        second = loop.call(lambda: adapter.generate(emulator, 300))
        relay.start()
        try:
            wait_for(lambda: count_lines(events_file) >= len(first) + len(second), timeout=60)
        finally:
            relay.stop()
    assert delivered(events_file, adapter) == Counter(first | second)


def test_duplicates_are_dropped(tmp_path: Path, adapter: ProviderAdapter) -> None:
    emulator = adapter.emulator(seed=3)
    with serving(emulator) as (loop, server):
        relay, events_file = start(tmp_path, adapter, server.urls)
        try:
            expected = loop.call(lambda: adapter.generate(emulator, 200))
            wait_for(lambda: count_lines(events_file) >= len(expected), timeout=60)
            loop.call(lambda: adapter.redeliver(loop, emulator))
            more = loop.call(lambda: adapter.generate(emulator, 200))
            wait_for(lambda: count_lines(events_file) >= len(expected) + len(more), timeout=60)
            wait_for(lambda: adapter.pending(emulator) == 0, timeout=30)
        finally:
            relay.stop()
    counts = delivered(events_file, adapter)
    assert counts == Counter(expected | more)
    assert relay.log_records()  # it ran and logged


def scrape(port: int) -> str:
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_malformed_answers_are_counted_and_survived(tmp_path: Path,
                                                    adapter: ProviderAdapter) -> None:
    emulator = adapter.emulator(seed=4)
    emulator.faults.update({"malformed_ratio": 0.3})
    expected = adapter.generate(emulator, 300)
    port = refused_port()

    def malformed_counted() -> float:
        return metric(scrape(port), "relay_source_requests_total", outcome="malformed")

    with serving(emulator) as (_loop, server):
        relay, events_file = start(tmp_path, adapter, server.urls, metrics_port=port,
                                   transient_backoff="50ms", transient_backoff_max="200ms")
        try:
            wait_for(lambda: count_lines(events_file) >= len(expected), timeout=90)
            # Polling goes on (empty answers are truncated too) until faults were met.
            wait_for(malformed_counted, timeout=30, interval=0.2)
            assert relay.running()
        finally:
            relay.stop()
    assert delivered(events_file, adapter) == Counter(expected)
    assert any(r.get("level") in ("warning", "error") for r in relay.log_records()), \
        "malformed answers must be logged"


def test_auth_failure_is_a_configuration_error(tmp_path: Path, adapter: ProviderAdapter) -> None:
    emulator = adapter.emulator(seed=5)
    adapter.generate(emulator, 10)
    port = refused_port()
    with serving(emulator) as (_loop, server):
        relay, _events = start(tmp_path, adapter, server.urls, metrics_port=port,
                               **adapter.wrong_credentials())
        try:
            errors = wait_for(lambda: [r for r in relay.log_records() if r.get("level") == "error"
                                       and "configuration" in r.get("event", "")], timeout=20)
            text = wait_for(lambda: scrape(port), timeout=10)
            requests_then = adapter.data_requests(emulator)
            wait_for(lambda: metric(scrape(port), "relay_source_config_error") >= 1, timeout=10)
        finally:
            relay.stop()
    assert metric(text, "relay_source_config_error", source="src") == 1
    assert errors
    secret = next(iter(adapter.wrong_credentials().values()))
    assert secret not in relay.log_text()
    assert requests_then <= 10, "no hot loop against a provider that rejects us"


def test_nothing_is_read_or_acknowledged_while_the_journal_cannot_commit(
        tmp_path: Path, adapter: ProviderAdapter) -> None:
    emulator = adapter.emulator(seed=6)
    adapter.generate(emulator, 50)
    with serving(emulator) as (_loop, server):
        # More free space required than any disk has: the journal counts as full.
        relay, events_file = start(tmp_path, adapter, server.urls,
                                   journal={"min_free_bytes": "1000000TB"})
        try:
            wait_for(lambda: any("disk full" in r.get("event", "")
                                 for r in relay.log_records()), timeout=20)
        finally:
            relay.stop()
    assert adapter.data_requests(emulator) == 0
    assert count_lines(events_file) == 0
    assert re.search(r"polling paused", relay.log_text())
