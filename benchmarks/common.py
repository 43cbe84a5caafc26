"""Helpers shared by the benchmarks: child processes, free ports, statistics."""

from __future__ import annotations

import compileall
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import relay


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_emulator(provider: str, *args: str) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """``relay emulate <provider>`` in its own process (its own core); returns its banner."""
    proc = subprocess.Popen([sys.executable, "-m", "relay", "emulate", provider, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"emulator {provider} did not start")
    return proc, json.loads(line)


_compiled = False


def _compile_relay() -> None:
    """Byte-compile the relay package once, as pip does when it installs it (and as the
    image has it). A checkout installed in place (``pip install -e``) compiles every
    module again at every start when PYTHONDONTWRITEBYTECODE is set: 0.15 s of CPU,
    0.75 µs per event of a 200,000-event drain that is start-up and not the drain. Stale
    files are no harm: Python checks each against its source's time and compiles that one
    again."""
    global _compiled
    if not _compiled:
        compileall.compile_dir(Path(relay.__file__).parent, quiet=1)
        _compiled = True


def start_relay(config: Path, log: Path) -> subprocess.Popen[bytes]:
    """``relay run`` in its own process (``RELAY_BENCH_LAUNCHER``: a script to run instead)."""
    _compile_relay()
    env = {**os.environ}
    launcher = [sys.executable, env["RELAY_BENCH_LAUNCHER"]] \
        if env.get("RELAY_BENCH_LAUNCHER") else [sys.executable, "-m", "relay"]
    with log.open("ab") as out:
        return subprocess.Popen([*launcher, "run", "--config", str(config)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)


def stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def descendants(pid: int) -> list[int]:
    """``pid`` and every live process below it (the relay's journal writer, say)."""
    found = [pid]
    for member in found:
        try:
            tasks = os.listdir(f"/proc/{member}/task")
        except OSError:
            continue
        for task in tasks:
            with contextlib.suppress(OSError):
                found += map(int, Path(f"/proc/{member}/task/{task}/children").read_text().split())
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a live process and its live descendants, from /proc."""
    total = 0.0
    for member in descendants(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """Resident memory (``VmHWM``: the peak so far) in MiB of a live process and its live
    descendants, summed, from /proc (for peaks, the sum bounds the peak of the whole)."""
    total = 0.0
    for member in descendants(pid):
        try:
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            pass
    return total


class LineCounter:
    """Lines in a growing file, reading only what was added since the last count.

    Counting from the start at every poll read the whole output again each 20 ms: by
    the end of a 200,000-event drain that was 100 MB a poll, a third of a core taken
    from the relay and the emulator on a 2-core machine.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines = 0
        self._offset = 0
        self._inode: int | None = None

    def count(self) -> int:
        try:
            with self.path.open("rb") as f:
                inode = os.fstat(f.fileno()).st_ino
                if inode != self._inode:  # a new file: count it from its start
                    self._inode, self._offset, self.lines = inode, 0, 0
                f.seek(self._offset)
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    self.lines += chunk.count(b"\n")
                    self._offset += len(chunk)
        except FileNotFoundError:
            self._inode, self._offset, self.lines = None, 0, 0
        return self.lines


def wait_lines(path: Path, target: int, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    counter = LineCounter(path)
    while time.monotonic() < deadline:
        if counter.count() >= target:
            return time.time()
        time.sleep(0.02)
    raise TimeoutError(f"{path}: fewer than {target} lines after {timeout}s")


def summary(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "runs": len(values)}


def machine() -> str:
    cpu = "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}, Python {sys.version.split()[0]}"
