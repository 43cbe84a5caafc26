"""Kafka sink (aiokafka): the relay's main downstream.

Idempotent producer with ``acks=all``; message key ``"{source}:{conversation}"``
(so each conversation stays on one partition, in order); value = the event's
JSON; headers ``id``, ``provider``, ``kind``, ``type`` always present (UTF-8,
empty allowed). The topic is fixed or a template over event fields
(``im.{provider}.{channel_type}``). A batch is delivered when every record in
it is acknowledged by the brokers; only then does the runner move the sink's
cursor. Any failure retries the whole batch (at-least-once: consumers dedup on
the ``id`` header), after the producer is rebuilt.

Topics that do not exist: a templated topic is chosen partly by senders (the
message ``type`` comes from the client), so an unknown one dead-letters only
its records, or is created where ``create_topics`` says so; a missing fixed
topic means the destination is wrong: the sink pauses and alerts. Neither
retries one batch for ever.
"""

from __future__ import annotations

import re
import ssl
import time
from collections.abc import Sequence
from typing import Any, Literal

import anyio
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.codec import has_lz4, has_snappy, has_zstd
from aiokafka.errors import (
    InvalidMessageError,
    InvalidTopicError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordTooLargeError,
    TopicAlreadyExistsError,
    UnknownTopicOrPartitionError,
    for_code,
)
from pydantic import Field, SecretStr, field_validator, model_validator

from relay.checks import CheckResult
from relay.config_base import ByteSize, Duration
from relay.journal import Routing, StoredEvent
from relay.logs import get_logger
from relay.sinks.base import (
    DeliveryResult,
    RetryableError,
    SinkConfig,
    SinkError,
    SinkPausedError,
)

log = get_logger("relay.sink.kafka")

# The record itself is unacceptable: retrying cannot help, the event is dead-lettered.
RECORD_ERRORS = (MessageSizeTooLargeError, RecordTooLargeError, InvalidMessageError,
                 InvalidTopicError)

_PLACEHOLDER = re.compile(r"\{([a-z_.]+)\}")
_TOPIC_FIELDS = {
    "source": "source",
    "provider": "provider",
    "kind": "kind",
    "channel_type": "channel_type",
    "channel.type": "channel_type",
    "type": "type",
}
_TOPIC_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


class KafkaSinkConfig(SinkConfig):
    type: Literal["kafka"]
    bootstrap_servers: str | list[str]
    topic: str = "im.events"
    client_id: str = "im-relay"
    compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "lz4"
    linger: Duration = 0.005
    max_batch_bytes: ByteSize = 1024 * 1024
    max_request_bytes: ByteSize = 8 * 1024 * 1024
    request_timeout: Duration = 30.0
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_check_hostname: bool = True
    batch_size: int = Field(default=2000, ge=1, le=100_000)
    # Topics the broker does not know: create them (with these settings; -1 = the broker's
    # defaults) instead of dead-lettering their records (templated) or pausing (fixed).
    create_topics: bool = False
    create_topic_partitions: int = Field(default=-1, ge=-1)
    create_topic_replication: int = Field(default=-1, ge=-1)
    # How long to wait for a broker that creates topics on first use to show a new one.
    topic_wait: Duration = Field(default=5.0, gt=0)

    @field_validator("topic")
    @classmethod
    def _topic(cls, topic: str) -> str:
        for name in _PLACEHOLDER.findall(topic):
            if name not in _TOPIC_FIELDS:
                raise ValueError(f"unknown placeholder {{{name}}} (known: "
                                 f"{', '.join(sorted(_TOPIC_FIELDS))})")
        if _TOPIC_UNSAFE.search(_PLACEHOLDER.sub("x", topic)):
            raise ValueError("a topic may hold only letters, digits, '.', '_' and '-'")
        return topic

    @field_validator("compression")
    @classmethod
    def _codec(cls, codec: str) -> str:
        available = {"snappy": has_snappy, "lz4": has_lz4, "zstd": has_zstd}
        if codec in available and not available[codec]():
            raise ValueError(f"{codec} needs the cramjam package")
        return codec

    @model_validator(mode="after")
    def _sasl(self) -> KafkaSinkConfig:
        if self.security_protocol.startswith("SASL"):
            if self.sasl_mechanism is None:
                raise ValueError("sasl_mechanism: required with a SASL security_protocol")
            if not self.sasl_username or self.sasl_password is None:
                raise ValueError("sasl_username: SASL needs sasl_username and sasl_password")
        return self


