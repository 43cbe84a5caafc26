"""File sink: JSON Lines, torn-line repair, rotation, permissions."""

from __future__ import annotations

import gzip
import os
import stat
import time
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


def lines_everywhere(folder: Path) -> list[bytes]:
    lines: list[bytes] = []
    for file in sorted(folder.glob("events*")):
        data = gzip.decompress(file.read_bytes()) if file.name.endswith(".gz") \
            else file.read_bytes()
        lines += data.splitlines()
    return lines


async def test_a_crash_mid_compression_leaves_no_partial_archive(tmp_path: Path) -> None:
    """The state kill -9 leaves while a rotated file is being gzipped: finished at start."""
    path = tmp_path / "events.jsonl"
    rotated = tmp_path / "events-20261201T000000000000Z.jsonl"
    rotated.write_bytes(b"".join(stored(i).payload + b"\n" for i in range(1, 6)))
    whole = gzip.compress(rotated.read_bytes())
    (tmp_path / ".events-20261201T000000000000Z.jsonl.gz.partial").write_bytes(whole[:20])
    sink = FileSink("f", FileSinkConfig(type="file", path=str(path), rotate_bytes=10_000,
                                        gzip=True))
    await sink.start()
    await sink.deliver([stored(6)])
    await sink.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "events-20261201T000000000000Z.jsonl.gz", "events.jsonl"]
    ids = [orjson.loads(line)["id"] for line in lines_everywhere(tmp_path)]
    assert ids == [f"rc:{i}" for i in range(1, 7)], "every line exactly once"


async def test_a_cut_off_archive_beside_its_plain_copy_is_rebuilt(tmp_path: Path) -> None:
    """What older versions left after a kill -9: a truncated .gz and the whole plain file."""
    path = tmp_path / "events.jsonl"
    rotated = tmp_path / "events-20261201T000000000000Z.jsonl"
    rotated.write_bytes(b"".join(stored(i).payload + b"\n" for i in range(1, 6)))
    (tmp_path / (rotated.name + ".gz")).write_bytes(gzip.compress(rotated.read_bytes())[:30])
    sink = FileSink("f", FileSinkConfig(type="file", path=str(path), gzip=True))
    await sink.start()
    await sink.close()
    ids = [orjson.loads(line)["id"] for line in lines_everywhere(tmp_path)]
    assert ids == [f"rc:{i}" for i in range(1, 6)]
    assert not rotated.exists()


