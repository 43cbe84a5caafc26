"""What operators see must be true: lag during outages, readiness, alerts on real series,
start-up errors, configuration problems, and the small things a new operator trips over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from relay.emulators.leancloud import LeanCloudEmulator
from relay.emulators.rongcloud import RongCloudEmulator
from relay.emulators.wukongim import WuKongIMEmulator
from tests.support.configs import file_sink, rongcloud_source, write_config
from tests.support.emulators import refused_port, serving
from tests.support.prometheus_tools import PrometheusToolsUnavailable, ensure_prometheus
from tests.support.relay_process import RelayProcess, count_lines, wait_for

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SECRET = "whsec_MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="


def relay_cli(*args: str, env: dict[str, str] | None = None,
              timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def scrape(port: int) -> str:
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text


def value(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")) and all(
                f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {labels} not exported")


# -- a dead webhook: the lag is visible --------------------------------------------------------

@pytest.fixture
def dead_webhook_relay(tmp_path: Path) -> Iterator[tuple[RelayProcess, Path, int, Any]]:
    emulator = RongCloudEmulator("test-key", "test-secret", budget=None, batch_size=50, seed=61)
    emulator.generate(500)
    port = refused_port()
    with serving(emulator) as (loop, server):
        config = write_config(
            tmp_path, sources={"rc": rongcloud_source(server.urls, idle_interval="100ms")},
            sinks={"hook": {"type": "webhook", "url": f"http://127.0.0.1:{refused_port()}/hook",
                            "secret": SECRET, "retry_backoff": "200ms",
                            "retry_backoff_max": "1s", "breaker_open": "2s"},
                   "archive": file_sink(tmp_path / "events.jsonl")},
            metrics={"enabled": True, "listen": f"127.0.0.1:{port}"})
        relay = RelayProcess(config, tmp_path / "relay.log").start()
        try:
            wait_for(lambda: count_lines(tmp_path / "events.jsonl") >= 500, timeout=30)
            yield relay, config, port, (loop, emulator)
        finally:
            relay.stop()


def test_a_dead_webhooks_lag_gauges_agree_with_relay_status(
        dead_webhook_relay: tuple[RelayProcess, Path, int, Any]) -> None:
    _relay, config, port, (loop, emulator) = dead_webhook_relay
    loop.call(lambda: emulator.generate(500))
    wait_for(lambda: count_lines(config.parent / "events.jsonl") >= 1000, timeout=30)
    time.sleep(3)  # the oldest pending event ages while the sink retries
    text = scrape(port)
    status = json.loads(relay_cli("status", "--json", "--config", str(config)).stdout)
    hook = next(s for s in status["sinks"] if s["sink"] == "hook")
    pending = value(text, "relay_sink_pending_events", sink="hook")
    oldest = value(text, "relay_sink_oldest_pending_age_seconds", sink="hook")
    held_for = time.time() - hook["oldest_pending_fetched_at"] / 1000
    assert hook["pending"] == 1000
    assert pending == 1000, f"the gauge says {pending} pending, relay status {hook['pending']}"
    assert oldest >= held_for - 2.5, f"oldest pending {oldest:.1f}s, really {held_for:.1f}s"
    assert value(text, "relay_sink_up", sink="hook") == 0


def test_readyz_says_a_dead_webhook_is_not_delivering(
        dead_webhook_relay: tuple[RelayProcess, Path, int, Any]) -> None:
    _relay, _config, port, _ = dead_webhook_relay
    answer = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
    checks = answer.json()["checks"]
    assert answer.status_code == 503
    assert checks["sink hook"].startswith(("retrying", "breaker_open")), checks
    assert checks["sink archive"] == "delivering"


def test_the_breaker_logs_opening(dead_webhook_relay: tuple[RelayProcess, Path, int, Any]) -> None:
    relay, _config, _port, _ = dead_webhook_relay
    wait_for(lambda: any("circuit breaker open" in r.get("event", "")
                         for r in relay.log_records()), timeout=30)


# -- alerts on series scraped from a real, healthy relay ------------------------------------------

def _series(texts: list[tuple[float, str]]) -> dict[str, list[float]]:
    """Scraped samples per series, as promtool input (timestamps made relative)."""
    found: dict[str, list[float]] = {}
    for index, (at, text) in enumerate(texts):
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            name_labels, _, raw = line.rpartition(" ")
            number = float(raw)
            name = name_labels.split("{", 1)[0]
            if name.endswith("_timestamp_seconds") and number > 1e9:
                # promtool's time() starts at 0: keep the age, not the epoch.
                number = number - at + index * 60
            labels = name_labels[len(name):].strip("{}")
            extra = 'job="im-relay",instance="relay:9464"'
            key = f"{name}{{{labels + ',' if labels else ''}{extra}}}"
            found.setdefault(key, []).append(number)
    return found


def test_no_alert_fires_on_a_healthy_relay(tmp_path: Path) -> None:
    try:
        promtool = ensure_prometheus() / "promtool"
    except PrometheusToolsUnavailable as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"promtool unavailable: {exc}")
        pytest.skip(f"promtool unavailable: {exc}")
    rc = RongCloudEmulator("k", "s", budget=10, seed=62)
    wk = WuKongIMEmulator("tok", uids=("u1",), channels=(("g1", 2),), seed=63)
    lc = LeanCloudEmulator("app", "mk", seed=64)
    port = refused_port()
    with serving(rc) as (_rc_loop, rc_server), serving(wk) as (wk_loop, wk_server), \
            serving(lc) as (lc_loop, lc_server):
        rc.generate(50)
        wk_loop.call(lambda: (wk.generate(20), wk.generate_channel(20, "g1", 2)))
        lc_loop.call(lambda: lc.generate(20, age=5))
        config = write_config(tmp_path, sources={
            "rc": rongcloud_source(rc_server.urls, app_key="k", app_secret="s"),
            "wk": {"type": "wukongim", "base_url": wk_server.urls[0], "token": "tok",
                   "uids": ["u1"], "channels": [{"id": "g1", "type": 2}],
                   "idle_interval": "200ms"},
            "lc": {"type": "leancloud", "base_url": lc_server.urls[0], "app_id": "app",
                   "master_key": "mk", "settle_delay": "1s", "idle_interval": "200ms",
                   "start": "1h"}},
            sinks={"archive": file_sink(tmp_path / "events.jsonl")},
            metrics={"enabled": True, "listen": f"127.0.0.1:{port}"})
        relay = RelayProcess(config, tmp_path / "relay.log").start()
        try:
            wait_for(lambda: count_lines(tmp_path / "events.jsonl") >= 110, timeout=60)
            scrapes = [(time.time(), scrape(port))]
            time.sleep(2)  # a second scrape, so that counters have a slope
            scrapes.append((time.time(), scrape(port)))
        finally:
            relay.stop()
    series = _series(scrapes)
    steps = 40
    inputs = []
    for key, values in series.items():
        last = values[-1]
        tail = [last + (i + 1) * 60 if "_timestamp_seconds" in key and last > -1e8 else last
                for i in range(steps)]
        inputs.append({"series": key, "values": " ".join(repr(v) for v in [*values, *tail])})
    inputs.append({"series": 'up{job="im-relay",instance="relay:9464"}',
                   "values": " ".join(["1"] * (steps + 2))})
    alerts = [rule["alert"] for group in yaml.safe_load(
        (ROOT / "deploy/prometheus/alerts.yml").read_text())["groups"] for rule in group["rules"]
        if "alert" in rule]
    test = {"rule_files": [str(ROOT / "deploy/prometheus/alerts.yml")],
            "evaluation_interval": "1m",
            "tests": [{"interval": "1m", "input_series": inputs,
                       "alert_rule_test": [{"eval_time": f"{steps}m", "alertname": a,
                                            "exp_alerts": []} for a in alerts]}]}
    path = tmp_path / "healthy_test.yml"
    path.write_text(yaml.safe_dump(test))
    result = subprocess.run([str(promtool), "test", "rules", str(path)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


# -- start-up errors: one line naming the setting, exit 2 ---------------------------------------

def _one_line_exit_2(result: subprocess.CompletedProcess[str], setting: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert setting in lines[0]


def _config(tmp_path: Path, **top: Any) -> Path:
    return write_config(tmp_path, sources={"rc": rongcloud_source([f"http://127.0.0.1:"
                                                                   f"{refused_port()}"])},
                        sinks={"archive": file_sink(tmp_path / "events.jsonl")}, **top)


def test_journal_path_under_a_regular_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    config = _config(tmp_path, journal={"path": str(tmp_path / "file" / "relay.db")})
    _one_line_exit_2(relay_cli("run", "--config", str(config)), "journal.path")


def test_journal_folder_not_writable(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(folder)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a read-only file system here")
    try:
        config = _config(tmp_path, journal={"path": str(folder / "relay.db")})
        _one_line_exit_2(relay_cli("run", "--config", str(config)), "journal.path")
        check = relay_cli("check", "--offline", "--config", str(config))
        assert check.returncode == 1
        assert "FAIL journal" in check.stdout
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_metrics_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        config = _config(tmp_path, metrics={"enabled": True, "listen": listen})
        _one_line_exit_2(relay_cli("run", "--config", str(config)), "metrics.listen")
        check = relay_cli("check", "--offline", "--config", str(config))
    assert check.returncode == 1
    assert "FAIL metrics.listen" in check.stdout


def test_emulator_port_in_use() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = relay_cli("emulate", "rongcloud", "--port", str(taken.getsockname()[1]))
    _one_line_exit_2(result, "--port")


def test_check_offline_reaches_nothing(tmp_path: Path) -> None:
    config = _config(tmp_path)  # the provider's port refuses: reaching it would fail
    offline = relay_cli("check", "--offline", "--config", str(config))
    assert offline.returncode == 0, offline.stdout + offline.stderr
    assert "ok   journal" in offline.stdout
    assert "rc" not in offline.stdout.split("\n", 1)[1]
    online = relay_cli("check", "--config", str(config))
    assert online.returncode == 1


# -- configuration problems: all of them -----------------------------------------------------------

def test_every_configuration_problem_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(f"""
[journal]
dedup_window = "1h"
[sources.rc]
type = "rongcloud"
app_key = "k"
idle_intervall = "1s"
base_urls = ["http://127.0.0.1:1"]
[sinks.archive]
type = "file"
path = "{tmp_path}/e.jsonl"
rotate_bytes = "lots"
""")
    result = relay_cli("run", "--config", str(path),
                       env={"RELAY_SOURCES__RC__REQUESTS_PER_SECOND": "0"})
    assert result.returncode == 2
    err = result.stderr
    assert "5 problems" in err
    for expected in ("journal.dedup_window", "sources.rc.app_secret: is required",
                     "sources.rc.idle_intervall: is not a known setting (did you mean"
                     " idle_interval?)", "sinks.archive.rotate_bytes",
                     "sources.rc.requests_per_second",
                     "from the environment: RELAY_SOURCES__RC__REQUESTS_PER_SECOND"):
        assert expected in err, err


# -- the small things ------------------------------------------------------------------

def test_relay_without_arguments_shows_help_and_exits_0() -> None:
    result = relay_cli()
    assert result.returncode == 0
    assert "Commands:" in result.stdout


def test_a_held_journal_names_its_holder(tmp_path: Path) -> None:
    config = _config(tmp_path)
    relay = RelayProcess(config, tmp_path / "relay.log").start()
    try:
        wait_for(lambda: (tmp_path / "relay.db.lock").exists()
                 and (tmp_path / "relay.db.lock").read_text().strip(), timeout=30)
        second = relay_cli("run", "--config", str(config))
    finally:
        relay.stop()
    _one_line_exit_2(second, f"pid {relay.pid}")


def test_erase_dry_run_counts_beside_a_running_relay_including_file_lines(
        tmp_path: Path) -> None:
    emulator = RongCloudEmulator("test-key", "test-secret", budget=None, seed=65)
    emulator.generate(200)
    with serving(emulator) as (_loop, server):
        config = write_config(tmp_path, sources={"rc": rongcloud_source(server.urls)},
                              sinks={"archive": file_sink(tmp_path / "events.jsonl")})
        relay = RelayProcess(config, tmp_path / "relay.log").start()
        try:
            wait_for(lambda: count_lines(tmp_path / "events.jsonl") >= 200, timeout=30)
            events = [json.loads(line) for line in
                      (tmp_path / "events.jsonl").read_text().splitlines()]
            user = events[0]["sender"]
            expected = sum(1 for e in events if user in (e["sender"], e["recipient"]))
            result = relay_cli("erase", "--user", user, "--dry-run", "--config", str(config))
        finally:
            relay.stop()
    assert result.returncode == 0, result.stderr
    assert f"would erase {expected} record(s) from events" in result.stdout
    assert f"would erase {expected} record(s) from file sink archive" in result.stdout


def test_journal_events_gauge_agrees_with_status_at_once(tmp_path: Path) -> None:
    emulator = RongCloudEmulator("test-key", "test-secret", budget=None, seed=66)
    emulator.generate(300)
    port = refused_port()
    with serving(emulator) as (_loop, server):
        config = write_config(tmp_path, sources={"rc": rongcloud_source(server.urls)},
                              sinks={"archive": file_sink(tmp_path / "events.jsonl")},
                              metrics={"enabled": True, "listen": f"127.0.0.1:{port}"})
        relay = RelayProcess(config, tmp_path / "relay.log").start()
        try:
            wait_for(lambda: count_lines(tmp_path / "events.jsonl") >= 300, timeout=30)
            gauge = value(scrape(port), "relay_journal_events")
            status = json.loads(relay_cli("status", "--json", "--config", str(config)).stdout)
        finally:
            relay.stop()
    assert gauge == status["events"] == 300


def test_status_shows_failing_sources(tmp_path: Path) -> None:
    port = refused_port()
    config = _config(tmp_path, metrics={"enabled": True, "listen": f"127.0.0.1:{port}"})
    relay = RelayProcess(config, tmp_path / "relay.log").start()
    try:
        wait_for(lambda: "failing" in relay_cli("status", "--config", str(config)).stdout,
                 timeout=30, message="relay status to show the failing source")
        text = relay_cli("status", "--config", str(config)).stdout
    finally:
        relay.stop()
    assert "rc" in text
    assert "connect" in text.lower()


def test_kafka_check_failure_prints_no_stray_library_line(tmp_path: Path) -> None:
    config = write_config(tmp_path, sources={"rc": rongcloud_source(["http://127.0.0.1:1"])},
                          sinks={"bus": {"type": "kafka", "request_timeout": "2s",
                                         "bootstrap_servers": f"127.0.0.1:{refused_port()}"}})
    result = relay_cli("check", "--config", str(config))
    assert result.returncode == 1
    assert "FAIL sink bus" in result.stdout
    assert "aiokafka" not in result.stdout + result.stderr


def test_demo_works_every_time(tmp_path: Path) -> None:
    def run_demo() -> int:
        with (tmp_path / "demo.log").open("ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "relay", "demo", "--dir",
                                     str(tmp_path)], stdout=log, stderr=subprocess.STDOUT)
        try:
            def channel_events() -> int:
                path = tmp_path / "events.jsonl"
                if not path.exists():
                    return 0
                return sum(1 for line in path.read_text().splitlines()
                           if '"provider":"wukongim"' in line and '"kind":"message"' in line)
            return int(wait_for(lambda: channel_events() >= 40 * (runs + 1) and channel_events(),
                                timeout=60, message="WuKongIM channel history in the demo"))
        finally:
            proc.terminate()
            proc.wait(30)

    runs = 0
    first = run_demo()
    runs = 1
    second = run_demo()
    assert second >= first + 40, "the second demo delivered no channel history"
