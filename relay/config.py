"""Loading the relay's configuration: a TOML file plus ``RELAY_`` environment overrides.

``RELAY_SOURCES__RC__APP_SECRET=...`` overrides ``[sources.rc] app_secret``
(``__`` separates levels; names are case-insensitive, so source and sink
names are lowercase). Secrets can also come from ``*_file`` paths. Problems
raise :class:`ConfigError` holding every problem found, one line each naming
its key (with "did you mean" for a misspelt key, and saying when the value came
from the environment); the CLI turns it into exit status 2. Messages never
quote the offending value: it might be a secret.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
import typing
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, unquote, urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from relay.config_base import ByteSize, ComponentConfig, Duration
from relay.logs import LogFormat
from relay.sinks import SINKS, SinkConfigUnion
from relay.sources import SOURCES, SourceConfig

DEFAULT_CONFIG_FILE = "relay.toml"


def _models_by_type(union: Any) -> dict[str, Any]:
    """``type`` value → config model, from an ``Annotated[A | B, Field(discriminator)]``."""
    members = typing.get_args(typing.get_args(union)[0])
    return {typing.get_args(m.model_fields["type"].annotation)[0]: m for m in members}


_SOURCE_MODELS = _models_by_type(SourceConfig)
_SINK_MODELS = _models_by_type(SinkConfigUnion)
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
RETENTION_FLOOR = 3 * 3600.0  # RongCloud keeps undelivered data 3 h: dedup at least that long


class ConfigError(Exception):
    """An invalid configuration: every problem found, one line each, naming its key."""

    def __init__(self, problems: str | list[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


class JournalConfig(ComponentConfig):
    """``[journal]``: the embedded SQLite file (``path``) or a shared PostgreSQL database.

    ``dsn`` (or ``dsn_file``) is a secret: it is never logged, and :meth:`describe`
    shows it without its password.
    """

    type: Literal["sqlite", "postgres"] = "sqlite"
    path: str = "var/relay.db"
    dsn: SecretStr | None = None
    schema_name: str = Field(default="relay", alias="schema")
    dedup_window: Duration = 86400.0
    retain: Duration = 86400.0
    max_bytes: ByteSize | None = Field(default=None, gt=0)
    min_free_bytes: ByteSize = 64 * 1024 * 1024
    compact_interval: Duration = 60.0

    model_config = ConfigDict(populate_by_name=True)

    @model_validator(mode="after")
    def _windows(self) -> JournalConfig:
        if self.dedup_window < RETENTION_FLOOR:
            raise ValueError("dedup_window: must be at least 3h (the providers' retention)")
        if self.retain < self.dedup_window:
            raise ValueError("retain: must be at least dedup_window")
        if self.type == "postgres":
            if self.dsn is None or not self.dsn.get_secret_value():
                raise ValueError("dsn: required for type = \"postgres\" (or give dsn_file)")
            if not self.dsn.get_secret_value().startswith(("postgres://", "postgresql://")):
                raise ValueError("dsn: expected a postgresql://user@host:5432/database URL")
            if "path" in self.model_fields_set:
                raise ValueError("path: only for type = \"sqlite\" (postgres uses dsn)")
            if not _SCHEMA_NAME.fullmatch(self.schema_name):
                raise ValueError("schema: lowercase letters, digits and '_', at most 63")
        else:
            if self.dsn is not None:
                raise ValueError("dsn: only for type = \"postgres\"")
            if "schema_name" in self.model_fields_set:
                raise ValueError("schema: only for type = \"postgres\"")
        return self

    def describe(self) -> str:
        """Where the journal is, fit for logs and ``relay status`` (no password)."""
        if self.type == "sqlite":
            return self.path
        assert self.dsn is not None
        return f"{redacted_dsn(self.dsn.get_secret_value())} (schema {self.schema_name})"

    def secret_values(self) -> list[str]:
        if self.dsn is None:
            return []
        dsn = self.dsn.get_secret_value()
        # Not url_secrets(): a user name such as "relay" is no secret, and would
        # redact every log line mentioning the relay.
        parts = urlsplit(dsn)
        found = [dsn]
        if parts.password:
            found.append(unquote(parts.password))
            found.append(parts.password)
        found += [v for k, v in parse_qsl(parts.query) if "password" in k.lower()]
        return found


def redacted_dsn(dsn: str) -> str:
    """``postgresql://user@host:port/db``: no password, no query (it may hold one)."""
    try:
        parts = urlsplit(dsn)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "postgresql://(unparsable DSN)"
    user = f"{parts.username}@" if parts.username else ""
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{user}{host}{port}{parts.path}"


