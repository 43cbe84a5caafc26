"""Sinks, by ``type``.

A sink's module (and its client library) is imported only when a sink of that type
is built: a relay without a Kafka sink never loads aiokafka. Every type's settings
are always known (:data:`SinkConfigUnion`), from modules free of client libraries.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from pydantic import Field

from relay.sinks.base import Sink, SinkConfig
from relay.sinks.file import FileSink, FileSinkConfig
from relay.sinks.kafka_config import KafkaSinkConfig
from relay.sinks.webhook import WebhookSink, WebhookSinkConfig

SinkConfigUnion = Annotated[FileSinkConfig | KafkaSinkConfig | WebhookSinkConfig,
                            Field(discriminator="type")]


def _kafka_sink(name: str, config: Any) -> Sink:
    from relay.sinks.kafka import KafkaSink

    return KafkaSink(name, config)


SINKS: dict[str, Callable[[str, Any], Sink]] = {
    "file": FileSink,
    "kafka": _kafka_sink,
    "webhook": WebhookSink,
}


def build_sink(name: str, config: Any) -> Sink:
    return SINKS[config.type](name, config)


__all__ = ["SINKS", "Sink", "SinkConfig", "SinkConfigUnion", "build_sink"]
