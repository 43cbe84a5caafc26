"""The cursor record of an ``exactly_once`` Kafka sink, in a compacted topic it owns.

Each transaction of the sink holds its batch's events *and* one record on
partition 0 of this topic: key = the sink's name, value = JSON with the journal
seq the batch moves the cursor to, the journal's identity and the
transaction's token. Kafka commits both or neither, so the newest committed
record says exactly what the topic holds. At start it is read back with a
``read_committed`` consumer, from the end backwards in growing windows (the
topic is compacted, but compaction is lazy: a topic that takes one record per
batch may hold many).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import anyio
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError, for_code

from relay.logs import get_logger
from relay.sinks.base import SinkPausedError

log = get_logger("relay.sink.kafka")

#: Records read per step when looking back for the newest cursor record.
FIRST_WINDOW = 64


@dataclass(frozen=True, slots=True)
class CursorRecord:
    seq: int
    journal: int | None
    token: str

    def encode(self, sink: str) -> bytes:
        return orjson.dumps({"seq": self.seq, "journal": self.journal, "sink": sink,
                             "txn": self.token, "at": int(time.time() * 1000)})

    @classmethod
    def decode(cls, value: bytes | None) -> CursorRecord | None:
        try:
            data = orjson.loads(value or b"")
            journal = data.get("journal")
            return cls(int(data["seq"]), int(journal) if journal is not None else None,
                       str(data.get("txn", "")))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            return None


def new_topic(name: str, partitions: int, replication: int,
              configs: dict[str, str] | None = None) -> NewTopic:
    """A topic to create; -1 takes the brokers' default (aiokafka then wants an explicit,
    empty replica assignment, or it refuses the -1)."""
    assignments: dict[int, list[int]] | None = {} if -1 in (partitions, replication) else None
    return NewTopic(name=name, num_partitions=partitions, replication_factor=replication,
                    replica_assignments=assignments, topic_configs=configs or {})


async def ensure_cursor_topic(connection: dict[str, Any], topic: str, *, replication: int,
                              timeout: float) -> None:
    """Create the cursor topic (one partition, compacted) if the brokers do not have it.

    Created here rather than by a broker's auto-creation, which would make it neither
    compacted nor of one partition. A topic that cannot be created pauses the sink.
    """
    admin = AIOKafkaAdminClient(**connection)
    try:
        await admin.start()
        if topic in await admin.list_topics():
            return
        response = await admin.create_topics(
            [new_topic(topic, 1, replication, {"cleanup.policy": "compact"})],
            timeout_ms=int(timeout * 1000))
        for entry in response.topic_errors:
            code = int(entry[1])
            if code == 0:
                log.info("Kafka cursor topic created (compacted)", topic=topic)
            elif code != TopicAlreadyExistsError.errno:
                raise SinkPausedError(
                    f"cannot create the cursor topic {topic} ({for_code(code).__name__}):"
                    " create it (1 partition, cleanup.policy=compact) or allow the relay to")
    finally:
        await admin.close()


async def read_cursor(connection: dict[str, Any], topic: str, sink: str,
                      timeout: float) -> CursorRecord | None:
    """The newest committed cursor record of ``sink`` in ``topic``, or None if it has none."""
    consumer = AIOKafkaConsumer(isolation_level="read_committed", enable_auto_commit=False,
                                group_id=None, auto_offset_reset="earliest", **connection)
    tp = TopicPartition(topic, 0)
    key = sink.encode()
    try:
        with anyio.fail_after(timeout):
            await consumer.start()
            consumer.assign([tp])
            # With read_committed: the last stable offset, past every finished transaction.
            end = (await consumer.end_offsets([tp]))[tp]
            window = FIRST_WINDOW
            stop = end
            while stop > 0:
                start = max(0, stop - window)
                consumer.seek(tp, start)
                found: CursorRecord | None = None
                while await consumer.position(tp) < stop:
                    batch = await consumer.getmany(tp, timeout_ms=1000)
                    for message in batch.get(tp, []):
                        if message.offset < stop and message.key == key:
                            found = CursorRecord.decode(message.value) or found
                if found is not None:
                    return found
                stop, window = start, window * 8
            return None
    except KafkaError as exc:
        raise KafkaError(f"cannot read the cursor topic {topic}: {exc}") from exc
    finally:
        with anyio.move_on_after(5, shield=True):
            await consumer.stop()
