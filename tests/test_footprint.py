"""What a running relay loads: only the client libraries its configuration uses (SPEC §7 memory)."""

from __future__ import annotations

import gc
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from relay import cli
from relay.config import load_config
from relay.emulators.rongcloud import RongCloudEmulator
from tests.support.configs import file_sink, rongcloud_source, write_config
from tests.support.emulators import serving
from tests.support.relay_process import RelayProcess, count_lines, wait_for

# ``python -X importtime`` (as an environment variable): every module the process
# imports, when it imports it, is written to stderr, which the log file receives.
_IMPORTED = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)\s*$", re.MULTILINE)


def peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc")


def test_file_sink_with_sqlite_loads_no_kafka_or_postgres_client(tmp_path: Path) -> None:
    emulator = RongCloudEmulator("test-key", "test-secret", batch_size=100, seed=7)
    keys = emulator.generate(2000)
    events = tmp_path / "events.jsonl"
    with serving(emulator) as (_loop, server):
        config = write_config(
            tmp_path, sources={"rc": rongcloud_source(server.urls)},
            sinks={"archive": file_sink(events, batch_size=500)},
            metrics={"enabled": True, "listen": "127.0.0.1:0"},
        )
        relay = RelayProcess(config, tmp_path / "relay.log",
                             env={"PYTHONPROFILEIMPORTTIME": "1"}).start()
        try:
            wait_for(lambda: count_lines(events) >= len(keys), timeout=60,
                     message="every message in the file")
            peak = peak_rss_bytes(relay.pid)
            assert relay.terminate() == 0
        finally:
            relay.stop()
    modules = set(_IMPORTED.findall(relay.log_text()))
    assert "relay.sinks.file" in modules  # the listing is really there
    assert "relay.journal.sqlite" in modules
    for unused in ("aiokafka", "relay.sinks.kafka", "asyncpg", "relay.journal.postgres"):
        assert unused not in modules, f"{unused} imported by a relay that does not use it"
    assert peak <= 100_000_000, f"peak RSS {peak / 1e6:.1f} MB (SPEC §7: ≤ 100 MB)"


def test_the_relay_runs_with_its_start_up_objects_frozen_out_of_the_collector(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Collections of the older generations traverse every live object: what start-up
    built (modules, pydantic's schemas) must not be among them, and the youngest
    generation must not be collected every 700 allocations of a drain."""
    config = load_config(str(write_config(
        tmp_path, sources={"rc": rongcloud_source(["http://127.0.0.1:9"])},
        sinks={"archive": file_sink(tmp_path / "events.jsonl")})))
    seen: dict[str, Any] = {}

    def fake_run(*_args: Any) -> None:  # the loop the relay would run, seen from inside
        seen["frozen"] = gc.get_freeze_count()
        seen["threshold"] = gc.get_threshold()

    before = gc.get_threshold()
    monkeypatch.setattr(cli.anyio, "run", fake_run)
    try:
        cli._run_relay(config)
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
    assert seen["frozen"] > 20_000, seen
    assert seen["threshold"][0] >= 10_000, seen


def test_the_cli_loads_no_terminal_library_until_relay_top_asks_for_it() -> None:
    """structlog would import rich (30-50 ms) only to format exceptions, which the relay
    formats itself; ``relay top`` still gets rich when it imports it."""
    probe = ("import sys, relay.cli; assert 'rich' not in sys.modules, 'rich loaded';"
             " import rich.console; print(rich.console.Console.__name__)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "Console"
