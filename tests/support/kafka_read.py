"""Reading a topic back from the real broker, for tests and benchmarks."""

from __future__ import annotations

import asyncio
import os
import signal
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


async def _transaction_open(committed: AIOKafkaConsumer, everything: AIOKafkaConsumer,
                            partitions: list[TopicPartition]) -> bool:
    """Records past the last stable offset: a transaction wrote them and has not ended."""
    stable = await committed.end_offsets(partitions)
    high = await everything.end_offsets(partitions)
    return any(high[tp] > stable[tp] for tp in partitions)


async def _freeze_in_transaction(bootstrap: str, topic: str, pid: int, timeout: float) -> bool:
    committed = AIOKafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_committed")
    everything = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await committed.start()
    await everything.start()
    try:
        deadline = time.monotonic() + timeout
        found: set[int] | None = None
        while found is None and time.monotonic() < deadline:
            found = committed.partitions_for_topic(topic)
            if found is None:
                await committed._client.force_metadata_update()
                await asyncio.sleep(0.1)
        partitions = [TopicPartition(topic, p) for p in sorted(found or ())]
        while partitions and time.monotonic() < deadline:
            if await _transaction_open(committed, everything, partitions):
                os.kill(pid, signal.SIGSTOP)
                # A commit already on its way would finish meanwhile; one still open stays.
                await asyncio.sleep(0.5)
                if await _transaction_open(committed, everything, partitions):
                    return True
                os.kill(pid, signal.SIGCONT)
            await asyncio.sleep(0.002)
        return False
    finally:
        await committed.stop()
        await everything.stop()


def freeze_in_transaction(bootstrap: str, topic: str, pid: int, timeout: float = 30.0) -> bool:
    """Stop (SIGSTOP) the producing process while one of its transactions on ``topic`` is
    open with records written, so that the kill that follows leaves it to be aborted.
    False if no open transaction was caught within ``timeout`` (the process then runs)."""
    return asyncio.run(_freeze_in_transaction(bootstrap, topic, pid, timeout))
