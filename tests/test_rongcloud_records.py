"""RongCloud answers → events, per SPEC §2.1 and §3 (pure logic)."""

from __future__ import annotations

import json

import pytest

from relay.event import derived_native_id
from relay.sources.rongcloud_records import BadRecord, normalize, parse_items

DOC_EXAMPLE = {
    "fromUserId": "877216513634336768",
    "toUserId": "881916345615646720",
    "msgTimestamp": "1499141156189",
    "timestamp": "1499141156189",
    "objectName": "app:lettermsgcontent",
    "content": {"content": "[Video]", "miniversion": 1, "readState": 1},
    "msgUID": "5EGN-HLDB-K4Q4-LQ1G",
    "channelType": "PERSON",
}
CHATROOM_EXAMPLE = {
    "fromUserId": "22810522",
    "toUserId": "10889854",
    "msgTimestamp": "1499097988346",
    "objectName": "func:leavechatroommsgcontent",
}


def test_documented_person_message() -> None:
    event = normalize(DOC_EXAMPLE, source="rc", endpoint="person", fetched_at=5)
    assert event["id"] == "rc:5EGN-HLDB-K4Q4-LQ1G"
    assert event["kind"] == "message"
    assert event["type"] == "app:lettermsgcontent"
    assert event["channel"] == {"type": "direct", "id": "881916345615646720"}
    assert event["conversation"] == "direct:877216513634336768|881916345615646720"
    assert event["sender"] == "877216513634336768"
    assert event["recipient"] == "881916345615646720"
    assert event["sent_at"] == 1499141156189
    assert event["fetched_at"] == 5
    assert event["content"] == DOC_EXAMPLE["content"]
    assert event["content_encoding"] == "json"
    assert event["seq"] is None
    assert event["native"] == {k: v for k, v in DOC_EXAMPLE.items() if k != "content"}


def test_documented_chatroom_event_gets_a_stable_derived_id() -> None:
    event = normalize(CHATROOM_EXAMPLE, source="rc", endpoint="chatroom", fetched_at=1)
    assert event["kind"] == "presence"
    assert event["channel"] == {"type": "chatroom", "id": "10889854"}
    assert event["conversation"] == "chatroom:10889854"
    assert event["id"] == "rc:" + derived_native_id(CHATROOM_EXAMPLE)
    assert event["id"].startswith("rc:h")
    assert len(event["id"]) == len("rc:h") + 32
    again = normalize(dict(CHATROOM_EXAMPLE), source="rc", endpoint="chatroom", fetched_at=99)
    assert again["id"] == event["id"]
    assert event["content"] is None
    assert event["content_encoding"] == "none"


@pytest.mark.parametrize(
    ("channel", "expected"),
    [("PERSON", "direct"), ("PERSONS", "discussion"), ("GROUP", "group"),
     ("TEMPGROUP", "chatroom"), ("CUSTOMERSERVICE", "customer_service"), ("NOTIFY", "system"),
     ("MC", "app_public_service"), ("MP", "public_service"), ("WHAT", "unknown"), ("3", "group")],
)
def test_channel_mapping(channel: str, expected: str) -> None:
    event = normalize({**DOC_EXAMPLE, "channelType": channel}, source="rc", endpoint="group",
                      fetched_at=1)
    assert event["channel"]["type"] == expected


def test_results_items_may_be_json_strings_and_contents_json_text() -> None:
    as_string = json.dumps({**DOC_EXAMPLE, "content": json.dumps({"content": "hi"})})
    text_content = json.dumps({**DOC_EXAMPLE, "content": "just text"})
    records, bad = parse_items({"results": [as_string, text_content, DOC_EXAMPLE], "size": 3})
    assert not bad
    events = [normalize(r, source="rc", endpoint="person", fetched_at=1) for r in records]
    assert events[0]["content"] == {"content": "hi"}
    assert events[0]["content_encoding"] == "json"
    assert (events[1]["content"], events[1]["content_encoding"]) == ("just text", "text")


def test_bad_items_are_reported_not_raised() -> None:
    records, bad = parse_items({"results": ["{not json", 42, DOC_EXAMPLE]})
    assert len(records) == 1
    assert len(bad) == 2
    with pytest.raises(BadRecord):
        parse_items({"code": 200})


@pytest.mark.parametrize(
    "broken",
    [
        {k: v for k, v in DOC_EXAMPLE.items() if k != "fromUserId"},
        {**DOC_EXAMPLE, "msgTimestamp": "yesterday", "timestamp": None},
        {**DOC_EXAMPLE, "msgUID": 12},
        {**DOC_EXAMPLE, "toUserId": ["x"]},
    ],
)
def test_records_that_cannot_be_normalized_raise_badrecord(broken: dict[str, object]) -> None:
    with pytest.raises(BadRecord):
        normalize(broken, source="rc", endpoint="person", fetched_at=1)
