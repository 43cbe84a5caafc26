"""Reading a topic back from the real broker, for tests and benchmarks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition


@dataclass
class Record:
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: dict[str, bytes]
    timestamp_ms: int


async def _consume(bootstrap: str, topic: str, expected: int, timeout: float,
                   done: Callable[[list[Record]], bool] | None = None,
                   **client: Any) -> list[Record]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest", **client)
    await consumer.start()
    records: list[Record] = []
    try:
        deadline = time.monotonic() + timeout
        partitions: set[int] | None = None
        while partitions is None and time.monotonic() < deadline:
            partitions = consumer.partitions_for_topic(topic)
            if partitions is None:
                await consumer._client.force_metadata_update()
                await asyncio.sleep(0.1)
        if partitions is None:
            return records
        assigned = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(assigned)
        await consumer.seek_to_beginning(*assigned)
        while len(records) < expected and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500, max_records=5000)
            if not batch and done is not None and done(records):
                break
            for tp_records in batch.values():
                for m in tp_records:
                    records.append(Record(m.partition, m.offset, m.key, m.value,
                                          dict(m.headers), m.timestamp))
    finally:
        await consumer.stop()
    return records


def consume(bootstrap: str, topic: str, expected: int, timeout: float = 60.0,
            done: Callable[[list[Record]], bool] | None = None, **client: Any) -> list[Record]:
    """Everything on ``topic`` (all partitions, from the start) until ``expected`` records,
    or until ``done(records)`` holds once the topic has nothing more to give, or timeout."""
    return asyncio.run(_consume(bootstrap, topic, expected, timeout, done, **client))
