"""Writing relay configurations for tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(type(value))


def render(config: dict[str, Any]) -> str:
    """A small TOML writer: top-level scalars, tables and one level of named tables."""
    lines: list[str] = []
    for key, value in config.items():
        if not isinstance(value, dict):
            lines.append(f"{key} = {_toml_value(value)}")
    for key, value in config.items():
        if not isinstance(value, dict):
            continue
        if key in ("sources", "sinks"):
            for name, table in value.items():
                lines.append(f"\n[{key}.{name}]")
                lines.extend(f"{k} = {_toml_value(v)}" for k, v in table.items())
        else:
            lines.append(f"\n[{key}]")
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in value.items())
    return "\n".join(lines) + "\n"


def write_config(directory: Path, *, sources: dict[str, Any], sinks: dict[str, Any],
                 **top: Any) -> Path:
    config: dict[str, Any] = {
        "shutdown_grace": "15s",
        "journal": {"path": str(directory / "relay.db")},
        "metrics": {"enabled": False},
        "log": {"level": "info", "format": "json"},
    }
    if isinstance(top.get("journal"), dict) and top["journal"].get("type") == "postgres":
        config["journal"] = {}  # no SQLite path
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    config["sources"] = sources
    config["sinks"] = sinks
    path = directory / "relay.toml"
    path.write_text(render(config))
    return path


def rongcloud_source(urls: list[str], *, app_key: str = "test-key",
                     app_secret: str = "test-secret", **extra: Any) -> dict[str, Any]:
    return {"type": "rongcloud", "app_key": app_key, "app_secret": app_secret,
            "base_urls": urls, "idle_interval": "200ms", **extra}


def file_sink(path: Path, **extra: Any) -> dict[str, Any]:
    return {"type": "file", "path": str(path), **extra}
