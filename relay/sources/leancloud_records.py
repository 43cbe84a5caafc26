"""Parsing LeanCloud ``GET /1.2/rtm/messages`` answers into events.

A record: ``timestamp`` (ms), ``conv-id``, ``data``, ``from``, ``msg-id``,
``is-conv``, ``is-room``, ``to``, ``bin``, ``from-ip``. ``data`` is text —
often a rich message (JSON with ``_lctype``) — or base64 when ``bin`` is true,
decoded by the one content rule (SPEC §3): JSON, else UTF-8 text, else base64.
"""

from __future__ import annotations

from typing import Any

from relay.event import (
    ChannelType,
    ContentEncoding,
    JSONValue,
    build_event,
    content_from_base64,
    content_from_text,
)


class BadRecord(ValueError):
    """A record that cannot be normalized; it is quarantined, not dropped."""


def parse_answer(body: Any) -> list[Any]:
    if not isinstance(body, list):
        raise BadRecord("answer is not a JSON array")
    return body


def cursor_of(record: Any) -> tuple[int, str] | None:
    """The record's ``(timestamp, msg-id)`` if it has a usable one (also for bad records)."""
    if isinstance(record, dict):
        stamp, msg_id = record.get("timestamp"), record.get("msg-id")
        if isinstance(stamp, int) and not isinstance(stamp, bool) and isinstance(msg_id, str):
            return stamp, msg_id
    return None


def normalize(record: Any, *, source: str, fetched_at: int) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise BadRecord(f"record is a {type(record).__name__}, not an object")
    msg_id = record.get("msg-id")
    if not isinstance(msg_id, str) or not msg_id:
        raise BadRecord("msg-id is missing or not a string")
    stamp = record.get("timestamp")
    if not isinstance(stamp, int) or isinstance(stamp, bool):
        raise BadRecord("timestamp is not a millisecond number")
    conv = record.get("conv-id")
    if not isinstance(conv, str):
        raise BadRecord("conv-id is missing or not a string")
    sender = record.get("from")
    if not isinstance(sender, str):
        raise BadRecord("from is missing or not a string")
    recipient = record.get("to")
    if recipient is not None and not isinstance(recipient, str):
        recipient = str(recipient)

    data = record.get("data")
    content: JSONValue
    encoding: ContentEncoding
    if data is None:
        content, encoding = None, "none"
    elif not isinstance(data, str):
        raise BadRecord("data is not a string")
    elif record.get("bin") is True:
        try:
            content, encoding = content_from_base64(data)
        except ValueError as exc:
            raise BadRecord(f"data (bin: true): {exc}") from None
    else:
        content, encoding = content_from_text(data)
    type_ = ""
    if isinstance(content, dict):
        lctype = content.get("_lctype")
        if isinstance(lctype, int | str) and not isinstance(lctype, bool):
            type_ = str(lctype)
    channel_type: ChannelType = "chatroom" if record.get("is-room") is True else "conversation"
    native = {k: v for k, v in record.items() if k != "data"}
    return build_event(
        source=source,
        provider="leancloud",
        native_id=msg_id,
        kind="message",
        type_=type_,
        channel_type=channel_type,
        channel_id=conv,
        sender=sender,
        recipient=recipient,
        sent_at=stamp,
        fetched_at=fetched_at,
        content=content,
        content_encoding=encoding,
        seq=None,
        native=native,
    )
