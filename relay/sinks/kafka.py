"""Kafka sink (aiokafka): the relay's main downstream.

Idempotent producer with ``acks=all``; message key ``"{source}:{conversation}"``
(so each conversation stays on one partition, in order); value = the event's
JSON; headers ``id``, ``provider``, ``kind``, ``type`` always present (UTF-8,
empty allowed). The topic is fixed or a template over event fields
(``im.{provider}.{channel_type}``). A batch is delivered when every record in
it is acknowledged by the brokers; only then does the runner move the sink's
cursor. Any failure retries the whole batch (at-least-once: consumers dedup on
the ``id`` header), after the producer is rebuilt.

Exactly once (``exactly_once = true``): a transactional producer whose
``transactional_id`` is stable per sink (a newer producer with it, a second
relay or the sink's lease moved elsewhere, fences this one: it then delivers
nothing more and says so). One transaction per batch holds the batch's
records and the sink's cursor record (:mod:`.kafka_cursor`); on start the
cursor is read back (``read_committed``) and wins over the journal's when
ahead, so a consumer reading ``read_committed`` sees every event once. Any
error aborts the transaction; nothing is written outside one. Records the
brokers refuse are set aside as dead letters (before the commit) and the rest
committed without them.

Topics that do not exist: a templated topic is chosen partly by senders (the
message ``type`` comes from the client), so an unknown one dead-letters only
its records, or is created where ``create_topics`` says so; a missing fixed
topic means the destination is wrong: the sink pauses and alerts. Neither
retries one batch for ever.
"""

from __future__ import annotations

import logging
import re
import secrets
import ssl
import time
from collections.abc import Sequence
from typing import Any

import anyio
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import (
    InvalidMessageError,
    InvalidProducerEpoch,
    InvalidTopicError,
    KafkaError,
    MessageSizeTooLargeError,
    ProducerFenced,
    RecordTooLargeError,
    TopicAlreadyExistsError,
    TransactionalIdAuthorizationFailed,
    UnknownTopicOrPartitionError,
    for_code,
)

from relay.checks import CheckResult
from relay.journal import Routing, StoredEvent
from relay.logs import get_logger
from relay.sinks.base import (
    Advance,
    DeliveryResult,
    RetryableError,
    SinkError,
    SinkFencedError,
    SinkPausedError,
    SinkPosition,
)
from relay.sinks.kafka_config import TOPIC_FIELDS, TOPIC_PLACEHOLDER, TOPIC_UNSAFE, KafkaSinkConfig
from relay.sinks.kafka_cursor import CursorRecord, ensure_cursor_topic, new_topic, read_cursor

log = get_logger("relay.sink.kafka")

# The record itself is unacceptable: retrying cannot help, the event is dead-lettered.
RECORD_ERRORS = (MessageSizeTooLargeError, RecordTooLargeError, InvalidMessageError,
                 InvalidTopicError)
# A newer producer with the same transactional id (or the coordinator's abort of a
# transaction older than its timeout, told apart by the transaction's age).
FENCED_ERRORS = (ProducerFenced, InvalidProducerEpoch)

def transactional_id_of(name: str, config: KafkaSinkConfig) -> str:
    """Stable per sink: a new holder of the sink (restart, lease) fences the old one."""
    return config.transactional_id or f"{config.client_id}.{name}"


def cursor_topic_of(name: str, config: KafkaSinkConfig) -> str:
    return config.cursor_topic or TOPIC_UNSAFE.sub("_", f"{config.client_id}.{name}.cursor")


def topic_for(template: str, routing: Routing) -> str:
    if "{" not in template:
        return template

    def field(match: re.Match[str]) -> str:
        value = getattr(routing, TOPIC_FIELDS[match.group(1)])
        return TOPIC_UNSAFE.sub("_", value) or "_"

    return TOPIC_PLACEHOLDER.sub(field, template)


def kafka_record(event: StoredEvent) -> tuple[bytes, list[tuple[str, bytes]], Routing]:
    """Key, headers and routing of one event."""
    r = event.routing()
    key = f"{r.source}:{r.conversation}".encode()
    headers = [("id", event.id.encode()), ("provider", r.provider.encode()),
               ("kind", r.kind.encode()), ("type", r.type.encode())]
    return key, headers, r


