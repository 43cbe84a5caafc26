"""The README documents what the code has: every setting, every command, every admin route.

Each check reads the README's tables and compares them with the code's own lists
(the configuration models, the CLI's commands, the emulators' routes), so a new key,
command or route without a line in the README fails here.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any

import pytest
from pydantic import BaseModel, TypeAdapter
from pydantic.fields import FieldInfo

from relay.cli import main
from relay.config import ClusterConfig, JournalConfig, LogConfig, MetricsConfig, RelayConfig
from relay.emulators.leancloud import LeanCloudEmulator
from relay.emulators.rongcloud import RongCloudEmulator
from relay.emulators.wukongim import WuKongIMEmulator
from relay.sinks.base import SinkConfig
from relay.sinks.file import FileSinkConfig
from relay.sinks.kafka_config import KafkaSinkConfig
from relay.sinks.webhook import WebhookSinkConfig
from relay.sources.http import HttpSourceConfig
from relay.sources.leancloud import EvacuationSettings, LeanCloudSourceConfig
from relay.sources.rongcloud import RongCloudSourceConfig
from relay.sources.wukongim import WuKongIMSourceConfig

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def section(heading: str) -> str:
    """The text under a ``## heading`` up to the next one."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## )", README, re.M | re.S)
    assert match, f"no section {heading!r} in the README"
    return match.group(1)


def block(start: str, text: str) -> str:
    """From the line starting with ``start`` up to the next bold heading line (``**...``)."""
    begin = text.find(start)
    assert begin >= 0, f"no {start!r} in the README"
    end = text.find("\n**", begin + len(start))
    return text[begin:end if end >= 0 else len(text)]


def table_after(start: str, text: str) -> str:
    """The first table after ``start``, up to the blank line that ends it."""
    assert start in text, f"no {start!r} in the README"
    begin = text.index("| route", text.index(start))
    end = text.find("\n\n", begin)
    return text[begin:end if end >= 0 else len(text)]


def table_rows(text: str) -> list[tuple[list[str], str]]:
    """``(keys, default cell)`` of every table row; ``X`` … ``_max`` gives ``X``, ``X_max``."""
    rows = []
    for line in text.splitlines():
        if not line.startswith("| `"):
            continue
        cells = line.split("|")
        names = re.findall(r"`([a-z_][a-z0-9_.]*)`", cells[1])
        keys = [names[i - 1] + name if name.startswith("_") and i else name
                for i, name in enumerate(names)]
        rows.append((keys, cells[2] if len(cells) > 3 else ""))
    return rows


def table_keys(text: str) -> set[str]:
    return {key for keys, _ in table_rows(text) for key in keys}


def documented_defaults(text: str) -> list[tuple[str, str]]:
    """``(key, default)`` where a row gives one `value` per key (``none``, ``required`` skipped)."""
    found: list[tuple[str, str]] = []
    for keys, cell in table_rows(text):
        values = re.findall(r"`([^`]*)`", cell)
        if values and len(values) == len(keys):
            found += zip(keys, values, strict=True)
    return found


def field_named(model: type[BaseModel], key: str) -> FieldInfo | None:
    for name, field in model.model_fields.items():
        if key in (name, field.alias):
            return field
    return None


def check_defaults(text: str, model: type[BaseModel], prefix: str = "") -> list[str]:
    """Where the README's default for a key of ``model`` is not the model's own."""
    wrong = []
    for key, written in documented_defaults(text):
        if not key.startswith(prefix):
            continue
        field = field_named(model, key.removeprefix(prefix))
        if field is None or field.default_factory is not None or field.default is None:
            continue
        annotation: Any = (Annotated[field.annotation, *field.metadata] if field.metadata
                           else field.annotation)
        adapter: TypeAdapter[Any] = TypeAdapter(annotation)
        value = adapter.validate_python(written)
        same = (math.isclose(value, field.default) if isinstance(field.default, float)
                else value == field.default)
        if not same:
            wrong.append(f"{key}: README says {written}, the default is {field.default!r}")
    return wrong


