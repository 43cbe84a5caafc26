"""Parsing WuKongIM messages (``/message/sync``, ``/channel/messagesync``) into events.

A message: ``header``, ``setting``, ``message_id`` (global, the dedup key),
``client_msg_no``, ``message_seq``, ``from_uid``, ``channel_id``,
``channel_type`` (1 person, 2 group), ``timestamp`` (seconds), ``payload``
(standard base64). Command messages' ``channel_id`` carries a ``____cmd``
suffix, which the event's channel drops and ``native`` keeps.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import orjson

from relay import metrics
from relay.event import (
    ChannelType,
    ContentEncoding,
    JSONValue,
    Kind,
    build_event,
    content_from_base64,
)
from relay.logs import get_logger

log = get_logger("relay.source.wukongim")

CMD_SUFFIX = "____cmd"
SYSTEM_CHANNEL = "____system____cmd"  # commands sent by the system (from_uid "")
CHANNEL_TYPES: dict[int, ChannelType] = {1: "direct", 2: "group"}


def _decimal(text: str) -> bool:
    """An ASCII decimal of at most 19 digits (``str.isdigit`` accepts "²", which int() refuses)."""
    return 0 < len(text) <= 19 and text.isascii() and text.isdigit()


class BadRecord(ValueError):
    """A message that cannot be normalized; it is quarantined, not dropped."""


def parse_sync_answer(body: Any) -> list[Any]:
    """``/message/sync`` answers a bare JSON array."""
    if not isinstance(body, list):
        raise BadRecord("sync answer is not a JSON array")
    return body


def parse_channel_answer(body: Any) -> tuple[list[Any], bool]:
    """``/channel/messagesync`` answers ``{"messages": [...], "more": 0|1, ...}``."""
    if not isinstance(body, dict) or not isinstance(body.get("messages", []), list):
        raise BadRecord("messagesync answer has no messages list")
    return body.get("messages") or [], body.get("more") in (1, True)


def _int(record: dict[str, Any], key: str) -> int:
    value = record.get(key)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and _decimal(value):
        return int(value)
    raise BadRecord(f"{key} is {'missing' if value is None else 'not an integer'}")


def _str(record: dict[str, Any], key: str) -> str:
    value = record.get(key)
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise BadRecord(f"{key} is {'missing' if value is None else 'not a string'}")


def message_seq(record: Any) -> int | None:
    """The record's ``message_seq`` if it has a usable one (a positive integer), else None."""
    if isinstance(record, dict):
        value = record.get("message_seq")
        if isinstance(value, str) and _decimal(value):
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def normalize(record: Any, *, source: str, kind: Kind, fetched_at: int,
              uid: str | None = None) -> dict[str, Any]:
    """One message as an event; ``uid`` is the uid being synced (commands only).

    A command's recipient is the uid being synced: the server names a direct
    command's channel after either party (``<sender>____cmd`` or
    ``<recipient>____cmd``, by a crc32 ordering), so the channel id cannot say.
    """
    if not isinstance(record, dict):
        raise BadRecord(f"message is a {type(record).__name__}, not an object")
    message_id = _int(record, "message_id")
    seq = message_seq(record)
    if seq is None:
        raise BadRecord("message_seq is missing or not a positive integer")
    sender = _str(record, "from_uid")
    raw_channel = _str(record, "channel_id")
    channel_number = _int(record, "channel_type")
    seconds = record.get("timestamp")
    if not isinstance(seconds, int | float) or isinstance(seconds, bool):
        raise BadRecord("timestamp is not a number of seconds")
    payload = record.get("payload")
    content: JSONValue
    encoding: ContentEncoding
    if payload is None or payload == "":
        content, encoding = None, "none"
    elif isinstance(payload, str):
        try:
            content, encoding = content_from_base64(payload)
        except ValueError as exc:
            raise BadRecord(f"payload: {exc}") from None
    else:
        raise BadRecord("payload is not a base64 string")

    channel_id = raw_channel.removesuffix(CMD_SUFFIX)
    channel_type = CHANNEL_TYPES.get(channel_number, "unknown")
    recipient = channel_id
    if uid is not None:
        recipient = uid
        if not sender or raw_channel == SYSTEM_CHANNEL:
            channel_type, channel_id = "system", uid
        elif channel_type == "direct":
            channel_id = uid
    type_ = ""
    if isinstance(content, dict):
        native_type = content.get("type")
        if isinstance(native_type, int | str) and not isinstance(native_type, bool):
            type_ = str(native_type)
    native = {k: v for k, v in record.items() if k != "payload"}
    return build_event(
        source=source,
        provider="wukongim",
        native_id=str(message_id),
        kind=kind,
        type_=type_,
        channel_type=channel_type,
        channel_id=channel_id,
        sender=sender,
        recipient=recipient,
        sent_at=int(seconds * 1000),
        fetched_at=fetched_at,
        content=content,
        content_encoding=encoding,
        seq=seq,
        native=native,
    )


_SEQ_IN_BYTES = re.compile(rb'"message_seq"\s*:\s*"?(\d{1,19})')


def ack_seq(records: Sequence[Any], raw: bytes) -> int:
    """The ``last_message_seq`` to acknowledge a committed sync batch with.

    The largest usable seq of the batch. The real server acknowledges what the
    last sync returned whatever the value (only 0 is refused), so a batch whose
    records were all quarantined is still acknowledged: with a seq read from
    the raw answer, or 1.
    """
    seqs = [s for s in map(message_seq, records) if s is not None]
    if seqs:
        return max(seqs)
    found = [int(m) for m in _SEQ_IN_BYTES.findall(raw)]
    return max([s for s in found if s > 0] or [1])


class ChannelSeqs:
    """The last ``message_seq`` seen per command channel of one uid, to report gaps.

    The server counts ``message_seq`` per command channel, not per uid, so a
    gap only shows within one channel. A channel first seen at seq > 1 after
    this uid has been synced before lost its first messages (the server's
    ``limit`` bug does exactly that); on the very first sync nothing can be said.
    """

    def __init__(self, source: str, uid: str, known: dict[str, int] | None) -> None:
        self.source = source
        self.uid = uid
        self.known: dict[str, int] = dict(known or {})
        self._baseline = known is not None

    def observe(self, records: Sequence[Any]) -> bool:
        """Note a batch's seqs, counting and logging gaps; True when anything moved."""
        moved = False
        for record in sorted((r for r in records if message_seq(r) is not None
                              and isinstance(r.get("channel_id"), str)),
                             key=lambda r: message_seq(r) or 0):
            channel, seq = record["channel_id"], message_seq(record) or 0
            last = self.known.get(channel)
            if last is None:
                last = 0 if self._baseline else seq - 1
            if seq <= last:
                continue
            if seq > last + 1:
                missing = seq - last - 1
                metrics.SOURCE_SEQ_GAPS.labels(self.source).inc(missing)
                log.warning("gap in a command channel's message_seq: commands the server never"
                            " returned", source=self.source, uid=self.uid, channel=channel,
                            first_missing=last + 1, missing=missing)
            self.known[channel] = seq
            moved = True
        self._baseline = True
        return moved

    def encode(self) -> str:
        return orjson.dumps(self.known).decode()


def encode_error(body: Any) -> str:
    """WuKongIM's error body ``{"msg", "status"}`` as text for logs."""
    if isinstance(body, dict) and "msg" in body:
        return f"{body.get('status')}: {body.get('msg')}"
    return orjson.dumps(body).decode()[:200] if body is not None else ""
