"""Logging setup: structlog, JSON lines when stderr is not a terminal.

Secrets are registered here once the configuration is loaded; a processor
replaces any occurrence of them in a log event, so even an exception text
that happens to quote a secret never reaches the log.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any, Literal

import orjson

# structlog's development renderer imports rich, if installed (it is, for `relay top`),
# to format exceptions: 30-50 ms of every command's start-up, for nothing: exceptions
# are formatted (and redacted) before any renderer sees them (configure_logging). So
# structlog is imported with rich marked absent; a later `import rich` is unaffected.
_RICH_LOADED = "rich" in sys.modules
if not _RICH_LOADED:
    sys.modules["rich"] = None  # type: ignore[assignment]
try:
    import structlog
finally:
    if not _RICH_LOADED:
        del sys.modules["rich"]

LogFormat = Literal["auto", "json", "console"]

_secrets: set[str] = set()
REDACTED = "***"


def register_secrets(values: Iterable[str]) -> None:
    """Values that must never appear in a log line (shorter than 4 chars are ignored)."""
    _secrets.update(v for v in values if len(v) >= 4)


def redact(text: str) -> str:
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, BaseException):
        return redact(f"{type(value).__name__}: {value}")
    if isinstance(value, dict):
        return {k: _redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value(v) for v in value]
    return value


def _redact_processor(
    _logger: Any, _name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    if _secrets:
        for key, value in event_dict.items():
            event_dict[key] = _redact_value(value)
    return event_dict


def _orjson_dumps(obj: Any, default: Any = None) -> str:
    return orjson.dumps(obj, default=default or str).decode()


def configure_logging(level: str = "info", fmt: LogFormat = "auto") -> None:
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        _redact_processor,
    ]
    if use_json:
        processors.append(structlog.processors.JSONRenderer(serializer=_orjson_dumps))
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # Libraries (aiokafka, aiohttp) log through the standard library: keep them
    # quiet unless asked, and route them to the same stream.
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=sys.stderr, force=True)


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
