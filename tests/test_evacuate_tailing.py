"""relay evacuate without --exit-when-done: a sampled check, then it keeps tailing; status
shows the figures; a stop and a restart with --exit-when-done finish at once."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from relay.emulators.leancloud import LeanCloudEmulator
from relay.sources.leancloud_api import sampled
from tests.support.configs import file_sink, write_config
from tests.support.emulators import serving
from tests.support.relay_process import RelayProcess, read_events, wait_for

pytestmark = pytest.mark.slow


def test_sampled_check_then_tailing_then_stop_and_finish(tmp_path: Path) -> None:
    emulator = LeanCloudEmulator("app", "mk", seed=31, keep_served=False)
    emulator.load_history(5_000, conversations=400, chatrooms=20)
    archive = tmp_path / "archive" / "events.jsonl"
    out = tmp_path / "out"
    with serving(emulator) as (_loop, server):
        config = write_config(
            tmp_path,
            sources={"lc": {"type": "leancloud", "base_url": server.urls[0], "app_id": "app",
                            "master_key": "mk", "settle_delay": "500ms",
                            "idle_interval": "100ms",
                            "evacuation": {"requests_per_minute": 9000, "verify": "sample",
                                           "sample_ratio": 0.25, "directory": str(out),
                                           "progress_interval": "1s"}}},
            sinks={"archive": file_sink(archive)})
        relay = RelayProcess(config, tmp_path / "relay.log")
        relay.start("--source", "lc", command="evacuate")
        try:
            wait_for(lambda: (out / "report.json").exists() or not relay.running(), timeout=60,
                     message="the report")
            assert relay.running(), relay.log_text()[-2000:]
            live = emulator.generate(3, "text")  # after the check: the tail takes them
            wait_for(lambda: set(live) <= {e["native"]["msg-id"] for e in
                                           read_events(archive)}, timeout=30,
                     message="live messages archived while tailing")
            text = subprocess.run([sys.executable, "-m", "relay", "status", "--config",
                                   str(config)], capture_output=True, text=True,
                                  check=True).stdout
        finally:
            code = relay.terminate()
        assert code == 0
        started = time.monotonic()
        relay.start("--source", "lc", "--exit-when-done", command="evacuate")
        assert relay.wait(timeout=60) == 0, relay.log_text()[-2000:]
        finished_in = time.monotonic() - started
    report = orjson.loads((out / "report.json").read_bytes())
    v = report["verification"]
    known = [c.object_id for c in emulator.history.conversations]
    assert v["mode"] == "sample"
    assert v["conversations_known"] == len(known)
    assert v["conversations_checked"] == sum(1 for c in known if sampled(c, 0.25))
    assert v["matching"] == v["conversations_checked"]
    assert report["complete"] is True
    assert "evacuation lc" in text
    assert "phase       done" in text
    assert re.search(r"exported +5,00[0-9] messages", text), text
    assert "lc:evacuation" not in text  # the figures, not the raw state
    assert emulator.all_msg_ids() <= {e["native"]["msg-id"] for e in read_events(archive)}
    assert finished_in < 30  # nothing left to do but wait for the tail and the sinks
    assert "COMPLETE" in (out / "report.txt").read_text()
    assert "evacuation lc [done]" in relay.log_text()  # plain lines: not a terminal
