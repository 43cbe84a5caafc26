"""Kafka benchmarks on one real broker, in one run.

1. Throughput: the relay delivering a pre-filled journal of N events to Kafka
   (its sink cursor timed from first move to the end), against a bare aiokafka
   producer sending the same payloads, keys and headers with the same settings.
   SPEC §7 bar: the relay ≥ 50 % of the bare producer.
2. Latency at a fixed rate: the RongCloud emulator (with its real 10 requests/s
   budget) produces R messages/s for T seconds; latency = the broker's append
   time (LogAppendTime topic) − the message's time at the emulator.
   SPEC §7 bar: p99 ≤ 300 ms at 1,000 events/s.

    python -m benchmarks.kafka --events 200000 --rate 1000 --seconds 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import orjson
from aiokafka import AIOKafkaProducer
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


def relay_throughput(broker: KafkaBroker, events: int, workdir: Path) -> float:
    db = workdir / "relay.db"
    anyio.run(fill_journal, db, events)
    config = write_config(
        workdir,
        sources={"rc": rongcloud_source([f"http://127.0.0.1:{refused_port()}"],
                                        transient_backoff="10s")},
        sinks={"bus": {"type": "kafka", "bootstrap_servers": broker.bootstrap,
                       "topic": "bench.relay"}},
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


async def bare_producer(broker: KafkaBroker, db: Path, events: int) -> float:
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
            futures.append(await producer.send("bench.bare", event.payload, key=key,
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


def latency(broker: KafkaBroker, rate: float, seconds: float, workdir: Path) -> dict[str, Any]:
    topic = "bench.latency"
    asyncio.run(create_append_time_topic(broker, topic))
    emulator = RongCloudEmulator("bench", "bench", batch_size=1000, budget=10, seed=4)
    with serving(emulator) as (loop, server):
        config = write_config(
            workdir,
            sources={"rc": rongcloud_source(server.urls, app_key="bench", app_secret="bench",
                                            idle_interval="50ms")},
            sinks={"bus": {"type": "kafka", "bootstrap_servers": broker.bootstrap,
                           "topic": topic}},
            log={"level": "error"},
        )
        relay = start_relay(config, workdir / "relay.log")
        try:
            time.sleep(3)  # start-up and the budget's one-second hold-off: not measured
            loop.call(lambda: emulator.set_traffic(rate))
            time.sleep(seconds)
            loop.call(lambda: emulator.set_traffic(0))
            generated = emulator.snapshot()["generated"]
            records = consume(broker.bootstrap, topic, generated, timeout=120)
        finally:
            stop(relay)
        over_budget = emulator.snapshot()["over_budget"]
    lat = sorted(r.timestamp_ms - orjson.loads(r.value)["sent_at"] for r in records)

    def pct(p: float) -> float:
        return float(lat[min(len(lat) - 1, int(p * len(lat)))])

    return {"rate": rate, "seconds": seconds, "generated": generated, "delivered": len(lat),
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
        (work / "throughput").mkdir()
        relay_rate = relay_throughput(broker, args.events, work / "throughput")
        bare_rate = asyncio.run(bare_producer(broker, work / "throughput" / "relay.db",
                                              args.events))
        print(f"relay → Kafka {relay_rate:,.0f} events/s; bare aiokafka {bare_rate:,.0f} "
              f"events/s; ratio {relay_rate / bare_rate:.2f}")
        (work / "latency").mkdir()
        lat = latency(broker, args.rate, args.seconds, work / "latency")
        print(f"latency at {args.rate:.0f}/s: p50 {lat['p50_ms']:.0f} ms, "
              f"p99 {lat['p99_ms']:.0f} ms")
        print(json.dumps({
            "benchmark": "kafka", "events": args.events,
            "relay_events_per_second": relay_rate, "bare_aiokafka_events_per_second": bare_rate,
            "ratio": relay_rate / bare_rate, "latency": lat, "machine": machine(),
            "broker": f"Kafka {broker.version}, single node, 3 partitions",
        }, indent=2))


if __name__ == "__main__":
    main()