class ClusterConfig(BaseModel):
    """``[cluster]``: leases among the relays sharing a journal (SPEC §9)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # How long a lease lasts without renewal: a dead relay's units are taken over
    # within it (plus a second). Renewed every tick, a fifth of it (at most a second).
    lease_ttl: Duration = Field(default=10.0, ge=4.0, le=300.0)
    member: str | None = Field(default=None, min_length=1, max_length=200)


class MetricsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    listen: str = "127.0.0.1:9464"

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError("expected host:port, e.g. 127.0.0.1:9464")
        return value


class LogConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: LogFormat = "auto"
    # A "progress" line every so often: events in per source, out per sink, lag. 0 = none.
    progress_interval: Duration = 30.0


class RelayConfig(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="RELAY_",
        env_nested_delimiter="__",
        case_sensitive=False,
        extra="forbid",
        frozen=True,
        hide_input_in_errors=True,
    )

    journal: JournalConfig = Field(default_factory=JournalConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    shutdown_grace: Duration = 20.0
    sources: dict[str, SourceConfig] = Field(default_factory=dict)
    sinks: dict[str, SinkConfigUnion] = Field(default_factory=dict)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file arrives as init kwargs; the environment overrides it.
        return (env_settings, init_settings)

    @field_validator("sources", "sinks")
    @classmethod
    def _names(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in value:
            if not _NAME.fullmatch(name):
                raise ValueError(
                    f"{name!r} is not a valid name (lowercase letters, digits, '_' and '-')"
                )
        return value

    def secret_values(self) -> list[str]:
        values: list[str] = list(self.journal.secret_values())
        for component in [*self.sources.values(), *self.sinks.values()]:
            values.extend(component.secret_values())
        return values


def _format_location(loc: tuple[int | str, ...]) -> list[str]:
    # Names come from the file: never let one carry control characters into the message.
    parts = [str(p) if str(p).isprintable() else repr(str(p)) for p in loc]
    # Discriminated unions add the tag ("rongcloud", "file") after the table name.
    tags = {"sources": SOURCES.keys(), "sinks": SINKS.keys()}
    if len(parts) >= 3 and parts[0] in tags and parts[2] in tags[parts[0]]:
        del parts[2]
    return parts


def _known_keys(loc: tuple[int | str, ...]) -> list[str]:
    """The setting names allowed where an unknown key ``loc`` was found."""
    model: Any = RelayConfig
    path = list(loc[:-1])
    while path:
        key = path.pop(0)
        if model is RelayConfig and key in ("sources", "sinks") and len(path) >= 2:
            registry = {"sources": _SOURCE_MODELS, "sinks": _SINK_MODELS}[str(key)]
            path.pop(0)  # the component's name
            model = registry.get(str(path.pop(0)))
        else:
            field = getattr(model, "model_fields", {}).get(str(key))
            annotation = getattr(field, "annotation", None)
            model = annotation if isinstance(annotation, type) else None
        if model is None:
            return []
    return list(getattr(model, "model_fields", {}))


def _environment_keys() -> dict[tuple[str, ...], str]:
    """Configuration paths set from the environment, with the variable's name."""
    found = {}
    for name in os.environ:
        if name.upper().startswith("RELAY_") and name.upper() != "RELAY_CONFIG_FILE":
            path = tuple(part.lower() for part in name[len("RELAY_"):].split("__"))
            found[path] = name
    return found


def _describe_problem(error: Any, from_env: dict[tuple[str, ...], str]) -> str:
    loc = tuple(error["loc"])
    parts = _format_location(loc)
    kind = error["type"]
    if kind == "missing":
        message = "is required"
    elif kind == "extra_forbidden":
        message = "is not a known setting"
        close = difflib.get_close_matches(str(loc[-1]), _known_keys(loc), n=1, cutoff=0.6)
        if close:
            message += f" (did you mean {close[0]}?)"
    elif kind == "union_tag_invalid":
        message = f"unknown type ({error['msg'].split(':', 1)[-1].strip()})"
        parts.append("type")
    elif kind == "union_tag_not_found":
        message = "needs a type"
        parts.append("type")
    else:
        message = str(error["msg"]).removeprefix("Value error, ")
        # Validators report the sub-key themselves as "key: message".
        head, sep, rest = message.partition(": ")
        if sep and re.fullmatch(r"[a-z_]+", head):
            parts.append(head)
            message = rest
    key = ".".join(parts)
    lowered = tuple(p.lower() for p in parts)
    for path, variable in from_env.items():
        if lowered[:len(path)] == path or path[:len(lowered)] == lowered:
            message += f" (the value comes from the environment: {variable})"
            break
    return f"{key}: {message}" if key else message