def settings(model: type[BaseModel], *, inherited_from: type[BaseModel] | None = None) -> set[str]:
    """A model's keys as written in relay.toml, without the tag and the inherited ones."""
    names = {field.alias or name for name, field in model.model_fields.items()}
    if inherited_from is not None:
        names -= set(inherited_from.model_fields)
    return names - {"type"}


def shared_keys(kind: str) -> set[str]:
    """The keys of the table every source (``kind="source"``) or sink takes."""
    return table_keys(block(f"**Every {kind}**", section("Configuration")))


# (section heading, model, the shared base documented in its own table)
DOCUMENTED: list[tuple[str, type[BaseModel], type[BaseModel]]] = [
    ('**`[sources.NAME] type = "rongcloud"`**', RongCloudSourceConfig, HttpSourceConfig),
    ('**`[sources.NAME] type = "wukongim"`**', WuKongIMSourceConfig, HttpSourceConfig),
    ('**`[sources.NAME] type = "leancloud"`**', LeanCloudSourceConfig, HttpSourceConfig),
    ('**`[sinks.NAME] type = "kafka"`**', KafkaSinkConfig, SinkConfig),
    ('**`[sinks.NAME] type = "webhook"`**', WebhookSinkConfig, SinkConfig),
    ('**`[sinks.NAME] type = "file"`**', FileSinkConfig, SinkConfig),
]


@pytest.mark.parametrize(("heading", "model", "base"), DOCUMENTED,
                         ids=[d[0].split('"')[1] for d in DOCUMENTED])
def test_every_component_setting_is_in_its_table(heading: str, model: type[BaseModel],
                                                 base: type[BaseModel]) -> None:
    documented = table_keys(block(heading, section("Configuration")))
    # batch_size: every sink has it, with a default of its own, in its own table.
    own = settings(model, inherited_from=base) | ({"batch_size"} if base is SinkConfig else set())
    missing = own - documented
    assert not missing, f"{heading}: not in the README's table: {sorted(missing)}"


def test_the_settings_every_source_and_sink_share_are_in_their_tables() -> None:
    missing = settings(HttpSourceConfig) - shared_keys("source")
    assert not missing, f"every source: not in the README's table: {sorted(missing)}"
    missing = settings(SinkConfig) - shared_keys("sink") - {"batch_size"}
    assert not missing, f"every sink: not in the README's table: {sorted(missing)}"


def test_every_top_level_setting_is_in_the_first_table() -> None:
    configuration = section("Configuration")
    documented = table_keys(configuration[:configuration.index("\n**")])
    expected = {f"{prefix}.{key}" for prefix, model in (
        ("journal", JournalConfig), ("cluster", ClusterConfig), ("metrics", MetricsConfig),
        ("log", LogConfig))
        for key in settings(model)}
    expected |= {name for name, field in RelayConfig.model_fields.items()
                 if not isinstance(field.annotation, type)
                 or not issubclass(field.annotation, BaseModel)} - {"sources", "sinks"}
    missing = expected - documented
    assert not missing, f"not in the README's configuration table: {sorted(missing)}"


@pytest.mark.parametrize(("heading", "model", "base"), DOCUMENTED,
                         ids=[d[0].split('"')[1] for d in DOCUMENTED])
def test_documented_defaults_are_the_code_defaults(heading: str, model: type[BaseModel],
                                                   base: type[BaseModel]) -> None:
    text = block(heading, section("Configuration"))
    assert documented_defaults(text), "no default read from the table: the check is toothless"
    wrong = check_defaults(text, model)
    assert not wrong, "\n".join(wrong)