async def test_time_rotation_counts_from_the_first_event_not_the_last_restart(
        tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    old = orjson.dumps({"id": "rc:0", "fetched_at": (time.time() - 3600) * 1000})
    path.write_bytes(old + b"\n")
    for seq in (1, 2):  # restarted more often than rotate_interval
        sink = FileSink("f", FileSinkConfig(type="file", path=str(path),
                                            rotate_interval="10m"))
        await sink.start()
        await sink.deliver([stored(seq)])
        await sink.close()
    rotated = sorted(tmp_path.glob("events-*.jsonl"))
    assert len(rotated) == 1, "an hour-old file rotates although no process ran 10 minutes"
    assert rotated[0].read_bytes() == old + b"\n"
    assert len(path.read_bytes().splitlines()) == 2


def test_erase_names_an_unreadable_archive_instead_of_aborting(tmp_path: Path) -> None:
    from relay.sinks.file import FileEraseError, erase_user_from_files

    path = tmp_path / "events.jsonl"
    path.write_bytes(b"")
    (tmp_path / "events-20261201T000000000000Z.jsonl.gz").write_bytes(
        gzip.compress(b'{"sender":"u1"}\n' * 100)[:25])
    with pytest.raises(FileEraseError, match="cannot read it whole"):
        erase_user_from_files(path, "u1")


def with_time(seq: int, size: int = 0) -> StoredEvent:
    payload = orjson.dumps({"id": f"rc:{seq}", "fetched_at": 1000 + seq, "pad": "p" * size})
    return StoredEvent(seq, f"rc:{seq}", 1000 + seq, stored(seq).routing_json, payload)


async def test_the_position_is_the_last_whole_line(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    # A last line longer than the blocks the file is read back in, then a torn one.
    path.write_bytes(with_time(1).payload + b"\n" + with_time(2, 200_000).payload + b"\n"
                     + b'{"id":"rc:3","fetch')
    sink = FileSink("f", FileSinkConfig(type="file", path=str(path)))
    await sink.start()
    position = await sink.position()
    await sink.close()
    assert position is not None
    assert (position.event_id, position.fetched_at) == ("rc:2", 1002)
    assert sink.commits_position


async def test_an_empty_file_takes_the_position_of_the_newest_rotated_one(
        tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    (tmp_path / "events-20261201T000000000000Z.jsonl").write_bytes(with_time(1).payload + b"\n")
    (tmp_path / "events-20261202T000000000000Z.jsonl.gz").write_bytes(gzip.compress(
        with_time(2).payload + b"\n" + with_time(3).payload + b"\n"))
    path.write_bytes(b"")
    sink = FileSink("f", FileSinkConfig(type="file", path=str(path), gzip=True))
    await sink.start()
    position = await sink.position()
    await sink.close()
    assert position is not None
    assert position.event_id == "rc:3"
    assert position.where.endswith(".jsonl.gz")


async def test_no_file_or_no_event_means_no_position(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    sink = FileSink("f", FileSinkConfig(type="file", path=str(path)))
    await sink.start()
    assert await sink.position() is None
    await sink.deliver([StoredEvent(1, "x", 1, b"[]", b'"not an event"')])
    assert await sink.position() is None  # read, not trusted: the journal's cursor decides
    await sink.close()


async def _run_to_the_end(tmp_path: Path, last_line: bytes | None,
                          journal_cursor: int) -> list[str]:
    """A real SQLite journal of 10 events, a file ending with ``last_line``, the journal's
    cursor at ``journal_cursor``: the ids the runner appends."""
    import anyio

    from relay.journal import NewEvent
    from relay.journal.sqlite import SqliteJournal
    from relay.sinks.runner import SinkRunner

    journal = SqliteJournal.open(tmp_path / "j.db")
    try:
        await journal.commit_batch([NewEvent(f"rc:{n}", 1000 + n, stored(n).routing_json,
                                             with_time(n).payload, 0) for n in range(1, 11)])
        await journal.register_sinks(["f"], prune=True)
        await journal.advance_sink("f", journal_cursor)
        path = tmp_path / "events.jsonl"
        path.write_bytes(last_line + b"\n" if last_line else b"")
        config = FileSinkConfig(type="file", path=str(path))
        runner = SinkRunner(FileSink("f", config), config, journal)
        stopping = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(runner.run, stopping)
            with anyio.fail_after(20):  # polled: the runner has no "done" to wait for
                while True:
                    if await journal.sink_cursor("f") >= 10:
                        break
                    await anyio.sleep(0.02)
            stopping.set()
        lines = path.read_bytes().splitlines()[1 if last_line else 0:]
        return [orjson.loads(line)["id"] for line in lines]
    finally:
        await journal.close()


async def test_the_file_position_wins_over_the_journal_cursor_only_when_ahead(
        tmp_path: Path) -> None:
    ahead = await _run_to_the_end(tmp_path / "a", with_time(7).payload, journal_cursor=4)
    assert ahead == ["rc:8", "rc:9", "rc:10"], "nothing the file holds is written again"
    behind = await _run_to_the_end(tmp_path / "b", with_time(2).payload, journal_cursor=4)
    assert behind == [f"rc:{n}" for n in range(5, 11)], "the journal's cursor never goes back"


async def test_a_last_event_the_journal_no_longer_holds_leaves_the_cursor_in_charge(
        tmp_path: Path) -> None:
    gone = orjson.dumps({"id": "rc:compacted-long-ago", "fetched_at": 5})
    assert await _run_to_the_end(tmp_path / "a", gone, journal_cursor=4) == \
        [f"rc:{n}" for n in range(5, 11)]
    # The same id, but another copy (accepted again after the dedup window): not it.
    other_copy = orjson.dumps({"id": "rc:7", "fetched_at": 1})
    assert await _run_to_the_end(tmp_path / "b", other_copy, journal_cursor=4) == \
        [f"rc:{n}" for n in range(5, 11)]
