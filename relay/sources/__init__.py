"""Provider sources, by ``type``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from relay.sources.base import CheckResult, Source, SourceHealth, SourceRuntime
from relay.sources.rongcloud import RongCloudSource, RongCloudSourceConfig

SourceConfig = RongCloudSourceConfig

SOURCES: dict[str, Callable[[str, Any], Source]] = {
    "rongcloud": RongCloudSource,
}


def build_source(name: str, config: Any) -> Source:
    return SOURCES[config.type](name, config)


__all__ = [
    "SOURCES",
    "CheckResult",
    "Source",
    "SourceConfig",
    "SourceHealth",
    "SourceRuntime",
    "build_source",
]