def test_documented_defaults_of_the_shared_and_top_level_tables() -> None:
    configuration = section("Configuration")
    top = configuration[:configuration.index("\n**")]
    wrong = (check_defaults(block("**Every source**", configuration), HttpSourceConfig)
             + check_defaults(block("**Every sink**", configuration), SinkConfig)
             + check_defaults(top, JournalConfig, "journal.")
             + check_defaults(top, ClusterConfig, "cluster.")
             + check_defaults(top, MetricsConfig, "metrics.")
             + check_defaults(top, LogConfig, "log.")
             + check_defaults(top, RelayConfig))
    assert not wrong, "\n".join(wrong)


def test_the_defaults_check_is_not_toothless() -> None:
    table = "| `sync_limit` | `500` | messages per request |\n| `idle_interval` | `2s` | |\n"
    assert len(check_defaults(table, WuKongIMSourceConfig)) == 2
    assert not check_defaults(table.replace("`500`", "`10000`").replace("`2s`", "`1s`"),
                              WuKongIMSourceConfig)


def test_every_evacuation_setting_is_documented() -> None:
    text = section("Leaving LeanCloud")
    missing = {key for key in settings(EvacuationSettings) if not re.search(
        rf"(^|[\s`]){key}\b", text, re.M)}
    assert not missing, f"not in 'Leaving LeanCloud': {sorted(missing)}"


def test_every_command_is_in_the_commands_table() -> None:
    table = section("Commands")
    missing = [name for name in main.commands if f"`relay {name}" not in table]
    assert not missing, f"commands not in the README's table: {missing}"
    options = {"check": ["--offline"], "top": ["--once", "--url"]}
    for command, flags in options.items():
        known = {opt for param in main.commands[command].params for opt in param.opts}
        for flag in flags:
            assert flag in known, f"relay {command} has no {flag}"
            assert re.search(rf"`relay {command}[^`]*{flag}", table), f"relay {command} {flag}"


EMULATORS: dict[str, Any] = {
    "RongCloud": lambda: RongCloudEmulator("key", "secret"),
    "WuKongIM": lambda: WuKongIMEmulator("token"),
    "LeanCloud": lambda: LeanCloudEmulator("app-id", "master-key"),
}


@pytest.mark.parametrize("provider", list(EMULATORS))
def test_every_emulator_admin_route_is_documented(provider: str) -> None:
    text = section("The emulators")
    tables = table_after("Every emulator:", text) + table_after(f"\n{provider} (", text)
    documented = set(re.findall(r"`(GET|POST) (/_emulator/[a-z_]+)", tables))
    app = EMULATORS[provider]().app()
    routes = {(route.method, info["path"]) for route in app.router.routes()
              if (info := route.resource.get_info()).get("path", "").startswith("/_emulator/")
              and route.method != "HEAD"}  # aiohttp answers HEAD on every GET route
    assert routes, "no admin routes found: the check would be toothless"
    missing = routes - documented
    assert not missing, f"{provider}: admin routes not in the README: {sorted(missing)}"
    stale = documented - routes
    assert not stale, f"{provider}: the README names routes it does not have: {sorted(stale)}"


def test_the_config_schema_recipe_validates_relay_toml(tmp_path: Path) -> None:
    """The README's CI recipe, run as written: it accepts the example config, refuses a typo."""
    text = section("Watching a running relay")
    match = re.search(r"```sh\n(relay config-schema > relay\.schema\.json\n.*?)```", text, re.S)
    assert match, "no relay config-schema recipe in 'Watching a running relay'"
    script = match.group(1)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    example = (Path(__file__).resolve().parent.parent / "config.example.toml").read_text()

    def run(config: str) -> subprocess.CompletedProcess[str]:
        (tmp_path / "relay.toml").write_text(config)
        return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=60, check=False)

    accepted = run(example)
    assert accepted.returncode == 0, accepted.stderr
    refused = run(example.replace("[journal]\n", "[journal]\nretian = \"2h\"\n", 1))
    assert refused.returncode != 0
    assert "retian" in refused.stderr
