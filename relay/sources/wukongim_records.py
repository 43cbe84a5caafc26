"""Parsing WuKongIM messages (``/message/sync``, ``/channel/messagesync``) into events.

A message: ``header``, ``setting``, ``message_id`` (global, the dedup key),
``client_msg_no``, ``message_seq``, ``from_uid``, ``channel_id``,
``channel_type`` (1 person, 2 group), ``timestamp`` (seconds), ``payload``
(standard base64). Command messages' ``channel_id`` carries a ``____cmd``
suffix, which the event's channel drops and ``native`` keeps.
"""

from __future__ import annotations

from typing import Any

import orjson

from relay.event import (
    ChannelType,
    ContentEncoding,
    JSONValue,
    Kind,
    build_event,
    content_from_bytes,
    decode_base64,
)

CMD_SUFFIX = "____cmd"
CHANNEL_TYPES: dict[int, ChannelType] = {1: "direct", 2: "group"}


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
    if isinstance(value, str) and value.isdigit():
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
    """The record's ``message_seq`` if it has a usable one (also for records that fail)."""
    if isinstance(record, dict):
        value = record.get("message_seq")
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def normalize(record: Any, *, source: str, kind: Kind, fetched_at: int) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise BadRecord(f"message is a {type(record).__name__}, not an object")
    message_id = _int(record, "message_id")
    seq = _int(record, "message_seq")
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
            data = decode_base64(payload)
        except ValueError as exc:
            raise BadRecord(f"payload: {exc}") from None
        content, encoding = content_from_bytes(data, payload)
    else:
        raise BadRecord("payload is not a base64 string")

    channel_id = raw_channel.removesuffix(CMD_SUFFIX)
    channel_type = CHANNEL_TYPES.get(channel_number, "unknown")
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
        recipient=channel_id,
        sent_at=int(seconds * 1000),
        fetched_at=fetched_at,
        content=content,
        content_encoding=encoding,
        seq=seq,
        native=native,
    )


def encode_error(body: Any) -> str:
    """WuKongIM's error body ``{"msg", "status"}`` as text for logs."""
    if isinstance(body, dict) and "msg" in body:
        return f"{body.get('status')}: {body.get('msg')}"
    return orjson.dumps(body).decode()[:200] if body is not None else ""
