"""WuKongIM messages → events, per SPEC §2.2 and §3 (pure logic)."""

from __future__ import annotations

import base64
import json

import pytest

from relay.sources.wukongim_records import (
    BadRecord,
    message_seq,
    normalize,
    parse_channel_answer,
    parse_sync_answer,
)


def message(**overrides: object) -> dict[str, object]:
    record: dict[str, object] = {
        "header": {"no_persist": 0, "red_dot": 0, "sync_once": 1},
        "setting": 0,
        "message_id": 122323343445,
        "client_msg_no": "xxxxx",
        "message_seq": 7,
        "from_uid": "u1",
        "channel_id": "g1____cmd",
        "channel_type": 2,
        "timestamp": 1223434512,
        "payload": base64.b64encode(json.dumps({"type": 99, "cmd": "sync"}).encode()).decode(),
    }
    record.update(overrides)
    return record


def test_command_message_mapping() -> None:
    record = message()
    event = normalize(record, source="wk", kind="command", fetched_at=5)
    assert event["id"] == "wk:122323343445"
    assert event["provider"] == "wukongim"
    assert event["kind"] == "command"
    assert event["type"] == "99"
    assert event["channel"] == {"type": "group", "id": "g1"}
    assert event["conversation"] == "group:g1"
    assert event["native"]["channel_id"] == "g1____cmd"
    assert "payload" not in event["native"]
    assert event["sent_at"] == 1223434512000
    assert event["seq"] == 7
    assert event["content"] == {"type": 99, "cmd": "sync"}
    assert event["content_encoding"] == "json"


def test_direct_and_unknown_channel_types() -> None:
    direct = normalize(message(channel_type=1, channel_id="u2", from_uid="u9"), source="wk",
                       kind="message", fetched_at=1)
    assert direct["channel"] == {"type": "direct", "id": "u2"}
    assert direct["conversation"] == "direct:u2|u9"
    other = normalize(message(channel_type=5), source="wk", kind="message", fetched_at=1)
    assert other["channel"]["type"] == "unknown"
    assert other["native"]["channel_type"] == 5


@pytest.mark.parametrize(
    ("raw", "content", "encoding"),
    [
        ("hello ✓".encode(), "hello ✓", "text"),
        (b"\xff\xfe\x01", base64.b64encode(b"\xff\xfe\x01").decode(), "base64"),
        (b"[1,2]", [1, 2], "json"),
    ],
)
def test_payload_decoding(raw: bytes, content: object, encoding: str) -> None:
    event = normalize(message(payload=base64.b64encode(raw).decode()), source="wk",
                      kind="command", fetched_at=1)
    assert (event["content"], event["content_encoding"]) == (content, encoding)
    assert event["type"] == ""


@pytest.mark.parametrize(
    "broken",
    [message(payload="not base64!"), message(message_id=None), message(timestamp="soon"),
     message(from_uid=None), message(channel_type="two"), "a string", 12],
)
def test_bad_messages_raise_badrecord(broken: object) -> None:
    with pytest.raises(BadRecord):
        normalize(broken, source="wk", kind="command", fetched_at=1)


def test_answer_shapes() -> None:
    assert parse_sync_answer([]) == []
    with pytest.raises(BadRecord):
        parse_sync_answer({"messages": []})
    assert parse_channel_answer({"messages": [1], "more": 1}) == ([1], True)
    assert parse_channel_answer({"start_message_seq": 0, "more": 0}) == ([], False)
    with pytest.raises(BadRecord):
        parse_channel_answer([])
    assert message_seq(message()) == 7
    assert message_seq({"message_seq": 0}) is None
    assert message_seq("x") is None