def topic_for(template: str, routing: Routing) -> str:
    if "{" not in template:
        return template

    def field(match: re.Match[str]) -> str:
        value = getattr(routing, _TOPIC_FIELDS[match.group(1)])
        return _TOPIC_UNSAFE.sub("_", value) or "_"

    return _PLACEHOLDER.sub(field, template)


def kafka_record(event: StoredEvent) -> tuple[bytes, list[tuple[str, bytes]], Routing]:
    """Key, headers and routing of one event."""
    r = event.routing()
    key = f"{r.source}:{r.conversation}".encode()
    headers = [("id", event.id.encode()), ("provider", r.provider.encode()),
               ("kind", r.kind.encode()), ("type", r.type.encode())]
    return key, headers, r


# How long a topic found missing stays known as missing before it is looked up again.
MISSING_TOPIC_TTL = 30.0


class KafkaSink:
    def __init__(self, name: str, config: KafkaSinkConfig) -> None:
        self.name = name
        self.config = config
        self._producer: Any = None
        self._templated = "{" in config.topic
        self._known_topics: set[str] = set()
        self._missing_topics: dict[str, float] = {}  # topic → when it was found missing

    def _ssl_context(self) -> ssl.SSLContext | None:
        c = self.config
        if c.security_protocol not in ("SSL", "SASL_SSL"):
            return None
        context = ssl.create_default_context(cafile=c.ssl_cafile)
        context.check_hostname = c.ssl_check_hostname
        if c.ssl_certfile:
            context.load_cert_chain(c.ssl_certfile, c.ssl_keyfile)
        return context

    def _connection_settings(self) -> dict[str, Any]:
        c = self.config
        return {
            "bootstrap_servers": c.bootstrap_servers,
            "client_id": c.client_id,
            "request_timeout_ms": int(c.request_timeout * 1000),
            "security_protocol": c.security_protocol,
            "ssl_context": self._ssl_context(),
            "sasl_mechanism": c.sasl_mechanism or "PLAIN",
            "sasl_plain_username": c.sasl_username,
            "sasl_plain_password": (c.sasl_password.get_secret_value()
                                    if c.sasl_password is not None else None),
        }

    def _new_producer(self) -> Any:
        c = self.config
        return AIOKafkaProducer(
            acks="all",
            enable_idempotence=True,
            compression_type=None if c.compression == "none" else c.compression,
            linger_ms=int(c.linger * 1000),
            max_batch_size=c.max_batch_bytes,
            max_request_size=c.max_request_bytes,
            **self._connection_settings(),
        )

    async def start(self) -> None:
        if self._producer is not None:
            return
        producer = self._new_producer()
        try:
            await producer.start()
        except (KafkaError, OSError) as exc:
            await _quiet_stop(producer)
            raise SinkError(f"cannot connect to Kafka: {_describe(exc)}") from None
        self._producer = producer

    async def _reset(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await _quiet_stop(producer)

    async def deliver(self, events: Sequence[StoredEvent]) -> DeliveryResult:
        if self._producer is None:
            try:
                await self.start()
            except SinkError as exc:
                raise RetryableError(str(exc)) from None
        producer = self._producer
        template = self.config.topic
        futures = []
        result = DeliveryResult()
        records = [(event, *kafka_record(event)) for event in events]
        topics = [topic_for(template, routing) for _, _, _, routing in records]
        try:
            # Bounded: with the brokers gone, aiokafka can wait for metadata indefinitely.
            with anyio.fail_after(self.config.request_timeout * 2):
                missing = await self._missing(set(topics))
                if missing and not self._templated:
                    raise SinkPausedError(
                        f"topic {template} does not exist on the brokers (and create_topics is"
                        " off): create it, or let the relay create it")
                for (event, key, headers, _), topic in zip(records, topics, strict=True):
                    if topic in missing:
                        result.rejected.append((event, f"unknown topic {topic}: the brokers do not"
                                                " create topics (set create_topics to let the"
                                                " relay create it)"))
                        continue
                    try:
                        future = await producer.send(topic, event.payload, key=key,
                                                     headers=headers)
                    except RECORD_ERRORS as exc:
                        result.rejected.append((event, _describe(exc)))
                        continue
                    futures.append((event, future))
                for event, future in futures:
                    try:
                        await future
                    except RECORD_ERRORS as exc:
                        result.rejected.append((event, _describe(exc)))
        except (KafkaError, OSError, TimeoutError) as exc:
            futures_only = [f for _, f in futures]
            for future in futures_only:
                if not future.done():
                    future.cancel()
                elif not future.cancelled():
                    future.exception()  # consumed: no "never retrieved" warnings
            await self._reset()
            raise RetryableError(f"Kafka did not acknowledge the batch: {_describe(exc)}") \
                from None
        return result

    async def _missing(self, topics: set[str]) -> set[str]:
        """The topics of a batch that do not exist (after creating them where configured)."""
        producer = self._producer
        known = producer.client.cluster.topics()
        now = time.monotonic()
        unsure = {t for t in topics if t not in self._known_topics and t not in known
                  and now - self._missing_topics.get(t, -MISSING_TOPIC_TTL) >= MISSING_TOPIC_TTL}
        missing = {t for t in topics if t in self._missing_topics
                   and now - self._missing_topics[t] < MISSING_TOPIC_TTL}
        if not unsure:
            self._known_topics |= topics - missing
            return missing
        if self.config.create_topics:
            await self._create(unsure)
        results: dict[str, bool] = {}

        async def look_up(topic: str) -> None:
            # A broker that creates topics on first use shows them here within topic_wait.
            with anyio.move_on_after(self.config.topic_wait):
                try:
                    await producer.partitions_for(topic)
                    results[topic] = True
                    return
                except UnknownTopicOrPartitionError:
                    pass
            results[topic] = False

        async with anyio.create_task_group() as tg:
            for topic in unsure:
                tg.start_soon(look_up, topic)
        for topic, exists in results.items():
            if exists:
                self._known_topics.add(topic)
                self._missing_topics.pop(topic, None)
            else:
                self._missing_topics[topic] = now
                missing.add(topic)
                log.error("Kafka topic does not exist: its records go to dead letters"
                          if self._templated else "Kafka topic does not exist: sink paused",
                          sink=self.name, topic=topic)
        self._known_topics |= topics - missing - unsure
        return missing

    async def _create(self, topics: set[str]) -> None:
        c = self.config
        admin = AIOKafkaAdminClient(**self._connection_settings())
        try:
            await admin.start()
            response = await admin.create_topics(
                [NewTopic(name=t, num_partitions=c.create_topic_partitions,
                          replication_factor=c.create_topic_replication) for t in topics],
                timeout_ms=int(c.request_timeout * 1000))
            for entry in response.topic_errors:
                name, code = entry[0], int(entry[1])
                if code in (0, TopicAlreadyExistsError.errno):
                    log.info("Kafka topic created", sink=self.name, topic=name)
                else:
                    log.error("cannot create Kafka topic", sink=self.name, topic=name,
                              error=for_code(code).__name__)
        finally:
            await admin.close()

    async def close(self) -> None:
        await self._reset()

    async def check(self) -> list[CheckResult]:
        target = str(self.config.bootstrap_servers)
        try:
            with anyio.fail_after(self.config.request_timeout + 5):
                await self.start()
        except (SinkError, TimeoutError) as exc:
            return [CheckResult(f"sink {self.name}", target, False, str(exc) or "timed out")]
        finally:
            await self._reset()
        return [CheckResult(f"sink {self.name}", target, True, "connected, metadata fetched")]


async def _quiet_stop(producer: Any) -> None:
    try:
        await producer.stop()
    except (KafkaError, OSError) as exc:
        log.debug("producer stop failed", error=_describe(exc))


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
