"""The LeanCloud emulator's message history: a large columnar part and a small live part.

A real application has years of history over thousands of conversations; the
emulator has to hold millions of messages in little memory and make them in
seconds. So the bulk of the history is kept as parallel arrays sorted by
(timestamp, msg-id) — 8 bytes of timestamp, 8 of id number and 4 of
conversation per message, plus a per-conversation array of positions — and a
record is encoded only when a page is served. Messages added one by one (live
traffic, late arrivals, chosen test messages, poison records) live in a small
sorted overlay; queries merge the two.

msg-ids look like the document's (22 characters of URL-safe base64 over 16
bytes), with the alphabet re-ordered to ASCII order so that the string order of
a bulk id equals the order of its 64-bit number: the history's order is the
plain string order of (timestamp, msg-id) throughout.
"""

from __future__ import annotations

import base64
import bisect
import functools
import heapq
import itertools
import random
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

# 64 characters in ASCII order: a fixed-length string sorts like the number it spells.
SORTED_ALPHABET = b"-0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz"
_TO_SORTED = bytes.maketrans(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/", SORTED_ALPHABET)
_MASK64 = (1 << 64) - 1
_SCRAMBLE = 0x9E3779B97F4A7C15  # odd: multiplying by it mod 2^64 is a bijection
_MIX = 0xD6E8FEB86659FD93

Key = tuple[int, str]  # (timestamp ms, msg-id): the history's order
_CHUNK = 1 << 16


def id_number(serial: int) -> int:
    """A random-looking, unique 64-bit number for the ``serial``-th bulk message."""
    return (serial * _SCRAMBLE) & _MASK64


def msg_id_of(number: int) -> str:
    """The 22-character msg-id of a bulk id number; sorts like the number."""
    low = ((number * _MIX) & _MASK64) ^ (number >> 29)
    raw = number.to_bytes(8, "big") + low.to_bytes(8, "big")
    return base64.b64encode(raw)[:22].translate(_TO_SORTED).decode("ascii")


def iso(ms: int) -> str:
    """LeanCloud's date format: ``2018-01-17T04:15:33.386Z``."""
    import datetime as _dt

    moment = _dt.datetime.fromtimestamp(ms / 1000, _dt.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


@dataclass
class Conversation:
    """One ``_Conversation`` row: a conversation (单聊/群聊) or a chatroom (``tr: true``)."""

    object_id: str
    name: str
    members: tuple[str, ...]
    creator: str
    attr: dict[str, Any]
    created_at: int
    updated_at: int
    room: bool
    unique: bool = False
    last_message_at: int | None = None

    def row(self) -> dict[str, Any]:
        row: dict[str, Any] = {"objectId": self.object_id, "name": self.name}
        if self.room:
            row["tr"] = True
        else:
            row["m"] = list(self.members)
            row["unique"] = self.unique
            if self.unique:
                row["uniqueId"] = f"{int(self.object_id, 16) * 7 & ((1 << 128) - 1):032x}"
        row["c"] = self.creator
        row["attr"] = self.attr
        if self.last_message_at is not None:
            row["lm"] = {"__type": "Date", "iso": iso(self.last_message_at)}
        row["createdAt"] = iso(self.created_at)
        row["updatedAt"] = iso(self.updated_at)
        return row


@dataclass
class Stored:
    """One overlay message, encoded once."""

    key: Key
    conv: str
    visible_at: float  # time.time() from which queries see it
    encoded: str

    def get_encoded(self) -> str:
        return self.encoded


@dataclass
class _Bulk:
    ts: array[int] = field(default_factory=lambda: array("q"))
    ids: array[int] = field(default_factory=lambda: array("Q"))
    conv: array[int] = field(default_factory=lambda: array("I"))
    by_conv: list[array[int]] = field(default_factory=list)


class _Keys:
    """Bulk positions seen as their (timestamp, msg-id) keys, for bisect."""

    def __init__(self, bulk: _Bulk, positions: array[int] | None) -> None:
        self.bulk = bulk
        self.positions = positions

    def __len__(self) -> int:
        return len(self.positions) if self.positions is not None else len(self.bulk.ts)

    def __getitem__(self, index: int) -> Key:
        i = self.positions[index] if self.positions is not None else index
        return self.bulk.ts[i], msg_id_of(self.bulk.ids[i])


@dataclass(frozen=True)
class Bound:
    timestamp: int
    msg_id: str | None  # None: the timestamp alone (every message at it)
    inclusive: bool


def lower_index(keys: Any, bound: Bound) -> int:
    """First index at or above a lower bound (msg-ids are never empty: (t, "") < all at t)."""
    if bound.msg_id is None:
        return bisect.bisect_left(keys, (bound.timestamp if bound.inclusive
                                         else bound.timestamp + 1, ""))
    key = (bound.timestamp, bound.msg_id)
    return bisect.bisect_left(keys, key) if bound.inclusive else bisect.bisect_right(keys, key)


def upper_index(keys: Any, bound: Bound) -> int:
    """One past the last index at or below an upper bound."""
    if bound.msg_id is None:
        return bisect.bisect_left(keys, (bound.timestamp + 1 if bound.inclusive
                                         else bound.timestamp, ""))
    key = (bound.timestamp, bound.msg_id)
    return bisect.bisect_right(keys, key) if bound.inclusive else bisect.bisect_left(keys, key)


class History:
    """Every message of the application, in (timestamp, msg-id) order."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.conversations: list[Conversation] = []
        self._conv_index: dict[str, int] = {}
        self._bulk = _Bulk()
        self._serial = itertools.count(1)
        # Overlay: sorted keys, the stored messages, and per conversation its keys.
        self._keys: list[Key] = []
        self._stored: dict[Key, Stored] = {}
        self._conv_keys: dict[str, list[Key]] = {}
        # Bulk positions hidden until the history has been read past them (late sends).
        self._hidden: dict[int, float] = {}  # position -> seconds after being passed
        self._revealed: dict[int, float] = {}  # position -> visible from (time.time())

    # -- conversations ---------------------------------------------------------

    def add_conversation(self, conv: Conversation) -> int:
        index = len(self.conversations)
        self.conversations.append(conv)
        self._conv_index[conv.object_id] = index
        self._bulk.by_conv.append(array("I"))
        return index

    def conversation(self, object_id: str) -> Conversation | None:
        index = self._conv_index.get(object_id)
        return None if index is None else self.conversations[index]

    def make_conversations(self, count: int, rooms: int, *, first_ms: int, last_ms: int,
                           clients: int) -> None:
        rng = self.rng
        for n in range(count + rooms):
            room = n >= count
            created = first_ms + int(rng.random() * max(1, (last_ms - first_ms) // 4))
            size = 0 if room else (2 if rng.random() < 0.6 else rng.randrange(3, 12))
            members = tuple(sorted({f"client{rng.randrange(clients)}" for _ in range(size)}))
            while not room and len(members) < 2:
                members = (*members, f"client{rng.randrange(clients)}")
                members = tuple(sorted(set(members)))
            self.add_conversation(Conversation(
                object_id=f"{rng.getrandbits(96):024x}",
                name=(f"聊天室 {n}" if room else
                      "" if size == 2 else f"group {n}"),
                members=members,
                creator=members[0] if members else f"client{rng.randrange(clients)}",
                attr={"topic": f"topic-{n % 17}", "level": n % 5} if n % 3 else {},
                created_at=created, updated_at=created + int(rng.random() * 86_400_000),
                room=room, unique=not room and size == 2))

    # -- the bulk history --------------------------------------------------------

    def load(self, count: int, *, first_ms: int, last_ms: int, tie_ratio: float) -> None:
        """``count`` messages spread over [first_ms, last_ms], sorted; appended to the bulk.

        ``tie_ratio``: the share of messages that carry the same timestamp as the
        one before (many messages on one millisecond).
        """
        if not self.conversations:
            raise ValueError("make conversations first")
        bulk = self._bulk
        if bulk.ts and first_ms <= bulk.ts[-1]:
            raise ValueError("bulk history is appended in time order")
        # Generated in chunks so that no temporary list of millions of ints is ever held.
        random_ = self.rng.random
        total = len(self.conversations)
        span = max(1, last_ms - first_ms)
        # A little short of the span (the clamp below rarely bites); ties take no time.
        mean_gap = 0.98 * span / max(1.0, count * (1 - min(tie_ratio, 0.99)))
        stamp = first_ms
        by_conv = bulk.by_conv
        done = 0
        while done < count:
            size = min(_CHUNK, count - done)
            gaps = [0 if random_() < tie_ratio else 1 + int(random_() * 2 * mean_gap)
                    for _ in range(size)]
            gaps[0] = 1 if done else 0  # a run of equal stamps never straddles two chunks
            stamps = [min(last_ms, s) for s in itertools.accumulate(gaps, initial=stamp)][1:]
            stamp = stamps[-1]
            serial = next(self._serial)
            self._serial = itertools.count(serial + size)
            numbers = [id_number(s) for s in range(serial, serial + size)]
            # Within one timestamp the order is the msg-id's: sort each run of equal stamps.
            run = 0
            for i in range(1, size + 1):
                if i == size or stamps[i] != stamps[run]:
                    if i - run > 1:
                        numbers[run:i] = sorted(numbers[run:i])
                    run = i
            # Some conversations are busier than others.
            convs = [int(total * r * r) for r in (random_() for _ in range(size))]
            base = len(bulk.ts)
            bulk.ts.extend(stamps)
            bulk.ids.extend(numbers)
            bulk.conv.extend(convs)
            for offset, c in enumerate(convs):
                by_conv[c].append(base + offset)
            done += size
        for c, conv in enumerate(self.conversations):
            positions = by_conv[c]
            if positions:
                conv.last_message_at = max(conv.last_message_at or 0, bulk.ts[positions[-1]])

    def bulk_count(self) -> int:
        return len(self._bulk.ts)

    def bulk_key(self, position: int) -> Key:
        return self._bulk.ts[position], msg_id_of(self._bulk.ids[position])

    def bulk_conversation(self, position: int) -> str:
        return self.conversations[self._bulk.conv[position]].object_id

    def hide_until_passed(self, positions: list[int], seconds: float) -> None:
        """These bulk messages show up only ``seconds`` after a history read went past them."""
        for p in positions:
            self._hidden[p] = seconds

    def hidden_count(self) -> int:
        return len(self._hidden)

    def _bulk_record(self, i: int) -> dict[str, Any]:
        bulk = self._bulk
        conv = self.conversations[bulk.conv[i]]
        number = bulk.ids[i]
        pick = (number >> 20) % 100
        if conv.members:
            sender = conv.members[(number >> 8) % len(conv.members)]
        else:
            sender = f"client{(number >> 8) % 997}"
        binary = False
        if conv.room or pick < 55:
            data = f"今天天气不错! {i}"
        elif pick < 85:
            data = orjson.dumps({"_lctype": -1, "_lctext": f"hi {i} ✓",
                                 "_lcattrs": {"n": i}}).decode()
        elif pick < 95:
            data = orjson.dumps({"_lctype": -2, "_lctext": "", "_lcfile": {
                "url": f"https://files.example/{i}.png", "objId": f"{i:024x}",
                "metaData": {"name": f"{i}.png", "format": "png", "width": 1, "height": 1,
                             "size": 68}}}).decode()
        else:
            binary = True
            data = base64.b64encode(b"\xff" + number.to_bytes(8, "big")).decode("ascii")
        return {"timestamp": bulk.ts[i], "conv-id": conv.object_id, "data": data,
                "from": sender, "msg-id": msg_id_of(number), "is-conv": True,
                "is-room": conv.room, "to": conv.object_id, "bin": binary,
                "from-ip": f"203.0.113.{1 + number % 254}"}

    def encode_bulk(self, i: int) -> str:
        return orjson.dumps(self._bulk_record(i)).decode()

    # -- the overlay -----------------------------------------------------------------

    def add(self, record: dict[str, Any], visible_at: float, encoded: str | None = None) -> Key:
        key = (int(record["timestamp"]), str(record["msg-id"]))
        conv = str(record.get("conv-id"))
        stored = Stored(key, conv, visible_at,
                        encoded if encoded is not None else orjson.dumps(record).decode())
        if key not in self._stored:  # a message is its key: the same key again replaces it
            bisect.insort(self._keys, key)
            bisect.insort(self._conv_keys.setdefault(conv, []), key)
        self._stored[key] = stored
        return key

    def overlay_count(self) -> int:
        return len(self._keys)

    def overlay_keys(self) -> list[Key]:
        return list(self._keys)

    # -- queries ---------------------------------------------------------------------

    def select(self, lower: Bound, upper: Bound, ascending: bool, limit: int, now: float,
               conv: str | None = None) -> list[tuple[Key, Callable[[], str]]]:
        """Up to ``limit`` visible messages within the bounds, in the asked direction."""
        bulk = self._bulk
        positions: array[int] | None = None
        if conv is not None:
            index = self._conv_index.get(conv)
            positions = bulk.by_conv[index] if index is not None else array("I")
        keys = _Keys(bulk, positions)
        lo, hi = lower_index(keys, lower), upper_index(keys, upper)
        overlay = self._keys if conv is None else self._conv_keys.get(conv, [])
        olo, ohi = lower_index(overlay, lower), upper_index(overlay, upper)
        step = range(lo, hi) if ascending else range(hi - 1, lo - 1, -1)
        ostep = range(olo, ohi) if ascending else range(ohi - 1, olo - 1, -1)

        def bulk_items() -> Iterator[tuple[Key, Callable[[], str]]]:
            hidden = self._hidden
            for index in step:
                i = positions[index] if positions is not None else index
                if hidden and i in hidden and not self._visible(i, now):
                    continue
                yield (bulk.ts[i], msg_id_of(bulk.ids[i])), functools.partial(self.encode_bulk, i)

        def overlay_items() -> Iterator[tuple[Key, Callable[[], str]]]:
            for index in ostep:
                stored = self._stored[overlay[index]]
                if stored.visible_at <= now:
                    yield stored.key, stored.get_encoded

        merged = heapq.merge(bulk_items(), overlay_items(), key=lambda item: item[0],
                             reverse=not ascending)
        taken = list(itertools.islice(merged, limit))
        if conv is None and self._hidden and taken:
            self._passed(max(taken[0][0], taken[-1][0]), now)
        return taken

    def _visible(self, position: int, now: float) -> bool:
        at = self._revealed.get(position)
        return at is not None and at <= now

    def _passed(self, top: Key, now: float) -> None:
        """An app-wide read went past hidden messages: they turn up a little later."""
        bulk = self._bulk
        for position, seconds in list(self._hidden.items()):
            if position in self._revealed:
                continue
            if (bulk.ts[position], msg_id_of(bulk.ids[position])) < top:
                self._revealed[position] = now + seconds

    def all_msg_ids(self) -> Iterator[str]:
        ids = self._bulk.ids
        for i in range(len(ids)):
            yield msg_id_of(ids[i])
        for key in self._keys:
            yield key[1]

    def count_for(self, conv: str) -> int:
        index = self._conv_index.get(conv)
        bulk = len(self._bulk.by_conv[index]) if index is not None else 0
        return bulk + len(self._conv_keys.get(conv, []))

    def memory_bytes(self) -> int:
        """Bytes held by the bulk arrays (what scales with the history)."""
        b = self._bulk
        return (b.ts.itemsize * len(b.ts) + b.ids.itemsize * len(b.ids)
                + b.conv.itemsize * len(b.conv) + sum(a.itemsize * len(a) for a in b.by_conv))
