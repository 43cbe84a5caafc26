"""File sink: JSON Lines, torn-line repair, rotation, permissions."""

from __future__ import annotations

import gzip
import os
import stat
from pathlib import Path

import orjson
import pytest

from relay.journal import StoredEvent
from relay.sinks.file import FileSink, FileSinkConfig, repair_torn_tail

pytestmark = pytest.mark.anyio


def stored(seq: int) -> StoredEvent:
    payload = orjson.dumps({"id": f"rc:{seq}", "content": "héllo ✓"})
    return StoredEvent(seq, f"rc:{seq}", 2, b'["rc","rongcloud","message","direct","RC:TxtMsg",'
                       b'"direct:a|b"]', payload)


async def test_writes_one_event_per_line_raw_utf8(tmp_path: Path) -> None:
    sink = FileSink("f", FileSinkConfig(type="file", path=str(tmp_path / "out" / "events.jsonl")))
    await sink.start()
    await sink.deliver([stored(1), stored(2)])
    await sink.close()
    data = (tmp_path / "out" / "events.jsonl").read_bytes()
    assert data.count(b"\n") == 2
    assert "héllo ✓".encode() in data  # raw UTF-8, not \u escapes
    mode = stat.S_IMODE(os.stat(tmp_path / "out" / "events.jsonl").st_mode)
    assert mode == 0o600


def test_torn_last_line_is_cut(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(b'{"a":1}\n{"b":2}\n{"c":')
    assert repair_torn_tail(path) == len(b'{"c":')
    assert path.read_bytes() == b'{"a":1}\n{"b":2}\n'
    assert repair_torn_tail(path) == 0
    path.write_bytes(b"no newline at all")
    repair_torn_tail(path)
    assert path.read_bytes() == b""


async def test_start_repairs_before_appending(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(b'{"a":1}\n{"torn')
    sink = FileSink("f", FileSinkConfig(type="file", path=str(path)))
    await sink.start()
    await sink.deliver([stored(3)])
    await sink.close()
    lines = path.read_bytes().splitlines()
    assert next(orjson.loads(line) for line in lines) == {"a": 1}
    assert len(lines) == 2


async def test_rotation_by_size_with_gzip(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    sink = FileSink("f", FileSinkConfig(type="file", path=str(path), rotate_bytes=200, gzip=True))
    await sink.start()
    for seq in range(1, 11):
        await sink.deliver([stored(seq), stored(seq + 100)])
    await sink.close()
    rotated = sorted(tmp_path.glob("events-*.jsonl.gz"))
    assert rotated, "expected rotated files"
    lines = []
    for file in rotated:
        assert file.name.startswith("events-")
        assert file.name.endswith("Z.jsonl.gz")
        lines += gzip.decompress(file.read_bytes()).splitlines()
    lines += path.read_bytes().splitlines()
    assert len(lines) == 20
    assert len({orjson.loads(line)["id"] for line in lines}) == 20
