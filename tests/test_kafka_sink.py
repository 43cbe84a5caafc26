"""Kafka sink against a real Apache Kafka broker started by the test suite."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from pathlib import Path

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from relay.emulators.rongcloud import RongCloudEmulator, message_key
from relay.journal import Routing
from relay.sinks.kafka import topic_for
from relay.sinks.kafka_config import KafkaSinkConfig
from tests.support.configs import file_sink, rongcloud_source, write_config
from tests.support.emulators import refused_port, serving
from tests.support.kafka_broker import KafkaBroker
from tests.support.kafka_read import consume
from tests.support.relay_process import RelayProcess, count_lines, read_events, wait_for
from tests.test_hostile_records import metric

pytestmark = pytest.mark.kafka


def kafka_sink(bootstrap: str, topic: str, **extra: object) -> dict[str, object]:
    return {"type": "kafka", "bootstrap_servers": bootstrap, "topic": topic, **extra}


def test_topic_templates() -> None:
    routing = Routing("rc", "rongcloud", "message", "direct", "RC:TxtMsg", "direct:a|b")
    assert topic_for("im.{provider}.{channel.type}", routing) == "im.rongcloud.direct"
    assert topic_for("im.{source}.{kind}.{type}", routing) == "im.rc.message.RC_TxtMsg"
    assert topic_for("fixed", routing) == "fixed"
    with pytest.raises(ValueError, match="unknown placeholder"):
        KafkaSinkConfig(type="kafka", bootstrap_servers="x:1", topic="im.{user}")


def test_every_event_arrives_once_in_conversation_order(
        tmp_path: Path, kafka_broker: KafkaBroker, kafka_topic: str) -> None:
    emulator = RongCloudEmulator("test-key", "test-secret", batch_size=50, budget=None,
                                 redelivery_ratio=0.05, seed=21)
    keys = emulator.generate(4000)
    events_file = tmp_path / "events.jsonl"
    with serving(emulator) as (_loop, server):
        config = write_config(
            tmp_path,
            sources={"rc": rongcloud_source(server.urls, requests_per_second=100)},
            sinks={"bus": kafka_sink(kafka_broker.bootstrap, kafka_topic, batch_size=700),
                   "archive": file_sink(events_file)},
        )
        relay = RelayProcess(config, tmp_path / "relay.log").start()
        try:
            wait_for(lambda: count_lines(events_file) >= len(keys), timeout=90)
            records = consume(kafka_broker.bootstrap, kafka_topic, len(keys), timeout=60)
        finally:
            relay.stop()
    file_events = read_events(events_file)
    ids = [r.headers["id"].decode() for r in records]
    assert len(ids) == len(set(ids)) == len(keys)
    assert set(ids) == {e["id"] for e in file_events}
    for r in records:
        event = orjson.loads(r.value)
        assert r.key == f"{event['source']}:{event['conversation']}".encode()
        assert r.headers["provider"] == b"rongcloud"
        assert r.headers["kind"].decode() == event["kind"]
        assert r.headers["type"].decode() == event["type"]
    # Per conversation, Kafka's order (by partition offset) is the journal's order,
    # which the file sink records line by line.
    by_key: dict[bytes | None, list[str]] = defaultdict(list)
    partitions_of_key: dict[bytes | None, set[int]] = defaultdict(set)
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        by_key[r.key].append(r.headers["id"].decode())
        partitions_of_key[r.key].add(r.partition)
    assert all(len(p) == 1 for p in partitions_of_key.values())
    journal_order: dict[bytes, list[str]] = defaultdict(list)
    for e in file_events:
        journal_order[f"{e['source']}:{e['conversation']}".encode()].append(e["id"])
    assert dict(by_key) == dict(journal_order)


def test_sasl_scram_listener(tmp_path: Path, kafka_broker: KafkaBroker, kafka_topic: str) -> None:
    emulator = RongCloudEmulator("test-key", "test-secret", budget=None, seed=5)
    keys = emulator.generate(300)
    with serving(emulator) as (_loop, server):
        config = write_config(
            tmp_path,
            sources={"rc": rongcloud_source(server.urls, requests_per_second=100)},
            sinks={"bus": kafka_sink(
                kafka_broker.sasl_bootstrap, kafka_topic, security_protocol="SASL_PLAINTEXT",
                sasl_mechanism="SCRAM-SHA-512", sasl_username=kafka_broker.sasl_username)},
        )
        relay = RelayProcess(config, tmp_path / "relay.log",
                             env={"RELAY_SINKS__BUS__SASL_PASSWORD": kafka_broker.sasl_password})
        relay.start()
        try:
            records = consume(kafka_broker.bootstrap, kafka_topic, len(keys), timeout=60)
        finally:
            relay.stop()
    assert len({r.headers["id"] for r in records}) == len(keys)
    assert kafka_broker.sasl_password not in relay.log_text()


@pytest.mark.slow
def test_broker_outage_loses_nothing_and_polling_continues(tmp_path: Path) -> None:
    broker = KafkaBroker(num_partitions=3)
    emulator = RongCloudEmulator("test-key", "test-secret", batch_size=20, budget=None, seed=8)
    try:
        broker.start()
        topic = "outage"
        first = emulator.generate(1500)
        with serving(emulator) as (loop, server):
            config = write_config(
                tmp_path,
                sources={"rc": rongcloud_source(server.urls, requests_per_second=20)},
                sinks={"bus": kafka_sink(broker.bootstrap, topic, request_timeout="5s",
                                         retry_backoff_max="2s")},
            )
            relay = RelayProcess(config, tmp_path / "relay.log").start()
            try:
                wait_for(lambda: len(consume(broker.bootstrap, topic, 200, timeout=5)) >= 200,
                         timeout=60, interval=0.5)
                broker.stop()
                down_at = time.monotonic()
                # While Kafka is down the relay keeps draining the provider into its journal.
                served_before = emulator.snapshot()["served_messages"]
                second = loop.call(lambda: emulator.generate(1500))
                wait_for(lambda: not any(emulator.snapshot()["queued"].values()), timeout=60,
                         message="polling to continue while Kafka is down")
                drained_during_outage = emulator.snapshot()["served_messages"] - served_before
                assert time.monotonic() - down_at < 60
                broker.start()
                wanted = set(first + second)
                # Until every key is there, not until so many records: the outage repeats
                # some batches (at least once), and those copies count towards a number.
                records = consume(
                    broker.bootstrap, topic, 10 * len(wanted), timeout=120,
                    done=lambda got: wanted <= {
                        message_key(orjson.loads(r.value)["native"]) for r in got})
            finally:
                relay.stop()
    finally:
        broker.close()
    delivered = {message_key(orjson.loads(r.value)["native"]) for r in records}
    assert delivered == set(first + second), "events lost across the Kafka outage"
    assert drained_during_outage >= 1500


def test_an_oversized_event_is_dead_lettered_not_retried_forever(
        tmp_path: Path, kafka_broker: KafkaBroker, kafka_topic: str) -> None:
    import json
    import subprocess
    import sys

    emulator = RongCloudEmulator("test-key", "test-secret", budget=None, seed=6)
    emulator.generate(20, "person")
    big = emulator.make_record("person", 10_000, int(time.time() * 1000))
    big["content"] = {"content": "x" * 300_000}
    emulator.queues["person"].appendleft(type(emulator.queues["person"][0])(
        big["msgUID"], big, time.time()))
    with serving(emulator) as (_loop, server):
        config = write_config(
            tmp_path,
            sources={"rc": rongcloud_source(server.urls, requests_per_second=100)},
            sinks={"bus": kafka_sink(kafka_broker.bootstrap, kafka_topic,
                                     max_request_bytes="200KiB")},
        )
        relay = RelayProcess(config, tmp_path / "relay.log").start()
        try:
            records = consume(kafka_broker.bootstrap, kafka_topic, 20, timeout=60)

            def dead_letters() -> list[dict[str, object]]:
                out = subprocess.run([sys.executable, "-m", "relay", "dlq", "list", "--json",
                                      "--config", str(config)], capture_output=True, text=True)
                return list(json.loads(out.stdout or "[]"))

            letters = wait_for(dead_letters, timeout=30)
        finally:
            relay.stop()
    assert len(records) == 20
    assert [d["event_id"] for d in letters] == [f"rc:{big['msgUID']}"]
    assert "TooLarge" in str(letters[0]["error"])


def test_exactly_once_commits_each_batch_with_its_cursor(
        tmp_path: Path, kafka_broker: KafkaBroker, kafka_topic: str) -> None:
    """Transactions: read_committed sees every event once; the cursor record says where."""
    emulator = RongCloudEmulator("test-key", "test-secret", batch_size=50, budget=None, seed=31)
    keys = emulator.generate(1500)
    with serving(emulator) as (_loop, server):
        config = write_config(
            tmp_path,
            sources={"rc": rongcloud_source(server.urls, requests_per_second=100)},
            sinks={"bus": kafka_sink(kafka_broker.bootstrap, kafka_topic, batch_size=200,
                                     exactly_once=True)},
        )
        relay = RelayProcess(config, tmp_path / "relay.log").start()
        try:
            records = consume(kafka_broker.bootstrap, kafka_topic, len(keys), timeout=60,
                              isolation_level="read_committed")
        finally:
            relay.stop()
    ids = [r.headers["id"].decode() for r in records]
    assert len(ids) == len(set(ids)) == len(keys)
    cursor = consume(kafka_broker.bootstrap, "im-relay.bus.cursor", 1, timeout=30,
                     done=lambda got: bool(got), isolation_level="read_committed")
    assert cursor
    assert {(r.key, r.partition) for r in cursor} == {(b"bus", 0)}
    last = orjson.loads(cursor[-1].value)
    assert last["seq"] >= len(keys)
    assert last["journal"]


async def _take_over(bootstrap: str, transactional_id: str) -> None:
    """What a second relay (or a new lease holder) does first: claim the transactional id."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=transactional_id)
    await producer.start()
    await producer.stop()