# How long a topic found missing stays known as missing before it is looked up again.
MISSING_TOPIC_TTL = 30.0


class _QuietLookups(logging.Filter):
    """While a topic is being looked up, aiokafka logs an ERROR for it every 100 ms; the sink
    reports the outcome itself, once."""

    def __init__(self) -> None:
        super().__init__()
        self.looking_up: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.looking_up or "not found in cluster metadata" not in record.msg:
            return True
        return not any(topic in record.getMessage() for topic in self.looking_up)


_QUIET = _QuietLookups()
logging.getLogger("aiokafka.cluster").addFilter(_QUIET)


class KafkaSink:
    def __init__(self, name: str, config: KafkaSinkConfig) -> None:
        self.name = name
        self.config = config
        #: With exactly_once the cursor record rides in each batch's transaction.
        self.commits_position = config.exactly_once
        self.transactional_id = transactional_id_of(name, config)
        self.cursor_topic = cursor_topic_of(name, config)
        self._producer: Any = None
        self._cursor_ready = False
        self._fenced: str | None = None
        # A commit whose outcome is unknown (the producer failed inside it): its token,
        # checked against the cursor record before the batch goes again.
        self._uncertain: str | None = None
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

    def _new_producer(self, *, transactional: bool = True) -> Any:
        c = self.config
        settings: dict[str, Any] = {}
        if c.exactly_once and transactional:
            settings = {"transactional_id": self.transactional_id,
                        "transaction_timeout_ms": int(c.transaction_timeout * 1000)}
        return AIOKafkaProducer(
            acks="all",
            enable_idempotence=True,
            **settings,
            compression_type=None if c.compression == "none" else c.compression,
            linger_ms=int(c.linger * 1000),
            max_batch_size=c.max_batch_bytes,
            max_request_size=c.max_request_bytes,
            **self._connection_settings(),
        )

    async def start(self) -> None:
        if self._fenced is not None:
            raise SinkFencedError(self._fenced)
        if self._producer is not None:
            return
        producer = self._new_producer()
        try:
            # Bounded: a transactional producer waits for its coordinator indefinitely.
            with anyio.fail_after(self.config.request_timeout * 2):
                # For exactly_once this also fences an older producer with the same
                # transactional id and ends its open transaction (aborted, or committed
                # if it was committing): after it, the cursor record is final.
                await producer.start()
        except TransactionalIdAuthorizationFailed:
            await _quiet_stop(producer, self.config.request_timeout)
            raise SinkPausedError(f"the brokers do not allow the transactional id"
                                  f" {self.transactional_id}: grant it, or set"
                                  " transactional_id") from None
        except (KafkaError, OSError, TimeoutError) as exc:
            await _quiet_stop(producer, self.config.request_timeout)
            raise SinkError(f"cannot connect to Kafka: {_describe(exc)}") from None
        self._producer = producer
        if self.config.exactly_once and not self._cursor_ready:
            try:
                await ensure_cursor_topic(
                    self._connection_settings(), self.cursor_topic,
                    replication=self.config.create_topic_replication,
                    timeout=self.config.request_timeout)
            except (KafkaError, OSError) as exc:
                await self._reset()
                raise SinkError(f"cannot look up the cursor topic {self.cursor_topic}:"
                                f" {_describe(exc)}") from None
            except SinkPausedError:
                await self._reset()
                raise
            self._cursor_ready = True

    async def position(self) -> SinkPosition | None:
        if not self.config.exactly_once:
            return None
        record = await self._read_cursor()
        if record is None:
            return None
        return SinkPosition(f"topic {self.cursor_topic}", seq=record.seq,
                            journal=record.journal)

    async def _read_cursor(self) -> CursorRecord | None:
        try:
            return await read_cursor(self._connection_settings(), self.cursor_topic, self.name,
                                     timeout=self.config.request_timeout * 2)
        except (KafkaError, OSError, TimeoutError) as exc:
            raise SinkError(f"cannot read the cursor topic {self.cursor_topic}:"
                            f" {_describe(exc)}") from None

    async def _reset(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await _quiet_stop(producer, self.config.request_timeout)

    async def deliver(self, events: Sequence[StoredEvent],
                      advance: Advance | None = None) -> DeliveryResult:
        if self._producer is None:
            try:
                await self.start()
            except (SinkFencedError, SinkPausedError):
                raise
            except SinkError as exc:
                raise RetryableError(str(exc)) from None
        if self.config.exactly_once:
            return await self._deliver_in_transaction(events, advance or Advance(None))
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

    async def _deliver_in_transaction(self, events: Sequence[StoredEvent],
                                      advance: Advance) -> DeliveryResult:
        """One transaction: the records and the cursor record, or (after any error) nothing."""
        if self._uncertain is not None and await self._committed_already():
            return DeliveryResult()
        template = self.config.topic
        records = [(event, *kafka_record(event)) for event in events]
        topics = [topic_for(template, routing) for _, _, _, routing in records]
        refused: dict[int, str] = {}
        try:
            with anyio.fail_after(self.config.request_timeout * 2):
                missing = await self._missing(set(topics))
        except (KafkaError, OSError, TimeoutError) as exc:
            await self._reset()
            raise RetryableError(f"Kafka metadata unavailable: {_describe(exc)}") from None
        if missing and not self._templated:
            raise SinkPausedError(
                f"topic {template} does not exist on the brokers (and create_topics is"
                " off): create it, or let the relay create it")
        for (event, *_), topic in zip(records, topics, strict=True):
            if topic in missing:
                refused[event.seq] = (f"unknown topic {topic}: the brokers do not create"
                                      " topics (set create_topics to let the relay create it)")
        # Each round either commits or sets aside at least one more refused record.
        while True:
            outcome = await self._transaction(records, topics, refused, advance)
            if outcome is None:
                return DeliveryResult(rejected=[(e, refused[e.seq]) for e in events
                                                if e.seq in refused])

    async def _transaction(self, records: list[tuple[StoredEvent, bytes, list[tuple[str, bytes]],
                                                     Routing]],
                           topics: list[str], refused: dict[int, str],
                           advance: Advance) -> str | None:
        """One try; None once committed, else why it was aborted (refused records found)."""
        producer = self._producer
        began = time.monotonic()
        token = secrets.token_hex(8)
        futures: list[tuple[StoredEvent, Any]] = []
        cursor_sent: Any = None
        try:
            with anyio.fail_after(self.config.request_timeout * 2):
                await producer.begin_transaction()
                for (event, key, headers, _), topic in zip(records, topics, strict=True):
                    if event.seq in refused:
                        continue
                    try:
                        future = await producer.send(topic, event.payload, key=key,
                                                     headers=headers)
                    except RECORD_ERRORS as exc:  # refused before it joined the transaction
                        refused[event.seq] = _describe(exc)
                        continue
                    futures.append((event, future))
                if advance.seq is not None:
                    cursor = CursorRecord(advance.seq, advance.journal or None, token)
                    cursor_sent = await producer.send(
                        self.cursor_topic, cursor.encode(self.name), key=self.name.encode(),
                        partition=0)
                    await cursor_sent
                newly_refused = False
                for event, future in futures:
                    try:
                        await future
                    except RECORD_ERRORS as exc:
                        refused[event.seq] = _describe(exc)
                        newly_refused = True
                if newly_refused:
                    # The brokers refused records inside the transaction: drop it and go
                    # again without them (a fresh producer: their sequence numbers are spent).
                    await self._abort(producer)
                    await self._reset()
                    await self.start()
                    return "refused records"
            # Not under the deadline: dead letters wait for the journal as long as it takes.
            refusals = [(e, refused[e.seq]) for e, *_ in records if e.seq in refused]
            if refusals and not await advance.settle(refusals):
                await self._abort(producer)
                raise RetryableError("stopping before the dead letters were kept")
            with anyio.fail_after(self.config.request_timeout * 2):
                self._uncertain = token
                await producer.commit_transaction()
                self._uncertain = None
            return None
        except FENCED_ERRORS as exc:
            _consume([*futures, (None, cursor_sent)])
            if time.monotonic() - began < self.config.transaction_timeout * 0.9:
                await self._fence(exc)
            await self._reset()
            raise RetryableError(f"the transaction outlived transaction_timeout and was"
                                 f" aborted by the brokers: {_describe(exc)}") from None
        except (KafkaError, OSError, TimeoutError, AssertionError) as exc:
            # AssertionError: aiokafka's transaction state machine refusing a step on a
            # producer that failed underneath; a fresh producer starts clean.
            _consume([*futures, (None, cursor_sent)])
            if self._uncertain is None:
                await self._abort(producer)
            await self._reset()
            raise RetryableError(f"Kafka transaction aborted: {_describe(exc)}") from None

    async def _abort(self, producer: Any) -> None:
        """Best effort: a transaction left open is aborted by the next producer's start."""
        try:
            with anyio.move_on_after(self.config.request_timeout):
                await producer.abort_transaction()
        except (KafkaError, OSError, AssertionError) as exc:
            log.debug("abort failed; the next producer aborts it", error=_describe(exc))

    async def _committed_already(self) -> bool:
        """After a commit whose outcome is unknown: did it land? (Read once the new
        producer's start has settled it.)"""
        token, self._uncertain = self._uncertain, None
        try:
            record = await self._read_cursor()
        except SinkError as exc:
            self._uncertain = token
            raise RetryableError(str(exc)) from None
        if record is not None and record.token == token:
            log.info("the last transaction did commit before the failure: not sent again",
                     sink=self.name, seq=record.seq)
            return True
        return False

    async def _fence(self, exc: BaseException) -> None:
        self._fenced = (f"fenced: a newer producer with transactional id"
                        f" {self.transactional_id} exists ({_describe(exc)})")
        await self._reset()
        raise SinkFencedError(self._fenced) from None

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
            _QUIET.looking_up.add(topic)
            try:
                with anyio.move_on_after(self.config.topic_wait):
                    try:
                        await producer.partitions_for(topic)
                        results[topic] = True
                        return
                    except UnknownTopicOrPartitionError:
                        pass
                results[topic] = False
            finally:
                _QUIET.looking_up.discard(topic)

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
        if missing and self._known_topics:
            # The look-up made the client track the missing topics; untracked, its metadata
            # refreshes stop logging an error for them every few seconds.
            producer.client.set_topics(sorted(self._known_topics))
        return missing

    async def _create(self, topics: set[str]) -> None:
        c = self.config
        admin = AIOKafkaAdminClient(**self._connection_settings())
        try:
            await admin.start()
            response = await admin.create_topics(
                [new_topic(t, c.create_topic_partitions, c.create_topic_replication)
                 for t in topics],
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
        """Connect and fetch metadata with a plain producer: never the transactional id,
        whose first use would fence a relay running with it, and no topic is created."""
        target = str(self.config.bootstrap_servers)
        producer = self._new_producer(transactional=False)
        try:
            with anyio.fail_after(self.config.request_timeout + 5):
                await producer.start()
        except (KafkaError, OSError, TimeoutError) as exc:
            return [CheckResult(f"sink {self.name}", target, False,
                                f"cannot connect to Kafka: {_describe(exc)}")]
        finally:
            await _quiet_stop(producer, self.config.request_timeout)
        return [CheckResult(f"sink {self.name}", target, True, "connected, metadata fetched")]


def _retrieve_failures(producer: Any) -> None:
    """Read the failures aiokafka leaves in futures nobody awaits once a producer is dropped
    (a failed transaction's waiter, its batches' drain waiters); else asyncio logs each as
    "exception was never retrieved"."""
    accumulator = getattr(producer, "_message_accumulator", None)
    batches = [*(b for queue in getattr(accumulator, "_batches", {}).values() for b in queue),
               *getattr(accumulator, "_pending_batches", ())]
    waiters = [getattr(getattr(producer, "_txn_manager", None), "_transaction_waiter", None),
               *(getattr(b, "_drain_waiter", None) for b in batches)]
    for waiter in waiters:
        if waiter is not None and waiter.done() and not waiter.cancelled():
            waiter.exception()


async def _quiet_stop(producer: Any, timeout: float = 30.0) -> None:
    _retrieve_failures(producer)
    try:
        with anyio.move_on_after(timeout):
            await producer.stop()
    except (KafkaError, OSError) as exc:
        log.debug("producer stop failed", error=_describe(exc))


def _consume(futures: list[tuple[Any, Any]]) -> None:
    """Cancel what is pending, read what failed: no "exception never retrieved" warnings."""
    for _, future in futures:
        if future is None:
            continue
        if not future.done():
            future.cancel()
        elif not future.cancelled():
            future.exception()


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
