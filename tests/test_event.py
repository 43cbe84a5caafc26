"""The normalized event: schema file, ids, conversation keys, content rules."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import jsonschema
import pytest

import relay
from relay.event import (
    build_event,
    content_from_base64,
    content_from_value,
    conversation_key,
    derived_native_id,
    json_schema,
)

SHIPPED = Path(relay.__file__).parent / "schema" / "event-1.schema.json"


def test_shipped_schema_matches_the_model() -> None:
    assert json.loads(SHIPPED.read_text()) == json_schema()


def test_schema_command_prints_the_shipped_schema(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from relay.cli import main

    result = CliRunner().invoke(main, ["schema"])
    assert result.exit_code == 0
    assert json.loads(result.output) == json.loads(SHIPPED.read_text())


def sample(**overrides: object) -> dict[str, object]:
    fields: dict[str, object] = dict(
        source="rc", provider="rongcloud", native_id="ABC", kind="message", type_="RC:TxtMsg",
        channel_type="direct", channel_id="u2", sender="u9", recipient="u2", sent_at=1,
        fetched_at=2, content={"content": "hi"}, content_encoding="json", seq=None,
        native={"msgUID": "ABC"},
    )
    fields.update(overrides)
    return build_event(**fields)  # type: ignore[arg-type]


def test_built_events_validate_against_the_schema() -> None:
    validator = jsonschema.Draft202012Validator(json_schema())
    event = sample()
    validator.validate(event)
    assert event["id"] == "rc:ABC"
    assert event["conversation"] == "direct:u2|u9"
    with pytest.raises(jsonschema.ValidationError):
        validator.validate({**event, "kind": "other"})
    with pytest.raises(jsonschema.ValidationError):
        validator.validate({**event, "unexpected": 1})


def test_conversation_is_direction_free_for_direct_and_keyed_by_channel_otherwise() -> None:
    assert conversation_key("direct", "b", "a", "b") == conversation_key("direct", "a", "b", "a")
    assert conversation_key("group", "g1", "u1", "g1") == "group:g1"


def test_derived_id_is_h_plus_32_hex_of_canonical_json() -> None:
    record = {"toUserId": "r1", "fromUserId": "u1", "msgTimestamp": "1", "objectName": "x"}
    canonical = '{"fromUserId":"u1","msgTimestamp":"1","objectName":"x","toUserId":"r1"}'
    expected = "h" + hashlib.sha256(canonical.encode()).hexdigest()[:32]
    assert derived_native_id(record) == expected
    assert derived_native_id(dict(reversed(list(record.items())))) == expected


@pytest.mark.parametrize(
    ("value", "content", "encoding"),
    [
        (None, None, "none"),
        ({"a": 1}, {"a": 1}, "json"),
        ([1, 2], [1, 2], "json"),
        ('{"a": 1}', {"a": 1}, "json"),
        ("  [1]", [1], "json"),
        ("hello", "hello", "text"),
        ("123", "123", "text"),
        ("{not json", "{not json", "text"),
        (42, "42", "text"),
    ],
)
def test_content_rules(value: object, content: object, encoding: str) -> None:
    assert content_from_value(value) == (content, encoding)


def test_base64_content_is_decoded_then_json_text_or_base64() -> None:
    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    assert content_from_base64(b64(b'{"k": "v"}')) == ({"k": "v"}, "json")
    assert content_from_base64(b64("héllo".encode())) == ("héllo", "text")
    blob = b64(b"\xff\xfe\x00")
    assert content_from_base64(blob) == (blob, "base64")
    with pytest.raises(ValueError, match="base64"):
        content_from_base64("not base64!")
