"""Sinks, by ``type``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from pydantic import Field

from relay.sinks.base import Sink, SinkConfig
from relay.sinks.file import FileSink, FileSinkConfig
from relay.sinks.kafka import KafkaSink, KafkaSinkConfig
from relay.sinks.webhook import WebhookSink, WebhookSinkConfig

SinkConfigUnion = Annotated[FileSinkConfig | KafkaSinkConfig | WebhookSinkConfig,
                            Field(discriminator="type")]

SINKS: dict[str, Callable[[str, Any], Sink]] = {
    "file": FileSink,
    "kafka": KafkaSink,
    "webhook": WebhookSink,
}


def build_sink(name: str, config: Any) -> Sink:
    return SINKS[config.type](name, config)


__all__ = ["SINKS", "Sink", "SinkConfig", "SinkConfigUnion", "build_sink"]
