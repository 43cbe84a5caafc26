"""Configuration: TOML + environment, secrets from files, exit 2 naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from relay.config import ConfigError, load_config

GOOD = """
[sources.rc]
type = "rongcloud"
app_key = "key"
app_secret = "s3cr3t-value-from-toml"
base_urls = ["http://127.0.0.1:1"]

[sinks.archive]
type = "file"
path = "{dir}/events.jsonl"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(text.replace("{dir}", str(tmp_path)))
    return path


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAY_SOURCES__RC__APP_SECRET", "from-env")
    monkeypatch.setenv("RELAY_SOURCES__RC__REQUESTS_PER_SECOND", "5")
    monkeypatch.setenv("RELAY_JOURNAL__PATH", str(tmp_path / "other.db"))
    config = load_config(write(tmp_path, GOOD))
    source = config.sources["rc"]
    assert source.app_secret.get_secret_value() == "from-env"
    assert source.requests_per_second == 5
    assert config.journal.path == str(tmp_path / "other.db")
    assert "from-env" not in repr(config)


def test_secret_from_file(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("file-secret\n")
    text = GOOD.replace('app_secret = "s3cr3t-value-from-toml"',
                        f'app_secret_file = "{tmp_path / "secret"}"')
    config = load_config(write(tmp_path, text))
    assert config.sources["rc"].app_secret.get_secret_value() == "file-secret"


def test_durations_and_sizes(tmp_path: Path) -> None:
    text = GOOD.replace('app_key = "key"', 'app_key = "key"\nidle_interval = "1500ms"\n'
                        'read_timeout = "2m"')
    text += 'rotate_bytes = "1MiB"\n'
    config = load_config(write(tmp_path, text))
    assert config.sources["rc"].idle_interval == 1.5
    assert config.sources["rc"].read_timeout == 120
    assert config.sinks["archive"].rotate_bytes == 1024 * 1024


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (lambda t: t.replace('app_key = "key"\n', ""), "sources.rc.app_key: is required"),
        (lambda t: t.replace('type = "rongcloud"', 'type = "nope"'), "sources.rc.type"),
        (lambda t: t + "\nbogus = 1\n", "sinks.archive.bogus: is not a known setting"),
        (lambda t: t.replace('["http://127.0.0.1:1"]', '["ftp://x"]'), "sources.rc.base_urls"),
        (lambda t: "[journal]\ndedup_window = \"1h\"\n" + t, "journal.dedup_window"),
        (lambda t: t.replace("[sources.rc]", "[sources.RC]"), "sources"),
        (lambda t: t.replace("[sinks.archive]", "[sinksx.archive]"), "sinksx"),
        (lambda t: t + "\n[[[", "not valid TOML"),
        (lambda t: t.replace('type = "file"', 'type = "file"\nbatch_size = "many"'),
         "sinks.archive.batch_size"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, change, key: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, change(GOOD)))
    assert key in str(info.value)
    assert "s3cr3t" not in str(info.value)


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run([sys.executable, "-m", "relay", *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})


def test_run_with_bad_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace('app_key = "key"\n', ""))
    result = run_cli("run", "--config", str(path))
    assert result.returncode == 2
    assert "sources.rc.app_key" in result.stderr
    assert "s3cr3t" not in result.stderr + result.stdout
    assert len(result.stderr.strip().splitlines()) == 1


def test_bad_environment_value_exits_2_naming_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    result = run_cli("run", "--config", str(path),
                     env={"RELAY_SOURCES__RC__REQUESTS_PER_SECOND": "lots"})
    assert result.returncode == 2
    assert "sources.rc.requests_per_second" in result.stderr


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    result = run_cli("run", "--config", str(tmp_path / "nope.toml"))
    assert result.returncode == 2
    assert "not found" in result.stderr


def test_second_relay_on_the_same_journal_exits_2(tmp_path: Path) -> None:
    from relay.journal.sqlite import SqliteJournal

    path = write(tmp_path, GOOD + f'\n[journal]\npath = "{tmp_path}/j.db"\n'.replace(
        "\n[journal]", "\n[metrics]\nenabled = false\n[journal]"))
    held = SqliteJournal.open(tmp_path / "j.db")
    try:
        result = run_cli("run", "--config", str(path))
    finally:
        import anyio

        anyio.run(held.close)
    assert result.returncode == 2
    assert "in use by another relay" in result.stderr


def test_admin_commands_work_without_the_services_secrets(tmp_path: Path) -> None:
    """An operator's shell often cannot read the service's credential files."""
    text = GOOD.replace('app_secret = "s3cr3t-value-from-toml"',
                        'app_secret_file = "/nonexistent/credential"')
    text += f'\n[journal]\npath = "{tmp_path}/j.db"\n'
    path = write(tmp_path, text)
    assert run_cli("run", "--config", str(path)).returncode == 2
    import anyio

    from relay.journal.sqlite import SqliteJournal

    anyio.run(lambda: SqliteJournal.open(tmp_path / "j.db").close())
    status = run_cli("status", "--config", str(path))
    assert status.returncode == 0, status.stderr
    assert "journal" in status.stdout
    assert run_cli("dlq", "list", "--config", str(path)).returncode == 0


def test_postgres_journal_takes_its_dsn_from_a_file_and_never_shows_the_password(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "dsn").write_text("postgresql://relay:pa55-w0rd@db.internal:5432/relay\n")
    text = GOOD + f'\n[journal]\ntype = "postgres"\ndsn_file = "{tmp_path / "dsn"}"\n'
    monkeypatch.setenv("RELAY_JOURNAL__SCHEMA", "tenant_a")
    config = load_config(write(tmp_path, text))
    assert config.journal.type == "postgres"
    assert config.journal.schema_name == "tenant_a"
    assert config.journal.describe() == \
        "postgresql://relay@db.internal:5432/relay (schema tenant_a)"
    assert "pa55-w0rd" in config.secret_values()
    assert "relay" not in config.secret_values()  # a user name is no secret
    assert "pa55-w0rd" not in repr(config)


@pytest.mark.parametrize(("journal", "message"), [
    ('type = "postgres"', "journal.dsn: required"),
    ('type = "postgres"\ndsn = "mysql://x@y/z"', "journal.dsn: expected a postgresql://"),
    ('type = "postgres"\ndsn = "postgresql://x@y/z"\npath = "j.db"', "journal.path: only for"),
    ('type = "postgres"\ndsn = "postgresql://x@y/z"\nschema = "Bad-Name"', "journal.schema:"),
    ('dsn = "postgresql://x@y/z"', "journal.dsn: only for"),
    ('schema = "relay"', "journal.schema: only for"),
    ('type = "mysql"', "journal.type"),
])
def test_bad_journal_settings_name_the_key(tmp_path: Path, journal: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(write(tmp_path, GOOD + f"\n[journal]\n{journal}\n"))
