"""File sink: JSON Lines, raw UTF-8, one event per line, fsynced per batch.

After a crash the last line may be torn (written in part): it is cut off
before anything is appended. The file is its own position: at start the last
whole line's event id (in the newest rotated file if the current one is
empty) tells the runner where the file stands, so a crash between the fsync
and the journal's cursor write repeats no line. Files
rotate by size and/or age into the same folder as
``<stem>-<UTC timestamp><suffix>`` (``events-20261125T191037Z.jsonl``),
optionally gzipped. A file's age is that of its first event (so restarts do
not keep a file young for ever). Compression writes a hidden temporary file
and renames it into place, so a crash never leaves a truncated ``.gz`` beside
its plain copy; an interrupted compression is redone at the next start.
Files and folders are created owner-only: they hold chat content.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import IO, Any, Literal

import orjson
from pydantic import Field

from relay.checks import CheckResult
from relay.config_base import ByteSize, Duration
from relay.journal import StoredEvent
from relay.logs import get_logger
from relay.private_files import make_private_dirs
from relay.sinks.base import Advance, DeliveryResult, RetryableError, SinkConfig, SinkPosition
from relay.worker_thread import WorkerThread

log = get_logger("relay.sink.file")


class FileSinkConfig(SinkConfig):
    type: Literal["file"]
    path: str = "var/events.jsonl"
    rotate_bytes: ByteSize | None = Field(default=None, gt=0)
    rotate_interval: Duration | None = Field(default=None, gt=0)
    gzip: bool = False
    fsync: bool = True
    # An fsync per delivery: a file read by batch jobs loses nothing by 50 ms, and a
    # relay that keeps up wrote a batch (and fsynced it) per journal commit, ~300 events.
    batch_wait: Duration = Field(default=0.05, le=60)


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


class FileEraseError(Exception):
    """A sink file could not be read whole, so one user's events could not be erased from it."""


def erase_user_from_files(path: Path, user_id: str, *, dry_run: bool = False) -> int:
    """Rewrite the sink's file and its rotated siblings without one user's events.

    Each file is rewritten to a temporary file and renamed over the original,
    so a crash leaves either the old or the new file. Returns events removed
    (with ``dry_run``, only counts them and changes nothing).
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
        try:
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
        except (OSError, EOFError) as exc:
            raise FileEraseError(f"{file}: cannot read it whole ({exc}); nothing was erased"
                                 " from it") from None
        if not dropped or dry_run:
            removed += dropped
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


def _packed_name(plain: Path) -> Path:
    return plain.with_name(plain.name + ".gz")


def _temporary_name(packed: Path) -> Path:
    return packed.with_name(f".{packed.name}.partial")


def compress_rotated(plain: Path) -> Path:
    """Gzip a rotated file: written aside, fsynced, renamed into place, then the plain one goes.

    Every step leaves a state a restart can finish: only a whole ``.gz`` ever has
    its final name, and the plain file is removed only after it.
    """
    packed = _packed_name(plain)
    partial = _temporary_name(packed)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with plain.open("rb") as src, os.fdopen(fd, "wb") as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb", filename=plain.name) as dst:
            shutil.copyfileobj(src, dst, 1024 * 1024)
        raw.flush()
        os.fsync(raw.fileno())
    os.replace(partial, packed)
    fsync_dir(plain.parent)
    plain.unlink()
    fsync_dir(plain.parent)
    return packed


def finish_interrupted_rotation(path: Path, gzipped: bool) -> list[Path]:
    """After a crash mid-compression: drop partial files, compress what was left plain."""
    finished = []
    pattern = f"{path.stem}-*{path.suffix}"
    for leftover in path.parent.glob(f".{pattern}.gz.partial"):
        leftover.unlink()
    for plain in sorted(path.parent.glob(pattern)):
        packed = _packed_name(plain)
        if packed.exists() and _gzip_is_whole(packed):
            plain.unlink()  # the .gz got its name last, so it is whole: the plain copy is spare
        elif packed.exists() or gzipped:
            # A cut-off .gz (written in place by an older version): the plain copy is the truth.
            finished.append(compress_rotated(plain))
    return finished


def _gzip_is_whole(packed: Path) -> bool:
    try:
        with gzip.open(packed, "rb") as f:
            while f.read(1024 * 1024):
                pass
    except (OSError, EOFError):
        return False
    return True


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def last_line(path: Path) -> bytes | None:
    """The last whole line of a JSON Lines file (plain or gzipped), or None if it has none."""
    if path.name.endswith(".gz"):
        found = None
        with gzip.open(path, "rb") as packed:  # a gzip stream reads only forwards
            for line in packed:
                if line.endswith(b"\n"):
                    found = line
        return found
    with path.open("rb") as f:
        end = f.seek(0, os.SEEK_END)
        tail = b""
        while end > 0:
            start = max(0, end - 64 * 1024)
            f.seek(start)
            tail = f.read(end - start) + tail
            end = start
            whole = tail[:tail.rfind(b"\n") + 1]  # a torn end is no line
            if not whole:
                continue
            cut = whole.rfind(b"\n", 0, len(whole) - 1)
            if cut >= 0 or end == 0:
                return whole[cut + 1:]
    return None


def newest_file(path: Path) -> Path | None:
    """The current file if it holds anything, else the newest rotated one (names sort by
    time), else None."""
    try:
        if path.stat().st_size > 0:
            return path
    except FileNotFoundError:
        pass
    pattern = f"{path.stem}-*{path.suffix}"
    rotated = [*path.parent.glob(pattern), *path.parent.glob(pattern + ".gz")]
    return max(rotated, key=lambda p: p.name.removesuffix(".gz"), default=None)


def first_line_fetched_at(path: Path) -> float | None:
    """When the file's first event was fetched (seconds), or None if it cannot be read."""
    try:
        with path.open("rb") as f:
            line = f.readline(1 << 20)
        return float(orjson.loads(line)["fetched_at"]) / 1000
    except (OSError, ValueError, KeyError, TypeError):
        return None


