"""Recovering the good records of an answer that does not parse as a whole.

One bad record must not cost its neighbours (SPEC §4, hostile world). A JSON
parser refuses a whole document for one record's sake: invalid UTF-8 inside a
string, nesting past its depth limit, an integer past 64 bits, ``NaN``. When
that happens the answer's record array is split into the byte spans of its
elements with a scanner that only tracks strings and brackets (so it has no
depth limit and does not care about encodings); each element is then parsed
on its own, and those that still fail are kept raw, byte for byte, for the
quarantine.

``complete`` says whether the array was closed: a cut-off answer still yields
its leading records, but a source that acknowledges "everything the last
answer held" (WuKongIM ``syncack``) must not acknowledge a cut-off one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

# A JSON string (escapes included) or one structural character; everything else
# (numbers, literals, white space) is skipped by finditer.
_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{},:]', re.DOTALL)


@dataclass(frozen=True, slots=True)
class Unparsed:
    """One element of an answer's array that is not JSON on its own."""

    raw: bytes
    error: str


@dataclass(frozen=True, slots=True)
class Salvaged:
    records: list[Any]  # parsed elements, in order, with Unparsed where one failed
    complete: bool  # the array was closed (the answer was not cut off)


def _elements(raw: bytes, key: bytes | None) -> tuple[list[tuple[int, int]], bool] | None:
    """Byte spans of the elements of the record array, and whether the array closed."""
    depth = 0
    # The array's own depth once entered: 1 at the top, 2 as the value of a top-level key.
    target = 1 if key is None else 2
    inside = False
    key_seen = False  # the previous string at depth 1 was the wanted key
    previous = b""
    begin = 0  # where the current element starts (after "[" or ",")
    spans: list[tuple[int, int]] = []
    for match in _TOKENS.finditer(raw):
        token = match.group()
        head = token[:1]
        if head == b'"':
            if key is not None and not inside and depth == 1 and previous in (b"{", b","):
                key_seen = token[1:-1] == key
            previous = head
            continue
        if head in (b"[", b"{"):
            if not inside and head == b"[" and depth == target - 1 and (
                    key is None or (key_seen and previous == b":")):
                inside = True
                begin = match.end()
            elif key is None and depth == 0:
                return None  # the answer is not an array
            depth += 1
        elif head in (b"]", b"}"):
            depth -= 1
            if inside and depth == target - 1:
                spans.append((begin, match.start()))
                return spans, True
        elif head == b"," and inside and depth == target:
            spans.append((begin, match.start()))
            begin = match.end()
        previous = head
    if not inside:
        return None
    spans.append((begin, len(raw)))
    return spans, False


def salvage(raw: bytes, key: str | None = None) -> Salvaged | None:
    """The records of ``raw``'s array (the top-level one, or the value of ``key``).

    None when no such array can be found at all (then the whole answer is the
    unit to quarantine).
    """
    found = _elements(raw, key.encode() if key is not None else None)
    if found is None:
        return None
    spans, complete = found
    records: list[Any] = []
    for begin, end in spans:
        piece = raw[begin:end].strip()
        if not piece:
            continue
        try:
            records.append(orjson.loads(piece))
        except orjson.JSONDecodeError as exc:
            records.append(Unparsed(piece, f"record is not valid JSON on its own: {exc}"))
    if not complete and records and isinstance(records[-1], Unparsed):
        # The cut-off tail is not a record the provider sent whole.
        last = records.pop()
        records.append(Unparsed(last.raw, "record cut off (the answer ended early)"))
    return Salvaged(records, complete)


def without_cut_off_tail(salvaged: Salvaged) -> list[Any]:
    """The records, minus a cut-off last one: for histories, which send it whole next time."""
    records = salvaged.records
    if not salvaged.complete and records and isinstance(records[-1], Unparsed):
        return records[:-1]
    return records


def dump_any(value: Any) -> bytes:
    """JSON of a parsed record, whatever its depth or contents (for the quarantine).

    orjson refuses nesting past about 254 levels and integers past 64 bits; the
    standard library recurses. This walks with an explicit stack, so a record
    that parsed can always be written back for an operator to inspect.
    """
    try:
        return orjson.dumps(value)
    except TypeError:
        pass
    out: list[bytes] = []
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, _Raw):
            out.append(item.text)
        elif isinstance(item, dict):
            out.append(b"{")
            pending: list[Any] = []
            for index, (key, inner) in enumerate(item.items()):
                prefix = b"," if index else b""
                pending += [_Raw(prefix + _scalar(str(key)) + b":"), inner]
            pending.append(_Raw(b"}"))
            stack.extend(reversed(pending))
        elif isinstance(item, list | tuple):
            out.append(b"[")
            pending = []
            for index, inner in enumerate(item):
                if index:
                    pending.append(_Raw(b","))
                pending.append(inner)
            pending.append(_Raw(b"]"))
            stack.extend(reversed(pending))
        else:
            out.append(_scalar(item))
    return b"".join(out)


@dataclass(frozen=True, slots=True)
class _Raw:
    text: bytes


def _scalar(value: Any) -> bytes:
    if isinstance(value, str):
        return orjson.dumps(value.encode("utf-8", "surrogatepass").decode("utf-8", "replace"))
    if isinstance(value, bool) or value is None:
        return orjson.dumps(value)
    if isinstance(value, int):
        return str(value).encode()
    if isinstance(value, float):
        return orjson.dumps(value)  # NaN and infinities become null
    return orjson.dumps(repr(value))
