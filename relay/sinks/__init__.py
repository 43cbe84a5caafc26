"""Sinks, by ``type``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from relay.sinks.base import Sink, SinkConfig
from relay.sinks.file import FileSink, FileSinkConfig

SinkConfigUnion = FileSinkConfig

SINKS: dict[str, Callable[[str, Any], Sink]] = {
    "file": FileSink,
}


def build_sink(name: str, config: Any) -> Sink:
    return SINKS[config.type](name, config)


__all__ = ["SINKS", "Sink", "SinkConfig", "SinkConfigUnion", "build_sink"]
