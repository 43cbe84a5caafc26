"""Property-based: malformed provider payloads never crash a parser; every bad record is counted.

Each provider's answer parser and record normalizer is fed arbitrary JSON-like
values and mutated versions of valid records. The contract: it either returns
an event that validates against the schema, or raises the module's BadRecord
(which the source turns into a quarantined, counted record) — nothing else.
"""

from __future__ import annotations

import base64
import contextlib
import json
from typing import Any

import jsonschema
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.event import json_schema
from relay.sources import leancloud_records, rongcloud_records, wukongim_records

VALIDATOR = jsonschema.Draft202012Validator(json_schema())
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | \
    st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=30)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10),
                                                                        children, max_size=4),
    max_leaves=12,
)

RC_VALID = {"fromUserId": "u1", "toUserId": "u2", "msgTimestamp": "1499141156189",
            "objectName": "RC:TxtMsg", "content": {"content": "hi"}, "msgUID": "A-B-C-D",
            "channelType": "PERSON"}
WK_VALID = {"header": {"sync_once": 1}, "message_id": 5, "message_seq": 1, "from_uid": "u1",
            "channel_id": "g1____cmd", "channel_type": 2, "timestamp": 1700000000,
            "payload": base64.b64encode(b'{"type":1}').decode()}
LC_VALID = {"timestamp": 1408008498571, "conv-id": "c1", "data": "hi", "from": "u1",
            "msg-id": "m1", "is-conv": True, "is-room": False, "to": "c1", "bin": False}


def mutated(valid: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """A valid record with some fields replaced by arbitrary values or removed."""
    keys = list(valid)
    return st.tuples(
        st.dictionaries(st.sampled_from(keys), json_values, max_size=len(keys)),
        st.sets(st.sampled_from(keys), max_size=3),
    ).map(lambda change: {k: v for k, v in {**valid, **change[0]}.items() if k not in change[1]})


def check(normalize: Any, bad: type[Exception], record: Any, **kwargs: Any) -> None:
    try:
        event = normalize(record, **kwargs)
    except bad:
        return
    VALIDATOR.validate(json.loads(json.dumps(event)))


@SETTINGS
@given(st.one_of(json_values, mutated(RC_VALID), st.builds(json.dumps, mutated(RC_VALID))),
       st.sampled_from(["person", "group", "chatroom"]))
def test_rongcloud_records(item: Any, endpoint: str) -> None:
    try:
        records, bad = rongcloud_records.parse_items({"results": [item]})
    except rongcloud_records.BadRecord:
        return
    assert len(records) + len(bad) == 1  # every item is accounted for
    for record in records:
        check(rongcloud_records.normalize, rongcloud_records.BadRecord, record,
              source="rc", endpoint=endpoint, fetched_at=1)


@SETTINGS
@given(json_values)
def test_rongcloud_answers(body: Any) -> None:
    try:
        records, bad = rongcloud_records.parse_items(body)
    except rongcloud_records.BadRecord:
        return
    assert len(records) + len(bad) == len(body["results"])


@SETTINGS
@given(st.one_of(json_values, mutated(WK_VALID)), st.sampled_from(["command", "message"]))
def test_wukongim_records(record: Any, kind: str) -> None:
    check(wukongim_records.normalize, wukongim_records.BadRecord, record,
          source="wk", kind=kind, fetched_at=1)


@SETTINGS
@given(json_values)
def test_wukongim_answers(body: Any) -> None:
    for parse in (wukongim_records.parse_sync_answer, wukongim_records.parse_channel_answer):
        with contextlib.suppress(wukongim_records.BadRecord):
            parse(body)


@SETTINGS
@given(st.one_of(json_values, mutated(LC_VALID)))
def test_leancloud_records(record: Any) -> None:
    check(leancloud_records.normalize, leancloud_records.BadRecord, record,
          source="lc", fetched_at=1)
    leancloud_records.cursor_of(record)


@SETTINGS
@given(st.binary(max_size=64))
def test_wukongim_arbitrary_payload_bytes(raw: bytes) -> None:
    record = {**WK_VALID, "payload": base64.b64encode(raw).decode()}
    event = wukongim_records.normalize(record, source="wk", kind="command", fetched_at=1)
    VALIDATOR.validate(json.loads(json.dumps(event)))
    if event["content_encoding"] == "base64":
        assert base64.b64decode(event["content"]) == raw
