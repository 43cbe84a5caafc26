"""The same behaviours, run against every sink (file, Kafka, Kafka exactly-once, webhook).

Each test runs the relay as a real child process over a journal filled
beforehand, delivering to a real destination (a file, the session's Kafka
broker, a webhook receiver on loopback), and checks what arrived — in the
manner of Benthos's checkpoint-capture stream tests and Vector's component
validator: one definition of a sink's contract, every sink held to it.

- kill -9 at random instants mid-delivery: every event arrives; a sink that
  records its own position (file, Kafka exactly-once) repeats none, the others
  only the batch in flight at each kill;
- a crash between the destination's commit and the journal's cursor write
  (left by hand, to hit that instant every time): the destination's position
  wins, nothing repeats there;
- refused records go to dead letters, the rest still arrives (once), and
  ``relay dlq replay`` delivers them once the destination takes them;
- per conversation, the destination's order is the journal's;
- ``relay replay`` is a deliberate repeat, also for exactly-once sinks, even
  if the relay dies between the rewind and the next delivery.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.configs import write_config
from tests.support.emulators import refused_port
from tests.support.relay_process import RelayProcess, wait_for
from tests.support.sink_adapters import (
    ADAPTERS,
    SINK,
    Bench,
    SinkAdapter,
    fill_journal,
    journal_order,
    set_sink_cursor,
    sink_cursor,
)
from tests.support.webhook_receiver import receiving

pytestmark = [pytest.mark.slow, pytest.mark.kafka]

EVENTS = 6000
BATCH = 50  # every adapter's batch_size


@pytest.fixture(params=ADAPTERS, ids=lambda a: a.name)
def adapter(request: pytest.FixtureRequest) -> SinkAdapter:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def bench(adapter: SinkAdapter, request: pytest.FixtureRequest,
          tmp_path: Path) -> Iterator[Bench]:
    if adapter.name.startswith("kafka"):
        yield Bench(tmp_path, broker=request.getfixturevalue("kafka_broker"))
    elif adapter.name == "webhook":
        with receiving(seed=9) as (receiver, url, _loop):
            yield Bench(tmp_path, receiver=receiver, hook_url=url)
    else:
        yield Bench(tmp_path)


def relay_for(bench: Bench, adapter: SinkAdapter, **sink: Any) -> RelayProcess:
    # No source to speak of: the journal holds the backlog already.
    config = write_config(
        bench.tmp_path,
        sources={"rc": {"type": "rongcloud", "app_key": "k", "app_secret": "s",
                        "base_urls": [f"http://127.0.0.1:{refused_port()}"],
                        "transient_backoff": "10s"}},
        sinks={SINK: adapter.sink(bench, **sink)}, shutdown_grace="5s")
    return RelayProcess(config, bench.tmp_path / "relay.log")


def drained(bench: Bench, last: int) -> None:
    wait_for(lambda: sink_cursor(bench.journal_path) >= last, timeout=120, interval=0.1,
             message="the sink to deliver the whole journal")


def per_conversation(events: list[dict[str, Any]]) -> dict[str, list[str]]:
    order: dict[str, list[str]] = defaultdict(list)
    for e in events:
        order[f"{e['source']}:{e['conversation']}"].append(e["id"])
    return dict(order)


def journal_conversations(bench: Bench) -> dict[str, list[str]]:
    order: dict[str, list[str]] = defaultdict(list)
    for conversation, event_id in journal_order(bench.journal_path):
        order[conversation].append(event_id)
    return dict(order)


def first_seen(ids: list[str]) -> list[str]:
    return list(dict.fromkeys(ids))


def run_cli(bench: Bench, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "relay", *args, "--config",
                          str(bench.tmp_path / "relay.toml")], capture_output=True, text=True,
                         timeout=60, check=True)
    return out.stdout


def dead_letters(bench: Bench) -> list[dict[str, Any]]:
    return list(json.loads(run_cli(bench, "dlq", "list", "--json", "--limit", "1000") or "[]"))


def log_says(relay: RelayProcess, words: str) -> bool:
    return any(words in r.get("event", "") for r in relay.log_records())


def test_kill_9_mid_delivery_resumes_at_the_right_place(bench: Bench,
                                                        adapter: SinkAdapter) -> None:
    ids = fill_journal(bench.journal_path, EVENTS)
    relay = relay_for(bench, adapter).start()
    rng = random.Random(adapter.name)
    kills = 0
    try:
        for fraction in sorted(rng.uniform(0.1, 0.8) for _ in range(3)):
            # Polled every few ms while batches go: the kill falls anywhere within one.
            wait_for(lambda f=fraction: sink_cursor(bench.journal_path) >= f * EVENTS,
                     timeout=120, interval=0.003, message="delivery to get under way")
            relay.kill9()
            kills += 1
            relay.start()
        drained(bench, EVENTS)
    finally:
        relay.stop()
    arrived = adapter.delivered(bench, EVENTS)
    counts = Counter(e["id"] for e in arrived)
    assert set(counts) == set(ids), "an event was lost or one never journaled arrived"
    duplicates = sum(n - 1 for n in counts.values())
    if adapter.exactly_once:
        assert duplicates == 0, f"{duplicates} events arrived twice"
    else:
        assert duplicates <= kills * BATCH, "duplicates beyond the batches in flight"
    # Per conversation, in journal order (duplicates of a repeated batch come after it).
    journal = journal_conversations(bench)
    got = per_conversation(arrived)
    assert {c: first_seen(v) for c, v in got.items()} == journal
    if adapter.exactly_once:
        assert got == journal


def test_a_destination_ahead_of_the_journal_cursor_repeats_nothing(
        bench: Bench, adapter: SinkAdapter) -> None:
    """The crash that matters: after the destination committed, before the journal's
    cursor write. Left by hand, so that every run hits it."""
    ids = fill_journal(bench.journal_path, 1000)
    relay = relay_for(bench, adapter).start()
    try:
        drained(bench, 1000)
        assert relay.terminate() == 0
        behind = 1000 - 3 * BATCH - 7
        set_sink_cursor(bench.journal_path, behind)
        relay.start()
        drained(bench, 1000)
    finally:
        relay.stop()
    counts = Counter(e["id"] for e in adapter.delivered(bench, 1000))
    assert set(counts) == set(ids)
    repeated = {i for i, n in counts.items() if n > 1}
    if adapter.exactly_once:
        assert not repeated
        assert log_says(relay, "already holds events past the journal's cursor")
    else:
        assert repeated == set(ids[behind:])  # at least once: what the cursor did not cover


def test_refused_records_go_to_dead_letters_and_replay_from_there(
        bench: Bench, adapter: SinkAdapter) -> None:
    if not adapter.refuses:
        pytest.skip(f"{adapter.name}: the destination refuses no record")
    big = frozenset({10, 333, 334, 900})
    ids = fill_journal(bench.journal_path, 1200, big=big)
    refused = {ids[n] for n in big}
    relay = relay_for(bench, adapter, **adapter.refusing(bench, refused)).start()
    try:
        drained(bench, 1200)
        letters = wait_for(lambda: len(dead_letters(bench)) >= len(big) and dead_letters(bench),
                           timeout=30, message="the dead letters")
        assert relay.running()
    finally:
        relay.stop()
    assert {d["event_id"] for d in letters} == refused
    counts = Counter(e["id"] for e in adapter.delivered(bench, 1200 - len(big)))
    assert set(counts) == set(ids) - refused
    if adapter.exactly_once:
        assert set(counts.values()) == {1}
    # The destination takes them now (a larger limit, a receiver that accepts): replayed.
    if bench.receiver is not None:
        bench.receiver.behaviour.refuse_ids = set()
    relay = relay_for(bench, adapter).start()
    try:
        run_cli(bench, "dlq", "replay", "--sink", SINK)
        wait_for(lambda: not dead_letters(bench), timeout=60, message="the dead letters to go")
        arrived = Counter(e["id"] for e in adapter.delivered(bench, 1200))
    finally:
        relay.stop()
    assert set(arrived) == set(ids)
    if adapter.exactly_once:
        assert set(arrived.values()) == {1}


def test_a_replay_repeats_and_says_so_even_across_a_crash(bench: Bench,
                                                          adapter: SinkAdapter) -> None:
    ids = fill_journal(bench.journal_path, 500)
    relay = relay_for(bench, adapter).start()
    try:
        drained(bench, 500)
        run_cli(bench, "replay", "--sink", SINK, "--since", "1h")
        wait_for(lambda: Counter(e["id"] for e in adapter.delivered(bench, 1000)) ==
                 Counter(ids * 2), timeout=60, message="the replay to arrive")
        assert relay.terminate() == 0
        # Killed between a rewind and its first delivery: the destination's position still
        # says "all of it"; the replay mark makes the restart repeat all the same.
        set_sink_cursor(bench.journal_path, 0, replay_mark=True)
        relay.start()
        wait_for(lambda: Counter(e["id"] for e in adapter.delivered(bench, 1500)) ==
                 Counter(ids * 3), timeout=60, message="the interrupted replay to arrive")
    finally:
        relay.stop()
    if adapter.exactly_once:
        assert log_says(relay, "a deliberate repeat")
