"""Proves the real-Kafka test harness (tests/support/kafka_broker.py).

Needs the fixtures from ``tests.support.kafka_fixtures`` (registered by
``tests/conftest.py``).  No sleeps: every wait polls with a deadline.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Iterable
from typing import Any

import anyio
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaConnectionError

from tests.support.kafka_broker import SASL_MECHANISMS, KafkaBroker

pytestmark = pytest.mark.kafka


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _sasl_config(
    broker: KafkaBroker, mechanism: str, password: str | None = None
) -> dict[str, Any]:
    return {
        "bootstrap_servers": broker.sasl_bootstrap,
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": mechanism,
        "sasl_plain_username": broker.sasl_username,
        "sasl_plain_password": broker.sasl_password if password is None else password,
    }


async def _produce(
    client_config: dict[str, Any], topic: str, values: Iterable[bytes], *, keyed: bool = True
) -> list[Any]:
    """Idempotent, acks=all producer; returns the RecordMetadata of every send."""
    producer = AIOKafkaProducer(**client_config, enable_idempotence=True, acks="all")
    try:
        await producer.start()
        futures = []
        for index, value in enumerate(values):
            key = f"key-{index % 10}".encode() if keyed else None
            futures.append(await producer.send(topic, value=value, key=key))
        return [await future for future in futures]
    finally:
        await producer.stop()


async def _consume(consumer: AIOKafkaConsumer, expected: int, within: float = 60.0) -> list[Any]:
    """Poll *consumer* until *expected* records arrived or *within* seconds passed."""
    records: list[Any] = []
    with anyio.move_on_after(within):
        while len(records) < expected:
            batches = await consumer.getmany(timeout_ms=500)
            for batch in batches.values():
                records.extend(batch)
    assert len(records) == expected, f"got {len(records)} of {expected} records in {within}s"
    return records


async def _read_back(
    client_config: dict[str, Any], topic: str, partitions: int, expected: int
) -> tuple[list[Any], int]:
    """Read *expected* records from the start of every partition (no group);
    returns them and the sum of the partitions' end offsets."""
    consumer = AIOKafkaConsumer(**client_config, enable_auto_commit=False)
    try:
        await consumer.start()
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        records = await _consume(consumer, expected)
        end_offsets = await consumer.end_offsets(tps)
    finally:
        await consumer.stop()
    return records, sum(end_offsets.values())


def _failed_authentications(broker: KafkaBroker) -> list[str]:
    text = broker.log_file.read_text(encoding="utf-8", errors="replace")
    return re.findall(r"Failed authentication with /127\.0\.0\.1 .*", text)


async def _eventually(predicate: Callable[[], bool], within: float = 20.0) -> bool:
    """Poll *predicate* until it holds or *within* seconds passed."""
    with anyio.move_on_after(within):
        while True:
            if predicate():
                return True
            await anyio.sleep(0.05)  # poll interval
    return predicate()


# -- the broker -------------------------------------------------------------


def test_broker_logs_through_log4j(kafka_broker: KafkaBroker) -> None:
    assert kafka_broker.is_running
    assert kafka_broker.startup_seconds is not None
    assert kafka_broker.bootstrap.startswith("127.0.0.1:")
    assert kafka_broker.sasl_bootstrap.startswith("127.0.0.1:")
    log = kafka_broker.log_file.read_text(encoding="utf-8", errors="replace")
    assert "Kafka Server started" in log, kafka_broker.log_tail(30)
    assert "auto.create.topics.enable = true" in log
    assert kafka_broker.log_tail(5).count("\n") <= 4


# -- PLAINTEXT ---------------------------------------------------------------


