"""WuKongIM emulator: the server API's message endpoints as the provider documents them.

Written from ``wukongim-message-api.md`` plus what the WuKongIM v2 server source
does where the document is silent:

- ``POST /message/sync {"uid", "limit"}`` → a bare JSON array of offline command
  messages (写扩散, ``header.sync_once = 1``), oldest first, ``limit`` at most.
  The server remembers, per uid and in memory only, what syncs returned since the
  last ack; without an ack the next sync returns the same messages again.
- ``POST /message/syncack {"uid", "last_message_seq"}`` acknowledges exactly that
  remembered set (whatever ``last_message_seq`` says, as long as it is not 0).
  A server restart (:meth:`WuKongIMEmulator.restart`) forgets the remembered
  sets, so everything not yet acknowledged is delivered again.
- ``POST /channel/messagesync`` (读扩散 channel history): ``start_message_seq``
  inclusive, ``end_message_seq`` exclusive (0 = no end), ``limit``, ``pull_mode``
  1 = upward (seq ≥ start), 0 = downward (seq ≤ start); start = end = 0 → the
  latest ``limit``. Answer ``{"start_message_seq", "end_message_seq", "more",
  "messages"}``, messages in ascending ``message_seq``.
- Records: ``header{no_persist, red_dot, sync_once}``, ``setting``,
  ``message_id`` (int, globally unique), ``client_msg_no``, ``message_seq``
  (per uid for commands, per channel for history, from 1), ``from_uid``,
  ``channel_id`` (command messages keep the ``____cmd`` suffix),
  ``channel_type``, ``timestamp`` (seconds), ``payload`` (standard base64 of
  JSON, UTF-8 text or non-UTF-8 bytes). Answers are ``application/json;
  charset=utf-8``, as the server's.
- Auth: with a token configured, every request (``/health`` included) carries
  header ``token``; otherwise 401 with an empty body. Bad input → 400
  ``{"msg", "status": 400}``.
- ``GET /health`` → ``{"status": "ok"}``: a harmless call that consumes nothing.

What a real v2.2.5 server does beyond that (observed on a server, confirmed in its
public source) is modelled by :class:`ServerQuirks`, one switch each; ``ServerQuirks()``
(all off) is the document, ``ServerQuirks.real()`` is the server. The model behind them:

- A command lives in a *command channel* and each (uid, channel) pair is a
  *conversation* with a read-to seq. A direct command from ``a`` to ``b`` is stored
  in the channel ``a@b____cmd`` if crc32(a) > crc32(b), else ``b@a____cmd``
  (crc32 = IEEE of the UTF-8 bytes), and the record shows the part after the ``@``:
  so **the uid with the smaller crc32 names the channel, the sender's on a tie**
  (``<recipient>____cmd`` or ``<sender>____cmd``). The system (``____system``) is a
  sender like any other, shown as ``from_uid = ""``: its commands show
  ``____system____cmd`` unless the recipient's crc32 is the smaller. A group
  command shows ``<group>____cmd``, channel type 2; the generated groups are named
  per uid (``<uid>-g<k>``) so that every command has exactly one recipient.
- A sync reads each conversation from its read-to seq + 1 and notes, per
  conversation, the last seq it returned; an ack raises each noted conversation's
  read-to seq to the noted one. Messages at or below a read-to seq that no sync
  returned are *lost* (the ``limit`` bug): stats ``lost_messages``, :meth:`lost_ids`.
- A conversation is *written down* ``conversation_persist_seconds`` after its first
  message (the server writes new conversations to its store about once a minute),
  at an ack that took effect or at :meth:`persist_conversations`; a graceful restart
  keeps it as it was (the server saves its cache to a file). Until then acks of it
  are ignored (``new_conversation_acks_ignored``) and a kill -9 drops it
  (``kill_loses_unpersisted``): its commands are not synced again until the next
  message arrives in that channel, which starts the conversation afresh from seq 1.
- Switching ``seq_per_channel`` or ``real_channel_names`` after generating mixes two
  numberings; switch them before generating.

Admin API (no auth, loopback): ``GET /_emulator/stats``, ``GET /_emulator/served``,
``GET /_emulator/acked``, ``POST /_emulator/generate {"count", "kind"?, "uid"?,
"sender"?, "group"?, "system"?, "channel_id"?, "channel_type"?}``,
``POST /_emulator/gap {"channel_id", "channel_type"?, "skip"?}``, ``POST /_emulator/faults
{...}``, ``POST /_emulator/refuse {"index", "seconds"}``, ``POST /_emulator/traffic
{"rate", "channel_rate"?}``, ``POST /_emulator/restart {"kill"?}``,
``POST /_emulator/persist`` (write every conversation down now) and
``POST /_emulator/quirks {"preset"?: "real" | "document", <switch>: value, ...}``
(answers the switches now in force; an unknown switch or a wrong type → 400).
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import hmac
import itertools
import json
import random
import threading
import time
import zlib
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from functools import lru_cache, partial
from typing import Any, TypeGuard

from aiohttp import web

from relay.emulators.gojson import GoDecodeError, GoField, GoStruct
from relay.emulators.harness import EmulatorBase, FaultPlan, Faults, paced, truncated_json

CMD_SUFFIX = "____cmd"
SYSTEM_UID = "____system"
SNOWFLAKE_EPOCH_MS = 1288834974657  # the snowflake library's default epoch, as the server uses
HISTORY_LIMIT_CAP = 10_000


@dataclass(frozen=True)
class ServerQuirks:
    """What a real WuKongIM v2.2.5 server does beyond its API document, one switch each.

    Frozen: a change makes a new instance (:meth:`updated`) that replaces the old one
    whole, so that each request sees one consistent set.
    """

    seq_per_channel: bool = False
    """``message_seq`` counts per command channel, not per uid: one batch can hold 1, 1, 1."""
    sync_by_conversation: bool = False
    """A sync answer lists conversation after conversation (each in seq order), not oldest
    first across them."""
    real_channel_names: bool = False
    """Generated commands come from ``senders_per_uid`` senders, ``groups_per_uid`` groups
    (``group_share`` of them) and the system (``system_share``), with the channel ids and
    ``from_uid`` the server shows (crc32 rule, see the module docstring)."""
    senders_per_uid: int = 4
    groups_per_uid: int = 2
    group_share: float = 0.2
    system_share: float = 0.1
    first_sync_once_zero: bool = False
    """``header.sync_once`` reads 0 on the first message of each command channel."""
    snowflake_ids: bool = False
    """``message_id`` is a snowflake id, about 2.1e18 (above 2**53)."""
    extra_fields: bool = False
    """Records carry ``message_idstr`` (the id in decimal) and ``expire`` (0)."""
    ack_last_sync_only: bool = False
    """A syncack acknowledges what the last sync of the uid returned, not every sync since
    the last ack."""
    new_conversation_acks_ignored: bool = False
    """A syncack answers 200 but acknowledges nothing of a conversation not written down yet."""
    conversation_persist_seconds: float = 60.0
    """How long after its first message a conversation is written down."""
    limit_bug: bool = False
    """Conversations a sync did not reach (its ``limit`` was used up) are noted with the seq
    of the last message it returned, whichever channel that was in: the ack skips them."""
    sync_limit_default: bool = False
    """``/message/sync`` ``limit`` 0 or missing means 200; only a negative one is a 400."""
    go_errors: bool = False
    """Bad input is answered with Go's texts (``EOF``, ``unexpected EOF``, ``用户uid不能为空！``,
    ...) and GET on the POST routes with 404 text/plain."""
    shutting_down: bool = False
    """The server is shutting down gracefully: 500 with an empty body. A moment, not a trait:
    :meth:`real` leaves it off."""
    kill_loses_unpersisted: bool = False
    """``restart(kill=True)`` drops conversations not written down: their commands are not
    synced until the next message arrives in that channel."""
    channel_more_when_full: bool = False
    """``/channel/messagesync`` ``more`` is 1 whenever the page is full, even if nothing remains."""
    channel_login_uid_required: bool = False
    """``login_uid`` is required for every channel type, not only for direct channels."""
    channel_limit_rules: bool = False
    """History ``limit`` 0 (or missing) returns everything, above 10,000 it is cut to 10,000."""
    channel_type_zero_empty: bool = False
    """History ``channel_type`` 0 (or missing) answers 200 with nothing instead of 400."""
    unknown_pull_mode_down: bool = False
    """An unknown ``pull_mode`` is treated as 0 (downward) instead of a 400."""

    def __post_init__(self) -> None:
        if self.senders_per_uid < 1 or self.groups_per_uid < 1:
            raise ValueError("senders_per_uid and groups_per_uid must be at least 1")
        shares = (self.group_share, self.system_share)
        if min(shares) < 0 or sum(shares) > 1:
            raise ValueError("group_share and system_share must be shares that add up to ≤ 1")
        if self.conversation_persist_seconds < 0:
            raise ValueError("conversation_persist_seconds must not be negative")

    @classmethod
    def real(cls) -> ServerQuirks:
        """Every switch a real v2.2.5 server has on."""
        return cls(**{f.name: True for f in fields(cls)
                      if f.type == "bool" and f.name not in _MOMENTS})

    @classmethod
    def from_options(cls, real: bool, settings: Iterable[str]) -> ServerQuirks:
        """From command-line options: ``real`` for :meth:`real`, then ``NAME[=VALUE]`` each."""
        values: dict[str, Any] = {}
        for setting in settings:
            name, sep, text = setting.partition("=")
            name = name.strip().replace("-", "_")
            kind = _FIELD_TYPES.get(name)
            if kind is None:
                raise ValueError(f"unknown quirk {name!r}")
            if kind == "bool":
                word = text.strip().lower() if sep else "true"
                if word not in _BOOL_WORDS:
                    raise ValueError(f"quirk {name}: expected true or false, got {text!r}")
                values[name] = _BOOL_WORDS[word]
            else:
                try:
                    values[name] = int(text) if kind == "int" else float(text)
                except ValueError:
                    raise ValueError(f"quirk {name}: expected a number, got {text!r}") from None
        return (cls.real() if real else cls()).updated(values)

    def updated(self, values: Mapping[str, Any]) -> ServerQuirks:
        """A copy with ``values`` (switch name → JSON value) applied; ValueError if wrong."""
        changes: dict[str, Any] = {}
        for name, value in values.items():
            kind = _FIELD_TYPES.get(name)
            if kind is None:
                raise ValueError(f"unknown quirk {name!r}")
            if kind == "bool":
                ok = isinstance(value, bool)
            elif kind == "int":
                ok = _is_int(value)
            else:
                ok = isinstance(value, int | float) and not isinstance(value, bool)
            if not ok:
                raise ValueError(f"quirk {name}: expected {kind}, got {value!r}")
            changes[name] = float(value) if kind == "float" else value
        return replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def names_on(self) -> list[str]:
        return [f.name for f in fields(self) if f.type == "bool" and getattr(self, f.name)]


_MOMENTS = frozenset({"shutting_down"})
_FIELD_TYPES: dict[str, str] = {f.name: str(f.type) for f in fields(ServerQuirks)}
_BOOL_WORDS = {"true": True, "1": True, "yes": True, "on": True,
               "false": False, "0": False, "no": False, "off": False}

DEFAULT_QUIRKS = ServerQuirks()
"""What an emulator does unless told: the document. ``ServerQuirks.real()`` once the relay
copes with the real server."""


def direct_channel_owner(from_uid: str, to_uid: str) -> str:
    """The uid a direct command channel is shown under: the smaller crc32, the sender on a tie."""
    return to_uid if _crc(from_uid) > _crc(to_uid) else from_uid


@lru_cache(maxsize=65536)
def _direct_channel(from_uid: str, to_uid: str) -> tuple[str, str]:
    """(channel id as stored, as shown) of a direct command channel."""
    # The server's "fake channel id" of a pair puts the larger crc32 first; a record
    # shows the part after the "@".
    if _crc(from_uid) > _crc(to_uid):
        return f"{from_uid}@{to_uid}{CMD_SUFFIX}", to_uid + CMD_SUFFIX
    return f"{to_uid}@{from_uid}{CMD_SUFFIX}", from_uid + CMD_SUFFIX


def _crc(uid: str) -> int:
    return zlib.crc32(uid.encode())


# The request structs the server decodes, for Go's error texts.
_SYNC_REQ = GoStruct("api", "syncReq", [
    GoField("uid", "UID", "string"), GoField("message_seq", "MessageSeq", "uint64"),
    GoField("limit", "Limit", "int")])
_ACK_REQ = GoStruct("api", "syncackReq", [
    GoField("uid", "UID", "string"), GoField("last_message_seq", "LastMessageSeq", "uint64")])
_CHANNEL_REQ = GoStruct("api", "", [
    GoField("login_uid", "LoginUID", "string"), GoField("channel_id", "ChannelID", "string"),
    GoField("channel_type", "ChannelType", "uint8", bits=8),
    GoField("start_message_seq", "StartMessageSeq", "uint64"),
    GoField("end_message_seq", "EndMessageSeq", "uint64"), GoField("limit", "Limit", "int"),
    GoField("pull_mode", "PullMode", "api.PullMode", kind="int"),
    GoField("event_summary_mode", "EventSummaryMode", "string")])

_EMPTY_HISTORY = b'{"start_message_seq":0,"end_message_seq":0,"more":0,"messages":[]}'


@dataclass(slots=True, eq=False)
class _Stored:
    """One message as the server keeps it, with its JSON encoded once."""

    message_id: int
    seq: int
    record: dict[str, Any]
    encoded: str
    conversation: _Conversation | None = None  # None for channel history
    removed: bool = False  # acknowledged or lost
    noted: bool = False  # in a sync the server noted
    served: bool = False  # in a sync answered in full


@dataclass(slots=True)
class _CmdChannel:
    next_seq: int = 1


@dataclass(slots=True, eq=False)
class _Conversation:
    """One uid's view of one command channel."""

    key: tuple[str, int]  # (channel id as stored, channel type)
    display_id: str  # the channel id records show
    channel: _CmdChannel
    created_at: float  # time.monotonic() of its first message
    pending: deque[_Stored] = field(default_factory=deque)  # by seq, none removed
    read_to: int = 0
    persisted: bool = False
    hidden: bool = False  # dropped by a kill -9, until its next message