def _format_errors(exc: ValidationError) -> list[str]:
    from_env = _environment_keys()
    problems: list[str] = []
    for error in exc.errors(include_input=False, include_url=False):
        problem = _describe_problem(error, from_env)
        if problem not in problems:
            problems.append(problem)
    return problems


class AdminView(BaseModel):
    """What ``relay status`` / ``dlq`` / ``replay`` need: no source credentials."""

    journal: JournalConfig
    sinks: list[str]
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @property
    def journal_path(self) -> str:
        return self.journal.describe()


def load_admin_view(path: str | os.PathLike[str] | None) -> AdminView:
    """The journal and sink names, even when secrets (``*_file``) are not readable here.

    An operator's shell often cannot read the service's credentials; these
    commands only touch the journal, so they must not need them (a PostgreSQL
    journal's own ``dsn_file`` excepted: the journal cannot be reached without it).
    """
    try:
        config = load_config(path, require_components=False)
        return AdminView(journal=config.journal, sinks=list(config.sinks),
                         metrics=config.metrics, cluster=config.cluster)
    except ConfigError as exc:
        first_error = exc
    file = config_path(str(path) if path is not None else None)
    try:
        with file.open("rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError):
        raise first_error from None
    table = data.get("journal")
    journal_data = dict(table) if isinstance(table, dict) else {}
    prefix = "RELAY_JOURNAL__"
    for key, value in os.environ.items():
        if key.upper().startswith(prefix):
            journal_data[key[len(prefix):].lower()] = value
    try:
        journal = JournalConfig(**journal_data)
    except (ValidationError, TypeError, ValueError):
        raise first_error from None
    sinks = data.get("sinks")
    names = [str(name) for name in sinks] if isinstance(sinks, dict) else []
    try:
        metrics = MetricsConfig(**(data.get("metrics") or {}))
    except (ValidationError, TypeError, ValueError):
        metrics = MetricsConfig(enabled=False)
    return AdminView(journal=journal, sinks=names, metrics=metrics)


def parse_config(data: dict[str, Any]) -> RelayConfig:
    """Validate parsed TOML (plus the environment); raises :class:`ConfigError` naming the key."""
    try:
        return RelayConfig(**data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from None
    except (TypeError, ValueError) as exc:  # e.g. environment values that are not JSON
        raise ConfigError(str(exc)) from None


def config_json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of ``relay.toml``, as editors and CI validate it.

    Generated from the models; every secret ``X`` also accepts ``X_file`` (a path),
    as the loader does.
    """
    schema = RelayConfig.model_json_schema()
    for model in schema.get("$defs", {}).values():
        properties = model.get("properties", {})
        for name, prop in list(properties.items()):
            if _is_secret(prop):
                properties[f"{name}_file"] = {
                    "type": "string", "description": f"a file holding {name} (instead of it)"}
                if name in model.get("required", []):
                    model["required"].remove(name)
                    model.setdefault("anyOf", []).append({"required": [name]})
                    model["anyOf"].append({"required": [f"{name}_file"]})
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "IM Relay configuration (relay.toml)"
    return schema


def _is_secret(prop: dict[str, Any]) -> bool:
    options = prop.get("anyOf", [prop])
    return any(o.get("format") == "password" for o in options)


def config_path(explicit: str | None) -> Path:
    return Path(explicit or os.environ.get("RELAY_CONFIG_FILE") or DEFAULT_CONFIG_FILE)


def load_config(
    path: str | os.PathLike[str] | None, *, require_components: bool = True
) -> RelayConfig:
    """Read, merge and validate; raises :class:`ConfigError` naming the offending key."""
    file = config_path(str(path) if path is not None else None)
    try:
        with file.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(
            f"config file {file} not found (give --config FILE or set RELAY_CONFIG_FILE)"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read: {exc.strerror}") from None
    config = parse_config(data)
    if require_components:
        if not config.sources:
            raise ConfigError("sources: at least one [sources.NAME] table is required")
        if not config.sinks:
            raise ConfigError("sinks: at least one [sinks.NAME] table is required")
    return config
