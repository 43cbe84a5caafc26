"""The benchmarks' own helpers: a wrong count would make every figure wrong."""

from __future__ import annotations

import os
from pathlib import Path

from benchmarks.common import LineCounter


def test_line_counter_follows_a_growing_file_and_a_replaced_one(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    counter = LineCounter(path)
    assert counter.count() == 0  # not there yet
    path.write_bytes(b"a\nb\n")
    assert counter.count() == 2
    with path.open("ab") as f:
        f.write(b"c\npartial")
    assert counter.count() == 3  # a line without its newline is not counted yet
    with path.open("ab") as f:
        f.write(b"\n" + b"x\n" * 5000)
    assert counter.count() == 5004
    replacement = tmp_path / "new.jsonl"
    replacement.write_bytes(b"only\n")
    os.replace(replacement, path)  # rotated: a new file under the same name
    assert counter.count() == 1
    path.unlink()
    assert counter.count() == 0
