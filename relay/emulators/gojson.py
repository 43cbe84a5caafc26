"""What Go's ``encoding/json`` says about a request body, for emulating Go servers.

Go servers such as WuKongIM bind a request with ``json.NewDecoder(body).Decode(&req)``
and answer the error text as it is. That decoder reads only the first JSON value (what
follows is ignored), matches keys to fields exactly or else case-insensitively, leaves
absent or ``null`` fields at their zero value and reports the first value that does not
fit its field's type. Its texts are reproduced here: ``EOF`` for an empty body,
``unexpected EOF`` for a truncated one, ``invalid character ...`` for bad syntax and
``json: cannot unmarshal ...`` for a type mismatch (the texts of bad syntax are close,
not always identical: Go's scanner names more contexts than Python's parser reports).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


class GoDecodeError(ValueError):
    """The error text Go's decoder would have returned."""


@dataclass(frozen=True)
class GoField:
    json_name: str
    go_name: str
    type_name: str  # as Go prints it: "string", "int", "uint64", "uint8", "api.PullMode"
    kind: str = ""  # "string", "int" or "uint"; derived from type_name when empty
    bits: int = 64

    @property
    def base(self) -> str:
        if self.kind:
            return self.kind
        return "string" if self.type_name == "string" else \
            "uint" if self.type_name.startswith("uint") else "int"

    def zero(self) -> object:
        return "" if self.base == "string" else 0


@dataclass(frozen=True)
class GoStruct:
    package: str
    name: str  # "" for an anonymous struct
    fields: Sequence[GoField]

    @property
    def type_string(self) -> str:
        if self.name:
            return f"{self.package}.{self.name}"
        members = "; ".join(
            f'{f.go_name} {f.type_name} "json:\\"{f.json_name}\\""' for f in self.fields)
        return "struct { " + members + " }"

    def decode(self, raw: bytes) -> dict[str, Any]:
        """The struct's fields (zero values where absent), or :class:`GoDecodeError`."""
        value = _first_value(raw.decode("utf-8", errors="replace"))
        result = {f.json_name: f.zero() for f in self.fields}
        if value is None:
            return result
        if not isinstance(value, dict):
            raise GoDecodeError(f"json: cannot unmarshal {_kind(value)} into Go value of type "
                                f"{self.type_string}")
        exact = {f.json_name: f for f in self.fields}
        folded = {f.json_name.lower(): f for f in self.fields}
        first_error: str | None = None
        for key, item in value.items():
            field = exact.get(key) or folded.get(key.lower())
            if field is None or item is None:
                continue
            problem = _mismatch(field, item)
            if problem is not None:
                first_error = first_error or (
                    f"json: cannot unmarshal {problem} into Go struct field "
                    f"{self.name}.{field.json_name} of type {field.type_name}")
                continue
            result[field.json_name] = int(item) if field.base != "string" else item
        if first_error is not None:
            raise GoDecodeError(first_error)
        return result


class _Float(float):
    """A JSON number with a fraction or exponent, remembering how it was written."""

    text: str


def _parse_float(text: str) -> _Float:
    number = _Float(text)
    number.text = text
    return number


def _refuse_constant(text: str) -> None:
    # Python reads NaN and Infinity; Go's scanner stops at their first letter.
    raise GoDecodeError(f"invalid character '{text[0]}' looking for beginning of value")


_DECODER = json.JSONDecoder(parse_float=_parse_float, parse_constant=_refuse_constant)


def _first_value(text: str) -> Any:
    stripped = text.lstrip(" \t\r\n")
    if not stripped:
        raise GoDecodeError("EOF")
    try:
        value, _end = _DECODER.raw_decode(stripped)
    except json.JSONDecodeError as exc:
        raise GoDecodeError(_syntax_error(stripped, exc)) from None
    return value


def _syntax_error(text: str, exc: json.JSONDecodeError) -> str:
    if exc.pos >= len(text) or exc.msg.startswith("Unterminated string"):
        return "unexpected EOF"
    char = _quote_char(text[exc.pos])
    if exc.msg.startswith("Invalid control character"):
        return f"invalid character {char} in string literal"
    if exc.msg.startswith("Invalid \\escape"):
        return f"invalid character {_quote_char(text[exc.pos + 1])} in string escape code" \
            if exc.pos + 1 < len(text) else "unexpected EOF"
    if exc.msg.startswith("Expecting ':'"):
        return f"invalid character {char} after object key"
    if exc.msg.startswith("Expecting property name"):
        return f"invalid character {char} looking for beginning of object key string"
    if exc.msg.startswith("Expecting ','"):
        inside = _innermost_container(text, exc.pos)
        where = "array element" if inside == "[" else "object key:value pair"
        return f"invalid character {char} after {where}"
    return f"invalid character {char} looking for beginning of value"


def _quote_char(char: str) -> str:
    # Go's quoteChar: strconv.Quote of the character inside single quotes.
    if char == "'":
        return "'\\''"
    if char == '"':
        return "'\"'"
    return "'" + json.dumps(char, ensure_ascii=False)[1:-1] + "'"


def _innermost_container(text: str, pos: int) -> str:
    stack: list[str] = []
    in_string = escaped = False
    for char in text[:pos]:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            stack.append(char)
        elif char in "]}" and stack:
            stack.pop()
    return stack[-1] if stack else ""


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _mismatch(field: GoField, value: object) -> str | None:
    """What Go's error calls a value that does not fit the field, or None if it fits."""
    kind = _kind(value)
    if field.base == "string":
        return None if kind == "string" else kind
    if kind != "number":
        return kind
    literal = value.text if isinstance(value, _Float) else str(value)
    if isinstance(value, float):
        return f"number {literal}"  # ParseInt/ParseUint refuse a fraction or exponent
    assert isinstance(value, int)
    if field.base == "uint":
        fits = 0 <= value < 1 << field.bits
    else:
        fits = -(1 << (field.bits - 1)) <= value < 1 << (field.bits - 1)
    return None if fits else f"number {literal}"
