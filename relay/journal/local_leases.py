"""Leases in a journal with one writer: every unit is the one relay's, at once.

The embedded journal is held by a single relay (an exclusive lock), so leases
need no coordination; they exist so that the relay runs one code path whatever
the backend. A fence still has to match: a unit released and taken again gets a
new epoch, and writes under the old one are refused.

What a lease's ``previous_end_ago`` says comes from ``<journal>.alive``: the
writer writes the time there at every heartbeat (five times a second; no fsync:
it must survive a killed process, and after a machine crash the relay is gone for
longer than a budget window anyway). A RongCloud budget holds off only for what
is left of a window since the previous relay was last alive (SPEC §7: a restart
right after a crash waits, a new journal or a relay long gone does not).
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from relay.journal.base import Fence, Grant, Lease, LeaseLostError, Member


class LocalLeases:
    def __init__(self) -> None:
        self._held: dict[str, Fence] = {}
        self._epochs: dict[str, int] = {}
        self._member: tuple[str, str, float] | None = None

    def check(self, fence: Fence | None) -> None:
        if fence is not None and self._held.get(fence.unit) != fence:
            raise LeaseLostError(f"the lease on {fence.unit} has moved: nothing written")

    def heartbeat(self, member: str, description: str) -> None:
        self._member = (member, description, time.monotonic())

    def members(self) -> list[Member]:
        if self._member is None:
            return []
        member, description, seen = self._member
        return [Member(member, description, time.monotonic() - seen)]

    def acquire(self, unit: str, member: str) -> Grant | None:
        held = self._held.get(unit)
        if held is not None:
            return None
        epoch = self._epochs.get(unit, 0) + 1
        self._epochs[unit] = epoch
        fence = Fence(unit, member, epoch)
        self._held[unit] = fence
        return Grant(fence, None)

    def holds(self, fence: Fence) -> bool:
        return self._held.get(fence.unit) == fence

    def release(self, fence: Fence) -> None:
        if self._held.get(fence.unit) == fence:
            del self._held[fence.unit]

    def leave(self, member: str) -> None:
        self._held = {u: f for u, f in self._held.items() if f.holder != member}
        self._member = None

    def leases(self) -> list[Lease]:
        return [Lease(f.unit, f.holder, f.epoch, float("inf")) for f in self._held.values()]


# Between two heartbeats the previous relay may still have sent requests.
ALIVE_SLACK = 0.25


class AliveFile:
    """The time the writer last said it was alive, kept beside the journal."""

    def __init__(self, path: Path, *, write: bool) -> None:
        self.path = path
        self._fd: int | None = None
        self._previous = self._read()
        if write:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)

    def _read(self) -> float | None:
        try:
            text = self.path.read_text(encoding="ascii").strip()
            return float(text) if text else None
        except (OSError, ValueError):
            return None

    def beat(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.pwrite(self._fd, f"{time.time():.3f}\n".encode(), 0)

    def previous_end_ago(self) -> float | None:
        """How long ago the previous writer was last alive (None: a new journal)."""
        if self._previous is None:
            return None
        return max(0.0, time.time() - self._previous - ALIVE_SLACK)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
