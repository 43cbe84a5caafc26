"""The last-poll mark a RongCloud endpoint keeps in the journal (for the gap report at start).

It only says when the endpoint was last polled, to tell at start-up whether the gap may
have outlasted the provider's retention (hours): written every ten seconds, not with every
batch, so that a batch's commit is its events alone (one statement, see
``relay.journal.sqlite_commit.GroupWriter``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest

from relay.emulators.rongcloud import RongCloudEmulator
from relay.journal import CommitResult, NewEvent
from relay.journal.sqlite import SqliteJournal
from relay.sources.base import SourceRuntime
from relay.sources.rongcloud import RongCloudSource, RongCloudSourceConfig
from tests.support.emulators import serving

pytestmark = pytest.mark.anyio


class RecordingJournal(SqliteJournal):
    """A real SQLite journal that remembers which commits carried cursors."""

    cursor_commits: list[Mapping[str, str] | None]

    async def commit_batch(self, events: Sequence[NewEvent], *,
                           cursors: Mapping[str, str] | None = None,
                           **kwargs: Any) -> CommitResult:
        if events:
            self.cursor_commits.append(cursors)
        return await super().commit_batch(events, cursors=cursors, **kwargs)


async def test_the_last_poll_mark_is_written_once_in_ten_seconds_not_with_every_batch(
        tmp_path: Path) -> None:
    emulator = RongCloudEmulator("key", "secret", budget=None, seed=3, batch_size=100)
    emulator.generate(1000, "person")
    with serving(emulator) as (_loop, server):
        journal = RecordingJournal.open(tmp_path / "relay.db")
        journal.cursor_commits = []
        try:
            source = RongCloudSource("rc", RongCloudSourceConfig(
                type="rongcloud", app_key="key", app_secret="secret", base_urls=server.urls,
                endpoints=["person"], requests_per_second=1000))
            stopping = anyio.Event()
            async with anyio.create_task_group() as tg:
                tg.start_soon(source.run, SourceRuntime(journal=journal, stopping=stopping))
                with anyio.fail_after(20):
                    while await journal.max_seq() < 1000:  # noqa: ASYNC110 - the journal's count
                        await anyio.sleep(0.01)
                stopping.set()
            assert len(journal.cursor_commits) >= 10  # an answer of 100 a commit
            # The first batch marks the poll; the others, within ten seconds of it, do not.
            assert journal.cursor_commits[0] is not None
            assert all(c is None for c in journal.cursor_commits[1:]), journal.cursor_commits
            marks = await journal.get_cursors("rc:")
            assert list(marks) == ["rc:person:last_poll_ms"]
        finally:
            await journal.close()
