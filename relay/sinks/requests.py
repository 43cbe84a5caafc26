"""Operators' requests to a running sink: ``relay replay`` and ``relay dlq replay``.

The CLI leaves them in the journal (control requests, dead letters marked for
replay); the sink's runner picks them up between batches, so they reach a
running relay within a second or a stopped one at its next start.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio

from relay.journal import SinkJournal, StoredEvent
from relay.logs import get_logger
from relay.sinks.base import DeliveryResult

log = get_logger("relay.sink")

Deliver = Callable[[list[StoredEvent], anyio.Event], Awaitable[DeliveryResult | None]]
Hook = Callable[[], Awaitable[None]]
Observe = Callable[[list[StoredEvent], DeliveryResult], None]


class OperatorRequests:
    def __init__(self, sink: str, journal: SinkJournal, batch_size: int) -> None:
        self.sink = sink
        self.journal = journal
        self.batch_size = batch_size

    async def apply_rewinds(self, cursor: int, before_rewind: Hook | None = None, *,
                            repeats: bool = False) -> int:
        """``relay replay``: move the cursor back; never forward (SPEC §4 e).

        ``before_rewind`` runs before the journal's cursor moves (the runner's replay
        mark); ``repeats``: the sink delivers exactly once otherwise, so say loudly
        that this repeats what the destination holds.
        """
        for action, arg in await self.journal.take_control(self.sink):
            if action == "replay":
                if before_rewind is not None:
                    await before_rewind()
                # Only ever back (the journal keeps the smaller cursor, and so does this).
                cursor = min(cursor, await self.journal.rewind_sink(self.sink, int(arg)))
                if repeats:
                    log.warning("replaying from the journal: a deliberate repeat; consumers"
                                " see these events again (exactly-once delivery does not"
                                " hide a replay)", sink=self.sink, since_ms=int(arg),
                                from_seq=cursor + 1)
                else:
                    log.info("replaying from the journal", sink=self.sink, since_ms=int(arg),
                             from_seq=cursor + 1)
        return cursor

    async def replay_dead_letters(self, deliver: Deliver, observe: Observe,
                                  stopping: anyio.Event) -> None:
        """``relay dlq replay``: re-deliver marked dead letters; drop those delivered."""
        while not stopping.is_set():
            marked = await self.journal.dead_letters_to_replay(self.sink, self.batch_size)
            if not marked:
                return
            events = [event for _, event in marked]
            result = await deliver(events, stopping)
            if result is None:
                return
            refused = {event.seq: error for event, error in result.rejected}
            await self.journal.settle_dead_letters(
                [dlid for dlid, e in marked if e.seq not in refused],
                [(dlid, refused[e.seq]) for dlid, e in marked if e.seq in refused],
            )
            observe(events, result)
            log.info("dead letters replayed", sink=self.sink,
                     delivered=len(marked) - len(refused), still_refused=len(refused))
