"""One adapter per sink, so a single conformance suite can drive every destination.

Each adapter knows how to configure the relay's sink for its real destination
(a file, the session's Kafka broker, a webhook receiver on loopback), how to
read back what arrived in the order it arrived, and what it promises: exactly
once (a destination that records its own position) or at least once.

The relay under test reads a journal filled beforehand (:func:`fill_journal`)
with real normalized RongCloud events, so the sink works through a backlog
from its first second and a kill always falls mid-delivery.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import anyio
import orjson

from relay.emulators.rongcloud import RongCloudEmulator
from relay.journal import NewEvent
from relay.journal.sqlite import SqliteJournal
from relay.sources.rongcloud_records import normalize
from tests.support.kafka_broker import KafkaBroker
from tests.support.kafka_read import consume
from tests.support.relay_process import read_events
from tests.support.webhook_receiver import WebhookReceiver

SINK = "out"
SECRET = "whsec_Y29uZm9ybWFuY2UtdGVzdC1zZWNyZXQtMDEyMw=="


@dataclass
class Bench:
    """What a test gives the adapters: its folder and the destinations' handles."""

    tmp_path: Path
    broker: KafkaBroker | None = None
    receiver: WebhookReceiver | None = None
    hook_url: str = ""
    topic: str = field(default_factory=lambda: f"conformance-{uuid.uuid4().hex[:10]}")

    @property
    def journal_path(self) -> Path:
        return self.tmp_path / "relay.db"


class SinkAdapter(Protocol):
    name: str
    exactly_once: bool
    refuses: bool  # the destination can refuse one record (and keep the others)

    def sink(self, bench: Bench, **overrides: Any) -> dict[str, Any]: ...

    def refusing(self, bench: Bench, ids: set[str]) -> dict[str, Any]:
        """Overrides that make the destination refuse these (oversized) events."""

    def delivered(self, bench: Bench, expected: int) -> list[dict[str, Any]]:
        """Every event that arrived, in arrival order per conversation."""


class FileAdapter:
    name = "file"
    exactly_once = True
    refuses = False

    def sink(self, bench: Bench, **overrides: Any) -> dict[str, Any]:
        return {"type": "file", "path": str(bench.tmp_path / "events.jsonl"), "batch_size": 50,
                **overrides}

    def refusing(self, bench: Bench, ids: set[str]) -> dict[str, Any]:
        raise NotImplementedError("a file refuses no record")

    def delivered(self, bench: Bench, expected: int) -> list[dict[str, Any]]:
        return read_events(bench.tmp_path / "events.jsonl")


class KafkaAdapter:
    refuses = True

    def __init__(self, exactly_once: bool) -> None:
        self.exactly_once = exactly_once
        self.name = "kafka-exactly-once" if exactly_once else "kafka"

    def sink(self, bench: Bench, **overrides: Any) -> dict[str, Any]:
        assert bench.broker is not None
        config: dict[str, Any] = {"type": "kafka", "bootstrap_servers": bench.broker.bootstrap,
                                  "topic": bench.topic, "batch_size": 50,
                                  "request_timeout": "5s", "retry_backoff_max": "1s"}
        if self.exactly_once:
            # Apart from every other test's relay on the session's broker.
            config |= {"exactly_once": True, "transactional_id": f"{bench.topic}.txn",
                       "cursor_topic": f"{bench.topic}.cursor"}
        return {**config, **overrides}

    def refusing(self, bench: Bench, ids: set[str]) -> dict[str, Any]:
        return {"max_request_bytes": "64KiB"}

    def delivered(self, bench: Bench, expected: int) -> list[dict[str, Any]]:
        assert bench.broker is not None
        isolation = "read_committed" if self.exactly_once else "read_uncommitted"
        records = consume(bench.broker.bootstrap, bench.topic, expected, timeout=60,
                          isolation_level=isolation)
        if len(records) >= expected:  # more may follow (duplicates): read to the end
            records = consume(bench.broker.bootstrap, bench.topic, 10 * expected, timeout=60,
                              done=lambda got: len(got) >= expected,
                              isolation_level=isolation)
        # A conversation lives on one partition: offset order is its arrival order.
        return [orjson.loads(r.value) for r in sorted(records,
                                                      key=lambda r: (r.partition, r.offset))]


class WebhookAdapter:
    name = "webhook"
    exactly_once = False
    refuses = True

    def sink(self, bench: Bench, **overrides: Any) -> dict[str, Any]:
        return {"type": "webhook", "url": bench.hook_url, "secret": SECRET, "batch_size": 50,
                "timeout": "2s", "retry_backoff": "100ms", "retry_backoff_max": "1s",
                **overrides}

    def refusing(self, bench: Bench, ids: set[str]) -> dict[str, Any]:
        assert bench.receiver is not None
        bench.receiver.behaviour.refuse_ids = set(ids)
        return {}

    def delivered(self, bench: Bench, expected: int) -> list[dict[str, Any]]:
        assert bench.receiver is not None
        return bench.receiver.delivered_events()


ADAPTERS: list[SinkAdapter] = [FileAdapter(), KafkaAdapter(exactly_once=False),
                               KafkaAdapter(exactly_once=True), WebhookAdapter()]


def fill_journal(path: Path, count: int, *, big: frozenset[int] = frozenset(),
                 seed: int = 7) -> list[str]:
    """``count`` normalized RongCloud events in a new journal; the ids in journal order.

    Events at the positions in ``big`` carry 100 KB of content (destinations with a
    small size limit refuse them).
    """

    async def fill() -> list[str]:
        emulator = RongCloudEmulator(seed=seed)
        journal = SqliteJournal.open(path)
        ids: list[str] = []
        try:
            await journal.register_sinks([SINK], prune=True)
            endpoints = ("person", "group", "chatroom")
            now = int(time.time() * 1000)
            for start in range(0, count, 2000):
                batch = []
                for n in range(start, min(count, start + 2000)):
                    endpoint = endpoints[n % 3] if n not in big else "group"
                    record = emulator.make_record(endpoint, n, now)
                    if n in big:
                        record["content"] = orjson.dumps({"content": "x" * 100_000}).decode()
                    event = normalize(record, source="rc", endpoint=endpoint, fetched_at=now)
                    batch.append(NewEvent.from_event(event))
                    ids.append(event["id"])
                await journal.commit_batch(batch)
        finally:
            await journal.close()
        return ids

    return anyio.run(fill)


def sink_cursor(path: Path) -> int:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT seq FROM sink_cursors WHERE sink = ?", (SINK,)).fetchone()
        return int(row[0]) if row else 0
    finally:
        conn.close()


def set_sink_cursor(path: Path, seq: int, *, replay_mark: bool = False) -> None:
    """Move the journal's cursor by hand, as a crash at the right instant leaves it."""
    conn = sqlite3.connect(path)
    try:
        conn.execute("UPDATE sink_cursors SET seq = ? WHERE sink = ?", (seq, SINK))
        if replay_mark:
            conn.execute("INSERT OR REPLACE INTO cursors(key, value, updated_at) VALUES (?,?,?)",
                         (f"@sink:{SINK}:replay", "1", int(time.time() * 1000)))
        conn.commit()
    finally:
        conn.close()


def journal_order(path: Path) -> list[tuple[str, str]]:
    """(conversation key, event id) of every event, in journal order."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT id, routing FROM events ORDER BY seq").fetchall()
    finally:
        conn.close()
    order = []
    for event_id, routing in rows:
        r = orjson.loads(routing)
        order.append((f"{r[0]}:{r[5]}", str(event_id)))
    return order