def test_a_fenced_exactly_once_sink_stops_and_says_so(
        tmp_path: Path, kafka_broker: KafkaBroker, kafka_topic: str) -> None:
    emulator = RongCloudEmulator("test-key", "test-secret", batch_size=50, budget=None, seed=41)
    first = emulator.generate(300)
    port = refused_port()
    txn = f"{kafka_topic}.txn"
    with serving(emulator) as (loop, server):
        config = write_config(
            tmp_path,
            sources={"rc": rongcloud_source(server.urls, requests_per_second=100)},
            sinks={"bus": kafka_sink(kafka_broker.bootstrap, kafka_topic, exactly_once=True,
                                     transactional_id=txn, cursor_topic=f"{kafka_topic}.c",
                                     retry_backoff="100ms", retry_backoff_max="200ms")},
            metrics={"enabled": True, "listen": f"127.0.0.1:{port}"},
        )
        relay = RelayProcess(config, tmp_path / "relay.log").start()
        try:
            assert len(consume(kafka_broker.bootstrap, kafka_topic, len(first), timeout=60,
                               isolation_level="read_committed")) == len(first)
            asyncio.run(_take_over(kafka_broker.bootstrap, txn))
            more = loop.call(lambda: emulator.generate(100))
            wait_for(lambda: any("sink fenced" in r.get("event", "")
                                 for r in relay.log_records()), timeout=60)
            ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
            stats = httpx.get(f"http://127.0.0.1:{port}/stats", timeout=5).json()
            sink_up = metric(port, "relay_sink_up", sink="bus")
            attempts_at_fence = metric(port, "relay_sink_attempts_total", sink="bus")
            # Polling goes on: the journal takes what the fenced sink no longer delivers,
            # and the sink does not try again (retrying blindly would fence-fight).
            more += loop.call(lambda: emulator.generate(100))
            wait_for(lambda: not any(emulator.snapshot()["queued"].values()), timeout=30)
            attempts_later = metric(port, "relay_sink_attempts_total", sink="bus")
            assert relay.running()
        finally:
            relay.stop()
    assert ready.status_code == 503
    assert ready.json()["checks"]["sink bus"].startswith("fenced")
    assert next(s for s in stats["sinks"] if s["sink"] == "bus")["state"] == "fenced"
    assert sink_up == 0
    errors = [r for r in relay.log_records() if "sink fenced" in r.get("event", "")]
    assert len(errors) == 1
    assert errors[0]["level"] == "error"
    assert attempts_later == attempts_at_fence
    assert "never retrieved" not in relay.log_text()
    records = consume(kafka_broker.bootstrap, kafka_topic, len(first) + len(more), timeout=10,
                      isolation_level="read_committed")
    assert len(records) == len(first), "the fenced relay wrote nothing more"