@dataclass
class _Inbox:
    """One uid's offline command messages."""

    next_seq: int = 1
    queue: deque[_Stored] = field(default_factory=deque)  # by generation; removed ones linger
    removed: int = 0  # removed messages still in ``queue``
    live: int = 0  # messages neither acknowledged nor lost
    conversations: dict[tuple[str, int], _Conversation] = field(default_factory=dict)
    # What the server noted from syncs since the last ack: conversation → last seq.
    # Held in memory only (lost on restart).
    noted: dict[tuple[str, int], int] = field(default_factory=dict)


@dataclass
class _Channel:
    next_seq: int = 1
    seqs: list[int] = field(default_factory=list)
    messages: list[_Stored] = field(default_factory=list)
    gaps: list[tuple[int, int]] = field(default_factory=list)  # (first skipped, last skipped)


@dataclass
class SyncBatch:
    """One ``/message/sync`` answer that carried messages."""

    uid: str
    at: float  # time.monotonic() when the answer was produced
    message_ids: list[int]
    seqs: list[int]
    faulty: bool = False  # answered with a 5xx or a truncated body


@dataclass
class AckRecord:
    """One ``/message/syncack`` that acknowledged something."""

    uid: str
    at: float
    last_message_seq: int
    message_ids: list[int]


@dataclass
class WuKongIMStats:
    requests: int = 0
    bad_token: int = 0
    bad_requests: int = 0
    shutdown_refusals: int = 0
    syncs: int = 0
    syncs_by_uid: dict[str, int] = field(default_factory=dict)
    empty_syncs: int = 0
    concurrent_syncs: int = 0
    acks: int = 0
    empty_acks: int = 0
    acked_messages: int = 0
    ignored_acks: int = 0  # syncacks that skipped a conversation not written down
    ignored_ack_conversations: int = 0
    ignored_ack_messages: int = 0  # messages those skipped conversations left unacknowledged
    lost_messages: int = 0  # skipped by a read-to seq without ever being returned
    served_messages: int = 0
    redelivered: int = 0
    faulted_syncs: int = 0
    channel_syncs: int = 0
    channel_served: int = 0
    generated: int = 0
    generated_channel: int = 0
    restarts: int = 0
    kills: int = 0
    dropped_conversations: int = 0  # by kills


