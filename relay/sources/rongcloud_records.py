"""Parsing RongCloud ``/rtmsg/*/qrymsg.json`` answers into normalized events.

The answer is ``{"results": [...], "size": n}``; ``results`` is documented
as ``String[]``, so an item may be a JSON object or a string holding one.
``content`` may be a JSON object or a string holding JSON or text. Chatroom
join/leave records carry no ``msgUID``; their id is derived from their fields.
"""

from __future__ import annotations

from typing import Any

import orjson

from relay.event import (
    ChannelType,
    Kind,
    build_event,
    content_from_value,
    derived_native_id,
)
from relay.sources.salvage import Unparsed

CHANNEL_TYPES: dict[str, ChannelType] = {
    "PERSON": "direct",
    "PERSONS": "discussion",
    "GROUP": "group",
    "TEMPGROUP": "chatroom",
    "CUSTOMERSERVICE": "customer_service",
    "NOTIFY": "system",
    "MC": "app_public_service",
    "MP": "public_service",
}

# The client SDKs' ConversationType numbers, in case an answer uses them.
_CHANNEL_NUMBERS: dict[str, str] = {
    "1": "PERSON",
    "2": "PERSONS",
    "3": "GROUP",
    "4": "TEMPGROUP",
    "5": "CUSTOMERSERVICE",
    "6": "NOTIFY",
    "7": "MC",
    "8": "MP",
}

DEFAULT_CHANNEL: dict[str, ChannelType] = {
    "person": "direct",
    "group": "group",
    "chatroom": "chatroom",
}


def _decimal(text: str) -> bool:
    """An ASCII decimal of at most 19 digits (``str.isdigit`` accepts "²", which int() refuses)."""
    return 0 < len(text) <= 19 and text.isascii() and text.isdigit()


class BadRecord(ValueError):
    """A record that cannot be normalized; it is quarantined, not dropped."""


def parse_items(body: Any) -> tuple[list[dict[str, Any]], list[tuple[Any, str]]]:
    """The records of a successful answer, and the items that are not records."""
    results = body.get("results") if isinstance(body, dict) else None
    if not isinstance(results, list):
        raise BadRecord("answer has no results list")
    if all(item.__class__ is dict for item in results):
        return list(results), []  # the usual answer: nothing to sort out (not a subclass)
    records: list[dict[str, Any]] = []
    bad: list[tuple[Any, str]] = []
    for item in results:
        if isinstance(item, Unparsed):
            bad.append((item, item.error))
            continue
        if isinstance(item, str):
            try:
                item = orjson.loads(item)
            except orjson.JSONDecodeError as exc:
                bad.append((item, f"results item is not JSON: {exc}"))
                continue
        if isinstance(item, dict):
            records.append(item)
        else:
            bad.append((item, f"results item is a {type(item).__name__}, not an object"))
    return records, bad


def _text(record: dict[str, Any], key: str, *, required: bool = True) -> str:
    value = record.get(key)
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if value is None and not required:
        return ""
    raise BadRecord(f"{key} is {'missing' if value is None else type(value).__name__}")


def _millis(record: dict[str, Any]) -> int:
    for key in ("msgTimestamp", "timestamp"):
        value = record.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and _decimal(value):
            return int(value)
        if value is not None:
            raise BadRecord(f"{key} is not a millisecond timestamp")
    raise BadRecord("msgTimestamp is missing")


def normalize(
    record: dict[str, Any], *, source: str, endpoint: str, fetched_at: int
) -> dict[str, Any]:
    """One RongCloud record as an ``im-relay.event/1`` dict.

    Written for the hot path (tens of thousands of records a second): the
    common shapes are taken directly, the helpers only handle the odd ones.
    """
    sender = record.get("fromUserId")
    if sender.__class__ is not str:
        sender = _text(record, "fromUserId")
    recipient = record.get("toUserId")
    if recipient.__class__ is not str:
        recipient = _text(record, "toUserId")
    stamp = record.get("msgTimestamp")
    sent_at = int(stamp) if stamp.__class__ is str and _decimal(stamp) else _millis(record)
    object_name = record.get("objectName")
    if object_name.__class__ is not str:
        object_name = _text(record, "objectName", required=False)

    if endpoint == "chatroom":
        channel_type: ChannelType = "chatroom"
        kind: Kind = "presence"
    else:
        kind = "message"
        raw_channel = record.get("channelType")
        if raw_channel is None:
            channel_type = DEFAULT_CHANNEL[endpoint]
        elif raw_channel.__class__ is str:
            channel_type = CHANNEL_TYPES.get(raw_channel) or CHANNEL_TYPES.get(
                _CHANNEL_NUMBERS.get(raw_channel, ""), "unknown"
            )
        elif isinstance(raw_channel, int) and not isinstance(raw_channel, bool):
            channel_type = CHANNEL_TYPES.get(_CHANNEL_NUMBERS.get(str(raw_channel), ""),
                                             "unknown")
        else:
            raise BadRecord("channelType is not a string")

    uid = record.get("msgUID")
    if uid.__class__ is str and uid:
        native_id = uid
    elif uid is None:
        native_id = derived_native_id(record)
    else:
        raise BadRecord("msgUID is not a string")

    if "content" in record:
        native = record.copy()  # a dict from orjson: copy() skips dict()'s generic path
        content, encoding = content_from_value(native.pop("content"))
    else:
        native = record
        content, encoding = None, "none"
    return build_event(
        source=source,
        provider="rongcloud",
        native_id=native_id,
        kind=kind,
        type_=object_name,
        channel_type=channel_type,
        channel_id=recipient,
        sender=sender,
        recipient=recipient,
        sent_at=sent_at,
        fetched_at=fetched_at,
        content=content,
        content_encoding=encoding,
        seq=None,
        native=native,
    )
