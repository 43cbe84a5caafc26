"""``relay top`` in a real pseudo-terminal against a running relay, and as plain lines.

The pseudo-terminal's output is rendered by a terminal emulator (pyte), so the
test reads the screen an operator would see, and compares its figures with the
relay's /metrics.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pexpect
import pyte
import pytest

from relay.emulators.rongcloud import RongCloudEmulator
from tests.support.configs import file_sink, rongcloud_source, write_config
from tests.support.emulators import refused_port, serving
from tests.support.relay_process import RelayProcess, count_lines, wait_for

pytestmark = pytest.mark.slow

SECRET = "whsec_MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="
ROWS, COLUMNS = 40, 180


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, int]]:
    """A relay with a RongCloud source, a file sink and a webhook that is down."""
    tmp_path = tmp_path_factory.mktemp("top")
    emulator = RongCloudEmulator("test-key", "test-secret", budget=None, seed=71)
    emulator.generate(300)
    port = refused_port()
    with serving(emulator) as (_loop, server):
        config = write_config(
            tmp_path, sources={"rc": rongcloud_source(server.urls)},
            sinks={"archive": file_sink(tmp_path / "events.jsonl"),
                   "hook": {"type": "webhook", "secret": SECRET,
                            "url": f"http://127.0.0.1:{refused_port()}/hook"}},
            metrics={"enabled": True, "listen": f"127.0.0.1:{port}"})
        relay = RelayProcess(config, tmp_path / "relay.log").start()
        try:
            wait_for(lambda: count_lines(tmp_path / "events.jsonl") >= 300, timeout=30)
            # The dead webhook's backlog is counted once a second: let it reach 300 first.
            wait_for(lambda: metric(port, "relay_sink_pending_events", sink="hook") == 300,
                     timeout=30, message="the webhook's pending gauge")
            yield config, port
        finally:
            relay.stop()


def metric(port: int, name: str, **labels: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")) and all(
                f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exported")


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def screen_of(config: Path, refreshes: int) -> list[str]:
    screen = pyte.Screen(COLUMNS, ROWS)
    stream = pyte.ByteStream(screen)
    child = pexpect.spawn(sys.executable, ["-m", "relay", "top", "--config", str(config)],
                          dimensions=(ROWS, COLUMNS), env={"TERM": "xterm-256color",
                                                           "PATH": "/usr/bin:/bin"},
                          # As an operator's shell starts it: an ignored SIGINT is inherited
                          # through exec, and late in a full run of the suite this process
                          # has it ignored (then top never hears the ^C below).
                          preexec_fn=_default_sigint)
    try:
        deadline = time.monotonic() + 20
        seen = 0
        while time.monotonic() < deadline and seen < refreshes:
            try:
                chunk = child.read_nonblocking(65536, timeout=1)
            except pexpect.TIMEOUT:
                continue
            stream.feed(chunk)
            if any("hook" in line for line in screen.display):
                seen += 1
        assert seen, "relay top drew no sink row:\n" + "\n".join(screen.display)
        return list(screen.display)
    finally:
        child.sendintr()
        child.expect(pexpect.EOF, timeout=10)
        child.close()
        assert child.exitstatus == 0, f"relay top exited {child.exitstatus}"


def row(lines: list[str], first: str) -> list[str]:
    for line in lines:
        cells = [c.strip() for c in re.split(r"[│┃|]", line) if c.strip()]
        if cells and cells[0] == first:
            return cells
    raise AssertionError(f"no row {first!r} on the screen:\n" + "\n".join(lines))


def test_top_in_a_terminal_matches_the_metrics(running: tuple[Path, int]) -> None:
    config, port = running
    lines = screen_of(config, refreshes=3)
    hook = row(lines, "hook")
    archive = row(lines, "archive")
    pending = metric(port, "relay_sink_pending_events", sink="hook")
    # sink | state | events/s | pending | oldest | dead letters | last error
    assert hook[1] in ("retrying", "breaker_open"), hook
    assert float(hook[3]) == pending == 300
    assert archive[1] == "delivering"
    assert archive[3] == "0"
    assert "cannot connect" in " ".join(hook[6:]) or "circuit breaker" in " ".join(hook[6:])
    source = row(lines, "rc")
    assert source[1] in ("person", "group", "chatroom")
    assert source[2] == "polling"
    assert any(line.startswith("journal") and "300 events" in line for line in lines), lines


def test_top_prints_plain_lines_when_not_on_a_terminal(running: tuple[Path, int]) -> None:
    config, port = running
    result = subprocess.run([sys.executable, "-m", "relay", "top", "--once", "--interval", "0.5",
                             "--config", str(config)], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr
    assert "\x1b[" not in result.stdout, "no terminal control codes in a pipe"
    lines = result.stdout.splitlines()
    hook = next(line for line in lines if line.startswith("sink sink=hook"))
    pending = metric(port, "relay_sink_pending_events", sink="hook")
    assert f"pending={pending:.0f}" in hook
    assert any(line.startswith("source source=rc endpoint=person state=polling")
               for line in lines), lines
    assert any(line.startswith("journal ") for line in lines)
