"""``relay journal copy``: move a single-node installation's SQLite journal to PostgreSQL.

Everything the journal holds goes, with its keys unchanged: events (with their
seqs, so sink cursors keep meaning the same position), source cursors, sink
cursors, dead letters (with their replay marks), quarantined records and
pending control requests. The relay must be stopped: the source is opened as
its writer (its lock refuses a running relay).

One PostgreSQL transaction, holding the journal's commit lock: the target has
all of it or none of it. The target's sequences continue after the copied keys.

Which target is safe to write into:

* an empty one (no rows in any table, no seq ever handed out);
* one this very copy filled before (the same source journal's identity is
  recorded in it) that nothing wrote to since: running the copy again then
  changes nothing and says so;
* anything else only with ``replace=True`` (``--replace-target``), which empties
  it first: the relay(s) on it must be stopped, and what it held is gone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from relay.journal.base import JournalError
from relay.journal.postgres import Conn, PostgresJournal
from relay.journal.sqlite import SqliteJournal

CHUNK = 5000

# Tables with an integer key, copied in key order: (table, columns, key first).
_KEYED_BY_INT: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("events", ("seq", "id", "fetched_at", "routing", "payload")),
    ("quarantine", ("qid", "source", "endpoint", "received_at", "error", "raw")),
    ("dead_letters", ("dlid", "sink", "event_seq", "event_id", "error", "attempts",
                      "failed_at", "payload", "routing", "fetched_at", "replay")),
    ("control", ("cid", "sink", "action", "arg", "created_at")),
)
# Small tables keyed by text; the source's value wins.
_KEYED_BY_TEXT: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("cursors", ("key", "value", "updated_at")),
    ("sink_cursors", ("sink", "seq", "updated_at")),
)
_SERIALS = (("quarantine", "qid"), ("dead_letters", "dlid"), ("control", "cid"))
_ALL_TABLES = ("events", "cursors", "sink_cursors", "quarantine", "dead_letters", "control")


class CopyRefusedError(JournalError):
    """The target holds data this copy did not put there."""


@dataclass
class CopyReport:
    #: table -> (rows in the source, rows new in the target)
    tables: dict[str, tuple[int, int]] = field(default_factory=dict)
    replaced: bool = False
    again: bool = False  # the target already held an earlier copy of this source
    high_seq: int = 0


async def copy_journal(source: SqliteJournal, target: PostgresJournal, *,
                       replace: bool = False) -> CopyReport:
    """Copy everything ``source`` holds into ``target`` (see the module's docstring)."""
    source_id = await source.journal_id()
    high_seq = await source.high_seq()
    report = CopyReport(high_seq=high_seq)
    async with target.exclusive() as conn:
        state = await _target_state(conn)
        if state["empty"]:
            pass
        elif state["copied_from"] == source_id and not state["written_since"]:
            report.again = True
        elif replace:
            await conn.execute(f"TRUNCATE {', '.join(_ALL_TABLES)}")
            await conn.execute("DELETE FROM meta WHERE key LIKE 'copied_%' OR key = 'high_seq'")
            report.replaced = True
        else:
            raise CopyRefusedError(
                f"the target journal {target.location} is not empty ({state['summary']}) and"
                " was not filled by an earlier copy of this journal, or was written to since;"
                " give --replace-target to delete what it holds and copy anyway")
        for table, columns in _KEYED_BY_INT:
            report.tables[table] = await _copy_keyed_by_int(source, conn, table, columns)
        for table, columns in _KEYED_BY_TEXT:
            rows = await source.export_keyed(table, columns)
            written = await _load(conn, table, columns, rows, conflict=(
                f"({columns[0]}) DO UPDATE SET "
                + ", ".join(f"{c} = EXCLUDED.{c}" for c in columns[1:])))
            report.tables[table] = (len(rows), written)
        await _continue_sequences(conn, high_seq)
        now = int(time.time() * 1000)
        await conn.executemany(
            "INSERT INTO meta(key, value) VALUES ($1, $2)"
            " ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            [("copied_from", source_id), ("copied_at", now), ("copied_high_seq", high_seq)])
    return report


async def _copy_keyed_by_int(source: SqliteJournal, conn: Conn, table: str,
                             columns: tuple[str, ...]) -> tuple[int, int]:
    read = written = 0
    after = 0
    while True:
        rows = await source.export_rows(table, columns, after, CHUNK)
        if not rows:
            return read, written
        if table == "dead_letters":  # SQLite keeps the flag as 0/1
            rows = [(*r[:-1], bool(r[-1])) for r in rows]
        read += len(rows)
        written += await _load(conn, table, columns, rows, conflict="DO NOTHING")
        after = int(rows[-1][0])


async def _load(conn: Conn, table: str, columns: tuple[str, ...],
                rows: list[tuple[Any, ...]], *, conflict: str) -> int:
    """COPY into a scratch table, then INSERT what the target lacks (one round trip each)."""
    if not rows:
        return 0
    scratch = f"copy_{table}"
    await conn.execute(f"CREATE TEMP TABLE IF NOT EXISTS {scratch}"
                       f" (LIKE {table}) ON COMMIT DROP")
    await conn.execute(f"TRUNCATE {scratch}")
    await conn.copy_records_to_table(scratch, records=rows, columns=list(columns))
    names = ", ".join(columns)
    status = await conn.execute(
        f"INSERT INTO {table} ({names}) SELECT {names} FROM {scratch}"  # noqa: S608
        f" ON CONFLICT {conflict}")
    return int(status.rpartition(" ")[2])


async def _continue_sequences(conn: Conn, high_seq: int) -> None:
    """New rows in the target get keys after the copied ones (never a smaller seq)."""
    await conn.execute(
        "SELECT setval('event_seq', GREATEST((SELECT last_value FROM event_seq),"
        " (SELECT COALESCE(max(seq), 0) FROM events), $1::bigint, 1))", high_seq)
    await conn.execute(
        "INSERT INTO meta(key, value) VALUES ('high_seq', $1)"
        " ON CONFLICT (key) DO UPDATE SET value = GREATEST(meta.value, EXCLUDED.value)",
        high_seq)
    for table, column in _SERIALS:
        await conn.execute(
            f"SELECT setval(pg_get_serial_sequence('{table}', '{column}'),"  # noqa: S608
            f" GREATEST(COALESCE(max({column}), 0), 1), max({column}) IS NOT NULL)"
            f" FROM {table}")


async def _target_state(conn: Conn) -> dict[str, Any]:
    counts = {table: int(await conn.fetchval(f"SELECT count(*) FROM {table}"))  # noqa: S608
              for table in _ALL_TABLES}
    meta = {r[0]: int(r[1]) for r in await conn.fetch("SELECT key, value FROM meta")}
    last_seq = int(await conn.fetchval("SELECT last_value FROM event_seq"))
    used = bool(await conn.fetchval("SELECT is_called FROM event_seq"))
    copied_at = meta.get("copied_at", 0)
    # Anything a relay wrote after the copy: a later seq, or a newer row anywhere.
    newest = await conn.fetchval(
        "SELECT GREATEST((SELECT max(updated_at) FROM cursors),"
        " (SELECT max(updated_at) FROM sink_cursors), (SELECT max(failed_at) FROM dead_letters),"
        " (SELECT max(received_at) FROM quarantine), (SELECT max(created_at) FROM control))")
    written_since = (used and last_seq > meta.get("copied_high_seq", 0)) or \
        (newest is not None and int(newest) > copied_at)
    summary = ", ".join(f"{n} {t}" for t, n in counts.items() if n) or "seqs already handed out"
    return {"empty": not any(counts.values()) and not used and not meta.get("high_seq"),
            "copied_from": meta.get("copied_from"), "written_since": written_since,
            "summary": summary}


async def copy_sqlite_to_postgres(path: str, dsn: str, *, schema: str = "relay",
                                  replace: bool = False,
                                  secrets_: tuple[str, ...] = ()) -> tuple[CopyReport, str]:
    """Open both journals (the SQLite one as its writer: the relay must be stopped),
    copy, close; returns the report and where the target is (without its password)."""
    from relay.config import redacted_dsn

    location = f"{redacted_dsn(dsn)} (schema {schema})"
    source = SqliteJournal.open(path)
    try:
        target = await PostgresJournal.open(dsn, schema=schema, location=location,
                                            secrets_=secrets_, listen=False)
        try:
            report = await copy_journal(source, target, replace=replace)
        finally:
            await target.close()
    finally:
        await source.close()
    return report, location