class FileSink:
    #: The last line written is the position: fsynced with the data, read back at start.
    commits_position = True

    def __init__(self, name: str, config: FileSinkConfig) -> None:
        self.name = name
        self.config = config
        self.path = Path(config.path)
        self._file: IO[bytes] | None = None
        self._size = 0
        self._opened_at = 0.0
        self._thread = WorkerThread(f"relay-file-{name}")

    async def start(self) -> None:
        await self._thread.run(self._open)

    def _open(self) -> None:
        make_private_dirs(self.path.parent)
        for packed in finish_interrupted_rotation(self.path, self.config.gzip):
            log.info("finished a compression interrupted by an earlier stop", sink=self.name,
                     file=str(packed))
        cut = repair_torn_tail(self.path)
        if cut:
            log.warning("cut a torn last line left by an earlier crash", sink=self.name,
                        path=str(self.path), bytes=cut)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._file = os.fdopen(fd, "ab")
        self._size = os.fstat(fd).st_size
        # The file's age is its first event's, not this process's: a relay restarted more
        # often than rotate_interval must still rotate.
        self._opened_at = (first_line_fetched_at(self.path) if self._size else None) \
            or time.time()

    async def position(self) -> SinkPosition | None:
        return await self._thread.run(self._position)

    def _position(self) -> SinkPosition | None:
        if self._file is None:
            self._open()  # cuts a torn line first: only whole lines count
        try:
            file = newest_file(self.path)
            line = last_line(file) if file is not None else None
        except (OSError, EOFError) as exc:
            log.warning("cannot read the file's last event; resuming from the journal's"
                        " cursor", sink=self.name, path=str(self.path), error=str(exc))
            return None
        if file is None or line is None:
            return None
        try:
            event = orjson.loads(line)
            return SinkPosition(str(file), event_id=str(event["id"]),
                                fetched_at=int(event["fetched_at"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            log.warning("the file's last line is not an event; resuming from the journal's"
                        " cursor", sink=self.name, path=str(file))
            return None

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
        fsync_dir(self.path.parent)
        if self.config.gzip:
            target = compress_rotated(target)
        log.info("rotated", sink=self.name, file=str(target))
        self._open()

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

    async def deliver(self, events: Sequence[StoredEvent],
                      advance: Advance | None = None) -> DeliveryResult:
        try:
            await self._thread.run(partial(self._write, events))
        except OSError as exc:
            # The file may now end with a partial line: reopen (and repair) before retrying.
            await self._thread.run(self._reset)
            raise RetryableError(f"cannot write {self.path}: {exc.strerror}") from None
        return DeliveryResult()

    def _reset(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None

    async def close(self) -> None:
        await self._thread.run(self._reset)
        self._thread.close()

    async def check(self) -> list[CheckResult]:
        folder = self.path.parent
        probe = folder
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        ok = os.access(probe, os.W_OK)
        detail = "writable" if ok else f"{probe} is not writable"
        return [CheckResult(f"sink {self.name}", str(self.path), ok, detail)]