class WuKongIMEmulator(EmulatorBase):
    def __init__(
        self,
        token: str | None = None,
        *,
        uids: Sequence[str] = ("u1",),
        channels: Sequence[tuple[str, int]] = (("g1", 2),),
        seed: int | None = None,
        faults: Faults | None = None,
        quirks: ServerQuirks | None = None,
    ) -> None:
        self.token = token
        self.uids = list(uids)
        self.channel_keys = [(str(c), int(t)) for c, t in channels]
        self.rng = random.Random(seed)
        self.faults = faults or Faults()
        self.quirks = quirks if quirks is not None else DEFAULT_QUIRKS
        self._plan = FaultPlan(self.faults, self.rng)
        self.stats = WuKongIMStats()
        self.inboxes: dict[str, _Inbox] = {}
        self.channels: dict[tuple[str, int], _Channel] = {}
        self._cmd_channels: dict[tuple[str, int], _CmdChannel] = {}
        # Everything generated, served, acknowledged and lost, for exactly-once accounting
        # (ids only: a benchmark's millions of records would otherwise stay in memory).
        self.generated: dict[str, list[int]] = {}
        self.served: list[SyncBatch] = []
        self.acked: list[AckRecord] = []
        self.lost: dict[str, list[int]] = {}
        self._in_flight: dict[str, int] = {}
        self.ack_delay = 0.0  # seconds each syncack is held before it takes effect
        self.acks_waiting = 0
        # message_id: globally unique and increasing. By default below 2**53 so that any
        # JSON reader keeps it exact; the server's snowflake ids (a quirk) are not.
        now_ms = int(time.time() * 1000)
        self._ids = itertools.count((now_ms - 1_600_000_000_000) << 12)
        self._snowflakes = itertools.count(((now_ms - SNOWFLAKE_EPOCH_MS) << 22) | 1 << 12)
        self._counter = itertools.count(1)
        self._lock = threading.Lock()

    def set_quirks(self, values: Mapping[str, Any]) -> ServerQuirks:
        """Apply switches (JSON values by name); ``"preset"``: ``"real"`` or ``"document"``
        first replaces them all. ValueError, and nothing changed, if any is wrong."""
        values = dict(values)
        preset = values.pop("preset", None)
        if preset not in (None, "real", "document"):
            raise ValueError(f"unknown preset {preset!r} (real or document)")
        base = ServerQuirks.real() if preset == "real" else \
            ServerQuirks() if preset == "document" else self.quirks
        self.quirks = base.updated(values)
        return self.quirks

    # -- traffic -----------------------------------------------------------

    def _payload(self, n: int, command: bool) -> bytes:
        roll = self.rng.random()
        if roll < 0.6:
            if command and self.rng.random() < 0.5:
                body: dict[str, Any] = {"type": 99, "cmd": "clearUnread",
                                        "param": {"channel_id": f"g{n % 7}", "channel_type": 2}}
            else:
                body = {"type": 1, "content": f"hi {n} ✓"}
            return json.dumps(body, ensure_ascii=False).encode()
        if roll < 0.85:
            return f"plain text {n} ✓".encode()
        # 0xff never occurs in UTF-8: these bytes are certainly not text.
        return b"\xff\xfe" + bytes(self.rng.randrange(256) for _ in range(8))

    def _record(self, *, message_id: int, seq: int, channel_id: str, channel_type: int,
                command: bool, n: int, at: float, from_uid: str | None,
                quirks: ServerQuirks) -> dict[str, Any]:
        extra = quirks.extra_fields
        record: dict[str, Any] = {
            "header": {"no_persist": 0, "red_dot": 0 if command else 1,
                       "sync_once": 1 if command else 0},
            "setting": 0,
            "message_id": message_id,
        }
        if extra:
            record["message_idstr"] = str(message_id)
        record["client_msg_no"] = f"{self.rng.getrandbits(128):032x}"
        record["message_seq"] = seq
        record["from_uid"] = f"u{self.rng.randrange(1000)}" if from_uid is None else from_uid
        record["channel_id"] = channel_id
        record["channel_type"] = channel_type
        if extra:
            record["expire"] = 0
        record["timestamp"] = int(at)
        record["payload"] = base64.b64encode(self._payload(n, command)).decode("ascii")
        return record

    def _next_id(self, quirks: ServerQuirks) -> int:
        return next(self._snowflakes) if quirks.snowflake_ids else next(self._ids)

    def _origin(self, target: str, n: int, quirks: ServerQuirks, sender: str | None,
                group: str | None, system: bool) -> tuple[tuple[str, int], str, str | None]:
        """Where one command for ``target`` comes from: (conversation key, channel id shown,
        from_uid or None to draw one at random)."""
        if system:
            kind = "system"
        elif group is not None:
            kind = "group"
        elif sender is not None:
            kind = "direct"
        elif quirks.real_channel_names:
            roll = self.rng.random()
            kind = "system" if roll < quirks.system_share else \
                "group" if roll < quirks.system_share + quirks.group_share else "direct"
        else:
            # The document's world: a few groups and many direct channels, any sender.
            is_group = self.rng.random() < 0.7
            shown = (f"g{n % 7}" if is_group else f"u{self.rng.randrange(1000)}") + CMD_SUFFIX
            return (f"{target}|{shown}", 2 if is_group else 1), shown, None
        if kind == "group":
            name = group if group is not None else \
                f"{target}-g{self.rng.randrange(quirks.groups_per_uid) + 1}"
            member = f"s{self.rng.randrange(quirks.senders_per_uid) + 1}" \
                if quirks.real_channel_names else None
            return (name + CMD_SUFFIX, 2), name + CMD_SUFFIX, member
        origin = SYSTEM_UID if kind == "system" else \
            sender if sender is not None else f"s{self.rng.randrange(quirks.senders_per_uid) + 1}"
        from_uid = "" if kind == "system" else origin
        if not quirks.real_channel_names:
            shown = origin + CMD_SUFFIX if kind == "direct" else SYSTEM_UID + CMD_SUFFIX
            return (f"{target}|{shown}", 1), shown, from_uid
        stored, shown = _direct_channel(origin, target)
        return (stored, 1), shown, from_uid

    def generate(self, count: int, uid: str | None = None, *, payload: bytes | None = None,
                 sender: str | None = None, group: str | None = None,
                 system: bool = False) -> list[int]:
        """Queue ``count`` command messages for ``uid`` (round-robin over the uids if None).

        Returns their ``message_id``s. ``payload`` fixes the payload bytes; ``sender``,
        ``group`` or ``system`` fixes where they come from (else the generator's mix).
        """
        if (sender is not None) + (group is not None) + system > 1:
            raise ValueError("at most one of sender, group and system")
        ids: list[int] = []
        now = time.time()
        started = time.monotonic()
        quirks = self.quirks
        with self._lock:
            for i in range(count):
                target = uid or self.uids[i % len(self.uids)]
                inbox = self.inboxes.get(target)
                if inbox is None:
                    inbox = self.inboxes[target] = _Inbox()
                n = next(self._counter)
                key, shown, from_uid = self._origin(target, n, quirks, sender, group, system)
                conversation = inbox.conversations.get(key)
                if conversation is None:
                    channel = self._cmd_channels.get(key)
                    if channel is None:
                        channel = self._cmd_channels[key] = _CmdChannel()
                    conversation = inbox.conversations[key] = _Conversation(
                        key, shown, channel, started)
                elif conversation.hidden:
                    # A message arrives: the server starts the conversation afresh.
                    conversation.hidden = False
                    conversation.created_at = started
                channel = conversation.channel
                channel_seq = channel.next_seq
                channel.next_seq += 1
                seq = channel_seq if quirks.seq_per_channel else inbox.next_seq
                inbox.next_seq += 1
                message_id = self._next_id(quirks)
                record = self._record(message_id=message_id, seq=seq, channel_id=shown,
                                      channel_type=key[1], command=True, n=n, at=now,
                                      from_uid=from_uid, quirks=quirks)
                if quirks.first_sync_once_zero and channel_seq == 1:
                    record["header"]["sync_once"] = 0
                if payload is not None:
                    record["payload"] = base64.b64encode(payload).decode("ascii")
                stored = _Stored(message_id, seq, record, _encode(record), conversation)
                self.generated.setdefault(target, []).append(message_id)
                ids.append(message_id)
                if seq <= conversation.read_to:
                    # The limit bug set this conversation's read-to seq past it in advance.
                    stored.removed = True
                    self._note_lost(target, [message_id])
                    continue
                conversation.pending.append(stored)
                inbox.queue.append(stored)
                inbox.live += 1
            self.stats.generated += count
        return ids

    def generate_channel(self, count: int, channel_id: str | None = None,
                         channel_type: int = 2) -> list[int]:
        """Append ``count`` messages to a channel's history; returns their ``message_seq``s.

        Without ``channel_id``, round-robin over the configured channels.
        """
        seqs: list[int] = []
        now = time.time()
        quirks = self.quirks
        with self._lock:
            for i in range(count):
                key = (channel_id, channel_type) if channel_id else \
                    self.channel_keys[i % len(self.channel_keys)]
                channel = self.channels.setdefault(key, _Channel())
                n = next(self._counter)
                message_id = self._next_id(quirks)
                record = self._record(message_id=message_id, seq=channel.next_seq,
                                      channel_id=key[0], channel_type=key[1], command=False,
                                      n=n, at=now, from_uid=None, quirks=quirks)
                channel.next_seq += 1
                channel.seqs.append(record["message_seq"])
                channel.messages.append(_Stored(message_id, record["message_seq"], record,
                                                _encode(record)))
                seqs.append(record["message_seq"])
            self.stats.generated_channel += count
        return seqs

    def skip_seq(self, channel_id: str, channel_type: int = 2, count: int = 1) -> list[int]:
        """Make a gap: the next ``count`` ``message_seq`` numbers of a channel never exist
        (the server lost messages it had accepted, as under heavy load)."""
        with self._lock:
            channel = self.channels.setdefault((channel_id, channel_type), _Channel())
            skipped = list(range(channel.next_seq, channel.next_seq + count))
            if skipped:
                channel.gaps.append((skipped[0], skipped[-1]))
            channel.next_seq += count
        return skipped

    async def _traffic_loop(self, rate: float, channel_rate: float) -> None:
        async with asyncio.TaskGroup() as tg:
            for uid in self.uids:
                if rate > 0:
                    tg.create_task(paced(rate, partial(self.generate, uid=uid)))
            for channel_id, channel_type in self.channel_keys:
                if channel_rate > 0:
                    tg.create_task(paced(channel_rate, partial(
                        self.generate_channel, channel_id=channel_id,
                        channel_type=channel_type)))

    def set_traffic(self, rate: float, channel_rate: float | None = None) -> None:
        """Per second: ``rate`` command messages per uid, ``channel_rate`` (default ``rate``)
        history messages per channel, until changed (0 stops). Call on the loop."""
        per_channel = rate if channel_rate is None else channel_rate
        active = rate > 0 or per_channel > 0
        self._replace_traffic(
            self._traffic_loop(max(rate, 0.0), max(per_channel, 0.0)) if active else None)

    def restart(self, kill: bool = False) -> None:
        """What a server restart does to the sync protocol: what syncs noted is forgotten.

        ``kill``: a kill -9 rather than a graceful restart; with ``kill_loses_unpersisted``
        the conversations not written down are dropped too.
        """
        now = time.monotonic()
        quirks = self.quirks
        with self._lock:
            for inbox in self.inboxes.values():
                inbox.noted = {}
                if kill and quirks.kill_loses_unpersisted:
                    for conversation in inbox.conversations.values():
                        if not conversation.hidden and \
                                not _written_down(conversation, now, quirks):
                            conversation.hidden = True
                            self.stats.dropped_conversations += 1
            self.stats.restarts += 1
            self.stats.kills += kill

    def persist_conversations(self) -> None:
        """The server writes every conversation down now (its periodic store)."""
        with self._lock:
            for inbox in self.inboxes.values():
                for conversation in inbox.conversations.values():
                    if not conversation.hidden:
                        conversation.persisted = True

    def unacked(self, uid: str) -> list[int]:
        """``message_id``s of ``uid`` neither acknowledged nor lost, oldest first."""
        with self._lock:
            inbox = self.inboxes.get(uid)
            return [s.message_id for s in inbox.queue if not s.removed] if inbox else []

    def acked_ids(self, uid: str | None = None) -> list[int]:
        """Every acknowledged ``message_id`` (of ``uid``, or all), in ack order."""
        with self._lock:
            return [i for a in self.acked if uid is None or a.uid == uid for i in a.message_ids]

    def lost_ids(self, uid: str | None = None) -> list[int]:
        """``message_id``s the server will never sync (the ``limit`` bug), in loss order."""
        with self._lock:
            if uid is not None:
                return list(self.lost.get(uid, ()))
            return [i for ids in self.lost.values() for i in ids]

    def channel_gaps(self, channel_id: str, channel_type: int = 2) -> list[tuple[int, int]]:
        with self._lock:
            channel = self.channels.get((channel_id, channel_type))
            return list(channel.gaps) if channel else []

    def _note_lost(self, uid: str, message_ids: list[int]) -> None:
        self.lost.setdefault(uid, []).extend(message_ids)
        self.stats.lost_messages += len(message_ids)

    # -- the provider's side -------------------------------------------------

    def _token_ok(self, request: web.Request) -> bool:
        if self.token is None:
            return True
        return hmac.compare_digest(request.headers.get("token", "").encode(),
                                   self.token.encode())

    def _admit(self, request: web.Request, quirks: ServerQuirks) -> web.Response | None:
        """None if the request may go on, else the answer: 500 (shutting down) or 401."""
        with self._lock:
            self.stats.requests += 1
            if quirks.shutting_down:
                self.stats.shutdown_refusals += 1
                return web.Response(status=500)
            if not self._token_ok(request):
                self.stats.bad_token += 1
                return web.Response(status=401)
        return None

    async def _read_body(self, request: web.Request, struct: GoStruct,
                         quirks: ServerQuirks) -> dict[str, Any] | web.Response:
        """The request's JSON object, or the answer to give: 500, 401 (empty body) or 400."""
        raw = await request.read()
        refused = self._admit(request, quirks)
        if refused is not None:
            return refused
        if quirks.go_errors:
            try:
                return struct.decode(raw)
            except GoDecodeError as exc:
                return self._bad_request(str(exc), quirks)
        try:
            body = json.loads(raw or b"null")
        except ValueError:
            return self._bad_request("数据格式有误!", quirks)
        if not isinstance(body, dict):
            return self._bad_request("数据格式有误!", quirks)
        return body

    def _bad_request(self, msg: str, quirks: ServerQuirks) -> web.Response:
        with self._lock:
            self.stats.bad_requests += 1
        if quirks.go_errors:
            # As gin writes it: keys sorted, compact, UTF-8 unescaped.
            body = json.dumps({"msg": msg, "status": 400}, ensure_ascii=False,
                              separators=(",", ":"))
            return _json_answer(body.encode(), status=400)
        return web.json_response({"msg": msg, "status": 400}, status=400)

    def _error_response(self) -> web.Response:
        return web.json_response({"msg": "服务器内部错误", "status": self.faults.error_status},
                                 status=self.faults.error_status)

    async def handle_sync(self, request: web.Request) -> web.Response:
        quirks = self.quirks
        body = await self._read_body(request, _SYNC_REQ, quirks)
        if isinstance(body, web.Response):
            return body
        uid, limit = body.get("uid"), body.get("limit")
        if quirks.go_errors:
            if not str(uid).strip():
                return self._bad_request("用户uid不能为空！", quirks)
        elif not isinstance(uid, str) or not uid:
            return self._bad_request("uid不能为空!", quirks)
        assert isinstance(uid, str)
        if quirks.sync_limit_default:
            limit = 0 if limit is None else limit
            if not _is_int(limit):
                return self._bad_request("limit必须是整数!", quirks)
            if limit < 0:
                return self._bad_request("limit不能为负数！", quirks)
            limit = limit or 200
        elif not _is_int(limit) or limit <= 0:
            return self._bad_request("limit必须大于0!", quirks)
        at = time.monotonic()
        self._in_flight[uid] = self._in_flight.get(uid, 0) + 1
        try:
            with self._lock:
                self.stats.syncs += 1
                self.stats.syncs_by_uid[uid] = self.stats.syncs_by_uid.get(uid, 0) + 1
                if self._in_flight[uid] > 1:
                    self.stats.concurrent_syncs += 1
                error = self._plan.error()
                malformed = not error and self._plan.malformed()
                faulty = error or malformed
                inbox = self.inboxes.setdefault(uid, _Inbox())
                taken, noted = _take(inbox, limit, quirks)
                # A fault that "consumes" is one that struck after the server noted the sync.
                if not faulty or self.faults.consume_on_fault:
                    if quirks.ack_last_sync_only:
                        inbox.noted = noted
                    else:
                        for key, seq in noted.items():
                            if seq > inbox.noted.get(key, 0):
                                inbox.noted[key] = seq
                    for s in taken:
                        s.noted = True
                if taken:
                    self.served.append(SyncBatch(uid, at, [s.message_id for s in taken],
                                                 [s.seq for s in taken], faulty))
                if faulty:
                    self.stats.faulted_syncs += 1
                elif taken:
                    self.stats.served_messages += len(taken)
                    redelivered = 0
                    for s in taken:
                        redelivered += s.served
                        s.served = True
                    self.stats.redelivered += redelivered
                else:
                    self.stats.empty_syncs += 1
                encoded = [s.encoded for s in taken]
            await self._plan.maybe_slow()
        finally:
            self._in_flight[uid] -= 1
        if error:
            return self._error_response()
        payload = ("[" + ",".join(encoded) + "]").encode()
        if malformed:
            payload = truncated_json(payload)
        return _json_answer(payload)

    async def handle_syncack(self, request: web.Request) -> web.Response:
        quirks = self.quirks
        body = await self._read_body(request, _ACK_REQ, quirks)
        if isinstance(body, web.Response):
            return body
        uid, last = body.get("uid"), body.get("last_message_seq")
        if quirks.go_errors:
            if not str(uid).strip():
                return self._bad_request("用户UID不能为空！", quirks)
            if last == 0:
                return self._bad_request("最后一次messageSeq不能为0！", quirks)
        else:
            if not isinstance(uid, str) or not uid:
                return self._bad_request("uid不能为空!", quirks)
            if not _is_int(last) or last == 0:
                return self._bad_request("last_message_seq不能为0!", quirks)
        assert isinstance(uid, str)
        assert isinstance(last, int)
        if self.ack_delay > 0:
            # Hold the ack (a slow server): a client that dies meanwhile never acked.
            self.acks_waiting += 1
            held_since = time.monotonic()
            try:
                # Polled, so that lowering ack_delay releases acks already held.
                while time.monotonic() - held_since < self.ack_delay:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
            finally:
                self.acks_waiting -= 1
            if request.transport is None or request.transport.is_closing():
                return web.Response(status=499)
        with self._lock:
            error = self._plan.error()
            malformed = not error and self._plan.malformed()
            if not (error or malformed) or self.faults.consume_on_fault:
                self._apply_ack(uid, last, quirks)
        await self._plan.maybe_slow()
        if error:
            return self._error_response()
        answer = json.dumps({"status": 200}).encode()
        return _json_answer(truncated_json(answer) if malformed else answer)

    def _apply_ack(self, uid: str, last_message_seq: int, quirks: ServerQuirks) -> None:
        self.stats.acks += 1
        inbox = self.inboxes.get(uid)
        if inbox is None or not inbox.noted:
            self.stats.empty_acks += 1
            return
        noted, inbox.noted = inbox.noted, {}
        now = time.monotonic()
        acked: list[int] = []
        lost: list[int] = []
        ignored = ignored_messages = 0
        for key, seq in noted.items():
            conversation = inbox.conversations.get(key)
            if conversation is None:
                continue
            if quirks.new_conversation_acks_ignored and \
                    not _written_down(conversation, now, quirks):
                # The server logs 会话不存在 ("conversation does not exist") and moves on.
                ignored += 1
                ignored_messages += _count_upto(conversation.pending, seq)
                continue
            conversation.persisted = True  # writing its read-to seq writes it down
            conversation.read_to = max(conversation.read_to, seq)
            pending = conversation.pending
            while pending and pending[0].seq <= conversation.read_to:
                s = pending.popleft()
                s.removed = True
                (acked if s.noted else lost).append(s.message_id)
        removed = len(acked) + len(lost)
        inbox.live -= removed
        inbox.removed += removed
        _compact(inbox)
        if ignored:
            self.stats.ignored_acks += 1
            self.stats.ignored_ack_conversations += ignored
            self.stats.ignored_ack_messages += ignored_messages
        if lost:
            self._note_lost(uid, sorted(lost))
        if acked:
            acked.sort()  # ids grow with generation: the order they were queued in
            self.acked.append(AckRecord(uid, now, last_message_seq, acked))
            self.stats.acked_messages += len(acked)

    async def handle_channel_sync(self, request: web.Request) -> web.Response:
        quirks = self.quirks
        body = await self._read_body(request, _CHANNEL_REQ, quirks)
        if isinstance(body, web.Response):
            return body
        bad = partial(self._bad_request, quirks=quirks)
        channel_id, channel_type = body.get("channel_id"), body.get("channel_type")
        login_uid = body.get("login_uid", "")
        start, end = body.get("start_message_seq", 0), body.get("end_message_seq", 0)
        limit, pull_mode = body.get("limit"), body.get("pull_mode", 0)
        if quirks.go_errors:
            if not str(channel_id).strip():
                return bad("channel_id不能为空！")
        elif not isinstance(channel_id, str) or not channel_id:
            return bad("频道ID不能为空!")
        assert isinstance(channel_id, str)
        if quirks.channel_login_uid_required and \
                (not isinstance(login_uid, str) or not login_uid.strip()):
            return bad("login_uid不能为空！" if quirks.go_errors else "login_uid不能为空!")
        if quirks.channel_type_zero_empty and channel_type in (None, 0) \
                and not isinstance(channel_type, bool):
            with self._lock:
                self.stats.channel_syncs += 1
            return _json_answer(_EMPTY_HISTORY)
        if not _is_int(channel_type) or channel_type <= 0:
            return bad("频道类型不能为0!")
        if not quirks.channel_login_uid_required and \
                (not isinstance(login_uid, str) or (channel_type == 1 and not login_uid)):
            return bad("login_uid不能为空!")
        if not (_is_int(start) and _is_int(end) and start >= 0 and end >= 0):
            return bad("消息序号必须是非负整数!")
        effective: int | None
        if quirks.channel_limit_rules:
            limit = 0 if limit is None else limit
            if not _is_int(limit) or limit < 0:
                return bad("limit不能为负数!")
            effective = min(limit, HISTORY_LIMIT_CAP) if limit else None
        elif not _is_int(limit) or limit <= 0:
            return bad("limit必须大于0!")
        else:
            effective = limit
        if not _is_int(pull_mode):
            return bad("pull_mode只能是0或1!")
        if pull_mode not in (0, 1):
            if not quirks.unknown_pull_mode_down:
                return bad("pull_mode只能是0或1!")
            pull_mode = 0
        with self._lock:
            self.stats.channel_syncs += 1
            error = self._plan.error()
            malformed = not error and self._plan.malformed()
            channel = self.channels.get((channel_id, channel_type), _Channel())
            taken, more = _select(channel, start, end, effective, pull_mode,
                                  quirks.channel_more_when_full)
            if not (error or malformed):
                self.stats.channel_served += len(taken)
            encoded = [s.encoded for s in taken]
        await self._plan.maybe_slow()
        if error:
            return self._error_response()
        payload = (
            '{"start_message_seq":' + str(start) + ',"end_message_seq":' + str(end)
            + ',"more":' + str(more) + ',"messages":[' + ",".join(encoded) + "]}"
        ).encode()
        if malformed:
            payload = truncated_json(payload)
        return _json_answer(payload)

    async def handle_health(self, request: web.Request) -> web.Response:
        refused = self._admit(request, self.quirks)
        if refused is not None:
            return refused
        return web.json_response({"status": "ok"})

    async def handle_wrong_method(self, request: web.Request) -> web.StreamResponse:
        """A GET (or HEAD) on a POST route: gin answers its plain-text 404."""
        quirks = self.quirks
        if not quirks.go_errors:
            raise web.HTTPMethodNotAllowed(request.method, ["POST"])
        refused = self._admit(request, quirks)
        if refused is not None:
            return refused
        return web.Response(status=404, body=b"404 page not found",
                            headers={"Content-Type": "text/plain"})

    # -- admin -------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            stats = dict(vars(self.stats))
            stats["syncs_by_uid"] = dict(self.stats.syncs_by_uid)
            stats["unacked"] = {uid: i.live for uid, i in self.inboxes.items()}
            stats["in_progress"] = {uid: _noted_count(i) for uid, i in self.inboxes.items()}
            stats["hidden"] = {
                uid: sum(len(c.pending) for c in i.conversations.values() if c.hidden)
                for uid, i in self.inboxes.items()}
            stats["conversations"] = {uid: len(i.conversations) for uid, i in self.inboxes.items()}
            stats["lost"] = {uid: len(ids) for uid, ids in self.lost.items()}
            stats["channels"] = {
                f"{cid}/{ctype}": {"messages": len(c.messages), "last_seq": c.next_seq - 1,
                                   "gaps": [list(g) for g in c.gaps]}
                for (cid, ctype), c in self.channels.items()
            }
            stats["faults"] = self.faults.as_dict()
            stats["quirks"] = self.quirks.as_dict()
            return stats

    async def _admin_served(self, request: web.Request) -> web.Response:
        start = int(request.query.get("from", "0"))
        with self._lock:
            batches = [{"uid": b.uid, "at": b.at, "message_ids": b.message_ids, "seqs": b.seqs,
                        "faulty": b.faulty} for b in self.served[start:]]
        return web.json_response({"from": start, "batches": batches})

    async def _admin_acked(self, request: web.Request) -> web.Response:
        start = int(request.query.get("from", "0"))
        with self._lock:
            acks = [{"uid": a.uid, "at": a.at, "last_message_seq": a.last_message_seq,
                     "message_ids": a.message_ids} for a in self.acked[start:]]
        return web.json_response({"from": start, "acks": acks})

    async def _admin_generate(self, request: web.Request) -> web.Response:
        body = await request.json()
        count = int(body.get("count", 1))
        if body.get("kind", "command") == "channel":
            seqs = self.generate_channel(count, body.get("channel_id"),
                                         int(body.get("channel_type", 2)))
            return web.json_response({"generated": len(seqs), "seqs": seqs})
        try:
            ids = self.generate(count, body.get("uid"), sender=body.get("sender"),
                                group=body.get("group"), system=bool(body.get("system")))
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"generated": len(ids), "message_ids": ids})

    async def _admin_gap(self, request: web.Request) -> web.Response:
        body = await request.json()
        skipped = self.skip_seq(str(body["channel_id"]), int(body.get("channel_type", 2)),
                                int(body.get("skip", 1)))
        return web.json_response({"skipped": skipped})

    async def _admin_traffic(self, request: web.Request) -> web.Response:
        body = await request.json()
        channel_rate = body.get("channel_rate")
        self.set_traffic(float(body.get("rate", 0)),
                         None if channel_rate is None else float(channel_rate))
        return web.json_response({"rate": body.get("rate", 0), "channel_rate": channel_rate})

    async def _admin_restart(self, request: web.Request) -> web.Response:
        raw = await request.read()
        body = json.loads(raw) if raw.strip() else {}
        self.restart(kill=bool(body.get("kill", False)))
        return web.json_response({"restarts": self.stats.restarts})

    async def _admin_persist(self, _request: web.Request) -> web.Response:
        self.persist_conversations()
        return web.json_response({"persisted": True})

    async def _admin_quirks(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise ValueError("expected a JSON object of switches")
            quirks = self.set_quirks(body)
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(quirks.as_dict())

    def app(self) -> web.Application:
        app = web.Application()
        for path, handler in (("/message/sync", self.handle_sync),
                              ("/message/syncack", self.handle_syncack),
                              ("/channel/messagesync", self.handle_channel_sync)):
            app.router.add_post(path, handler)
            app.router.add_get(path, self.handle_wrong_method)
        app.router.add_get("/health", self.handle_health)
        app.router.add_get("/_emulator/served", self._admin_served)
        app.router.add_get("/_emulator/acked", self._admin_acked)
        app.router.add_post("/_emulator/generate", self._admin_generate)
        app.router.add_post("/_emulator/gap", self._admin_gap)
        self.add_common_admin_routes(app)
        app.router.add_post("/_emulator/restart", self._admin_restart)
        app.router.add_post("/_emulator/persist", self._admin_persist)
        app.router.add_post("/_emulator/quirks", self._admin_quirks)
        return app


def _json_answer(body: bytes, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, content_type="application/json",
                        charset="utf-8")


def _encode(record: dict[str, Any]) -> str:
    # Python's json writes integers exactly, however large (snowflake ids are above 2**53).
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


def _is_int(value: object) -> TypeGuard[int]:
    # JSON true/false would decode as Python bools; the server's Go structs refuse them.
    return isinstance(value, int) and not isinstance(value, bool)


def _written_down(conversation: _Conversation, now: float, quirks: ServerQuirks) -> bool:
    if not conversation.persisted and \
            now - conversation.created_at >= quirks.conversation_persist_seconds:
        conversation.persisted = True
    return conversation.persisted


def _count_upto(pending: deque[_Stored], seq: int) -> int:
    count = 0
    for s in pending:
        if s.seq > seq:
            break
        count += 1
    return count


def _noted_count(inbox: _Inbox) -> int:
    total = 0
    for key, seq in inbox.noted.items():
        conversation = inbox.conversations.get(key)
        if conversation is not None:
            total += _count_upto(conversation.pending, seq)
    return total


def _compact(inbox: _Inbox) -> None:
    """Drop removed messages from the head of the queue, and from all of it when many."""
    queue = inbox.queue
    while queue and queue[0].removed:
        queue.popleft()
        inbox.removed -= 1
    if inbox.removed > 1024 and inbox.removed * 2 > len(queue):
        inbox.queue = deque(s for s in queue if not s.removed)
        inbox.removed = 0


def _take(inbox: _Inbox, limit: int, quirks: ServerQuirks
          ) -> tuple[list[_Stored], dict[tuple[str, int], int]]:
    """What one sync returns, and what the server notes: conversation → last seq."""
    taken: list[_Stored] = []
    noted: dict[tuple[str, int], int] = {}
    if quirks.sync_by_conversation:
        for key, conversation in inbox.conversations.items():
            if conversation.hidden or not conversation.pending:
                continue
            room = limit - len(taken)
            if room <= 0:
                if not quirks.limit_bug:
                    break
                # The bug: the last message returned, whichever channel it was in.
                noted[key] = taken[-1].seq
                continue
            part = list(itertools.islice(conversation.pending, room))
            taken.extend(part)
            noted[key] = part[-1].seq
        return taken, noted
    for s in inbox.queue:
        if len(taken) >= limit:
            break
        owner = s.conversation
        if s.removed or owner is None or owner.hidden:
            continue
        taken.append(s)
        noted[owner.key] = s.seq
    if quirks.limit_bug and len(taken) >= limit:
        for key, conversation in inbox.conversations.items():
            if key not in noted and conversation.pending and not conversation.hidden:
                noted[key] = taken[-1].seq
    return taken, noted


def _select(channel: _Channel, start: int, end: int, limit: int | None, pull_mode: int,
            more_when_full: bool) -> tuple[list[_Stored], int]:
    """The documented ``/channel/messagesync`` window: (messages ascending, more).

    ``limit`` None: no limit. ``more_when_full``: the server's ``more``, 1 whenever the
    page is full (and always without a limit), rather than "something remains".
    """
    seqs, messages = channel.seqs, channel.messages
    cap = len(seqs) if limit is None else limit
    if start == 0 and end == 0:
        lo = max(0, len(seqs) - cap)
        taken, remains = messages[lo:], lo > 0
    elif pull_mode == 1:
        # Upward: start ≤ seq < end (no end when 0), the first ``limit``.
        lo = bisect.bisect_left(seqs, start)
        hi = bisect.bisect_left(seqs, end) if end else len(seqs)
        hi = max(lo, hi)
        taken, remains = messages[lo:min(hi, lo + cap)], hi - lo > cap
    else:
        # Downward: end < seq ≤ start (start 0 = from the newest), the last ``limit``.
        hi = bisect.bisect_right(seqs, start) if start else len(seqs)
        lo = bisect.bisect_right(seqs, end) if end else 0
        lo = min(lo, hi)
        taken, remains = messages[max(lo, hi - cap):hi], hi - lo > cap
    if more_when_full:
        return taken, int(limit is None or len(taken) >= limit)
    return taken, int(remains)
