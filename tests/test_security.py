"""Secrets never reach output; safe defaults (TLS checks, loopback metrics, owner-only files)."""

from __future__ import annotations

import base64
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from relay.config import RelayConfig
from relay.sinks.kafka_config import KafkaSinkConfig
from relay.sinks.webhook import WebhookSinkConfig
from relay.sources.leancloud import LeanCloudSourceConfig
from relay.sources.rongcloud import RongCloudSourceConfig
from relay.sources.wukongim import WuKongIMSourceConfig
from tests.support.emulators import refused_port
from tests.support.relay_process import RelayProcess, wait_for

SECRETS = {
    "rc_secret": "rc-SECRET-4f9c2a7e",
    "wk_token": "wk-SECRET-81d3b0c6",
    "lc_key": "lc-SECRET-5e27f913",
    "hook": "whsec_" + base64.b64encode(b"hook-SECRET-0c9e4d12").decode(),
    "sasl": "sasl-SECRET-7a6b2c90",
}


def secret_config(tmp_path: Path, port: int, metrics_port: int) -> Path:
    dead = f"http://127.0.0.1:{port}"
    (tmp_path / "lc_key").write_text(SECRETS["lc_key"] + "\n")
    text = f"""
[journal]
path = "{tmp_path}/relay.db"
[metrics]
listen = "127.0.0.1:{metrics_port}"
[log]
format = "json"
level = "debug"
[sources.rc]
type = "rongcloud"
app_key = "key"
app_secret = "{SECRETS['rc_secret']}"
base_urls = ["{dead}"]
[sources.wk]
type = "wukongim"
base_url = "{dead}"
token = "{SECRETS['wk_token']}"
uids = ["u1"]
[sources.lc]
type = "leancloud"
base_url = "{dead}"
app_id = "app"
master_key_file = "{tmp_path}/lc_key"
[sinks.hook]
type = "webhook"
url = "{dead}/hook"
secret = "{SECRETS['hook']}"
[sinks.bus]
type = "kafka"
bootstrap_servers = "127.0.0.1:{port}"
security_protocol = "SASL_PLAINTEXT"
sasl_mechanism = "SCRAM-SHA-256"
sasl_username = "relay"
sasl_password = "{SECRETS['sasl']}"
request_timeout = "2s"
[sinks.file]
type = "file"
path = "{tmp_path}/events.jsonl"
"""
    path = tmp_path / "relay.toml"
    path.write_text(text)
    return path


def cli(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "relay", *args], capture_output=True, text=True,
                         timeout=90, env=dict(os.environ))
    return out.stdout + out.stderr


def assert_clean(text: str, where: str) -> None:
    for name, value in SECRETS.items():
        assert value not in text, f"{name} leaked into {where}"
        assert base64.b64encode(value.encode()).decode() not in text, f"{name} (b64) in {where}"


@pytest.mark.slow
def test_no_command_output_log_or_metric_contains_a_secret(tmp_path: Path) -> None:
    port, metrics_port = refused_port(), refused_port()
    config = str(secret_config(tmp_path, port, metrics_port))
    relay = RelayProcess(Path(config), tmp_path / "relay.log").start()
    try:
        metrics = wait_for(lambda: _get(f"http://127.0.0.1:{metrics_port}/metrics"), timeout=30)
        ready = _get(f"http://127.0.0.1:{metrics_port}/readyz") or ""
        # Let every component fail at least once (unreachable providers, sinks).
        wait_for(lambda: relay.log_text().count('"level":"warning"') +
                 relay.log_text().count('"level":"error"') >= 5, timeout=30)
        time.sleep(1)  # a few more retry cycles' worth of log lines
        outputs = {
            "check": cli("check", "--config", config),
            "status": cli("status", "--config", config),
            "status --json": cli("status", "--json", "--config", config),
            "dlq list": cli("dlq", "list", "--config", config),
            "replay": cli("replay", "--sink", "file", "--since", "1h", "--config", config),
            "metrics": metrics,
            "readyz": ready,
            "second relay": cli("run", "--config", config),
        }
    finally:
        relay.stop()
    outputs["run log"] = relay.log_text()
    bad = Path(config).read_text().replace('app_key = "key"', "app_key = 5")
    (tmp_path / "bad.toml").write_text(bad)
    outputs["config error"] = cli("run", "--config", str(tmp_path / "bad.toml"))
    assert "FAIL" in outputs["check"]
    assert "in use by another relay" in outputs["second relay"]
    assert "sources.rc.app_key" in outputs["config error"]
    for where, text in outputs.items():
        assert_clean(text, where)


def _get(url: str) -> str | None:
    try:
        return httpx.get(url, timeout=2).text
    except httpx.TransportError:
        return None


def test_secrets_are_hidden_in_reprs_and_config_errors() -> None:
    config = RelayConfig(sources={"rc": {"type": "rongcloud", "app_key": "k",
                                         "app_secret": SECRETS["rc_secret"]}},
                         sinks={"f": {"type": "file"}})
    assert_clean(repr(config) + str(config.model_dump()), "repr")
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as info:
        RelayConfig(sources={"rc": {"type": "rongcloud", "app_key": SECRETS["rc_secret"],
                                    "app_secret": SECRETS["rc_secret"], "endpoints": "x"}})
    assert_clean(str(info.value), "validation error")


def test_safe_defaults() -> None:
    assert RongCloudSourceConfig(type="rongcloud", app_key="k", app_secret="s").verify_tls
    assert WuKongIMSourceConfig(type="wukongim", base_url="https://x", uids=["u"]).verify_tls
    assert LeanCloudSourceConfig(type="leancloud", base_url="https://x", app_id="a",
                                 master_key="m").verify_tls
    assert WebhookSinkConfig(type="webhook", url="https://x", secret=SECRETS["hook"]).verify_tls
    assert KafkaSinkConfig(type="kafka", bootstrap_servers="x:1").ssl_check_hostname
    assert RelayConfig().metrics.listen.startswith("127.0.0.1:")
    assert LeanCloudSourceConfig(type="leancloud", base_url="https://x", app_id="a",
                                 master_key="m").auth == "sign"  # the key never travels


@pytest.mark.anyio
async def test_rotated_and_gzipped_files_are_owner_only(tmp_path: Path) -> None:
    from relay.journal import StoredEvent
    from relay.sinks.file import FileSink, FileSinkConfig

    sink = FileSink("f", FileSinkConfig(type="file", path=str(tmp_path / "events.jsonl"),
                                        rotate_bytes=10, gzip=True))
    await sink.start()
    for n in range(3):
        await sink.deliver([StoredEvent(n, f"id{n}", 1, b"[]", b'{"a": 1}')])
    await sink.close()
    files = list(tmp_path.iterdir())
    assert any(f.name.endswith(".jsonl.gz") for f in files)
    for file in files:
        assert stat.S_IMODE(file.stat().st_mode) & 0o077 == 0, file.name
