"""Running the relay as a real child process (``python -m relay``), as an operator would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import orjson


def wait_for(condition: Callable[[], Any], timeout: float, interval: float = 0.05,
             message: str = "condition") -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


# The relays started by the running test, so that a failed test can show their logs
# (tests/conftest.py): a relay that stopped or stalled says why there, nowhere else.
started: list[RelayProcess] = []


class RelayProcess:
    def __init__(self, config_file: Path, log_file: Path, env: dict[str, str] | None = None):
        self.config_file = config_file
        self.log_file = log_file
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self, *args: str, command: str = "run") -> RelayProcess:
        env = {**os.environ, **self.env}
        env.pop("NOTIFY_SOCKET", None)
        self._log = self.log_file.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "relay", command, "--config", str(self.config_file), *args],
            stdout=self._log, stderr=subprocess.STDOUT, env=env,
        )
        started.append(self)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self, timeout: float = 30) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        self._close_log()

    def wait(self, timeout: float = 30) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout)
        self._close_log()
        return code

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self) -> None:
        if self.running():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._close_log()

    def describe(self, lines: int = 60) -> str:
        """How it ended (or that it still runs) and the last ``lines`` of its log."""
        code = self.proc.poll() if self.proc is not None else None
        state = "still running" if code is None else f"exited with {code}"
        tail = "\n".join(self.log_text().splitlines()[-lines:])
        return f"relay {self.config_file} ({state}), last {lines} log lines:\n{tail}"

    def log_text(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def log_records(self) -> list[dict[str, Any]]:
        records = []
        for line in self.log_text().splitlines():
            if line.startswith("{"):
                try:
                    records.append(orjson.loads(line))
                except orjson.JSONDecodeError:
                    continue
        return records


def read_events(path: Path) -> list[dict[str, Any]]:
    """Every event in a JSON Lines file (and its rotated siblings are not included)."""
    if not path.exists():
        return []
    events = []
    with path.open("rb") as f:
        for line in f:
            if line.endswith(b"\n"):
                events.append(orjson.loads(line))
    return events


def count_lines(path: Path) -> int:
    try:
        with path.open("rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    except FileNotFoundError:
        return 0
