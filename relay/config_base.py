"""Building blocks of the configuration: durations, sizes, secrets and the component base.

Every component's config model (sources, sinks) derives from
:class:`ComponentConfig`: unknown keys are rejected, and every secret field
``X`` may instead be given as ``X_file`` (a path whose content is the secret,
as systemd ``LoadCredential`` and Kubernetes secret volumes provide).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    SecretStr,
    WithJsonSchema,
    model_validator,
)

from relay.remote import url_secrets

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4}


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string such as ``500ms``, ``30s``, ``5m``, ``2h``, ``1d``."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 5m or 2h")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    raise ValueError("expected a duration such as 30s, 5m or 2h")


def parse_size(value: Any) -> int:
    """Bytes from a number or a string such as ``512MiB``, ``10GB``, ``64k``."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 512MiB or 10GB")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match:
            unit = (match.group(2) or "").lower()
            binary = "i" in unit
            base = unit[:1]
            factor = 1024 ** "bkmgt".index(base) if binary and base != "b" else _SIZE_UNITS[base]
            return int(float(match.group(1)) * factor)
    raise ValueError("expected a size such as 512MiB or 10GB")


def parse_point_in_time(value: str, now_ms: int) -> int:
    """Milliseconds since the epoch from a duration back from now (``2h``) or RFC 3339."""
    try:
        return now_ms - int(parse_duration(value) * 1000)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError("expected a duration such as 2h or an RFC 3339 time such as"
                         " 2026-11-25T08:00:00Z") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def check_http_url(url: str) -> str:
    """An http(s) URL without a trailing slash (paths are appended to it)."""
    if not url.startswith(("http://", "https://")):
        raise ValueError("not an http(s) URL")
    return url.rstrip("/")


HttpUrl = Annotated[str, AfterValidator(check_http_url),
                    WithJsonSchema({"type": "string", "pattern": "^https?://"})]
# What editors validate against (relay config-schema): a number, or the same text forms.
_DURATION_SCHEMA = {"anyOf": [{"type": "number", "minimum": 0},
                              {"type": "string", "pattern": _DURATION.pattern}],
                    "description": "seconds, or 500ms, 30s, 5m, 2h, 1d"}
_SIZE_SCHEMA = {"anyOf": [{"type": "integer", "minimum": 0},
                          {"type": "string",
                           "pattern": r"^\s*\d+(\.\d+)?\s*([kKmMgGtT][iI]?[bB]?|[bB])?\s*$"}],
                "description": "bytes, or 64k, 512MiB, 10GB"}
Duration = Annotated[float, BeforeValidator(parse_duration), WithJsonSchema(_DURATION_SCHEMA)]
ByteSize = Annotated[int, BeforeValidator(parse_size), WithJsonSchema(_SIZE_SCHEMA)]


def _secret_fields(model: type[BaseModel]) -> list[str]:
    names = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if annotation is SecretStr or SecretStr in getattr(annotation, "__args__", ()):
            names.append(name)
    return names


class ComponentConfig(BaseModel):
    """Base of every source and sink config: strict keys, secrets also from ``*_file``."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    @model_validator(mode="before")
    @classmethod
    def _read_secret_files(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for name in _secret_fields(cls):
            file_key = f"{name}_file"
            if file_key not in data:
                continue
            path = data.pop(file_key)
            if data.get(name) not in (None, ""):
                raise ValueError(f"give either {name} or {file_key}, not both")
            try:
                data[name] = Path(str(path)).read_text(encoding="utf-8").rstrip("\r\n")
            except OSError as exc:
                raise ValueError(f"{file_key}: cannot read {path}: {exc.strerror}") from None
        return data

    def secret_values(self) -> list[str]:
        """The plain values of this component's secrets, for log redaction.

        Credentials inside URLs (user-info, query values) count as secrets too.
        """
        values = []
        for name in _secret_fields(type(self)):
            secret = getattr(self, name)
            if isinstance(secret, SecretStr) and secret.get_secret_value():
                values.append(secret.get_secret_value())
        for name in type(self).model_fields:
            value = getattr(self, name)
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, str) and item.startswith(("http://", "https://")):
                    values.extend(url_secrets(item))
        return values
