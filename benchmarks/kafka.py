"""Kafka benchmarks on one real broker, in one run, at least once and exactly once.

1. Throughput: the relay delivering a pre-filled journal of N events to Kafka
   (its sink cursor timed from first move to the end), against a bare aiokafka
   producer sending the same payloads, keys and headers with the same settings
   (run before and after the relays; the faster of the two counts). SPEC §7
   bars: the relay ≥ 90 % of the bare producer; with ``exactly_once`` (one
   transaction per batch, with the sink's cursor record) ≥ 60 %.
2. Latency at a fixed rate: the RongCloud emulator (with its real 10 requests/s
   budget) produces R messages/s for T seconds. At least once: latency = the
   broker's append time (LogAppendTime topic) − the message's time at the
   emulator. Exactly once a record counts only once its transaction commits,
   so latency = when a live ``read_committed`` consumer receives it − the
   message's time (an upper bound: it includes the consumer's fetch).
   SPEC §7 bars: p99 ≤ 300 ms at 1,000 events/s; ≤ 500 ms with exactly_once.

    python -m benchmarks.kafka --events 200000 --rate 1000 --seconds 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from benchmarks.common import machine, start_relay, stop
from relay.emulators.rongcloud import RongCloudEmulator
from relay.journal import NewEvent, StoredEvent
from relay.journal.sqlite import SqliteJournal
from relay.sinks.kafka import kafka_record
from relay.sources.rongcloud_records import normalize
from tests.support.configs import rongcloud_source, write_config
from tests.support.emulators import refused_port, serving
from tests.support.kafka_broker import KafkaBroker
from tests.support.kafka_read import consume


async def fill_journal(path: Path, events: int) -> None:
    emulator = RongCloudEmulator(seed=3)
    journal = SqliteJournal.open(path)
    try:
        await journal.register_sinks(["bus"], prune=True)
        endpoints = ("person", "group", "chatroom")
        now = int(time.time() * 1000)
        for start in range(0, events, 5000):
            batch = []
            for n in range(start, min(events, start + 5000)):
                endpoint = endpoints[n % 3]
                record = emulator.make_record(endpoint, n, now)
                batch.append(NewEvent.from_event(
                    normalize(record, source="rc", endpoint=endpoint, fetched_at=now)))
            await journal.commit_batch(batch)
    finally:
        await journal.close()


def sink_cursor(db: Path) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT seq FROM sink_cursors WHERE sink='bus'").fetchone()
        return int(row[0]) if row else 0
    finally:
        conn.close()


def kafka_sink(broker: KafkaBroker, topic: str, exactly_once: bool) -> dict[str, Any]:
    sink: dict[str, Any] = {"type": "kafka", "bootstrap_servers": broker.bootstrap,
                            "topic": topic}
    if exactly_once:
        sink |= {"exactly_once": True, "transactional_id": f"{topic}.txn",
                 "cursor_topic": f"{topic}.cursor"}
    return sink


def relay_throughput(broker: KafkaBroker, events: int, workdir: Path, *,
                     exactly_once: bool = False) -> float:
    db = workdir / "relay.db"
    anyio.run(fill_journal, db, events)
    topic = "bench.relay.once" if exactly_once else "bench.relay"
    config = write_config(
        workdir,
        sources={"rc": rongcloud_source([f"http://127.0.0.1:{refused_port()}"],
                                        transient_backoff="10s")},
        sinks={"bus": kafka_sink(broker, topic, exactly_once)},
        log={"level": "error"},
    )
    relay = start_relay(config, workdir / "relay.log")
    try:
        started = None
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            cursor = sink_cursor(db)
            if cursor and started is None:
                started, first = time.monotonic(), cursor
            if cursor >= events:
                break
            time.sleep(0.02)
        else:
            raise TimeoutError("the relay did not deliver the journal in time")
        assert started is not None
        return (events - first) / (time.monotonic() - started)
    finally:
        stop(relay)


async def bare_producer(broker: KafkaBroker, db: Path, events: int, topic: str) -> float:
    journal = SqliteJournal.open_readonly(db)
    try:
        rows: list[StoredEvent] = await journal.read(0, events)
    finally:
        await journal.close()
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, acks="all",
                                enable_idempotence=True, compression_type="lz4", linger_ms=5,
                                max_batch_size=1024 * 1024, max_request_size=8 * 1024 * 1024)
    await producer.start()
    try:
        started = time.monotonic()
        futures = []
        for event in rows:
            key, headers, _ = kafka_record(event)
            futures.append(await producer.send(topic, event.payload, key=key,
                                               headers=headers))
        await asyncio.gather(*futures)
        return len(rows) / (time.monotonic() - started)
    finally:
        await producer.stop()


async def create_append_time_topic(broker: KafkaBroker, topic: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 3, 1, topic_configs={
            "message.timestamp.type": "LogAppendTime"})])
    finally:
        await admin.close()


class CommittedWatcher:
    """A live read_committed consumer noting when each record becomes visible."""

    def __init__(self, broker: KafkaBroker, topic: str) -> None:
        self.broker = broker
        self.topic = topic
        self.latencies: list[float] = []
        self.expected: int | None = None
        self.ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._watch()), daemon=True)

    def start(self) -> None:
        self._thread.start()
        if not self.ready.wait(60):
            raise TimeoutError("the watching consumer did not start")

    def finish(self, expected: int, timeout: float = 120) -> list[float]:
        self.expected = expected
        self._thread.join(timeout)
        return self.latencies

    async def _watch(self) -> None:
        consumer = AIOKafkaConsumer(bootstrap_servers=self.broker.bootstrap,
                                    isolation_level="read_committed", enable_auto_commit=False,
                                    fetch_max_wait_ms=50)
        await consumer.start()
        try:
            tps = [TopicPartition(self.topic, p) for p in range(3)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            self.ready.set()
            deadline = time.monotonic() + 3600
            while time.monotonic() < deadline:
                if self.expected is not None and len(self.latencies) >= self.expected:
                    return
                batch = await consumer.getmany(timeout_ms=200, max_records=5000)
                now_ms = time.time() * 1000
                for records in batch.values():
                    self.latencies += [now_ms - orjson.loads(r.value)["sent_at"]
                                       for r in records]
                if self.expected is not None and not batch:
                    deadline = min(deadline, time.monotonic() + 10)
        finally:
            await consumer.stop()


def latency(broker: KafkaBroker, rate: float, seconds: float, workdir: Path, *,
            exactly_once: bool = False) -> dict[str, Any]:
    topic = "bench.latency.once" if exactly_once else "bench.latency"
    asyncio.run(create_append_time_topic(broker, topic))
    watcher = CommittedWatcher(broker, topic) if exactly_once else None
    emulator = RongCloudEmulator("bench", "bench", batch_size=1000, budget=10, seed=4)
    with serving(emulator) as (loop, server):
        config = write_config(
            workdir,
            sources={"rc": rongcloud_source(server.urls, app_key="bench", app_secret="bench",
                                            idle_interval="50ms")},
            sinks={"bus": kafka_sink(broker, topic, exactly_once)},
            log={"level": "error"},
        )
        relay = start_relay(config, workdir / "relay.log")
        try:
            if watcher is not None:
                watcher.start()
            time.sleep(3)  # start-up and the budget's one-second hold-off: not measured
            loop.call(lambda: emulator.set_traffic(rate))
            time.sleep(seconds)
            loop.call(lambda: emulator.set_traffic(0))
            generated = emulator.snapshot()["generated"]
            if watcher is not None:
                lat = sorted(watcher.finish(generated))
            else:
                records = consume(broker.bootstrap, topic, generated, timeout=120)
                lat = sorted(r.timestamp_ms - orjson.loads(r.value)["sent_at"] for r in records)
        finally:
            stop(relay)
        over_budget = emulator.snapshot()["over_budget"]

    def pct(p: float) -> float:
        return float(lat[min(len(lat) - 1, int(p * len(lat)))])

    return {"rate": rate, "seconds": seconds, "generated": generated, "delivered": len(lat),
            "exactly_once": exactly_once,
            "measured": "visible to read_committed" if exactly_once else "broker append time",
            "p50_ms": pct(0.50), "p90_ms": pct(0.90), "p99_ms": pct(0.99),
            "max_ms": float(lat[-1]), "mean_ms": statistics.fmean(lat),
            "over_budget": over_budget}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    with KafkaBroker(num_partitions=3) as broker, \
            tempfile.TemporaryDirectory(prefix="relay-bench-kafka-") as tmp:
        work = Path(tmp)
        for name in ("throughput", "throughput-once", "latency", "latency-once"):
            (work / name).mkdir()
        relay_rate = relay_throughput(broker, args.events, work / "throughput")
        db = work / "throughput" / "relay.db"
        bare_before = asyncio.run(bare_producer(broker, db, args.events, "bench.bare"))
        once_rate = relay_throughput(broker, args.events, work / "throughput-once",
                                     exactly_once=True)
        bare_after = asyncio.run(bare_producer(broker, db, args.events, "bench.bare2"))
        bare_rate = max(bare_before, bare_after)
        lat = latency(broker, args.rate, args.seconds, work / "latency")
        lat_once = latency(broker, args.rate, args.seconds, work / "latency-once",
                           exactly_once=True)
        rows = [
            ("bare aiokafka producer", f"{bare_rate:,.0f} events/s"
             f" (runs: {bare_before:,.0f}, {bare_after:,.0f})", "", ""),
            ("relay → Kafka, at least once", f"{relay_rate:,.0f} events/s",
             f"{relay_rate / bare_rate:.2f} of bare", "≥ 0.90"),
            ("relay → Kafka, exactly once", f"{once_rate:,.0f} events/s",
             f"{once_rate / bare_rate:.2f} of bare", "≥ 0.60"),
            (f"latency at {args.rate:.0f}/s, at least once",
             f"p50 {lat['p50_ms']:.0f} ms, p99 {lat['p99_ms']:.0f} ms",
             f"{lat['delivered']:,} events", "p99 ≤ 300 ms"),
            (f"latency at {args.rate:.0f}/s, exactly once",
             f"p50 {lat_once['p50_ms']:.0f} ms, p99 {lat_once['p99_ms']:.0f} ms",
             f"{lat_once['delivered']:,} events", "p99 ≤ 500 ms"),
        ]
        width = max(len(r[0]) for r in rows)
        for row in rows:
            print(f"{row[0]:<{width}}  {row[1]:<40} {row[2]:<22} {row[3]}")
        print(json.dumps({
            "benchmark": "kafka", "events": args.events,
            "relay_events_per_second": relay_rate, "bare_aiokafka_events_per_second": bare_rate,
            "bare_runs": [bare_before, bare_after], "ratio": relay_rate / bare_rate,
            "exactly_once_events_per_second": once_rate,
            "exactly_once_ratio": once_rate / bare_rate,
            "latency": lat, "latency_exactly_once": lat_once, "machine": machine(),
            "broker": f"Kafka {broker.version}, single node, 3 partitions",
        }, indent=2))


if __name__ == "__main__":
    main()
