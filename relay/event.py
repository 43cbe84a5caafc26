"""The normalized event ``im-relay.event/1`` and the rules every source shares.

Sources build events as plain dicts (the hot path: tens of thousands per
second) through :func:`build_event`; :class:`Event` is the pydantic model the
shipped JSON Schema is generated from and that tests validate against. The
schema only ever gains optional fields; a breaking change is ``/2``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

SCHEMA_ID = "im-relay.event/1"

Provider = Literal["rongcloud", "wukongim", "leancloud"]
Kind = Literal["message", "presence", "command"]
ChannelType = Literal[
    "direct",
    "group",
    "chatroom",
    "discussion",
    "customer_service",
    "system",
    "public_service",
    "app_public_service",
    "service",
    "conversation",
    "unknown",
]
ContentEncoding = Literal["json", "text", "base64", "none"]

JSONValue = dict[str, Any] | list[Any] | str | None


class Channel(BaseModel):
    """Where the message was sent: the channel type and the provider's id for it."""

    model_config = ConfigDict(extra="forbid")

    type: ChannelType
    id: str


class Event(BaseModel):
    """One normalized IM event as it is journaled and delivered to every sink."""

    model_config = ConfigDict(
        extra="forbid",
        title="im-relay.event/1",
        json_schema_extra={"$id": "https://im-relay.dev/schema/event-1.json"},
    )

    schema_: Literal["im-relay.event/1"] = Field(alias="schema", description="Schema identifier.")
    id: str = Field(
        description="'{source}:{native_id}': stable across redeliveries and restarts; dedup key."
    )
    source: str = Field(description="The configured source name.")
    provider: Provider
    kind: Kind
    type: str = Field(description="The provider's message type, or ''.")
    channel: Channel
    conversation: str = Field(
        description="Direction-free key: 'direct:' + both user ids sorted and joined by '|', "
        "otherwise '{channel.type}:{channel.id}'."
    )
    sender: str = Field(description="Sender id ('' for system messages).")
    recipient: str | None = Field(description="Target user/channel id as the provider gives it.")
    sent_at: int = Field(description="Provider server time, ms since the epoch.")
    fetched_at: int = Field(description="When the relay received it, ms since the epoch.")
    content: dict[str, Any] | list[Any] | str | None = Field(
        description="Native content: parsed JSON object/array, else text, else base64, or null."
    )
    content_encoding: ContentEncoding
    seq: int | None = Field(description="Provider sequence number where there is one.")
    native: dict[str, Any] = Field(
        description="The provider's original record minus its content field, unchanged."
    )


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of :class:`Event`."""
    schema = Event.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


def event_id(source: str, native_id: str) -> str:
    return f"{source}:{native_id}"


def derived_native_id(record: dict[str, Any]) -> str:
    """A stable id for records that carry none (RongCloud chatroom join/leave).

    ``h`` + the first 32 hex digits of SHA-256 over the record's canonical JSON
    (sorted keys, no spaces, UTF-8): the same record redelivered gets the same id.
    """
    try:
        canonical = orjson.dumps(record, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # integers beyond 64 bits: the standard library handles them
        canonical = json.dumps(
            record, sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode("utf-8")
    return "h" + hashlib.sha256(canonical).hexdigest()[:32]


def conversation_key(channel_type: str, channel_id: str, sender: str, recipient: str | None) -> str:
    if channel_type == "direct":
        a, b = sorted((sender, recipient or ""))
        return f"direct:{a}|{b}"
    return f"{channel_type}:{channel_id}"


_CONTAINERS = (dict, list)


def content_from_text(text: str) -> tuple[JSONValue, ContentEncoding]:
    """Text that may hold a JSON object or array: parsed if it does, else kept as text."""
    stripped = text.lstrip()
    if stripped[:1] in ("{", "["):
        try:
            parsed = orjson.loads(text)
        except orjson.JSONDecodeError:
            return text, "text"
        if isinstance(parsed, _CONTAINERS):
            return parsed, "json"
    return text, "text"


def content_from_value(value: Any) -> tuple[JSONValue, ContentEncoding]:
    """A content field that may be absent, a JSON object/array, or a string."""
    if value is None:
        return None, "none"
    # A tuple of classes, not ``dict | list``, which builds a union at every call (once per
    # record on the hot path).
    if isinstance(value, _CONTAINERS):
        return value, "json"
    if isinstance(value, str):
        return content_from_text(value)
    # A number or boolean where content belongs: keep it, as its JSON text.
    return orjson.dumps(value).decode(), "text"


def content_from_base64(value: str) -> tuple[JSONValue, ContentEncoding]:
    """Content the wire carries as base64 (WuKongIM ``payload``, LeanCloud ``bin: true``).

    The one rule for every provider (SPEC §3): decode first; then a JSON object
    or array is parsed, other UTF-8 is text, anything else stays base64 (as given).
    Raises ValueError when ``value`` is not valid standard base64.
    """
    raw = decode_base64(value)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return value, "base64"
    return content_from_text(text)


def decode_base64(value: str) -> bytes:
    """Strict standard base64; raises ValueError on anything else."""
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"invalid base64: {exc}") from None


def build_event(
    *,
    source: str,
    provider: Provider,
    native_id: str,
    kind: Kind,
    type_: str,
    channel_type: ChannelType,
    channel_id: str,
    sender: str,
    recipient: str | None,
    sent_at: int,
    fetched_at: int,
    content: JSONValue,
    content_encoding: ContentEncoding,
    seq: int | None,
    native: dict[str, Any],
) -> dict[str, Any]:
    """The event as a plain dict, keys in schema order."""
    if channel_type == "direct":
        a, b = (sender, recipient or "") if sender <= (recipient or "") else (recipient, sender)
        conversation = f"direct:{a}|{b}"
    else:
        conversation = f"{channel_type}:{channel_id}"
    return {
        "schema": SCHEMA_ID,
        "id": f"{source}:{native_id}",
        "source": source,
        "provider": provider,
        "kind": kind,
        "type": type_,
        "channel": {"type": channel_type, "id": channel_id},
        "conversation": conversation,
        "sender": sender,
        "recipient": recipient,
        "sent_at": sent_at,
        "fetched_at": fetched_at,
        "content": content,
        "content_encoding": content_encoding,
        "seq": seq,
        "native": native,
    }
