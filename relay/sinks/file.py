"""File sink: JSON Lines, raw UTF-8, one event per line, fsynced per batch.

After a crash the last line may be torn (written in part): it is cut off
before anything is appended, and the journal re-delivers the batch. Files
rotate by size and/or age into the same folder as
``<stem>-<UTC timestamp><suffix>`` (``events-20261125T191037Z.jsonl``),
optionally gzipped. Files are created owner-only: they hold chat content.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Literal

import anyio
import anyio.to_thread
import orjson
from pydantic import Field

from relay.config_base import ByteSize, Duration
from relay.journal import StoredEvent
from relay.logs import get_logger
from relay.sinks.base import DeliveryResult, RetryableError, SinkConfig
from relay.sources.base import CheckResult

log = get_logger("relay.sink.file")


class FileSinkConfig(SinkConfig):
    type: Literal["file"]
    path: str = "var/events.jsonl"
    rotate_bytes: ByteSize | None = Field(default=None, gt=0)
    rotate_interval: Duration | None = Field(default=None, gt=0)
    gzip: bool = False
    fsync: bool = True


def repair_torn_tail(path: Path) -> int:
    """Cut a partial last line left by a crash; returns the bytes removed."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return 0
    if size == 0:
        return 0
    with path.open("rb+") as f:
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        # Scan back in blocks for the last complete line.
        block = 64 * 1024
        end = size
        cut_at = 0
        while end > 0:
            start = max(0, end - block)
            f.seek(start)
            chunk = f.read(end - start)
            index = chunk.rfind(b"\n")
            if index >= 0:
                cut_at = start + index + 1
                break
            end = start
        f.truncate(cut_at)
        f.flush()
        os.fsync(f.fileno())
        return size - cut_at


def erase_user_from_files(path: Path, user_id: str) -> int:
    """Rewrite the sink's file and its rotated siblings without one user's events.

    Each file is rewritten to a temporary file and renamed over the original,
    so a crash leaves either the old or the new file. Returns events removed.
    """
    removed = 0
    pattern = f"{path.stem}-*{path.suffix}"
    candidates = [path, *sorted(path.parent.glob(pattern)),
                  *sorted(path.parent.glob(pattern + ".gz"))]
    for file in candidates:
        if not file.exists():
            continue
        packed = file.name.endswith(".gz")
        opener: Any = gzip.open if packed else open
        kept: list[bytes] = []
        dropped = 0
        with opener(file, "rb") as src:
            for line in src:
                try:
                    event = orjson.loads(line)
                except orjson.JSONDecodeError:
                    kept.append(line)
                    continue
                if event.get("sender") == user_id or event.get("recipient") == user_id:
                    dropped += 1
                else:
                    kept.append(line)
        if not dropped:
            continue
        tmp = file.with_name(f".{file.name}.erasing")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as raw:
            if packed:
                with gzip.GzipFile(fileobj=raw, mode="wb") as dst:
                    dst.writelines(kept)
            else:
                raw.writelines(kept)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, file)
        removed += dropped
    return removed


class FileSink:
    def __init__(self, name: str, config: FileSinkConfig) -> None:
        self.name = name
        self.config = config
        self.path = Path(config.path)
        self._file: IO[bytes] | None = None
        self._size = 0
        self._opened_at = 0.0
        self._limiter = anyio.CapacityLimiter(1)

    async def start(self) -> None:
        await anyio.to_thread.run_sync(self._open, limiter=self._limiter)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        cut = repair_torn_tail(self.path)
        if cut:
            log.warning("cut a torn last line left by an earlier crash", sink=self.name,
                        path=str(self.path), bytes=cut)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._file = os.fdopen(fd, "ab")
        self._size = os.fstat(fd).st_size
        self._opened_at = time.time()

    def _rotate_due(self) -> bool:
        c = self.config
        if self._size == 0:
            return False
        if c.rotate_bytes is not None and self._size >= c.rotate_bytes:
            return True
        return c.rotate_interval is not None and time.time() - self._opened_at >= c.rotate_interval

    def _rotate(self) -> None:
        assert self._file is not None
        self._file.close()
        self._file = None
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        target = self.path.with_name(f"{self.path.stem}-{stamp}{self.path.suffix}")
        os.rename(self.path, target)
        self._fsync_dir()
        if self.config.gzip:
            packed = target.with_name(target.name + ".gz")
            fd = os.open(packed, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with target.open("rb") as src, os.fdopen(fd, "wb") as raw, \
                    gzip.GzipFile(fileobj=raw, mode="wb", filename=target.name) as dst:
                shutil.copyfileobj(src, dst, 1024 * 1024)
                dst.flush()
            with packed.open("rb") as f:
                os.fsync(f.fileno())
            target.unlink()
            self._fsync_dir()
            target = packed
        log.info("rotated", sink=self.name, file=str(target))
        self._open()

    def _fsync_dir(self) -> None:
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _write(self, events: Sequence[StoredEvent]) -> None:
        if self._file is None:
            self._open()
        if self._rotate_due():
            self._rotate()
        assert self._file is not None
        data = b"\n".join(e.payload for e in events) + b"\n"
        self._file.write(data)
        self._file.flush()
        if self.config.fsync:
            os.fsync(self._file.fileno())
        self._size += len(data)

    async def deliver(self, events: Sequence[StoredEvent]) -> DeliveryResult:
        try:
            await anyio.to_thread.run_sync(self._write, events, limiter=self._limiter)
        except OSError as exc:
            # The file may now end with a partial line: reopen (and repair) before retrying.
            await anyio.to_thread.run_sync(self._reset, limiter=self._limiter)
            raise RetryableError(f"cannot write {self.path}: {exc.strerror}") from None
        return DeliveryResult()

    def _reset(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None

    async def close(self) -> None:
        await anyio.to_thread.run_sync(self._reset, limiter=self._limiter)

    async def check(self) -> list[CheckResult]:
        folder = self.path.parent
        probe = folder
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        ok = os.access(probe, os.W_OK)
        detail = "writable" if ok else f"{probe} is not writable"
        return [CheckResult(f"sink {self.name}", str(self.path), ok, detail)]
