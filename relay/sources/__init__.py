"""Provider sources, by ``type``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from pydantic import Field

from relay.checks import CheckResult
from relay.sources.base import Source, SourceHealth, SourceRuntime
from relay.sources.leancloud import LeanCloudSource, LeanCloudSourceConfig
from relay.sources.rongcloud import RongCloudSource, RongCloudSourceConfig
from relay.sources.wukongim import WuKongIMSource, WuKongIMSourceConfig

SourceConfig = Annotated[
    RongCloudSourceConfig | WuKongIMSourceConfig | LeanCloudSourceConfig,
    Field(discriminator="type"),
]

SOURCES: dict[str, Callable[[str, Any], Source]] = {
    "rongcloud": RongCloudSource,
    "wukongim": WuKongIMSource,
    "leancloud": LeanCloudSource,
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