@pytest.mark.anyio
async def test_plaintext_idempotent_produce_and_group_consume_100(
    kafka_broker: KafkaBroker, kafka_topic: str
) -> None:
    config = {"bootstrap_servers": kafka_broker.bootstrap}
    values = [f"message-{i:03d}".encode() for i in range(100)]
    metadata = await _produce(config, kafka_topic, values)
    assert len(metadata) == 100
    assert {m.partition for m in metadata} <= {0, 1, 2}
    assert len({m.partition for m in metadata}) > 1  # 10 keys spread over 3 partitions

    consumer = AIOKafkaConsumer(
        kafka_topic,
        bootstrap_servers=kafka_broker.bootstrap,
        group_id=f"group-{kafka_topic}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    try:
        await consumer.start()
        records = await _consume(consumer, 100)
        await consumer.commit()
        tps = [TopicPartition(kafka_topic, p) for p in range(3)]
        end_offsets = await consumer.end_offsets(tps)
        committed = {tp: await consumer.committed(tp) for tp in tps}
    finally:
        await consumer.stop()

    assert sorted(r.value for r in records) == values
    # Exactly 100 records in the log: the idempotent producer wrote no duplicate.
    assert sum(end_offsets.values()) == 100
    assert committed == end_offsets
    # Per-key order is preserved.
    by_key: dict[bytes, list[bytes]] = {}
    for record in records:
        by_key.setdefault(record.key, []).append(record.value)
    for key_values in by_key.values():
        assert key_values == sorted(key_values)


@pytest.mark.anyio
async def test_topics_are_auto_created(kafka_broker: KafkaBroker, kafka_topic: str) -> None:
    topic = f"{kafka_topic}-auto"
    config = {"bootstrap_servers": kafka_broker.bootstrap}
    metadata = await _produce(config, topic, [b"x", b"y", b"z"], keyed=False)
    assert {m.topic for m in metadata} == {topic}
    records, end_total = await _read_back(config, topic, kafka_broker.num_partitions, 3)
    assert sorted(r.value for r in records) == [b"x", b"y", b"z"]
    assert end_total == 3


# -- SASL_PLAINTEXT ----------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("mechanism", SASL_MECHANISMS)
async def test_sasl_produce_and_consume(
    kafka_broker: KafkaBroker, kafka_topic: str, mechanism: str
) -> None:
    config = _sasl_config(kafka_broker, mechanism)
    values = [f"{mechanism}-{i}".encode() for i in range(20)]
    metadata = await _produce(config, kafka_topic, values)
    assert len(metadata) == 20
    records, end_total = await _read_back(config, kafka_topic, 3, 20)
    assert sorted(r.value for r in records) == sorted(values)
    assert end_total == 20


@pytest.mark.anyio
@pytest.mark.parametrize("mechanism", SASL_MECHANISMS)
async def test_sasl_wrong_password_is_refused(
    kafka_broker: KafkaBroker, mechanism: str, caplog: pytest.LogCaptureFixture
) -> None:
    failures_before = len(_failed_authentications(kafka_broker))
    config = _sasl_config(kafka_broker, mechanism, password=kafka_broker.sasl_password + "-wrong")
    producer = AIOKafkaProducer(**config, request_timeout_ms=10_000)
    try:
        # aiokafka reports the refusal as a failed bootstrap ...
        with pytest.raises(KafkaConnectionError):
            await producer.start()
    finally:
        await producer.stop()
    # ... and logs the broker's SaslAuthenticate error (code 58).
    assert "SaslAuthenticationFailed" in caplog.text
    # The broker itself logged the failed authentication for this mechanism.
    assert await _eventually(
        lambda: len(_failed_authentications(kafka_broker)) > failures_before
    ), kafka_broker.log_tail(20)
    newest = _failed_authentications(kafka_broker)[-1]
    expected = "Invalid username or password" if mechanism == "PLAIN" else mechanism
    assert expected in newest


# -- stop / restart ----------------------------------------------------------


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@pytest.mark.anyio
async def test_stop_and_restart_keep_data(kafka_broker: KafkaBroker, tmp_path: Any) -> None:
    # A broker of its own: stopping the session broker would disturb other tests.
    broker = KafkaBroker(version=kafka_broker.version, work_dir=tmp_path / "broker")
    try:
        await anyio.to_thread.run_sync(broker.start)
        bootstrap, sasl_bootstrap = broker.bootstrap, broker.sasl_bootstrap
        topic = "restart-keeps-data"
        await broker.acreate_topic(topic, 2)
        plain = {"bootstrap_servers": bootstrap}
        before = [f"before-{i}".encode() for i in range(30)]
        await _produce(plain, topic, before)

        # Orderly stop ... the listeners are gone ... start on the same ports.
        exit_code = await anyio.to_thread.run_sync(broker.stop)
        assert exit_code in (0, 143), broker.log_tail(20)  # 143: JVM exit after SIGTERM
        assert broker.last_stop_forced is False
        assert not broker.is_running
        assert not _accepts(broker.port)
        await anyio.to_thread.run_sync(broker.start)
        assert (broker.bootstrap, broker.sasl_bootstrap) == (bootstrap, sasl_bootstrap)
        records, end_total = await _read_back(plain, topic, 2, 30)
        assert sorted(r.value for r in records) == sorted(before)
        assert end_total == 30

        # SCRAM users survive too (they live in the cluster metadata log).
        scram = _sasl_config(broker, "SCRAM-SHA-512")
        await _produce(scram, topic, [b"after-restart"])

        # A crash (SIGKILL) followed by restart() recovers the log as well.
        await anyio.to_thread.run_sync(broker.kill)
        assert not broker.is_running
        await anyio.to_thread.run_sync(broker.restart)
        records, end_total = await _read_back(plain, topic, 2, 31)
        assert sorted(r.value for r in records) == sorted([*before, b"after-restart"])
        assert end_total == 31
    finally:
        await anyio.to_thread.run_sync(broker.close)
    assert not broker.is_running
